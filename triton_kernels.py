"""GPU kernels (Triton), imported lazily by cache.py and only on CUDA.

gather_attend: decode attention that reads only the K/V rows a retrieval strategy selected (Spotlight,
Quest, ...), flash-decoding style: each program takes one (sequence, KV head) and a chunk of the
selected indices, gathers those rows, and keeps an online softmax over them for the whole GQA group
at once (the group is the query axis of one tl.dot, so each gathered row is read once per KV head);
a few torch ops merge the chunks. Token-level selections are not block-aligned, so a FlexAttention
block mask would read whole 128-token blocks (PERFORMANCE.md); gathering rows reads only the sliver.

spotlight_select: Spotlight's scoring and top-k selection, with the output of cache.count_select.

quest_select: Quest's page scores and page selection (the current page plus the best others, no sort),
with the output of cache.Quest.pick.

All are registered with torch.library.triton_op so `torch.compile(fullgraph=True)` and CUDA graphs keep
them. Tests run them on CPU in Triton's interpreter (TRITON_INTERPRET=1), which needs compile-time
loop bounds (CHUNK, K are tl.constexpr) and has no libdevice (popcount by SWAR there).
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton
from triton.language.extra import libdevice


@triton.jit
def _gather_attend_kernel(Q, K, V, IDX, OK, PO, PM, PL, n_sel, H, scale,
                          sqb, sqh, sqg, skb, skh, sks, svb, svh, svs, sib, sih,
                          CHUNK: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                          BLOCK: tl.constexpr):
    bh, split = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    g, d = tl.arange(0, GP), tl.arange(0, D)
    q = tl.load(Q + b * sqb + h * sqh + g[:, None] * sqg + d[None, :], mask=g[:, None] < G, other=0.0)
    # -1e30, a finite "minus infinity": an empty chunk never makes exp(-inf - -inf) = nan. A literal, not a
    # global: inductor re-emits a user kernel's source and drops float globals.
    m_i = tl.full([GP], -1.0e30, tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for off in range(0, CHUNK, BLOCK):
        n = split * CHUNK + off + tl.arange(0, BLOCK)
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
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    splits = max(1, min(triton.cdiv(n_sel, BLOCK), triton.cdiv(2 * sms, B * H)))  # ~2 programs per SM
    chunk = triton.cdiv(triton.cdiv(n_sel, splits), BLOCK) * BLOCK
    splits = triton.cdiv(n_sel, chunk)
    po = torch.empty(B, H, splits, GP, D, device=q.device, dtype=torch.float32)
    pm = torch.empty(B, H, splits, GP, device=q.device, dtype=torch.float32)
    pl = torch.empty(B, H, splits, GP, device=q.device, dtype=torch.float32)
    q, idx, ok8 = q.contiguous(), idx.contiguous(), ok.to(torch.int8).contiguous()  # OK shares IDX's strides
    wrap_triton(_gather_attend_kernel)[(B * H, splits)](
        q, k, v, idx, ok8, po, pm, pl, n_sel, H, D ** -0.5,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), idx.stride(0), idx.stride(1),
        CHUNK=chunk, G=G, GP=GP, D=D, BLOCK=BLOCK)
    m = pm.amax(2, keepdim=True)
    w = torch.exp(pm - m)  # chunk weights; an empty chunk weighs 0
    out = (po * w[..., None]).sum(2) / (pl * w).sum(2)[..., None]
    return out[:, :, :G].to(q.dtype)


# ---- Spotlight's selection: Hamming scores, the n-th best score, the slots at or above it ----------
# The torch path (cache.count_select) costs a dozen kernels per layer (scores recomputed by several
# consumers, a contended scatter-add, scans); three kernels do it: keys and histograms per chunk, the
# threshold per row, the selected slots per chunk.
# Keys as in count_select: 0 = empty slot, 1 + G d - Hamming for a scored slot, TOP = G d + 2 forced.

@triton.jit
def _popcount(x, POPC: tl.constexpr):
    if POPC:  # the hardware instruction (CUDA); the interpreter has no libdevice, so SWAR there
        return libdevice.popc(x)
    y = x & 0x7FFFFFFFFFFFFFFF
    y = y - ((y >> 1) & 0x5555555555555555)
    y = (y & 0x3333333333333333) + ((y >> 2) & 0x3333333333333333)
    y = (y + (y >> 4)) & 0x0F0F0F0F0F0F0F0F
    y = ((y * 0x0101010101010101) >> 56) & 0x7F
    return (y + (x < 0).to(tl.int64)).to(tl.int32)


@triton.jit
def _spotlight_keys_kernel(Q, C, P, IP, KEYS, HIST, S, H, n_chunk, sinks, recent, CHUNK: tl.constexpr,
                           G: tl.constexpr, W: tl.constexpr, TOP: tl.constexpr, NB: tl.constexpr,
                           BLOCK: tl.constexpr, POPC: tl.constexpr):
    """Program (row = sequence x KV head, chunk): each slot's key, and the chunk's histogram of keys."""
    r, c = tl.program_id(0), tl.program_id(1)
    now = tl.load(IP + r // H)
    hist = tl.zeros([NB], tl.int32)
    for off in range(0, CHUNK, BLOCK):
        s = c * CHUNK + off + tl.arange(0, BLOCK)
        inb = s < S
        pos = tl.load(P + r * S + s, mask=inb, other=-1)
        ham = tl.zeros([BLOCK], tl.int32)
        for w in tl.static_range(W):
            code = tl.load(C + (r * S + s) * W + w, mask=inb, other=0)
            for g in tl.static_range(G):
                ham += _popcount(tl.load(Q + (r * G + g) * W + w) ^ code, POPC)
        forced = (pos < sinks) | (pos > now - recent) | (pos == now)
        key = tl.where(pos >= 0, tl.where(forced, TOP, TOP - 1 - ham), 0)
        tl.store(KEYS + r * S + s, key, mask=inb)
        hist += tl.histogram(key, NB)  # slots past S have key 0 and count in bin 0, never read
    tl.store(HIST + (r * n_chunk + c) * NB + tl.arange(0, NB), hist)


@triton.jit
def _spotlight_threshold_kernel(HIST, KSEL, ROW, OFF, H, n_chunk,
                                TOP: tl.constexpr, NB: tl.constexpr, NCP: tl.constexpr):
    """Program (row): from the chunks' histograms, the n-th best key t, how many of the ties at t are
    left out, the slots read, and each chunk's count of earlier slots above t and at t (its rank offsets)."""
    r = tl.program_id(0)
    ch, v = tl.arange(0, NCP), tl.arange(0, NB)
    hist = tl.load(HIST + (r * n_chunk + ch[:, None]) * NB + v[None, :], mask=ch[:, None] < n_chunk, other=0)
    total = tl.sum(hist, 0)
    at_least = tl.cumsum(total, 0, reverse=True)  # [v] = slots with key >= v
    n = tl.sum(tl.where(v == TOP, total, 0)) + tl.load(KSEL + r // H).to(tl.int32)  # forced + k
    t = tl.maximum(tl.sum((at_least >= n).to(tl.int32)) - 1, 1)  # the n-th best key (1 if fewer filled)
    n_above, n_tie = tl.sum(tl.where(v > t, total, 0)), tl.sum(tl.where(v == t, total, 0))
    skip = tl.maximum(n_tie - (n - n_above), 0)  # the earliest ties are left out (count_select)
    tl.store(ROW + r * 3, t)
    tl.store(ROW + r * 3 + 1, skip)
    tl.store(ROW + r * 3 + 2, n_above + n_tie - skip)  # slots read
    above = tl.sum(tl.where(v[None, :] > t, hist, 0), 1)  # [NCP] per chunk
    tie = tl.sum(tl.where(v[None, :] == t, hist, 0), 1)
    tl.store(OFF + (r * n_chunk + ch) * 2, tl.cumsum(above, 0) - above, mask=ch < n_chunk)
    tl.store(OFF + (r * n_chunk + ch) * 2 + 1, tl.cumsum(tie, 0) - tie, mask=ch < n_chunk)


@triton.jit
def _spotlight_pick_kernel(KEYS, ROW, OFF, IDX, OK, S, n_chunk, K: tl.constexpr, CHUNK: tl.constexpr,
                           BLOCK: tl.constexpr):
    """Program (row, chunk): the chunk's slots with key > t, and the ties at t after the first `skip`,
    written at their rank among the row's read slots. Chunk 0 also fills the unused tail."""
    r, c = tl.program_id(0), tl.program_id(1)
    t, skip, taken = tl.load(ROW + r * 3), tl.load(ROW + r * 3 + 1), tl.load(ROW + r * 3 + 2)
    above_before = tl.load(OFF + (r * n_chunk + c) * 2)
    tie_before = tl.load(OFF + (r * n_chunk + c) * 2 + 1)
    for off in range(0, CHUNK, BLOCK):
        s = c * CHUNK + off + tl.arange(0, BLOCK)
        key = tl.load(KEYS + r * S + s, mask=s < S, other=0)
        above, tie = (key > t).to(tl.int32), (key == t).to(tl.int32)
        a_incl, t_incl = above_before + tl.cumsum(above, 0), tie_before + tl.cumsum(tie, 0)
        take = (above == 1) | ((tie == 1) & (t_incl > skip))
        rank = a_incl - above + tl.maximum(t_incl - tie - skip, 0)  # read slots before this one
        tl.store(IDX + r * K + rank, s.to(tl.int64), mask=take)
        above_before += tl.sum(above)
        tie_before += tl.sum(tie)
    if c == 0:
        for j0 in range(0, K, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            tl.store(IDX + r * K + j, tl.zeros([BLOCK], tl.int64), mask=(j >= taken) & (j < K))
            tl.store(OK + r * K + j, (j < taken).to(tl.int8), mask=j < K)


@triton_op("kvcompress::spotlight_select", mutates_args={})
def spotlight_select(q_codes: torch.Tensor, codes: torch.Tensor, pos: torch.Tensor, input_pos: torch.Tensor,
                     k: torch.Tensor, K: int, d: int, sinks: int, recent: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cache.hamming_select, exactly (same slots, same order): q_codes [B, H, G, W]
    and codes [B, H, S, W] (packed int64), pos [B, H, S], input_pos and k [B] -> (idx, ok) [B, H, K]."""
    B, H, G, W = q_codes.shape
    S = codes.shape[2]
    NB = triton.next_power_of_2(G * d + 3)
    max_chunks = max(2, 32768 // NB)  # the threshold kernel holds every chunk's histogram in registers
    chunk = max(1024, triton.next_power_of_2(triton.cdiv(S, max_chunks)))
    n_chunk = triton.cdiv(S, chunk)
    dev = codes.device
    keys = torch.empty(B, H, S, dtype=torch.int32, device=dev)
    hist = torch.empty(B * H, n_chunk, NB, dtype=torch.int32, device=dev)
    idx = torch.empty(B, H, K, dtype=torch.long, device=dev)
    ok = torch.empty(B, H, K, dtype=torch.int8, device=dev)
    q_codes, codes, pos, input_pos, k = (x.contiguous() for x in (q_codes, codes, pos, input_pos, k))  # flat indexing
    wrap_triton(_spotlight_keys_kernel)[(B * H, n_chunk)](  # BLOCK 1024, 4 warps: the fastest of 5 tried
        q_codes, codes, pos, input_pos, keys, hist, S, H, n_chunk, sinks, recent, CHUNK=chunk,
        G=G, W=W, TOP=G * d + 2, NB=NB, BLOCK=1024, POPC=dev.type == "cuda")
    row = torch.empty(B * H, 3, dtype=torch.int32, device=dev)  # t, ties left out, slots read
    offsets = torch.empty(B * H, n_chunk, 2, dtype=torch.int32, device=dev)
    wrap_triton(_spotlight_threshold_kernel)[(B * H,)](
        hist, k, row, offsets, H, n_chunk, TOP=G * d + 2, NB=NB, NCP=triton.next_power_of_2(n_chunk), num_warps=8)
    wrap_triton(_spotlight_pick_kernel)[(B * H, n_chunk)](
        keys, row, offsets, idx, ok, S, n_chunk, K=K, CHUNK=chunk, BLOCK=1024)
    return idx, ok.bool()


# ---- Quest's selection: page scores, then the best pages without a sort ---------------------------
# The torch path (Quest.page_scores + torch.topk) made Quest's layer step slower than the full cache on
# an H100: a handful of small kernels plus topk's radix select and sort per layer. Two launches here:
# _quest_scores_kernel reads each row's page bounds once (2 P D bf16 = 1.08 MB per (sequence, KV head)
# at 32k context, D = 128; pages past the current one are not read) and writes P fp32 scores (8.4 KB);
# _quest_pick_kernel reads those scores and writes the token list (K ps int64 + bool: 30 KB per row at a
# 10% budget). The bounds dominate: 8.7 MB per layer at batch 1, 69 MB at batch 8 (H_kv = 8), against
# 14 MB (batch 1) of selected K/V rows that gather_attend reads at a 10% budget.

@triton.jit
def _quest_scores_kernel(Q, KMAX, KMIN, IP, SC, H, P, CHUNK: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                         DP: tl.constexpr, PS: tl.constexpr, BLOCK: tl.constexpr, GROUP_MAX: tl.constexpr):
    """Program (row = sequence x KV head, chunk of pages): sum_d max(q_d M_d, q_d m_d) per page, combined
    over the group's G query rows; -inf for pages past the current one (not candidates, never read)."""
    r, c = tl.program_id(0), tl.program_id(1)
    cur = tl.load(IP + r // H) // PS
    d = tl.arange(0, DP)
    qp, qn = tl.zeros([DP], tl.float32), tl.zeros([DP], tl.float32)
    for g in tl.static_range(G):  # mean: relu(q).M is linear in q's positive part, so average q first
        q = tl.load(Q + (r * G + g) * D + d, mask=d < D, other=0.0).to(tl.float32)
        qp += tl.maximum(q, 0.0) / G
        qn += tl.minimum(q, 0.0) / G
    for off in range(0, CHUNK, BLOCK):
        p = c * CHUNK + off + tl.arange(0, BLOCK)
        live = (p <= cur) & (p < P)
        at = (r * P + p)[:, None] * D + d[None, :]
        hi = tl.load(KMAX + at, mask=live[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
        lo = tl.load(KMIN + at, mask=live[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
        if GROUP_MAX:  # max over the group: one bound per query row
            s = tl.full([BLOCK], float("-inf"), tl.float32)
            for g in tl.static_range(G):
                q = tl.load(Q + (r * G + g) * D + d, mask=d < D, other=0.0).to(tl.float32)
                s = tl.maximum(s, tl.sum(tl.maximum(q, 0.0)[None, :] * hi + tl.minimum(q, 0.0)[None, :] * lo, 1))
        else:
            s = tl.sum(qp[None, :] * hi + qn[None, :] * lo, 1)
        tl.store(SC + r * P + p, tl.where(live, s, float("-inf")), mask=p < P)


@triton.jit
def _order_key(s):
    """fp32 -> int64 in [0, 2^32) with the floats' order (-0.0 first made +0.0, so the two tie)."""
    bits = tl.where(s == 0.0, 0.0, s).to(tl.int32, bitcast=True)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) + 2147483648  # negatives: magnitude reversed


@triton.jit
def _nth_largest(key, valid, n):
    """The n-th largest key where valid (keys in [0, 2^32)): the largest t with n keys >= t, built from
    the top bit down; 32 counts over the row instead of a sort. n = 0 gives 2^32 - 1 (nothing above)."""
    t = tl.zeros([], tl.int64)
    bit = tl.full([], 2147483648, tl.int64)
    for _ in range(32):
        c = t | bit
        t = tl.where(tl.sum((valid & (key >= c)).to(tl.int32)) >= n, c, t)
        bit = bit >> 1
    return t


@triton.jit
def _quest_pick_kernel(SC, IP, NSEL, IDX, OK, H, P, S, K: tl.constexpr, PS: tl.constexpr, PP: tl.constexpr,
                       BLOCK: tl.constexpr):
    """Program (row): the current page plus the n_sel best earlier pages (ties at the threshold go to the
    later page), in page order, written as their tokens: idx = page ps + j (at most S - 1), ok = token
    filled. The unused tail of the K pages gets idx 0, ok False."""
    r = tl.program_id(0)
    now = tl.load(IP + r // H)
    cur = now // PS
    p = tl.arange(0, PP)
    cand = p < cur  # filled pages other than the current one
    key = _order_key(tl.load(SC + r * P + p, mask=cand, other=0.0))
    n = tl.minimum(tl.load(NSEL + r // H), tl.sum(cand.to(tl.int64)))
    t = _nth_largest(key, cand, n)
    above, tie = (cand & (key > t)).to(tl.int32), (cand & (key == t)).to(tl.int32)
    skip = tl.sum(tie) - (n - tl.sum(above))  # the earliest ties are left out
    take = (above == 1) | ((tie == 1) & (tl.cumsum(tie, 0) - tie >= skip)) | (p == cur)
    rank = tl.cumsum(take.to(tl.int32), 0) - take.to(tl.int32)
    for j in tl.static_range(PS):  # page p's tokens land at rank ps + j; PS strided stores, no [PP, PS] tile
        tok = p * PS + j
        tl.store(IDX + r * K * PS + rank * PS + j, tl.minimum(tok, S - 1).to(tl.int64), mask=take)
        tl.store(OK + r * K * PS + rank * PS + j, tok <= now, mask=take)
    used = tl.sum(take.to(tl.int32)) * PS
    for off in range(0, K * PS, BLOCK):
        e = off + tl.arange(0, BLOCK)
        tail = (e >= used) & (e < K * PS)
        tl.store(IDX + r * K * PS + e, tl.zeros([BLOCK], tl.int64), mask=tail)
        tl.store(OK + r * K * PS + e, tl.zeros([BLOCK], tl.int1), mask=tail)


@triton_op("kvcompress::quest_scores", mutates_args={})
def quest_scores(qg: torch.Tensor, kmax: torch.Tensor, kmin: torch.Tensor, input_pos: torch.Tensor,
                 page_size: int, group_max: bool) -> torch.Tensor:
    """qg [B, H, G, D], page bounds kmax/kmin [B, H, P, D], input_pos [B] -> page scores [B, H, P] fp32
    (Quest.page_scores up to summation order; -inf past the current page)."""
    B, H, G, D = qg.shape
    P = kmax.shape[2]
    BLOCK = 32  # 2 x 32 x 128 bf16 = 16 KB of bounds per iteration (not tuned on a GPU)
    sms = torch.cuda.get_device_properties(qg.device).multi_processor_count if qg.is_cuda else 4
    splits = max(1, min(triton.cdiv(P, BLOCK), triton.cdiv(4 * sms, B * H)))  # ~4 programs per SM
    chunk = triton.cdiv(triton.cdiv(P, splits), BLOCK) * BLOCK
    scores = torch.empty(B, H, P, device=qg.device, dtype=torch.float32)
    qg, kmax, kmin = qg.contiguous(), kmax.contiguous(), kmin.contiguous()  # flat indexing
    wrap_triton(_quest_scores_kernel)[(B * H, triton.cdiv(P, chunk))](
        qg, kmax, kmin, input_pos, scores, H, P, CHUNK=chunk, G=G, D=D, DP=triton.next_power_of_2(D),
        PS=page_size, BLOCK=BLOCK, GROUP_MAX=group_max)
    return scores


@triton_op("kvcompress::quest_pick", mutates_args={})
def quest_pick(scores: torch.Tensor, input_pos: torch.Tensor, n_sel: torch.Tensor, K: int, page_size: int,
               S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quest.pick exactly (same tokens, same order): scores [B, H, P], input_pos and n_sel [B]
    -> (idx, ok) [B, H, K page_size]. One program per row holds its P scores (P <= ~8k: 128k tokens)."""
    B, H, P = scores.shape
    PP = triton.next_power_of_2(P)
    idx = torch.empty(B, H, K * page_size, dtype=torch.long, device=scores.device)
    ok = torch.empty(B, H, K * page_size, dtype=torch.bool, device=scores.device)
    scores, input_pos, n_sel = scores.contiguous(), input_pos.contiguous(), n_sel.contiguous()
    wrap_triton(_quest_pick_kernel)[(B * H,)](
        scores, input_pos, n_sel, idx, ok, H, P, S, K=K, PS=page_size, PP=PP, BLOCK=1024,
        num_warps=min(16, max(4, PP // 512)))  # 8 warps at P = 2112
    return idx, ok


def quest_select(qg, kmax, kmin, input_pos, n_sel, K: int, page_size: int, S: int, group_max: bool):
    """Quest.select on CUDA: two launches, (idx, ok) [B, H, K page_size] as Quest.pick gives them. S (the
    slots) is passed because a token index is clamped to S - 1, and P ps may exceed S."""
    return quest_pick(quest_scores(qg, kmax, kmin, input_pos, page_size, group_max), input_pos, n_sel, K,
                      page_size, S)
