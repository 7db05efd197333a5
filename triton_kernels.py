"""GPU kernels (Triton), imported lazily by cache.py and only on CUDA.

gather_attend: decode attention that reads only the K/V rows a retrieval strategy selected (Spotlight,
Quest, ...), flash-decoding style: each program takes one (sequence, KV head) and a chunk of the
selected indices, gathers those rows, and keeps an online softmax over them for the whole GQA group
at once (the group is the query axis of one tl.dot, so each gathered row is read once per KV head);
a few torch ops merge the chunks. Token-level selections are not block-aligned, so a FlexAttention
block mask would read whole 128-token blocks (PERFORMANCE.md); gathering rows reads only the sliver.
Registered with torch.library.triton_op so `torch.compile(fullgraph=True)` and CUDA graphs keep it.
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton


@triton.jit
def _gather_attend_kernel(Q, K, V, IDX, OK, PO, PM, PL, n_sel, chunk, H, scale,
                          sqb, sqh, sqg, skb, skh, sks, svb, svh, svs, sib, sih,
                          G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    bh, split = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    g, d = tl.arange(0, GP), tl.arange(0, D)
    q = tl.load(Q + b * sqb + h * sqh + g[:, None] * sqg + d[None, :], mask=g[:, None] < G, other=0.0)
    # -1e30, a finite "minus infinity": an empty chunk never makes exp(-inf - -inf) = nan. A literal, not a
    # global: inductor re-emits a user kernel's source and drops float globals.
    m_i = tl.full([GP], -1.0e30, tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for off in range(0, chunk, BLOCK):
        n = split * chunk + off + tl.arange(0, BLOCK)
        inb = n < n_sel
        idx = tl.load(IDX + b * sib + h * sih + n, mask=inb, other=0)
        ok = (tl.load(OK + b * sib + h * sih + n, mask=inb, other=0) != 0) & inb
        k = tl.load(K + b * skb + h * skh + idx[:, None] * sks + d[None, :], mask=ok[:, None], other=0.0)
        s = (tl.dot(q, tl.trans(k)) * scale).to(tl.float32)  # [GP, BLOCK]; inductor passes scale as fp64
        s = tl.where(ok[None, :], s, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.where(ok[None, :], tl.exp(s - m_new[:, None]), 0.0)
        v = tl.load(V + b * svb + h * svh + idx[:, None] * svs + d[None, :], mask=ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    out = (bh * tl.num_programs(1) + split) * GP + g
    tl.store(PO + out[:, None] * D + d[None, :], acc)
    tl.store(PM + out, m_i)
    tl.store(PL + out, l_i)


@triton_op("kvcompress::gather_attend", mutates_args={})
def gather_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                  ok: torch.Tensor) -> torch.Tensor:
    """q [B, H_kv, G, D] attends to k/v [B, H_kv, S, D] rows idx [B, H_kv, K] where ok [B, H_kv, K]
    -> [B, H_kv, G, D]. Reads K selected rows per KV head, never the whole cache."""
    B, H, G, D = q.shape
    n_sel = idx.shape[-1]
    BLOCK = 32
    GP = max(16, triton.next_power_of_2(G))  # tl.dot needs >= 16 rows
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    splits = max(1, min(triton.cdiv(n_sel, BLOCK), triton.cdiv(2 * sms, B * H)))  # ~2 programs per SM
    chunk = triton.cdiv(triton.cdiv(n_sel, splits), BLOCK) * BLOCK
    splits = triton.cdiv(n_sel, chunk)
    po = torch.empty(B, H, splits, GP, D, device=q.device, dtype=torch.float32)
    pm = torch.empty(B, H, splits, GP, device=q.device, dtype=torch.float32)
    pl = torch.empty(B, H, splits, GP, device=q.device, dtype=torch.float32)
    q, idx, ok8 = q.contiguous(), idx.contiguous(), ok.to(torch.int8).contiguous()  # OK shares IDX's strides
    wrap_triton(_gather_attend_kernel)[(B * H, splits)](
        q, k, v, idx, ok8, po, pm, pl, n_sel, chunk, H, D ** -0.5,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), idx.stride(0), idx.stride(1),
        G=G, GP=GP, D=D, BLOCK=BLOCK)
    m = pm.amax(2, keepdim=True)
    w = torch.exp(pm - m)  # chunk weights; an empty chunk weighs 0
    out = (po * w[..., None]).sum(2) / (pl * w).sum(2)[..., None]
    return out[:, :, :G].to(q.dtype)
