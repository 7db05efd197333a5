"""KV storage: where a cache's keys and values live, apart from the policy that picks which tokens stay.

A cache (cache.KVCache and its strategies) owns the policy state: `pos` (each slot's token position,
-1 = empty), budgets, scores. Its store owns the key/value content of the slots and the decode attention
over them; every policy calls the same five methods, so any policy runs on any store:
    prefill(k, v, pos, now, owner)        the slots' content after the prompt
    advance(pos, now)                     start of a decode step (QuantStore flushes its residual here)
    write(slot, k_new, v_new, drop, now)  the new token into slot [B, H_kv] (drop: it was not kept; None: never)
    attend(qg, pos, now, runs=, mask=)    decode attention over each head's run of slots (CUDA) or a mask
    attend_gather(qg, pos, now, idx, ok)  a retrieval selection; attend_with_new: plus probabilities
Layouts: `rows` code rows per sequence: n_kv (one per KV head, [B, H_kv, S]) or 1 (HeadBudgetCache's flat
buffer, every head a run of it; a head's row index is then 0).

DenseStore: k, v [B, rows, S, D] in the model dtype (two views of one buffer). QuantStore: KIVI (Liu et al.
2024, arXiv 2402.02750), asymmetric min/max integer codes at 2/4/8 bits, bit-packed along head_dim into uint8;
keys per CHANNEL over groups of G slots, values per TOKEN over groups of G channels; scale and zero point in the
model dtype; the newest tokens stay in a full-precision ring of R + G entries per KV head. Where slot = position
(aligned), positions >= the frontier F = (now + 1 - R) // G * G (R to R + G - 1 tokens) are in the ring and are
flushed into codes a whole key group of G positions at a time, as KIVI does. An evicting or appending policy
writes slots out of position order, so a key group collects tokens over time: there the ring holds the newest R
and one token is flushed a step, re-quantizing its slot's group with a range that only widens (a departure from
KIVI, whose groups are never revisited); on CUDA one Triton launch does it (triton_kernels.quant_flush).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# 4-bit codes are packed planar: byte j holds channels j and j + D / 2, so each of the kernel's two pieces of a row
# is a half of the channels, contiguous (its query slice, key scales and output columns load and store as vectors):
# the 4-bit kernel took 219 against 283 us at 32k x 8 with channel pairs in a byte (BENCHMARKS.md, session 15). At 2
# bits the planar kernel was slower (401 against 266 us), so 2- and 8-bit bytes hold consecutive channels.
PLANAR_BITS = (4,)


def pack_codes(codes, bits):
    """codes [..., D] integers in [0, 2^bits) -> [..., D * bits / 8] uint8, piece i of a byte at bits i * bits
    and up (little end first), per = 8 / bits pieces a byte: planar (PLANAR_BITS), byte j's piece i is channel
    i * D / per + j; otherwise channel d is in byte d // per, piece d % per."""
    per = 8 // bits
    c = codes.to(torch.uint8)
    c = c.unflatten(-1, (per, -1)).transpose(-1, -2) if bits in PLANAR_BITS else c.unflatten(-1, (-1, per))
    out = c[..., 0]
    for i in range(1, per):
        out = out | (c[..., i] << (i * bits))
    return out


