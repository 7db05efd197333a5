"""KV storage: where a cache's keys and values live, apart from the policy that picks which tokens stay.

A cache (cache.KVCache and its strategies) owns the policy state: `pos` (each slot's token position,
-1 = empty), budgets, scores. Its store owns the key/value content of the slots and the decode attention
over them; every policy calls the same five methods, so any policy runs on any store:
    prefill(k, v, pos, now, owner)        the slots' content after the prompt
    advance(pos, now)                     start of a decode step (QuantStore flushes its residual here)
    write(slot, k_new, v_new, drop, now)  the new token into slot [B, H_kv] (drop: it was not kept)
    attend(qg, pos, now, runs=, mask=)    decode attention over each head's run of slots (CUDA) or a mask
    attend_gather(qg, pos, now, idx, ok)  a retrieval selection; attend_with_new: plus probabilities
Layouts: `rows` code rows per sequence: n_kv (one per KV head, [B, H_kv, S]) or 1 (HeadBudgetCache's flat
buffer, every head a run of it; a head's row index is then 0).

DenseStore: k, v [B, rows, S, D] in the model dtype. QuantStore: KIVI (Liu et al. 2024, arXiv 2402.02750),
asymmetric min/max integer codes at 2/4/8 bits, bit-packed along head_dim into uint8; keys per CHANNEL over
groups of G slots, values per TOKEN over groups of G channels; scale and zero point in the model dtype;
the newest tokens (positions >= the frontier F = (now + 1 - R) // G * G, i.e. R to R + G - 1 of them) stay in a
full-precision ring of R + G entries per KV head, and are flushed into codes a group of G positions at a time.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def pack_codes(codes, bits):
    """codes [..., D] integers in [0, 2^bits) -> [..., D * bits / 8] uint8: channel d in byte d // (8 / bits),
    bits (d % (8 / bits)) * bits and up (little end first)."""
    per = 8 // bits
    c = codes.to(torch.uint8).view(*codes.shape[:-1], -1, per)
    out = c[..., 0]
    for i in range(1, per):
        out = out | (c[..., i] << (i * bits))
    return out


def unpack_codes(packed, bits):
    """pack_codes' inverse: [..., D * bits / 8] uint8 -> [..., D] uint8."""
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
    return ((packed[..., None] >> shifts) & ((1 << bits) - 1)).flatten(-2)


def minmax_quantize(x, mn, mx, bits, dtype):
    """x [..., n] on the grid [mn, mx] (broadcast) -> (codes, scale, zero): scale and zero rounded to the
    model dtype first, so codes * scale + zero is what dequantization gives. A flat range: scale 0, codes 0."""
    qmax = (1 << bits) - 1
    zero = mn.to(dtype)
    scale = ((mx - zero.float()) / qmax).to(dtype)
    s = scale.float()
    codes = ((x.float() - zero.float()) / torch.where(s > 0, s, 1.0)).round().clamp(0, qmax)
    return codes.masked_fill(s == 0, 0), scale, zero


def dequantize(codes, scale, zero):
    return codes.float() * scale.float() + zero.float()


class DenseStore(nn.Module):
    """Keys and values in the model dtype: k, v [B, rows, S, D]."""
    quantized = False

    def __init__(self, batch, n_kv, rows, slots, head_dim, dtype):
        super().__init__()
        self.n_kv, self.rows, self.n_slots, self.head_dim, self.dtype = n_kv, rows, slots, head_dim, dtype
        self.register_buffer("k", torch.zeros(batch, rows, slots, head_dim, dtype=dtype))
        self.register_buffer("v", torch.zeros(batch, rows, slots, head_dim, dtype=dtype))

    def row_bytes(self) -> float:
        """Bytes one (KV head, token) row of K and V occupies (read_bytes)."""
        return 2 * self.head_dim * self.k.element_size()

    def keys(self):
        return self.k

    def values(self):
        return self.v

    def prefill(self, k, v, pos, now, owner=None):
        n = k.shape[2]
        self.k[:, :, :n] = k
        self.v[:, :, :n] = v

    def advance(self, pos, now):
        pass

    def write(self, slot, k_new, v_new, drop, now):
        """index_put_ (not scatter_) so that inductor updates the buffers in place: a scatter_ into a
        graph input can be functionalised into a full copy of the cache every step."""
        b, h, s = index_grid(slot, self.rows)
        for buf, new in ((self.k, k_new), (self.v, v_new)):
            buf[b, h, s] = torch.where(drop[..., None], buf[b, h, s], new)

    def heads(self, x, H):
        return x if x.shape[1] == H else x.expand(x.shape[0], H, *x.shape[2:])  # flat: stride-0 heads

    def attend(self, qg, pos, now, runs=None, mask=None):
        """qg [B, H, G, D] over each head's run (start, length) = runs [B, H, 2] of slots whose pos >= 0
        (CUDA), or over mask [B, H, S] (CPU: callers pass run_mask(runs, pos)); pos [B, rows, S]."""
        B, H = qg.shape[:2]
        k, v = self.heads(self.k, H), self.heads(self.v, H)
        if mask is not None:
            return F.scaled_dot_product_attention(qg, k, v, attn_mask=mask[:, :, None, :])
        from triton_kernels import dense_attend  # Triton: imported only on CUDA
        return dense_attend(qg, k, v, self.heads(pos, H), runs, pos.shape[-1])

    def attend_gather(self, qg, pos, now, idx, ok):
        from triton_kernels import gather_attend  # Triton: imported only on CUDA
        return gather_attend(qg, self.k, self.v, idx, ok)

    def attend_with_new(self, qg, pos, now, k_new, v_new):
        """Attention over the filled slots plus the new token, and the group-mean probabilities
        [B, H, S + 1] fp32 (cached slots, then the new token). CUDA: one Triton pass that stores the logits."""
        if qg.is_cuda:
            from triton_kernels import attend_scores  # Triton: imported only on CUDA
            return attend_scores(qg, self.k, self.v, pos, k_new, v_new)
        return attend_new_torch(qg, self.k, self.v, pos >= 0, k_new, v_new)


def attend_new_torch(qg, k, v, filled, k_new, v_new):
    """CPU attend_with_new over k/v [B, H, N, D] where filled [B, H, N], plus the new token."""
    scale = 1.0 / math.sqrt(qg.shape[-1])
    logits = torch.cat([qg.float() @ k.float().transpose(-1, -2), qg.float() @ k_new.float().transpose(-1, -2)], -1)
    logits = logits * scale
    logits[..., :-1] = logits[..., :-1].masked_fill(~filled[:, :, None, :], -math.inf)
    probs = logits.softmax(dim=-1)
    out = probs[..., :-1] @ v.float() + probs[..., -1:] * v_new.float()
    return out.to(qg.dtype), probs.mean(dim=2)


def index_grid(slot, rows):
    """(b [B, 1], row [1, H] or [1, 1], slot): buf[b, row, slot] is one slot per (sequence, KV head); a flat
    store (rows = 1) has every head in row 0."""
    b = torch.arange(slot.shape[0], device=slot.device)[:, None]
    h = torch.arange(slot.shape[1], device=slot.device)[None, :]
    return b, (h if rows > 1 else torch.zeros_like(h)), slot


def run_mask(runs, pos):
    """[B, H, S]: slot s in head h's run start .. start + length - 1 and filled; pos [B, rows, S]."""
    s = torch.arange(pos.shape[-1], device=pos.device)
    start, length = runs[..., :1], runs[..., 1:]
    return (s >= start) & (s < start + length) & (pos >= 0)