def unpack_codes(packed, bits):
    """pack_codes' inverse: [..., D * bits / 8] uint8 -> [..., D] uint8."""
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
    c = (packed[..., None] >> shifts) & ((1 << bits) - 1)  # [..., D bits / 8, pieces]
    return (c.transpose(-1, -2) if bits in PLANAR_BITS else c).flatten(-2)


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
    """Keys and values in the model dtype: k, v [B, rows, S, D] (kv[0], kv[1]). symbolic: the slot count is a
    symbol in the compiled step (generate.SymbolicSlots sets it; the kernels then plan without specialising it)."""
    quantized = False
    symbolic = False

    def __init__(self, batch, n_kv, rows, slots, head_dim, dtype):
        super().__init__()
        self.n_kv, self.rows, self.n_slots, self.head_dim, self.dtype = n_kv, rows, slots, head_dim, dtype
        # keys then values in one buffer, so a decode step writes both in one index_put (one kernel, not two)
        self.register_buffer("kv", torch.zeros(2, batch, rows, slots, head_dim, dtype=dtype))

    @property
    def k(self):
        return self.kv[0]

    @property
    def v(self):
        return self.kv[1]

    def row_bytes(self) -> float:
        """Bytes one (KV head, token) row of K and V occupies (read_bytes)."""
        return 2 * self.head_dim * self.k.element_size()

    def residual_bytes(self) -> int:
        """Bytes a decode step reads besides the attended rows (QuantStore: its full-precision residual)."""
        return 0

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
        kv = torch.arange(2, device=slot.device)[:, None, None]
        new = torch.stack([k_new, v_new])
        self.kv[kv, b, h, s] = new if drop is None else torch.where(drop[..., None], self.kv[kv, b, h, s], new)

    def heads(self, x, H):
        return x if x.shape[1] == H else x.expand(x.shape[0], H, *x.shape[2:])  # flat: stride-0 heads

    def attend(self, qg, pos, now, runs=None, mask=None):
        """qg [B, H, G, D] over each head's run (start, length) = runs [B, H, 2] of slots whose pos >= 0, or
        over mask [B, H, S] if given; pos [B, rows, S]. CUDA reads the runs in place, CPU masks them."""
        B, H = qg.shape[:2]
        k, v = self.heads(self.k, H), self.heads(self.v, H)
        if mask is None and not qg.is_cuda:
            mask = run_mask(runs, pos)
        if mask is not None:
            return F.scaled_dot_product_attention(qg, k, v, attn_mask=mask[:, :, None, :])
        from triton_kernels import dense_attend  # Triton: imported only on CUDA
        # a flat store (one row shared by H heads' runs of different lengths): each run split by its own length
        return dense_attend(qg, k, v, self.heads(pos, H), runs, pos.shape[-1], self.rows == 1 and H > 1,
                            self.symbolic)

    def attend_gather(self, qg, pos, now, idx, ok):
        from triton_kernels import gather_attend  # Triton: imported only on CUDA
        return gather_attend(qg, self.k, self.v, idx, ok)

    def attend_with_new(self, qg, pos, now, k_new, v_new):
        """Attention over the filled slots plus the new token, and the group-mean probabilities
        [B, H, S + 1] fp32 (cached slots, then the new token). CUDA: one Triton pass that stores the logits."""
        if qg.is_cuda:
            from triton_kernels import attend_scores  # Triton: imported only on CUDA
            return attend_scores(qg, self.k, self.v, pos, k_new, v_new, self.symbolic)
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


class QuantStore(nn.Module):
    """KIVI's quantized K/V (module docstring): codes kq, vq [B, rows, S', D bits / 8] uint8; key scale and
    zero ks, kz [B, rows, S' / G, D] (per channel, per group of G slots); value scale and zero vs, vz
    [B, rows, S', D / G] (per token, per group of G channels); the full-precision residual rk, rv
    [B, H_kv, R + G, D], entry p % (R + G) holding position p (rpos) and its slot (rslot); `front` [B] the
    frontier. S' = S rounded up to whole groups, plus one spare group that absorbs the writes a step does
    not make (index_put_ with duplicate indices is unordered, so a skipped write must go elsewhere)."""
    quantized = True
    flush_kernel = None  # None: advance's unaligned flush in Triton on CUDA (flush_in_kernel)

    def __init__(self, batch, n_kv, rows, slots, head_dim, dtype, bits, group, residual, aligned):
        super().__init__()
        if bits not in (2, 4, 8) or group < 1 or head_dim % group or residual < group or residual % group:
            raise ValueError(f"--kv_bits {bits} --kv_group {group} --kv_residual {residual}: bits must be 2, 4 or 8, "
                             f"the group must divide head_dim ({head_dim}) and the residual be a multiple of the group, "
                             f"at least one group (the newest token enters through it)")
        self.n_kv, self.rows, self.n_slots, self.head_dim, self.dtype = n_kv, rows, slots, head_dim, dtype
        # a residual past the cache's slots would only cost bytes; at least one group: the newest token enters
        # through it (with none, it was flushed before it was written)
        residual = max(group, min(residual, slots // group * group))
        self.bits, self.G, self.R, self.Rr, self.aligned = bits, group, residual, residual + group, aligned
        S = -(-slots // group) * group + group
        self.spare = S // group - 1  # the spare group
        B, D, Dp = batch, head_dim, head_dim * bits // 8
        self.register_buffer("kq", torch.zeros(B, rows, S, Dp, dtype=torch.uint8))
        self.register_buffer("ks", torch.zeros(B, rows, S // group, D, dtype=dtype))
        self.register_buffer("kz", torch.zeros(B, rows, S // group, D, dtype=dtype))
        self.register_buffer("vq", torch.zeros(B, rows, S, Dp, dtype=torch.uint8))
        self.register_buffer("vs", torch.zeros(B, rows, S, D // group, dtype=dtype))
        self.register_buffer("vz", torch.zeros(B, rows, S, D // group, dtype=dtype))
        self.register_buffer("rk", torch.zeros(B, n_kv, self.Rr, D, dtype=dtype))
        self.register_buffer("rv", torch.zeros(B, n_kv, self.Rr, D, dtype=dtype))
        self.register_buffer("rslot", torch.full((B, n_kv, self.Rr), -1, dtype=torch.long))
        self.register_buffer("rpos", torch.full((B, n_kv, self.Rr), -1, dtype=torch.long))
        self.register_buffer("front", torch.zeros(B, dtype=torch.long))

    def row_bytes(self) -> float:
        e = torch.finfo(self.dtype).bits // 8
        return 2 * self.head_dim * self.bits / 8 + 2 * e * (self.head_dim / self.G + self.head_dim / self.G)

    def residual_bytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in (self.rk, self.rv, self.rslot, self.rpos))

    def frontier(self, now):
        """Positions below it are in codes, the rest in the residual. Aligned: the newest R .. R + G - 1 tokens,
        flushed a whole key group at a time (KIVI); otherwise the newest R, one token flushed a step."""
        if not self.aligned:
            return (now + 1 - self.R).clamp(min=0)
        return (torch.div(now + 1 - self.R, self.G, rounding_mode="floor") * self.G).clamp(min=0)

    def code_row(self, h):
        return h if self.rows > 1 else torch.zeros_like(h)

    def row_gather(self, t, idx):
        """t [B, rows, S] at idx [B, H, X] (each head's code row) -> [B, H, X]."""
        return t.expand(t.shape[0], idx.shape[1], t.shape[2]).gather(2, idx)

    # ---- quantization --------------------------------------------------------------------------
    def quantize_keys(self, x, inc, lo=None, hi=None):
        """x [..., G, D] one key group per row, inc [..., G] the members counted -> codes [..., G, D], scale
        and zero [..., D]. lo/hi [..., D]: a range the group must keep covering (re-quantization widens only)."""
        xf = x.float()
        mn = xf.masked_fill(~inc[..., None], math.inf).amin(-2)
        mx = xf.masked_fill(~inc[..., None], -math.inf).amax(-2)
        if lo is not None:
            mn, mx = torch.minimum(mn, lo), torch.maximum(mx, hi)
        empty = torch.isinf(mn)
        mn, mx = mn.masked_fill(empty, 0), mx.masked_fill(empty, 0)
        codes, scale, zero = minmax_quantize(xf, mn[..., None, :], mx[..., None, :], self.bits, self.dtype)
        return codes, scale[..., 0, :], zero[..., 0, :]

    def quantize_values(self, v):
        """v [..., D] -> codes [..., D], scale and zero [..., D / G] (per token, groups of G channels)."""
        vv = v.float().unflatten(-1, (-1, self.G))
        codes, scale, zero = minmax_quantize(vv, vv.amin(-1, keepdim=True), vv.amax(-1, keepdim=True), self.bits, self.dtype)
        return codes.flatten(-2), scale[..., 0], zero[..., 0]

    def dequantized(self):
        """Codes as values [B, rows, S, D] fp32 (garbage where a slot is not in codes)."""
        S, G, (B, rows, Sq, _) = self.n_slots, self.G, self.kq.shape
        kc = unpack_codes(self.kq, self.bits).view(B, rows, Sq // G, G, -1)
        k = dequantize(kc, self.ks[:, :, :, None], self.kz[:, :, :, None]).flatten(2, 3)[:, :, :S]
        vc = unpack_codes(self.vq[:, :, :S], self.bits).unflatten(-1, (-1, G))
        return k, dequantize(vc, self.vs[:, :, :S, :, None], self.vz[:, :, :S, :, None]).flatten(-2)

    # ---- the store interface ---------------------------------------------------------------------
    def prefill(self, k, v, pos, now, owner=None):
        """k/v [B, rows, n, D]: slots 0..n-1; pos [B, rows, S]; now [B] the newest position; owner [B, rows, n]
        each slot's KV head (a flat layout's; else the row)."""
        B, rows, n, D = k.shape
        front = self.frontier(now)
        self.front.copy_(front)
        ng = -(-n // self.G)
        p = F.pad(pos[..., :n], (0, ng * self.G - n), value=-1)
        inc = ((p >= 0) & (p < front[:, None, None])).view(B, rows, ng, self.G)
        codes, scale, zero = self.quantize_keys(F.pad(k, (0, 0, 0, ng * self.G - n)).view(B, rows, ng, self.G, D), inc)
        self.kq[:, :, :ng * self.G] = pack_codes(codes.flatten(2, 3), self.bits)
        self.ks[:, :, :ng], self.kz[:, :, :ng] = scale, zero
        codes, scale, zero = self.quantize_values(v)
        self.vq[:, :, :n], self.vs[:, :, :n], self.vz[:, :, :n] = pack_codes(codes, self.bits), scale, zero
        self.rpos.fill_(-1)
        self.rslot.fill_(-1)
        b, c, s = (pos[..., :n] >= front[:, None, None]).nonzero(as_tuple=True)  # the residual's tokens
        h = c if owner is None else owner[b, c, s]
        r = pos[b, c, s] % self.Rr
        self.rk[b, h, r], self.rv[b, h, r], self.rslot[b, h, r], self.rpos[b, h, r] = k[b, c, s], v[b, c, s], s, pos[b, c, s]

    def write(self, slot, k_new, v_new, drop, now):
        """The new token enters the residual (flushed into codes once it leaves the newest R: aligned, with the
        rest of its key group)."""
        b, h = torch.arange(slot.shape[0], device=slot.device)[:, None], torch.arange(slot.shape[1], device=slot.device)
        r = (now % self.Rr)[:, None]
        self.rk[b, h, r], self.rv[b, h, r] = k_new, v_new
        self.rslot[b, h, r] = slot
        self.rpos[b, h, r] = now[:, None].expand(slot.shape) if drop is None else torch.where(drop, -1, now[:, None])

    def advance(self, pos, now):
        """When the frontier passes positions (aligned: a group of G, every G steps; otherwise one, every step),
        flush their surviving residual entries into codes: values token by token; keys by (re-)quantizing each
        touched key group (aligned: the one group they fill). A step moves a sequence one position."""
        front = self.frontier(now)
        old_front = self.front.clone()
        self.front.copy_(front)
        if self.flush_in_kernel(now):
            from triton_kernels import quant_flush  # Triton: imported only on CUDA
            quant_flush(self.kq, self.ks, self.kz, self.vq, self.vs, self.vz, self.rk, self.rv, self.rslot, self.rpos,
                        pos, old_front, front, self.bits, self.G, self.bits in PLANAR_BITS)
            return
        go = front > old_front
        B, H, G = self.rk.shape[0], self.n_kv, self.G
        E = G if self.aligned else 1  # entries leaving the residual
        ppos = front[:, None] - E + torch.arange(E, device=now.device)  # [B, E]: the positions leaving
        r = (ppos % self.Rr)[:, None].expand(B, H, E)
        ek, ev = (x.gather(2, r[..., None].expand(B, H, E, x.shape[-1])) for x in (self.rk, self.rv))
        es, ep = self.rslot.gather(2, r), self.rpos.gather(2, r)
        alive = go[:, None, None] & (ep == ppos[:, None]) & (es >= 0)
        alive &= self.row_gather(pos, es.clamp(min=0)) == ep  # still cached (an evicting policy may have dropped it)
        b, hc = torch.arange(B, device=now.device)[:, None, None], self.code_row(torch.arange(H, device=now.device))[None, :, None]
        spare = self.spare * G
        s = torch.where(alive, es, spare)
        codes, scale, zero = self.quantize_values(ev)
        self.vq[b, hc, s], self.vs[b, hc, s], self.vz[b, hc, s] = pack_codes(codes, self.bits), scale, zero
        if self.aligned:  # slot = position: the G positions are one whole group, quantized once (KIVI)
            codes, scale, zero = self.quantize_keys(ek, alive)
            g = torch.where(go, (front - G) // G, self.spare)[:, None, None]  # [B, 1, 1]
            self.kq[b, hc, g * G + torch.arange(G, device=now.device)] = pack_codes(codes, self.bits)
            self.ks[b[..., 0], hc[..., 0], g[..., 0]], self.kz[b[..., 0], hc[..., 0], g[..., 0]] = scale, zero
        else:
            self.requantize_groups(pos, old_front, ek, es, alive)

    def flush_in_kernel(self, now) -> bool:
        """Whether advance runs triton_kernels.quant_flush: the unaligned flush of per-head rows (a flat row's heads
        share key groups: torch), power-of-two tiles, on CUDA (flush_kernel True: anywhere, as the tests run it in
        Triton's interpreter; False: never)."""
        fits = not self.aligned and self.rows > 1 and all(x & (x - 1) == 0 for x in (self.head_dim, self.G))
        return fits and (now.is_cuda if self.flush_kernel is None else self.flush_kernel)

    def requantize_groups(self, pos, old_front, ek, es, alive):
        """Evicting and appending policies write slots out of position order, so a key group holds tokens
        flushed at different times: each flushed entry's group is re-quantized from its members already in
        codes (dequantized) and the members flushed now; its range only widens (the old range is kept), so
        a member is re-rounded only when the range grows. Entries sharing a group compute the same result,
        so their duplicate writes agree; skipped ones write the spare group. One entry per step (per KV head):
        G members of D channels, where flushing G entries every G steps cost G times that on every step (a
        CUDA graph cannot skip the steps that flush nothing; 4 of the 11 ms of a 4-bit SnapKV step at 32k x 8)."""
        B, H, E, D = ek.shape
        G, dev = self.G, ek.device
        b, hc = torch.arange(B, device=dev)[:, None, None], self.code_row(torch.arange(H, device=dev))[None, :, None]
        gi = es.clamp(min=0) // G  # [B, H, E] each entry's group
        m = gi[..., None] * G + torch.arange(G, device=dev)  # [B, H, E, G] its members' slots
        old = dequantize(unpack_codes(self.kq[b[..., None], hc[..., None], m], self.bits),
                         self.ks[b, hc, gi][..., None, :], self.kz[b, hc, gi][..., None, :])
        pm = self.row_gather(pos, m.flatten(2).clamp(max=self.n_slots - 1)).view(B, H, E, G).masked_fill(m >= self.n_slots, -1)
        old_inc = (pm >= 0) & (pm < old_front[:, None, None, None])
        # entries flushed now, of every head sharing the code row (a flat row holds them all)
        es_all, ek_all, alive_all = (x.reshape(B, 1, H * E, *x.shape[3:]) if self.rows == 1 else x for x in (es, ek, alive))
        hit = (m[..., None] == es_all[:, :, None, None, :]) & alive_all[:, :, None, None, :]  # [B, H, E, G, E or H E]
        j = hit.int().argmax(-1)  # the entry holding each member, if any
        new = ek_all.expand(B, H, *ek_all.shape[2:]).gather(2, j.flatten(2)[..., None].expand(-1, -1, -1, D)).view(B, H, E, G, D)
        fresh = hit.any(-1)
        had = old_inc.any(-1)[..., None]  # [B, H, E, 1]: the group held codes before: keep its range
        zero_old, scale_old = self.kz[b, hc, gi].float(), self.ks[b, hc, gi].float()
        lo = torch.where(had, zero_old, math.inf)
        hi = torch.where(had, zero_old + scale_old * ((1 << self.bits) - 1), -math.inf)
        codes, scale, zero = self.quantize_keys(torch.where(fresh[..., None], new.float(), old), old_inc | fresh, lo, hi)
        g = torch.where(alive, gi, self.spare)
        self.kq[b[..., None], hc[..., None], g[..., None] * G + torch.arange(G, device=dev)] = pack_codes(codes, self.bits)
        self.ks[b, hc, g], self.kz[b, hc, g] = scale, zero

    # ---- reading ---------------------------------------------------------------------------------
    def codes_ok(self, pos):
        """[B, rows, S]: slots whose token is in codes (filled, below the frontier)."""
        return (pos >= 0) & (pos < self.front[:, None, None])

    def ring_ok(self, pos):
        """[B, H_kv, R + G]: residual entries that hold a cached token not yet in codes."""
        live = (self.rpos >= self.front[:, None, None]) & (self.rslot >= 0)
        return live & (self.row_gather(pos, self.rslot.clamp(min=0)) == self.rpos)

    def full_precision(self, pos=None):
        """Every slot's keys and values [B, rows, S, D] in the model dtype: dequantized codes with the residual
        on top (a copy, for prefill bookkeeping and tests; decode reads the codes in place)."""
        k, v = (x.to(self.dtype) for x in self.dequantized())
        ok = self.ring_ok(pos) if pos is not None else (self.rpos >= self.front[:, None, None]) & (self.rslot >= 0)
        b, h, r = ok.nonzero(as_tuple=True)
        c = self.code_row(h)
        k[b, c, self.rslot[b, h, r]], v[b, c, self.rslot[b, h, r]] = self.rk[b, h, r], self.rv[b, h, r]
        return k, v

    def keys(self):
        return self.full_precision()[0]

    def values(self):
        return self.full_precision()[1]

    def torch_inputs(self, pos, mask, H):
        """CPU reference: dequantize every slot, then attend with the residual beside it: K, V
        [B, H, S + R + G, D] and mask [B, H, S + R + G]."""
        k, v = self.dequantized()
        k, v = (x.to(self.dtype).expand(x.shape[0], H, *x.shape[2:]) for x in (k, v))
        ring = self.ring_ok(pos) & mask.gather(2, self.rslot.clamp(min=0))
        return (torch.cat([k, self.rk], 2), torch.cat([v, self.rv], 2),
                torch.cat([(mask & self.codes_ok(pos)).expand(k.shape[:3]), ring], 2))

    def kernel(self, qg):
        """Whether the Triton kernel reads the codes: on CUDA, where a row's packed bytes (a tl.dot's depth:
        it needs 16) are at least 16; 2 bits at head_dim 32 take the reference path."""
        return qg.is_cuda and self.head_dim * self.bits // 8 >= 16

    def attend(self, qg, pos, now, runs=None, mask=None):
        H = qg.shape[1]
        if mask is None:
            if self.kernel(qg):
                from triton_kernels import quant_attend  # Triton: imported only on CUDA
                runs = runs.expand(qg.shape[0], H, 2)
                return quant_attend(qg, *self.triton_args(pos), runs, runs, self.n_slots, True)
            mask = run_mask(runs, pos)
        k, v, m = self.torch_inputs(pos, mask.expand(qg.shape[0], H, -1), H)
        return F.scaled_dot_product_attention(qg, k, v, attn_mask=m[:, :, None, :])

    def attend_gather(self, qg, pos, now, idx, ok):
        sel = torch.zeros(*idx.shape[:2], self.n_slots + 1, dtype=torch.bool, device=idx.device)
        sel = sel.scatter(-1, idx.masked_fill(~ok, self.n_slots), True)[..., :-1]
        if qg.is_cuda and not self.kernel(qg):  # (CPU callers attend with a mask; tests run the kernel here)
            return self.attend(qg, pos, now, mask=sel)
        from triton_kernels import quant_attend  # Triton: imported only on CUDA (CPU: attend with a mask)
        args = self.triton_args(pos, sel)
        return quant_attend(qg, *args, idx, ok & self.row_gather(self.codes_ok(pos), idx), idx.shape[-1], False)

    def triton_args(self, pos, sel=None):
        """quant_attend's store arguments; the kernel tells the residual's live entries itself (ring_ok), sel [B, H,
        S] (a selection) narrows them to the selected slots."""
        rsel = None if sel is None else sel.gather(2, self.rslot.clamp(min=0))
        return (self.kq, self.ks, self.kz, self.vq, self.vs, self.vz, pos, self.front, self.rk, self.rv, self.rslot,
                self.rpos, rsel, self.bits, self.G, self.bits in PLANAR_BITS)

    def attend_with_new(self, qg, pos, now, k_new, v_new):
        B, H = qg.shape[:2]
        S = self.n_slots
        if self.kernel(qg):
            from triton_kernels import quant_attend_scores  # Triton: imported only on CUDA
            out, probs = quant_attend_scores(qg, *self.triton_args(pos), k_new, v_new)
        else:
            k, v, m = self.torch_inputs(pos, (pos >= 0).expand(B, H, -1), H)
            out, probs = attend_new_torch(qg, k, v, m, k_new, v_new)
        p_codes, p_ring, p_new = probs[..., :S], probs[..., S:-1], probs[..., -1:]  # slots, residual, new token
        # a slot's probability is its code's or, for a token still in the residual, its entry's
        # into zeros, then added: p_codes.scatter_add(...) on the softmax's slice was miscompiled by inductor
        # (torch 2.13 CPU: layer 0's H2O scores lost their history; tests/test_kv_quant.py's inductor test)
        ring = torch.zeros_like(p_codes).scatter_add(-1, self.rslot.clamp(min=0), p_ring)
        return out, torch.cat([p_codes + ring, p_new], -1)
