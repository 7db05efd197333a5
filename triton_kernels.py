"""GPU kernels (Triton), imported lazily by cache.py and only on CUDA.

gather_attend: decode attention that reads only the K/V rows a retrieval strategy selected (Spotlight,
Quest, ...), flash-decoding style: each program takes one (sequence, KV head) and a chunk of the
selected indices, gathers those rows, and keeps an online softmax over them for the whole GQA group
at once (the group is the query axis of one tl.dot, so each gathered row is read once per KV head);
a few torch ops merge the chunks. Token-level selections are not block-aligned, so a FlexAttention
block mask would read whole 128-token blocks (PERFORMANCE.md); gathering rows reads only the sliver.

The same kernel reads dense caches (slots 0..S-1, validity from the position buffer): dense_attend is
every cache's decode attention on CUDA, and attend_scores is DenseStore.attend_with_new (attention over the
cache plus the new token, and the group-mean softmax probabilities H2O, TOVA and Scissorhands score
with) in one bandwidth-bound pass over K and V that also stores the logits.

hash_codes: Spotlight's (and lsh_retrieval's, spotlight_linear's) packed sign codes of a few rows, one launch.

spotlight_select: Spotlight's scoring and top-k selection, with the output of cache.count_select.

quest_select: Quest's page scores and page selection (the current page plus the best others, no sort),
with the output of cache.Quest.pick.

quant_attend, quant_attend_scores: dense_attend / gather_attend / attend_scores over a quantized cache
(kvstore.QuantStore): packed codes dequantized tile by tile in registers, the full-precision residual beside.

prompt_colsum: the prompt scores of H2O, SnapKV and TOVA (cache.prompt_attention) in two passes of
QK^T over the causal half, never T x T (the section's header says how).

decode_linear: y = x W^T for a decode step's few rows (model.Linear's wo and w2 on CUDA, and every int8
weight: quant.Int8Linear).

evict_slot: cache.KVCache.choose_slot (the slot that takes the new token) in one launch.

All are registered with torch.library.triton_op so `torch.compile(fullgraph=True)` and CUDA graphs keep
them. Tests run them on CPU in Triton's interpreter (TRITON_INTERPRET=1), which needs compile-time
loop bounds (CHUNK, K are tl.constexpr; _attend_kernel's CHUNK is 0, a runtime bound, only where a compile made
the cache size a symbol: _chunk_bound) and has no libdevice (popcount by SWAR there).
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op
from torch.library import wrap_triton as _wrap_triton
from triton.language.extra import libdevice
from triton.runtime.interpreter import InterpretedFunction


def wrap_triton(kernel):
    """torch.library.wrap_triton, but a kernel under Triton's interpreter is launched as it is, as torch 2.13's
    wrap_triton does itself (2.11's, on the GPU image, raises)."""
    return kernel if isinstance(kernel, InterpretedFunction) else _wrap_triton(kernel)


@triton.jit
def _attend_kernel(Q, K, V, IDX, OK, PO, PM, PL, PS, KN, VN, n_sel, H, scale, chunk,
                   sqb, sqh, sqg, skb, skh, sks, svb, svh, svs, sib, sih,
                   CHUNK: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                   BLOCK: tl.constexpr, DENSE: tl.constexpr, SCORES: tl.constexpr, RAGGED: tl.constexpr,
                   NEW: tl.constexpr):
    """Program (sequence x KV head, split): online softmax of the GQA group over rows
    split*chunk .. +chunk of the list (IDX's slots where OK != 0; DENSE: the run of slots start + n for
    n < length, (start, length) = IDX[b, h, :2], valid where the position buffer OK is >= 0: slots past
    the run are never loaded), stored as partials PO [.., G, D], PM, PL [.., G]. SCORES also stores the
    scaled logits PS [B, H, G, n_sel + NEW] (-1e30 at invalid slots: exp of it is 0). NEW: split 0 also
    attends the new token KN, VN [B, H, D] (contiguous), its logit stored in PS's last column, so the merge
    of the partials is the whole softmax. RAGGED (dense runs of very different lengths,
    HeadBudgetCache's): each row splits its own run evenly over the splits."""
    bh, split = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    g, d = tl.arange(0, GP), tl.arange(0, D)
    q = tl.load(Q + b * sqb + h * sqh + g[:, None] * sqg + d[None, :], mask=g[:, None] < G, other=0.0)
    # -1e30, a finite "minus infinity": an empty chunk never makes exp(-inf - -inf) = nan. A literal, not a
    # global: inductor re-emits a user kernel's source and drops float globals.
    m_i = tl.full([GP], -1.0e30, tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    if NEW:  # split 0 starts from the new token: its weight 1 at max s_new
        first = split == 0
        s_new = (tl.sum(q.to(tl.float32) * tl.load(KN + bh * D + d).to(tl.float32)[None, :], 1) * scale).to(tl.float32)
        tl.store(PS + (bh * G + g) * (n_sel + 1) + n_sel, s_new, mask=(g < G) & first)
        m_i = tl.where(first, s_new, m_i)
        l_i = tl.where(first, 1.0, l_i)
        acc = tl.where(first, tl.load(VN + bh * D + d).to(tl.float32)[None, :] + acc, acc)
    if RAGGED:  # a while loop: its bound is data (a for loop's would need a constant in the interpreter)
        length = tl.load(IDX + bh * 2 + 1)
        own = tl.cdiv(tl.cdiv(length, tl.num_programs(1)), BLOCK) * BLOCK  # this run's chunk
        off = split * own
        while off < tl.minimum(split * own + own, length):
            m_i, l_i, acc = _attend_block(K, V, IDX, OK, PS, q, m_i, l_i, acc, off + tl.arange(0, BLOCK),
                                          n_sel, scale, b, h, bh, skb, skh, sks, svb, svh, svs, sib, sih,
                                          G, GP, D, DENSE, SCORES, NEW)
            off += BLOCK
    else:  # a for loop: software-pipelined (num_stages), to a constant CHUNK or (CHUNK 0) the runtime chunk:
        # _chunk_bound. Inline, not assigned: the interpreter turns an assigned constant into a tensor.
        for off in range(0, CHUNK if CHUNK > 0 else chunk, BLOCK):
            m_i, l_i, acc = _attend_block(K, V, IDX, OK, PS, q, m_i, l_i, acc,
                                          split * (CHUNK if CHUNK > 0 else chunk) + off + tl.arange(0, BLOCK),
                                          n_sel, scale, b, h, bh,
                                          skb, skh, sks, svb, svh, svs, sib, sih, G, GP, D, DENSE, SCORES, NEW)
    out = (bh * tl.num_programs(1) + split) * G + g  # only the G real rows: tl.dot's padding is not stored
    tl.store(PO + out[:, None] * D + d[None, :], acc, mask=g[:, None] < G)
    tl.store(PM + out, m_i, mask=g < G)
    tl.store(PL + out, l_i, mask=g < G)


@triton.jit
def _softmax_step(s, ok, inb, n, m_i, PS, bh, n_sel, row, G: tl.constexpr, GP: tl.constexpr, SCORES: tl.constexpr,
                  LAZY: tl.constexpr):
    """One tile's logits s [GP, BLOCK] (valid where ok) into the online softmax: -> (the new max m_new, grow: whether
    it moved, the tile's weights p); SCORES stores the masked logits first (PS's rows `row` long). LAZY (the quantized
    kernel): FlashAttention-3's lazy rescaling, the max moves only where some row's grows by more than 8, so the
    caller rescales its accumulators (_rescaled: 78 of the 4-bit kernel's 1,479 loop instructions a tile) on few tiles;
    otherwise the weights stay below e^8, which fp32 sums and bf16 dot inputs hold as well as weights below 1. The
    bf16 kernel rescales every tile: lazily it ran 1.4-1.8% slower (BENCHMARKS.md, session 24)."""
    g = tl.arange(0, GP)
    s = tl.where(ok[None, :], s, -1.0e30)
    if SCORES:
        tl.store(PS + (bh * G + g[:, None]) * row + n[None, :], s, mask=(g[:, None] < G) & inb[None, :])
    m_new = tl.maximum(m_i, tl.max(s, 1))
    grow = tl.max(m_new - m_i, 0) > 8.0
    if LAZY:
        m_new = tl.where(grow, m_new, m_i)
    return m_new, grow, tl.where(ok[None, :], tl.exp(s - m_new[:, None]), 0.0)


@triton.jit
def _rescaled(accs, l_i, alpha):
    """The online softmax's accumulators (a tuple) and normaliser times alpha (exp(old max - new max))."""
    out = ()
    for t in tl.static_range(len(accs)):
        out = out + (accs[t] * alpha[:, None],)
    return out, l_i * alpha


@triton.jit
def _attend_block(K, V, IDX, OK, PS, q, m_i, l_i, acc, n, n_sel, scale, b, h, bh,
                  skb, skh, sks, svb, svh, svs, sib, sih,
                  G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DENSE: tl.constexpr, SCORES: tl.constexpr,
                  NEW: tl.constexpr):
    """_attend_kernel's step over the BLOCK list entries n: the online softmax's (m_i, l_i, acc) updated."""
    d = tl.arange(0, D)
    inb = n < n_sel
    if DENSE:  # contiguous rows: no index list to read; validity from the positions themselves
        inb = inb & (n < tl.load(IDX + bh * 2 + 1))
        idx = tl.load(IDX + bh * 2) + n
        ok = (tl.load(OK + b * sib + h * sih + idx, mask=inb, other=-1) >= 0) & inb
    else:
        ok = (tl.load(OK + b * sib + h * sih + n, mask=inb, other=0) != 0) & inb
        idx = tl.load(IDX + b * sib + h * sih + n, mask=inb, other=0)
    k = tl.load(K + b * skb + h * skh + idx[:, None] * sks + d[None, :], mask=ok[:, None], other=0.0)
    s = (tl.dot(q, tl.trans(k)) * scale).to(tl.float32)  # [GP, BLOCK]; inductor passes scale as fp64
    m_new, _, p = _softmax_step(s, ok, inb, n, m_i, PS, bh, n_sel, n_sel + NEW, G, GP, SCORES, False)
    v = tl.load(V + b * svb + h * svh + idx[:, None] * svs + d[None, :], mask=ok[:, None], other=0.0)
    alpha = tl.exp(m_i - m_new)
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)


def _launch_plan(q, n, dense, scores, ragged=False, quant=False, symbolic=False, new=False, ring=0):
    """The grid and partial buffers of a launch of _attend_kernel (or _attend_quant_kernel) over n rows:
    (GP, the TUNE entry, splits, chunk, (po, pm, pl, s)); _attend_partials says what each buffer holds. ring:
    the quantized kernel's residual entries, attended by programs of their own, a tile each (their partials after the
    splits', their logits after the n rows' and before the new token's).
    symbolic: n is a symbol in a compile (a store of generate.SymbolicSlots says so: dynamo shows a symbolic
    size to Python as a plain int)."""
    B, H, G, D = q.shape
    GP = max(16, triton.next_power_of_2(G))  # tl.dot needs >= 16 rows
    # ~per_sm programs per SM (H200: 132 SMs), each a chunk of whole blocks. Bytes per (sequence, KV head,
    # slot): K and V read once, 2 * D * 2 = 512 in bf16 at D = 128, and 8 of position (dense); scores
    # add a 4 * G = 16 byte logit write, read back once by the epilogue (which writes 4 bytes of probs).
    # Llama-3-8B at B = 8, S = 3.3k slots (10% of 32k): per layer 108 MB of K/V, then 3.4 MB of logits
    # written and read, 0.8 of probs, 1.7 of positions: ~8% on top of K/V.
    kind = "quant" if quant and dense else ("scores" if scores else "dense") if dense else "gather"
    short = kind == "quant" and n <= QUANT_SHORT  # an evicting cache's few slots: fewer, longer programs
    tune = TUNE[kind + ("_few" if B * H <= 16 else "_short" if short else "")]
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    # a ragged run (per-head budgets in one flat buffer of n slots) is split by its own length, so the
    # splits are sized for the average run; sized for n, most programs would find their chunk empty
    per_row = triton.cdiv(n, H) if ragged else n
    most = triton.cdiv(tune["per_sm"] * sms, B * H)
    # symbolic: always `most` splits, so that only the chunk is symbolic (a split count computed from n was
    # specialised, a graph per value); a chunk past n is empty and weighs 0
    splits = most if symbolic else max(1, min(triton.cdiv(per_row, tune["block"]), most))
    chunk = triton.cdiv(triton.cdiv(n, splits), tune["block"]) * tune["block"]
    splits = splits if ragged or symbolic else triton.cdiv(n, chunk)
    programs = splits + triton.cdiv(ring, tune["block"])
    po = torch.empty(B, H, programs, G, D, device=q.device, dtype=torch.float32)
    pm = torch.empty(B, H, programs, G, device=q.device, dtype=torch.float32)
    pl = torch.empty(B, H, programs, G, device=q.device, dtype=torch.float32)
    s = torch.empty(B, H, G, n + ring + new, device=q.device, dtype=torch.float32) if scores else pm  # pm: never written
    return GP, tune, splits, chunk, (po, pm, pl, s)


def _chunk_bound(chunk, symbolic) -> int:
    """_attend_kernel's CHUNK constexpr: the chunk itself for a static cache size (a constant trip count, which
    Triton's interpreter needs, and which took 635 loop instructions a tile in the dense kernel's SASS against 826
    for a runtime one), 0 for a symbolic one (generate.SymbolicSlots: one graph for caches of many sizes): the
    loop then runs to the runtime `chunk`, so no size is specialised."""
    return 0 if symbolic else chunk


def _attend_partials(q, k, v, idx, ok, n, dense, scores, ragged=False, symbolic=False, new=None):
    """Launch _attend_kernel over n rows; -> partials po [B, H, splits, G, D], pm, pl [B, H, splits, G]
    and (scores) the logits [B, H, G, n (+ 1 with new)]. Gather: ok is int8 sharing idx's strides; dense: ok
    is the position buffer and idx each row's run of slots, (start, length) [B, H, 2] contiguous. Ragged:
    dense runs of any length <= n, about n / H on average (a flat buffer of n slots shared by H heads).
    new: the new token's (k, v) [B, H, 1, D], attended by split 0 (its logit last in the logits)."""
    B, H, G, D = q.shape
    GP, tune, splits, chunk, (po, pm, pl, s) = _launch_plan(q, n, dense, scores, ragged, symbolic=symbolic,
                                                            new=new is not None)
    q = q.contiguous()
    kn, vn = (x.contiguous() for x in new) if new is not None else (q, q)  # (q: a pointer never read)
    wrap_triton(_attend_kernel)[(B * H, splits)](
        q, k, v, idx, ok, po, pm, pl, s, kn, vn, n, H, D ** -0.5, chunk,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), ok.stride(0), ok.stride(1),
        CHUNK=_chunk_bound(chunk, symbolic), G=G, GP=GP, D=D, BLOCK=tune["block"], DENSE=dense, SCORES=scores,
        RAGGED=ragged, NEW=new is not None, num_warps=tune["warps"], num_stages=tune["stages"])
    return po, pm, pl, s


# Launch settings: rows per tile, programs per SM, warps, software-pipeline stages; "_few" when at most
# 16 (sequence, KV head) rows share the GPU (batch 1 at Llama-3's 8 KV heads). Chosen from
# scripts/tune_attend.py on the H200 (BENCHMARKS.md): dense 64/2/2/3 the best at batch 8 (32k and 3.3k slots)
# and at batch 1 and 32k, within 1% at batch 1 and 3.3k, once 1- and 2-warp programs were tried (2026-11-30:
# 282 against 311 us for 4 warps at 32k x 8); gather 32/4/4/2 the best at batch 8, 32/2/4/2 at batch 1 (2026-11-29; 1 and 2
# warps not yet tried). quant (codes read by a bf16 model; 2026-11-30, the pieces kernel): the best at 4 and
# 2 bits, one warp per program and 16 programs per SM at batch 8. scores (attend_scores: the dense kernel that also
# stores the logits; `tune_attend.py scores`, 2026-11-30): 114.0 against 121.4 us for the op at batch 8 and 3.3k
# slots with dense's setting, 66.3 against 67.5 at batch 1. quant_short (more than 16 rows of at most QUANT_SHORT
# slots: eviction stacked on the codes; 2026-12-02, 4-bit at 3,328 slots x 8): 31.6 against 34.2 us for quant's
# setting, whose 26 splits a row (and the residual's 5 programs) made 1.9 waves at 8 programs an SM (248 registers).
QUANT_SHORT = 8192
TUNE = {"dense": dict(block=64, per_sm=2, warps=2, stages=3), "dense_few": dict(block=64, per_sm=2, warps=2, stages=3),
        "gather": dict(block=32, per_sm=4, warps=4, stages=2), "gather_few": dict(block=32, per_sm=2, warps=4, stages=2),
        "quant": dict(block=32, per_sm=16, warps=1, stages=3), "quant_few": dict(block=64, per_sm=4, warps=2, stages=3),
        "quant_short": dict(block=32, per_sm=8, warps=1, stages=3),
        "scores": dict(block=32, per_sm=8, warps=1, stages=3),
        "scores_few": dict(block=128, per_sm=4, warps=4, stages=3)}


@triton.jit
def _merge_kernel(PO, PM, PL, OUT, MZ, G: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, SP: tl.constexpr,
                  SB: tl.constexpr, STATS: tl.constexpr):
    """Program (sequence x KV head x query row): the splits' partials merged (each weighted by exp(its max - the
    max of all), an empty split weighing 0), in one launch (inductor made two of a torch merge, a reduction for the
    max and normaliser, then the weighted sum; each is a few microseconds a layer). SP: SPLITS rounded up to a power of two; SB splits are summed at a time (a [SB, D] tile). Merging
    in the attention kernel instead (a row's last program, by an atomic ticket) made that kernel 5 us a layer
    slower at batch 1 (BENCHMARKS.md): the merge then runs serially at the end of the longest program.
    STATS also stores the row's max and normaliser, MZ [2, rows]."""
    row = tl.program_id(0)
    bh, g = row // G, row % G
    s, d = tl.arange(0, SP), tl.arange(0, D)
    pm = tl.load(PM + (bh * SPLITS + s) * G + g, mask=s < SPLITS, other=float("-inf"))
    m = tl.max(pm, 0)
    z = tl.sum(tl.load(PL + (bh * SPLITS + s) * G + g, mask=s < SPLITS, other=0.0) * tl.exp(pm - m), 0)
    acc = tl.zeros([D], tl.float32)
    for s0 in tl.static_range(0, SPLITS, SB):
        sb = s0 + tl.arange(0, SB)
        w = tl.exp(tl.load(PM + (bh * SPLITS + sb) * G + g, mask=sb < SPLITS, other=float("-inf")) - m)
        po = tl.load(PO + ((bh * SPLITS + sb) * G + g)[:, None] * D + d[None, :], mask=(sb < SPLITS)[:, None],
                     other=0.0)
        acc += tl.sum(po * w[:, None], 0)
    tl.store(OUT + row * D + d, (acc / z).to(OUT.dtype.element_ty))
    if STATS:
        tl.store(MZ + row, m)
        tl.store(MZ + tl.num_programs(0) + row, z)


def _merge_out(po, pm, pl, dtype, stats=False):
    """The partials po [B, H, splits, G, D], pm, pl [B, H, splits, G] merged by _merge_kernel: -> [B, H, G, D] in
    dtype; stats: also the softmax's max and normaliser, each [B, H, G] fp32."""
    B, H, splits, G, D = po.shape
    out = torch.empty(B, H, G, D, device=po.device, dtype=dtype)
    mz = torch.empty(2, B, H, G, device=po.device, dtype=torch.float32) if stats else pm  # pm: never written
    SP = triton.next_power_of_2(splits)
    wrap_triton(_merge_kernel)[(B * H * G,)](po, pm, pl, out, mz, G=G, D=D, SPLITS=splits, SP=SP, SB=min(SP, 32),
                                             STATS=stats, num_warps=4)
    return (out, mz[0], mz[1]) if stats else out


@triton_op("kvcompress::gather_attend", mutates_args={})
def gather_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                  ok: torch.Tensor) -> torch.Tensor:
    """q [B, H_kv, G, D] attends to k/v [B, H_kv, S, D] rows idx [B, H_kv, K] where ok [B, H_kv, K]
    -> [B, H_kv, G, D]. Reads K selected rows per KV head, never the whole cache."""
    idx, ok8 = idx.contiguous(), ok.to(torch.int8).contiguous()  # OK shares IDX's strides
    po, pm, pl, _ = _attend_partials(q, k, v, idx, ok8, idx.shape[-1], dense=False, scores=False)
    return _merge_out(po, pm, pl, q.dtype)


# Dense reads: the same kernel over slots 0..S-1, valid where the cache's position buffer is >= 0 (read in
# the kernel: no separate mask pass) and below the sequence's limit (a cache whose slot is the position
# passes input_pos + 1, so its unwritten tail is never loaded).

def _every_slot(pos, H):
    """Runs (start 0, length S) [B, H, 2] over all S = pos.shape[-1] slots; built from pos so that a symbolic S
    (generate.SymbolicSlots) stays a symbol (torch.tensor of it would make it a constant)."""
    B, S = pos.shape[0], pos.shape[-1]
    return torch.stack([pos.new_zeros(B, H), pos.new_full((B, H), S)], -1)


@triton_op("kvcompress::attend_scores", mutates_args={})
def attend_scores(qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                  k_new: torch.Tensor, v_new: torch.Tensor, symbolic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """kvstore.DenseStore.attend_with_new: qg [B, H_kv, G, D] over the slots of k/v [B, H_kv, S, D] where pos
    [B, H_kv, S] >= 0, plus the new token k/v_new [B, H_kv, 1, D] -> out [B, H_kv, G, D] (qg's dtype) and
    the group-mean probabilities [B, H_kv, S + 1] fp32 (cached slots, then the new token). One pass over
    K/V that also stores the logits (the new token's with them: its split attends it first), one merge that
    also gives the final max and normaliser, which then turn the logits into probabilities (in torch, so that
    inductor fuses them into the policy's score update). The new token inside the kernel, not beside it, saved
    the launches of its logit and of a torch merge (BENCHMARKS.md, session 16)."""
    runs = _every_slot(pos, qg.shape[1])
    po, pm, pl, s = _attend_partials(qg, k, v, runs, pos, k.shape[2], dense=True, scores=True, symbolic=symbolic,
                                     new=(k_new, v_new))
    out, m, z = _merge_out(po, pm, pl, qg.dtype, stats=True)
    return out, (torch.exp(s - m[..., None]) / z[..., None]).mean(2)


@triton_op("kvcompress::dense_attend", mutates_args={})
def dense_attend(qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, runs: torch.Tensor,
                 n: int, ragged: bool = False, symbolic: bool = False) -> torch.Tensor:
    """cache.attend on CUDA: qg [B, H_kv, G, D] over each row's run of slots start .. start + length - 1,
    (start, length) = runs [B, H_kv, 2] with length <= n, of k/v [B, H_kv, S, D] where pos [B, H_kv, S]
    >= 0 -> [B, H_kv, G, D]. Every valid slot's row is read once; masked loads never fetch another. A
    row with no valid slot gives nan. Ragged: head-budget caches pass one flat buffer of n slots per
    sequence, expanded over heads with stride 0, and each head's run in it (of any length). symbolic: n is a
    symbol in a compile (_launch_plan)."""
    po, pm, pl, _ = _attend_partials(qg, k, v, runs.contiguous(), pos, n, dense=True, scores=False,
                                     ragged=ragged, symbolic=symbolic)
    return _merge_out(po, pm, pl, qg.dtype)


# ---- quantized caches (kvstore.QuantStore, KIVI): attention that reads the codes in place ----------
# The same online softmax as _attend_kernel, but each tile of K and V rows is loaded as packed codes
# (D bits / 8 bytes a row) with its scales and zero points and dequantized in registers: the full-precision
# cache is never materialised. The residual's R + G full-precision rows per KV head are attended by programs of
# their own in the same launch, and their partials merge with the splits'.

@triton.jit
def _code_pieces(b, BITS: tl.constexpr, CT: tl.constexpr, ASM: tl.constexpr):
    """Packed bytes [R, C] -> the 8 / BITS pieces of codes (piece t: every byte's code at bits t BITS), each [R, C]
    of type CT. A 16-bit CT gets its codes without an int-to-float conversion (a quarter-rate instruction, which
    bound the fp32 path): a code's bits OR'd into the mantissa of 2^e are exactly 2^e + code, and one subtraction
    leaves the code; fp16 (1024.0, 10 mantissa bits) holds every code, bf16 (128.0, 7 bits) 2- and 4-bit ones.
    ASM (a 16-bit CT on the GPU) does it in PTX (_unpack_asm) on four bytes in a 32-bit register at a time, two
    codes per instruction, where Triton's byte-wise ops with tl.join cost about five per code."""
    PER: tl.constexpr = 8 // BITS
    if ASM:
        UNPACK: tl.constexpr = _unpack_asm(BITS, 0x4300 if CT == tl.bfloat16 else 0x6400)
        ct = CT.value
        if PER == 4:  # two 32-bit output registers a piece, then the input word
            r = tl.inline_asm_elementwise(UNPACK, "=&r," * 8 + "r", [b], (ct, ct, ct, ct), True, 4)
        elif PER == 2:
            r = tl.inline_asm_elementwise(UNPACK, "=&r," * 4 + "r", [b], (ct, ct), True, 4)
        else:
            r = (tl.inline_asm_elementwise(UNPACK, "=&r," * 2 + "r", [b], ct, True, 4),)
    else:
        M: tl.constexpr = (1 << BITS) - 1
        b = b.to(tl.int16) if CT != tl.float32 else b.to(tl.int32)
        r = ()
        for t in tl.static_range(PER):
            c = (b >> (t * BITS)) & M
            if CT == tl.float16:
                c = (c | 0x6400).to(tl.float16, bitcast=True)
            elif CT == tl.bfloat16:
                c = (c | 0x4300).to(tl.bfloat16, bitcast=True)
            else:
                c = c.to(tl.float32)
            r = r + (c,)
    out = ()
    for t in tl.static_range(PER):
        if CT == tl.float16:
            out = out + (r[t] - 1024.0,)
        elif CT == tl.bfloat16:
            out = out + (r[t] - 128.0,)
        else:
            out = out + (r[t],)
    return out


@triton.constexpr_function
def _unpack_asm(bits, magic):
    """_code_pieces' PTX (magic: the high half of 2^e, 0x4300 bf16, 0x6400 fp16): $IN holds four packed bytes
    b0..b3 -> 8 / bits pieces, each two registers of two 16-bit halves 2^e + code: (b0's code, b1's), then (b2's,
    b3's). Elementwise per byte, as inline_asm_elementwise requires (which four elements share a register
    depends on the tensor's layout): a PRMT moves b0, b1 (b2, b3) into the low bytes of the halves, a shift
    brings piece t's bits down, one LOP3 masks the code and ORs in the exponent. The outputs are the temporaries
    (early-clobber: none shares $IN's register). A constexpr function, not a string argument: inductor writes a
    user kernel's string arguments into its launch code as names."""
    per, mask = 8 // bits, (1 << bits) - 1
    ops = []
    for pair, sel in enumerate(("0x4140", "0x4342")):  # bytes 0, 1 (2, 3) of the word into bytes 0 and 2
        ops.append(f"prmt.b32 ${pair}, ${2 * per}, 0, {sel};")
        ops += [f"shr.u32 ${2 * t + pair}, ${pair}, {t * bits};" for t in range(1, per)]
        ops += [f"lop3.b32 ${2 * t + pair}, ${2 * t + pair}, {mask | mask << 16:#010x}, {magic | magic << 16:#010x}, 0xEA;"
                for t in range(per)]
    return " ".join(ops)


@triton.jit
def _piece_channels(t, dp, DP: tl.constexpr, PER: tl.constexpr, PLANAR: tl.constexpr):
    """The channels of piece t's columns dp (kvstore.pack_codes' layouts): t DP + j planar, else PER j + t."""
    return t * DP + dp if PLANAR else dp * PER + t


@triton.jit
def _row_pieces(rows, ok, DP: tl.constexpr, PER: tl.constexpr, PLANAR: tl.constexpr):
    """Full-precision rows (pointers rows [R, 1] to their first channel, loaded where ok [R]) as the PER pieces of
    channels _piece_channels gives, each [R, DP]. Interleaved pieces come from one contiguous load split in
    registers: loaded piece by piece at a stride of PER, the residual's 2-bit program took 257 scalar loads a tile
    against 33 (sm_90 SASS)."""
    if PLANAR or PER == 1:
        dp = tl.arange(0, DP)
        out = ()
        for t in tl.static_range(PER):
            ch = _piece_channels(t, dp, DP, PER, PLANAR)
            out = out + (tl.load(rows + ch[None, :], mask=ok[:, None], other=0.0),)
    else:
        x = tl.load(rows + tl.arange(0, DP * PER)[None, :], mask=ok[:, None], other=0.0)
        if PER == 2:  # channel 2 j + t
            out = tl.split(tl.reshape(x, (x.shape[0], DP, 2)))
        else:  # channel 4 j + 2 a + c: split by c (each [R, DP, a]), then by a
            lo, hi = tl.split(tl.reshape(x, (x.shape[0], DP, 2, 2)))
            t0, t2 = tl.split(lo)
            t1, t3 = tl.split(hi)
            out = (t0, t1, t2, t3)
    return out


@triton.jit
def _attend_quant_kernel(Q, KQ, KS, KZ, VQ, VS, VZ, IDX, OK, POS, FRONT, RK, RV, RSLOT, RPOS, RSEL, KN, VN, PO, PM, PL,
                         PS, n_sel, H, HC, SQ, SP, NGR, scale, sqb, sqh, sqg, sib, sih, CHUNK: tl.constexpr,
                         G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, DENSE: tl.constexpr,
                         SCORES: tl.constexpr, BITS: tl.constexpr, QG: tl.constexpr, ALIGNED: tl.constexpr,
                         NATIVE: tl.constexpr, ASM: tl.constexpr, PLANAR: tl.constexpr, RR: tl.constexpr,
                         SEL: tl.constexpr, NEW: tl.constexpr):
    """Program (sequence x KV head, split) as _attend_kernel's, over codes: kq/vq [B, HC, SQ, D BITS / 8] uint8,
    ks/kz [B, HC, NGR, D] (key groups of QG slots), vs/vz [B, HC, SQ, D / QG] (value groups of QG channels),
    all contiguous; HC = H (a row per KV head) or 1 (a flat row every head reads). A slot counts if its token
    is in codes: 0 <= pos < FRONT[b] (DENSE, over the run IDX[b, h, :2]; POS [B, HC, SP]), or OK != 0 (gather).
    A tile's codes are never put back into channel order: piece t of the bytes (_code_pieces) holds channels
    t DP + j (PLANAR: kvstore.pack_codes' 4-bit layout) or PER j + t, so q.K^T is a sum of PER dots over the
    pieces' channels and p.V makes PER partial outputs; PLANAR pieces are contiguous channels, so their query
    slices, key scales and output columns are vectors (strided otherwise). ALIGNED (dense runs from slot 0,
    BLOCK a multiple or a divisor of QG): a tile is whole key groups or lies in one, so each group's scale and
    zero row is loaded once and broadcast over its slots (loaded per slot, they held the 4-bit cache at 0.50x the
    bf16 one; BENCHMARKS.md). NATIVE (a bf16 model at 2 or 4 bits, an fp16 one at any): tiles are dequantized in the
    model's own dtype (one packed fma per two elements, scales used as stored); otherwise in fp32.
    The last RP = cdiv(RR, BLOCK) programs of each row attend the full-precision residual instead, a tile each: entries
    rk/rv [B, H, RR, D] that hold a token not yet in codes (position RPOS >= FRONT[b], still at its slot RSLOT: POS
    says so; SEL: and RSEL [B, H, RR] int8 != 0, a selection's), and (NEW) the first of them the new token KN/VN,
    so the merge of one launch's partials is the whole softmax (one program looping over the residual's tiles, at
    3.3k slots, was the launch's longest: 0.2 ms a step of 4-bit SnapKV at 32k x 8). SCORES stores the logits in
    PS's rows of n_sel + RR + NEW: the codes' slots, the residual's entries, the new token."""
    bh, split = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    row = b * HC + h % HC
    PER: tl.constexpr = 8 // BITS
    DP: tl.constexpr = D // PER
    g, dp, dg = tl.arange(0, GP), tl.arange(0, DP), tl.arange(0, D // QG)
    qs = ()
    accs = ()
    for t in tl.static_range(PER):
        ch = _piece_channels(t, dp, DP, PER, PLANAR)
        qs = qs + (tl.load(Q + b * sqb + h * sqh + g[:, None] * sqg + ch[None, :], mask=g[:, None] < G, other=0.0),)
        accs = accs + (tl.zeros([GP, DP], tl.float32),)
    CT: tl.constexpr = qs[0].dtype if NATIVE else tl.float32  # dequantization's type
    front = tl.load(FRONT + b)
    m_i = tl.full([GP], -1.0e30, tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    NG: tl.constexpr = BLOCK // QG if BLOCK >= QG else 1  # key groups a tile spans (ALIGNED)
    # value scales loaded per token and broadcast over whole groups of a piece's columns: interleaved, column j of
    # every piece is in group j // (QG / PER); PLANAR, piece t spans NGP groups from t DP / QG (or lies in one)
    WHOLE: tl.constexpr = (DP % QG == 0 or QG % DP == 0) if PLANAR else QG % PER == 0
    NGP: tl.constexpr = DP // QG if DP >= QG else 1
    dgp = tl.arange(0, NGP)
    ROW: tl.constexpr = RR + NEW  # PS's row: n_sel + ROW logits
    RP: tl.constexpr = (RR + BLOCK - 1) // BLOCK  # the residual's programs, a tile each
    tile = split - (tl.num_programs(1) - RP)
    if tile >= 0:  # the residual, in programs of their own (its rows are bf16, not codes): as short as a code tile
        if NEW:  # the first starts from the new token: its weight 1 at max s_new
            first = tile == 0
            s_new = tl.zeros([GP], tl.float32)
            for t in tl.static_range(PER):
                ch = _piece_channels(t, dp, DP, PER, PLANAR)
                s_new += tl.sum(qs[t].to(tl.float32) * tl.load(KN + bh * D + ch).to(tl.float32)[None, :], 1)
            s_new = (s_new * scale).to(tl.float32)
            if SCORES:
                tl.store(PS + (bh * G + g) * (n_sel + ROW) + n_sel + RR, s_new, mask=(g < G) & first)
            m_i, l_i = tl.where(first, s_new, m_i), tl.where(first, 1.0, l_i)
            new = ()
            for t in tl.static_range(PER):
                ch = _piece_channels(t, dp, DP, PER, PLANAR)
                new = new + (tl.where(first, tl.load(VN + bh * D + ch).to(tl.float32)[None, :] + accs[t], accs[t]),)
            accs = new
        r = tile * BLOCK + tl.arange(0, BLOCK)
        inb = r < RR
        rpos = tl.load(RPOS + bh * RR + r, mask=inb, other=-1)
        rslot = tl.load(RSLOT + bh * RR + r, mask=inb, other=-1)
        ok = (rpos >= front) & (rslot >= 0) & inb  # kvstore.QuantStore.ring_ok, here: no launch of its own
        ok = ok & (tl.load(POS + row * SP + rslot, mask=ok, other=-1) == rpos)
        if SEL:
            ok = ok & (tl.load(RSEL + bh * RR + r, mask=inb, other=0) != 0)
        rows = (bh * RR + r)[:, None] * D
        kp = _row_pieces(RK + rows, ok, DP, PER, PLANAR)
        s = tl.zeros([GP, BLOCK], tl.float32)
        for t in tl.static_range(PER):
            s = tl.dot(qs[t], tl.trans(kp[t]), s)
        m_new, grow, p = _softmax_step((s * scale).to(tl.float32), ok, inb, n_sel + r, m_i, PS, bh, n_sel,
                                       n_sel + ROW, G, GP, SCORES, True)
        vp = _row_pieces(RV + rows, ok, DP, PER, PLANAR)
        if grow:
            accs, l_i = _rescaled(accs, l_i, tl.exp(m_i - m_new))
        new = ()
        for t in tl.static_range(PER):
            new = new + (tl.dot(p.to(vp[t].dtype), vp[t], accs[t]),)
        accs = new
        l_i = l_i + tl.sum(p, 1)
        m_i = m_new
    else:
        for off in range(0, CHUNK, BLOCK):
            n = split * CHUNK + off + tl.arange(0, BLOCK)
            inb = n < n_sel
            if DENSE:
                inb = inb & (n < tl.load(IDX + bh * 2 + 1))
                idx = tl.load(IDX + bh * 2) + n
                p = tl.load(POS + row * SP + idx, mask=inb, other=-1)
                ok = (p >= 0) & (p < front) & inb
            else:
                ok = (tl.load(OK + b * sib + h * sih + n, mask=inb, other=0) != 0) & inb
                idx = tl.load(IDX + b * sib + h * sih + n, mask=inb, other=0)
            slot = (row * SQ + idx).to(tl.int64)
            kp = _code_pieces(tl.load(KQ + slot[:, None] * DP + dp[None, :], mask=ok[:, None], other=0), BITS, CT, ASM)
            s = tl.zeros([GP, BLOCK], tl.float32)
            gi = (split * CHUNK + off) // QG + tl.arange(0, NG)  # ALIGNED: the tile's key groups
            for t in tl.static_range(PER):
                ch = _piece_channels(t, dp, DP, PER, PLANAR)
                if ALIGNED:
                    grp = (row * NGR + gi).to(tl.int64)[:, None] * D + ch[None, :]
                    ks = tl.load(KS + grp, mask=gi[:, None] < NGR, other=0.0).to(CT)
                    kz = tl.load(KZ + grp, mask=gi[:, None] < NGR, other=0.0).to(CT)
                    k = tl.reshape(tl.reshape(kp[t], (NG, BLOCK // NG, DP)) * ks[:, None, :] + kz[:, None, :],
                                   (BLOCK, DP))
                else:
                    grp = (row * NGR + idx // QG).to(tl.int64)[:, None] * D + ch[None, :]
                    k = kp[t] * tl.load(KS + grp, mask=ok[:, None], other=0.0).to(CT) + \
                        tl.load(KZ + grp, mask=ok[:, None], other=0.0).to(CT)
                s = tl.dot(qs[t], tl.trans(k.to(qs[t].dtype)), s)
            m_new, grow, p = _softmax_step((s * scale).to(tl.float32), ok, inb, n, m_i, PS, bh, n_sel, n_sel + ROW,
                                           G, GP, SCORES, True)
            if grow:
                accs, l_i = _rescaled(accs, l_i, tl.exp(m_i - m_new))
            vp = _code_pieces(tl.load(VQ + slot[:, None] * DP + dp[None, :], mask=ok[:, None], other=0), BITS, CT, ASM)
            pv = p.to(qs[0].dtype)
            if WHOLE and not PLANAR:
                vg = slot[:, None] * (D // QG) + dg[None, :]
                vs = tl.load(VS + vg, mask=ok[:, None], other=0.0).to(CT)[:, :, None]
                vz = tl.load(VZ + vg, mask=ok[:, None], other=0.0).to(CT)[:, :, None]
                vs = tl.reshape(tl.broadcast_to(vs, (BLOCK, D // QG, QG // PER)), (BLOCK, DP))
                vz = tl.reshape(tl.broadcast_to(vz, (BLOCK, D // QG, QG // PER)), (BLOCK, DP))
            new = ()
            for t in tl.static_range(PER):
                if WHOLE and PLANAR:  # this piece's groups, each over DP / NGP of its columns
                    vg = slot[:, None] * (D // QG) + ((t * DP) // QG + dgp)[None, :]
                    vs = tl.load(VS + vg, mask=ok[:, None], other=0.0).to(CT)[:, :, None]
                    vz = tl.load(VZ + vg, mask=ok[:, None], other=0.0).to(CT)[:, :, None]
                    vs = tl.reshape(tl.broadcast_to(vs, (BLOCK, NGP, DP // NGP)), (BLOCK, DP))
                    vz = tl.reshape(tl.broadcast_to(vz, (BLOCK, NGP, DP // NGP)), (BLOCK, DP))
                if WHOLE:
                    v = vp[t] * vs + vz
                else:
                    vg = slot[:, None] * (D // QG) + (_piece_channels(t, dp, DP, PER, PLANAR) // QG)[None, :]
                    v = vp[t] * tl.load(VS + vg, mask=ok[:, None], other=0.0).to(CT) + \
                        tl.load(VZ + vg, mask=ok[:, None], other=0.0).to(CT)
                new = new + (tl.dot(pv, v.to(pv.dtype), accs[t]),)
            accs = new
            l_i = l_i + tl.sum(p, 1)
            m_i = m_new
    out = (bh * tl.num_programs(1) + split) * G + g
    for t in tl.static_range(PER):
        ch = _piece_channels(t, dp, DP, PER, PLANAR)
        tl.store(PO + out[:, None] * D + ch[None, :], accs[t], mask=g[:, None] < G)
    tl.store(PM + out, m_i, mask=g < G)
    tl.store(PL + out, l_i, mask=g < G)


NATIVE_DEQUANT = True  # dequantize in the model's 16-bit dtype where exact (tune_attend.py quant times both)


def _quant_partials(q, kq, ks, kz, vq, vs, vz, pos, front, rk, rv, rslot, rpos, rsel, idx, ok, n, dense, scores, bits,
                    group, planar, new=None):
    """_attend_partials over the codes (same splits and tuning: a tile's bytes are fewer, its rows as many), and the
    residual's entries that hold a token not in codes (and in rsel [B, H, R + G], if given; and the new token (k, v)
    [B, H, 1, D]) in programs of their own:
    -> partials po, pm, pl over every program and (scores) the logits [B, H, G, n + R + G (+ 1 with new)]."""
    B, H, G, D = q.shape
    assert D * bits // 8 >= 16, "a piece's tl.dot needs 16 bytes a row (kvstore.QuantStore.kernel)"
    RR = rk.shape[2]
    GP, tune, splits, chunk, (po, pm, pl, s) = _launch_plan(q, n, dense, scores, quant=True, new=new is not None,
                                                            ring=RR)
    q, idx, ok = q.contiguous(), idx.contiguous(), ok.contiguous()
    kn, vn = (x.contiguous() for x in new) if new is not None else (q, q)  # (q: a pointer never read)
    native = NATIVE_DEQUANT and (q.dtype == torch.float16 or q.dtype == torch.bfloat16 and bits <= 4)
    wrap_triton(_attend_quant_kernel)[(B * H, po.shape[2])](
        q, kq, ks, kz, vq, vs, vz, idx, ok, pos.contiguous(), front, rk, rv, rslot, rpos,
        rslot if rsel is None else rsel.to(torch.int8).contiguous(), kn, vn,
        po, pm, pl, s, n, H, kq.shape[1], kq.shape[2], pos.shape[-1], ks.shape[2], D ** -0.5,
        q.stride(0), q.stride(1), q.stride(2), ok.stride(0), ok.stride(1),
        # a constant chunk (int: a symbolic size is specialised here; quantized stores compile per size)
        CHUNK=int(chunk), G=G, GP=GP, D=D, BLOCK=tune["block"], DENSE=dense, SCORES=scores, BITS=bits, QG=group,
        # per-head rows (runs start at 0) whose tiles never straddle a key group
        ALIGNED=dense and kq.shape[1] == H and (tune["block"] % group == 0 or group % tune["block"] == 0),
        NATIVE=native, ASM=native and q.is_cuda, PLANAR=planar, RR=RR, SEL=rsel is not None, NEW=new is not None,
        num_warps=tune["warps"], num_stages=tune["stages"])
    return po, pm, pl, s


@triton_op("kvcompress::quant_attend", mutates_args={})
def quant_attend(qg: torch.Tensor, kq: torch.Tensor, ks: torch.Tensor, kz: torch.Tensor, vq: torch.Tensor,
                 vs: torch.Tensor, vz: torch.Tensor, pos: torch.Tensor, front: torch.Tensor, rk: torch.Tensor,
                 rv: torch.Tensor, rslot: torch.Tensor, rpos: torch.Tensor, rsel: Optional[torch.Tensor], bits: int,
                 group: int, planar: bool, idx: torch.Tensor,
                 ok: torch.Tensor, n: int, dense: bool) -> torch.Tensor:
    """kvstore.QuantStore's decode attention: qg [B, H_kv, G, D] over the codes (dense: each head's run
    (start, length) = idx [B, H_kv, 2] of slots in codes, ok unused; gather: the n rows idx where ok) and
    the residual's entries that hold a token not in codes (rslot, rpos [B, H_kv, R + G]; and in rsel, if given)
    -> [B, H_kv, G, D]. One launch (the residual in programs of their own: a second launch, a torch.cat of the
    partials and a torch merge cost 0.33 ms a step of 4-bit SnapKV at 32k x 8, BENCHMARKS.md) and the merge kernel."""
    okc = ok.to(torch.int8) if not dense else ok  # dense: OK is never read
    pc = _quant_partials(qg, kq, ks, kz, vq, vs, vz, pos, front, rk, rv, rslot, rpos, rsel, idx, okc, n, dense, False,
                         bits, group, planar)
    return _merge_out(*pc[:3], qg.dtype)


@triton_op("kvcompress::quant_attend_scores", mutates_args={})
def quant_attend_scores(qg: torch.Tensor, kq: torch.Tensor, ks: torch.Tensor, kz: torch.Tensor, vq: torch.Tensor,
                        vs: torch.Tensor, vz: torch.Tensor, pos: torch.Tensor, front: torch.Tensor, rk: torch.Tensor,
                        rv: torch.Tensor, rslot: torch.Tensor, rpos: torch.Tensor, rsel: Optional[torch.Tensor],
                        bits: int, group: int, planar: bool,
                        k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """attend_scores over a QuantStore: out [B, H_kv, G, D] and the group-mean probabilities [B, H_kv, S + R + G + 1]
    of the codes' slots, then of the residual's entries, then of the new token k/v_new [B, H_kv, 1, D]."""
    runs = _every_slot(pos, qg.shape[1])
    po, pm, pl, s = _quant_partials(qg, kq, ks, kz, vq, vs, vz, pos, front, rk, rv, rslot, rpos, rsel, runs, runs,
                                    pos.shape[-1], True, True, bits, group, planar, new=(k_new, v_new))
    out, m, z = _merge_out(po, pm, pl, qg.dtype, stats=True)
    return out, (torch.exp(s - m[..., None]) / z[..., None]).mean(2)


# ---- a quantized cache's flush (kvstore.QuantStore.advance where slots are not positions) -------------
# An evicting or appending policy on a QuantStore flushes one residual entry a step per (sequence, KV head): its
# value quantized into its slot, and its key group re-quantized with the members already in codes. In torch that
# was about 12 inductor kernels a layer (gathers of the group, dequantize, the range, the codes, the index_puts
# into a spare group for the entries that are not flushed): ~0.5 ms of a 4-bit SnapKV step at 32k x 8
# (BENCHMARKS.md). Here it is one launch of programs of a few key channels each, their stores masked where nothing
# is flushed.

@triton.jit
def _round_half_even(x):
    """torch.round (half to even) without libdevice, which Triton's interpreter lacks."""
    r = tl.floor(x + 0.5)
    return tl.where((r - x == 0.5) & (r - 2.0 * tl.floor(r * 0.5) == 1.0), r - 1.0, r)


@triton.jit
def _minmax_codes(x, mn, mx, QMAX: tl.constexpr, DT: tl.constexpr):
    """kvstore.minmax_quantize: x fp32 on the grid [mn, mx] (broadcast) -> (codes int32, scale, zero in DT);
    correctly rounded divisions, as torch's."""
    zero = mn.to(DT)
    scale = tl.math.div_rn(mx - zero.to(tl.float32), tl.full(mx.shape, QMAX, tl.float32)).to(DT)
    sf = scale.to(tl.float32)
    c = tl.math.div_rn(x - zero.to(tl.float32), tl.broadcast_to(tl.where(sf > 0, sf, 1.0), x.shape))
    c = tl.minimum(tl.maximum(_round_half_even(c), 0.0), QMAX)
    return tl.where(sf > 0, c, 0.0).to(tl.int32), scale, zero


@triton.jit
def _pack_rows(c, R: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, PLANAR: tl.constexpr):
    """Codes c [R, D] int32 in channel order -> bytes [R, D BITS / 8] (kvstore.pack_codes' layouts)."""
    PER: tl.constexpr = 8 // BITS
    t = tl.arange(0, PER) * BITS
    if PLANAR:
        out = tl.sum(tl.reshape(c, (R, PER, D // PER)) << t[None, :, None], 1)
    else:
        out = tl.sum(tl.reshape(c, (R, D // PER, PER)) << t[None, None, :], 2)
    return out.to(tl.uint8)


@triton.jit
def _flush_kernel(KQ, KS, KZ, VQ, VS, VZ, RK, RV, RSLOT, RPOS, POS, OLD, FRONT, H, S, SQ, NGR, RR,
                  D: tl.constexpr, QG: tl.constexpr, BITS: tl.constexpr, PLANAR: tl.constexpr, CH: tl.constexpr):
    """Program (sequence x KV head, part): position FRONT[b] - 1 leaves the residual (OLD[b] < FRONT[b]); if its
    entry still holds a cached token (rpos, and POS at its slot rslot, say so), its value is quantized into the slot
    (per token, groups of QG channels; part 0) and its slot's key group is re-quantized from the members in codes
    (positions below OLD) and the new key, over a range that only widens (kvstore.QuantStore.requantize_groups):
    each part CH channels of it, the channels of a run of whole bytes of the packed rows (keys are quantized per
    channel: the parts share nothing; FLUSH_CHANNELS says why the parts are small). Buffers as in QuantStore, rows =
    KV heads, contiguous."""
    bh, part = tl.program_id(0), tl.program_id(1)
    b = bh // H
    front, old = tl.load(FRONT + b), tl.load(OLD + b)
    r = tl.maximum(front - 1, 0) % RR
    es, ep = tl.load(RSLOT + bh * RR + r), tl.load(RPOS + bh * RR + r)
    alive = (front > old) & (ep == front - 1) & (es >= 0)
    es = tl.maximum(es, 0)
    # every load below depends on es only, not on alive: the stores are masked instead, so the loads overlap the
    # check (a program is a chain of dependent loads; a branch on alive added one more round trip)
    alive = alive & (tl.load(POS + bh * S + es) == ep)
    QMAX: tl.constexpr = (1 << BITS) - 1
    PER: tl.constexpr = 8 // BITS
    DP: tl.constexpr = D // PER
    BP: tl.constexpr = CH // PER  # this part's bytes of a packed row
    DT: tl.constexpr = KS.dtype.element_ty
    # the value, per token (part 0: a value group spans the channels of several parts in the planar layout)
    d, dp = tl.arange(0, D), tl.arange(0, DP)
    v = tl.reshape(tl.load(RV + (bh * RR + r) * D + d).to(tl.float32), (D // QG, QG))
    c, scale, zero = _minmax_codes(v, tl.min(v, 1)[:, None], tl.max(v, 1)[:, None], QMAX, DT)
    first = alive & (part == 0)
    tl.store(VQ + (bh * SQ + es) * DP + dp[None, :], _pack_rows(tl.reshape(c, (1, D)), 1, D, BITS, PLANAR), mask=first)
    tl.store(VS + (bh * SQ + es) * (D // QG) + tl.arange(0, D // QG)[:, None], scale, mask=first)
    tl.store(VZ + (bh * SQ + es) * (D // QG) + tl.arange(0, D // QG)[:, None], zero, mask=first)
    # the key group: this part's channels, byte j's piece t in (j, t) order (kvstore.pack_codes' layouts)
    i = tl.arange(0, CH)
    j, t = part * BP + i // PER, i % PER
    ch = _piece_channels(t, j, DP, PER, PLANAR)
    gi = es // QG
    m = gi * QG + tl.arange(0, QG)
    codes = (tl.load(KQ + (bh * SQ + m)[:, None] * DP + j[None, :]).to(tl.int32) >> (t * BITS)[None, :]) & QMAX
    ks = tl.load(KS + (bh * NGR + gi) * D + ch).to(tl.float32)
    kz = tl.load(KZ + (bh * NGR + gi) * D + ch).to(tl.float32)
    pm = tl.load(POS + bh * S + tl.minimum(m, S - 1), mask=m < S, other=-1)
    had = (pm >= 0) & (pm < old)
    fresh = m == es
    x = tl.where(fresh[:, None], tl.load(RK + (bh * RR + r) * D + ch).to(tl.float32)[None, :],
                 codes.to(tl.float32) * ks[None, :] + kz[None, :])
    inc = had | fresh
    mn = tl.min(tl.where(inc[:, None], x, float("inf")), 0)
    mx = tl.max(tl.where(inc[:, None], x, float("-inf")), 0)
    any_old = tl.max(had.to(tl.int32), 0) > 0  # the group held codes: its old range is kept
    mn = tl.where(any_old, tl.minimum(mn, kz), mn)
    mx = tl.where(any_old, tl.maximum(mx, kz + ks * QMAX), mx)
    c, scale, zero = _minmax_codes(x, mn[None, :], mx[None, :], QMAX, DT)
    packed = _pack_rows(c, QG, CH, BITS, False)  # (j, t) order: byte j's pieces side by side, whatever the layout
    tl.store(KQ + (bh * SQ + m)[:, None] * DP + part * BP + tl.arange(0, BP)[None, :], packed, mask=alive)
    tl.store(KS + (bh * NGR + gi) * D + ch[None, :], scale, mask=alive)
    tl.store(KZ + (bh * NGR + gi) * D + ch[None, :], zero, mask=alive)


# quant_flush's key channels and warps a program: a program is bound by its threads' instruction latency, not by
# bytes (~13 us a layer for 32 x 128 elements on 4 warps and for 32 x 32 on 1, 32 elements a thread either way), so
# each thread takes 4 elements of a key group's 32 x 16
FLUSH_CHANNELS, FLUSH_WARPS = 16, 4


@triton_op("kvcompress::quant_flush", mutates_args={"kq", "ks", "kz", "vq", "vs", "vz"})
def quant_flush(kq: torch.Tensor, ks: torch.Tensor, kz: torch.Tensor, vq: torch.Tensor, vs: torch.Tensor,
                vz: torch.Tensor, rk: torch.Tensor, rv: torch.Tensor, rslot: torch.Tensor, rpos: torch.Tensor,
                pos: torch.Tensor, old_front: torch.Tensor, front: torch.Tensor, bits: int, group: int,
                planar: bool) -> None:
    """kvstore.QuantStore.advance's unaligned flush, per-head code rows (kq ... vz [B, H_kv, ...]), in place:
    position front - 1 of each sequence leaves the residual (rk, rv, rslot, rpos [B, H_kv, R + G, ...]) when
    front > old_front [B]; pos [B, H_kv, S] the cache's positions."""
    B, H, S = pos.shape
    D = rk.shape[3]
    CH = min(D, FLUSH_CHANNELS)
    wrap_triton(_flush_kernel)[(B * H, D // CH)](
        kq, ks, kz, vq, vs, vz, rk, rv, rslot, rpos, pos.contiguous(), old_front, front, H, S, kq.shape[2],
        ks.shape[2], rk.shape[2], D=D, QG=group, BITS=bits, PLANAR=planar, CH=CH, num_warps=FLUSH_WARPS)


# ---- Spotlight's hash codes: the hash and the sign bits packed, one launch ---------------------------
# The torch path (cache.Spotlight.hash, then pack_bits) is a dtype copy, two cuBLAS bmm calls and two fused
# pointwise kernels per hash: 15 us of bmm a layer at batch 1 on the H200, besides the pointwise ones
# (BENCHMARKS.md, "Where a decode step goes"), for a few rows of 64-128 numbers per head.

HASH_WARPS = 8  # hash_codes' warps (sm_90 SASS: see _hash_codes_kernel)


@triton.jit
def _hash_codes_kernel(X, X2, LIFT, W1, B1, W2, B2, OUT, H, N, N2, sxb, sxh, sxn, s2b, s2h, s2n, D: tl.constexpr,
                       NB: tl.constexpr, NP: tl.constexpr, LIFTED: tl.constexpr, MLP: tl.constexpr):
    """Program (sequence x hash head h): the codes of rows x = X[b, h, :N] then X2[b, h, :N2] [N + N2, D]
    (cache.Spotlight.hash, then pack_bits): LIFTED x = x LIFT[h] ([D, NB]: a lift, or lsh_retrieval's R); MLP
    y = x + SiLU(x W1[h] + b1), x = y + (y W2[h] + b2); bit i of word w = (x[64 w + i] > 0) -> OUT
    [B, H, N + N2, NB / 64] int64. Every weight's load is issued before the first product. That did not shorten a
    launch (H200: 8.3 us with the loads in program order, 9.1 us for the query's and the key's rows with them all
    first; 4.6 us with R alone, 1.2 us with no weight): one program's chain of ~2,400 instructions on one SM is
    the time (BENCHMARKS.md, session 18). tf32x3 products: near fp32's on the tensor cores (a code bit is the sign
    of a sum: only sums within rounding of 0 may differ from cuBLAS's fp32); ieee's FMA products held each
    128 x 128 weight in registers and spilled. sm_90 SASS at d = n = 128: no spills at 8 warps (HASH_WARPS);
    4 and 16 warps spill."""
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    r, d, j = tl.arange(0, NP), tl.arange(0, D), tl.arange(0, NB)
    if LIFTED:
        lift = tl.load(LIFT + (h * D + d[:, None]) * NB + j[None, :])
    if MLP:
        w = (h * NB + j[:, None]) * NB + j[None, :]
        w1, b1, w2, b2 = tl.load(W1 + w), tl.load(B1 + h * NB + j), tl.load(W2 + w), tl.load(B2 + h * NB + j)
    x = tl.load(X + b * sxb + h * sxh + r[:, None] * sxn + d[None, :], mask=r[:, None] < N, other=0.0)
    x2 = tl.load(X2 + b * s2b + h * s2h + (r[:, None] - N) * s2n + d[None, :],
                 mask=(r[:, None] >= N) & (r[:, None] < N + N2), other=0.0)
    x = tl.where(r[:, None] < N, x.to(tl.float32), x2.to(tl.float32))
    if LIFTED:
        x = tl.dot(x, lift, input_precision="tf32x3")
    if MLP:
        y = tl.dot(x, w1, input_precision="tf32x3") + b1[None, :]
        y = x + y * tl.sigmoid(y)
        x = y + (tl.dot(y, w2, input_precision="tf32x3") + b2[None, :])
    bits = (x > 0).to(tl.int64) << (j % 64).to(tl.int64)[None, :]  # distinct bits: their sum is their OR
    words = tl.sum(tl.reshape(bits, (NP, NB // 64, 64)), 2)
    wi = tl.arange(0, NB // 64)
    tl.store(OUT + (bh * (N + N2) + r[:, None]) * (NB // 64) + wi[None, :], words, mask=r[:, None] < N + N2)


def hash_codes_fit(d: int, n: int) -> bool:
    """Whether hash_codes takes head_dim d and n code bits (powers of two, whole int64 words)."""
    return d >= 16 and n >= 64 and d & (d - 1) == 0 and n & (n - 1) == 0


@triton_op("kvcompress::hash_codes", mutates_args={})
def hash_codes(x: torch.Tensor, x2: Optional[torch.Tensor], lift: Optional[torch.Tensor], w1: Optional[torch.Tensor],
               b1: Optional[torch.Tensor], w2: Optional[torch.Tensor], b2: Optional[torch.Tensor]) -> torch.Tensor:
    """pack_bits(spotlight_hash(rows, w1, b1, w2, b2, lift) > 0) of the rows x, then x2 (a decode step hashes its
    query and its new key in one launch; w1 None: no MLP, the codes of x lift, or of x with no lift): x [B, H, N, d],
    x2 [B, H, N2, d] (any float dtype), lift [H, d, n], w [H, n, n], b [H, n] fp32 -> [B, H, N + N2, n / 64]."""
    B, H, N, D = x.shape
    NB = lift.shape[-1] if lift is not None else D
    x = x if x.stride(3) == 1 else x.contiguous()
    x2 = x[:, :, :0] if x2 is None else x2 if x2.stride(3) == 1 else x2.contiguous()
    N2 = x2.shape[2]
    out = torch.empty(B, H, N + N2, NB // 64, dtype=torch.long, device=x.device)
    lifted, mlp = lift is not None, w1 is not None
    lift, w1, b1, w2, b2 = (t.contiguous() if t is not None else out for t in (lift, w1, b1, w2, b2))  # out: never read
    wrap_triton(_hash_codes_kernel)[(B * H,)](
        x, x2, lift, w1, b1, w2, b2, out, H, N, N2, x.stride(0), x.stride(1), x.stride(2), x2.stride(0), x2.stride(1),
        x2.stride(2), D=D, NB=NB, NP=max(16, triton.next_power_of_2(N + N2)), LIFTED=lifted, MLP=mlp,
        num_warps=HASH_WARPS)
    return out


# ---- Spotlight's selection: Hamming scores, the n-th best score, the slots at or above it ----------
# The torch path (cache.count_select) costs a dozen kernels per layer (scores recomputed by several
# consumers, a contended scatter-add, scans). Here a two-level (radix) select: tl.histogram lowers to warp
# ballots whose cost per element grows with the bins (log2(bins) ballots, then bins / 32 popcount chains
# per thread; fewer than 32 bins are padded to 32), so one histogram of every key value (1024 bins at
# G d = 512) made the keys kernel compute-bound; two digits of 32 bins cost a few instructions per slot.
# Four launches:
#   keys (row, chunk):  each slot's key (int16) and the chunk's histogram of coarse digits key >> LO;
#   fine (row, chunk):  c, the coarse digit of the row's n-th best key (every program recomputes it from
#                       the row's coarse histograms: an L2 read instead of a launch), and the chunk's
#                       histogram of fine digits key & (2^LO - 1) among its keys whose coarse digit is c;
#   threshold (row):    the n-th best key t = (c << LO) + fine digit, the ties left out, the slots read,
#                       and each chunk's rank offsets (earlier slots above t, tied at t);
#   pick (row, chunk):  the selected slots, written at their ranks.
# Bytes per row, S slots of W code words in n_ch chunks: keys reads 8 W S of codes and 8 S of positions
# and writes 2 S of keys, which fine and pick read again; the histograms 4 n_ch (NBH + NBL), which fine
# re-reads n_ch times from L2. Llama-3 (G d = 512, W = 2) at S = 33792 (n_ch = 17, 32 + 32 bins): 811 KB
# of codes and positions, 203 KB of keys, 4.4 KB of histograms (+ 37 KB from L2); one histogram of 1024
# bins and int32 keys moved 270 KB of keys and 139 KB of histograms.
# Keys: 0 = empty slot, 1 + G d - Hamming for a scored slot (count_select's score + 1), FORCED for a
# forced one: the first multiple of 2^LO above G d + 1, so forced slots own a coarse digit (their count is
# read off the coarse histograms) and t = (c << LO) + fine digit is a key (count_select's G d + 2 would
# share a digit with the best scores; only the order matters).

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
def _spotlight_keys_kernel(Q, C, P, IP, KEYS, HC, S, H, n_chunk, sinks, recent, CHUNK: tl.constexpr,
                           G: tl.constexpr, W: tl.constexpr, BEST: tl.constexpr, FORCED: tl.constexpr,
                           LO: tl.constexpr, NBH: tl.constexpr, BLOCK: tl.constexpr, POPC: tl.constexpr,
                           SLOT_IS_POS: tl.constexpr):
    """Program (row = sequence x KV head, chunk): each slot's key, and the chunk's histogram of the
    keys' coarse digits. SLOT_IS_POS (a retrieval cache: slot s holds position s up to the sequence's newest,
    nothing after): the positions are not read (their int64 was 8 of the 16 bytes a slot read, with 64-bit codes)."""
    r, c = tl.program_id(0), tl.program_id(1)
    now = tl.load(IP + r // H)
    hist = tl.zeros([NBH], tl.int32)
    for off in range(0, CHUNK, BLOCK):
        s = c * CHUNK + off + tl.arange(0, BLOCK)
        inb = s < S
        if SLOT_IS_POS:
            pos = tl.where(inb & (s <= now), s, -1)
        else:
            pos = tl.load(P + r * S + s, mask=inb, other=-1)
        ham = tl.zeros([BLOCK], tl.int32)
        for w in tl.static_range(W):
            code = tl.load(C + (r * S + s) * W + w, mask=inb, other=0)
            for g in tl.static_range(G):
                ham += _popcount(tl.load(Q + (r * G + g) * W + w) ^ code, POPC)
        forced = (pos < sinks) | (pos > now - recent) | (pos == now)
        key = tl.where(pos >= 0, tl.where(forced, FORCED, BEST - ham), 0)
        tl.store(KEYS + r * S + s, key, mask=inb)  # int16
        hist += tl.histogram(key >> LO, NBH)  # slots past S have key 0 and count in bin 0, never read
    tl.store(HC + (r * n_chunk + c) * NBH + tl.arange(0, NBH), hist)


@triton.jit
def _spotlight_coarse(HC, KSEL, r, H, n_chunk, LO: tl.constexpr, FORCED: tl.constexpr, NBH: tl.constexpr,
                      NCP: tl.constexpr):
    """A row's chunk histograms of coarse digits [NCP, NBH], n (forced + k) and c, the coarse digit of
    the n-th best key (0 if fewer than n slots are filled)."""
    ch, v = tl.arange(0, NCP), tl.arange(0, NBH)
    hc = tl.load(HC + (r * n_chunk + ch[:, None]) * NBH + v[None, :], mask=ch[:, None] < n_chunk, other=0)
    total = tl.sum(hc, 0)
    n = tl.sum(tl.where(v == FORCED >> LO, total, 0)) + tl.load(KSEL + r // H).to(tl.int32)  # forced + k
    at_least = tl.cumsum(total, 0, reverse=True)  # [v] = slots whose coarse digit is >= v
    return hc, n, tl.maximum(tl.sum((at_least >= n).to(tl.int32)) - 1, 0)


@triton.jit
def _spotlight_fine_kernel(KEYS, HC, KSEL, HF, S, H, n_chunk, CHUNK: tl.constexpr, LO: tl.constexpr,
                           FORCED: tl.constexpr, NBH: tl.constexpr, NBL: tl.constexpr, NCP: tl.constexpr,
                           BLOCK: tl.constexpr):
    """Program (row, chunk): the chunk's histogram of fine digits among its keys in coarse digit c."""
    r, ch = tl.program_id(0), tl.program_id(1)
    _, _, c = _spotlight_coarse(HC, KSEL, r, H, n_chunk, LO, FORCED, NBH, NCP)
    hist = tl.zeros([NBL], tl.int32)
    for off in range(0, CHUNK, BLOCK):
        s = ch * CHUNK + off + tl.arange(0, BLOCK)
        key = tl.load(KEYS + r * S + s, mask=s < S, other=0).to(tl.int32)  # past S: key 0, as in HC
        hist += tl.histogram(key & (NBL - 1), NBL, mask=(key >> LO) == c)
    tl.store(HF + (r * n_chunk + ch) * NBL + tl.arange(0, NBL), hist)


@triton.jit
def _spotlight_threshold_kernel(HC, HF, KSEL, ROW, OFF, H, n_chunk, LO: tl.constexpr, FORCED: tl.constexpr,
                                NBH: tl.constexpr, NBL: tl.constexpr, NCP: tl.constexpr):
    """Program (row): the n-th best key t = (c << LO) + its fine digit, how many of the ties at t are left
    out, the slots read, and each chunk's count of earlier slots above t and at t (its rank offsets)."""
    r = tl.program_id(0)
    hc, n, c = _spotlight_coarse(HC, KSEL, r, H, n_chunk, LO, FORCED, NBH, NCP)
    ch, v, u = tl.arange(0, NCP), tl.arange(0, NBH), tl.arange(0, NBL)
    hf = tl.load(HF + (r * n_chunk + ch[:, None]) * NBL + u[None, :], mask=ch[:, None] < n_chunk, other=0)
    above_c = tl.sum(tl.where(v[None, :] > c, hc, 0), 1)  # [NCP] per chunk: coarse digit above c
    fine = tl.sum(hf, 0)
    at_least = tl.sum(above_c) + tl.cumsum(fine, 0, reverse=True)  # [u] = slots with key >= (c << LO) + u
    f = tl.sum((at_least >= n).to(tl.int32)) - 1  # -1 only when fewer than n are filled (then c = 0)
    t = tl.maximum((c << LO) + f, 1)  # the n-th best key (1 if fewer filled), in digit c
    ft = t - (c << LO)
    n_above, n_tie = tl.sum(above_c) + tl.sum(tl.where(u > ft, fine, 0)), tl.sum(tl.where(u == ft, fine, 0))
    skip = tl.maximum(n_tie - (n - n_above), 0)  # the earliest ties are left out (count_select)
    tl.store(ROW + r * 3, t)
    tl.store(ROW + r * 3 + 1, skip)
    tl.store(ROW + r * 3 + 2, n_above + n_tie - skip)  # slots read
    above = above_c + tl.sum(tl.where(u[None, :] > ft, hf, 0), 1)  # [NCP] per chunk
    tie = tl.sum(tl.where(u[None, :] == ft, hf, 0), 1)
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


def _spotlight_digits(gd):
    """The key split for G d = gd: LO fine bits, the forced key, the coarse digit's bins. The fine digit has
    32 bins, tl.histogram's floor (bins are padded to a warp's 32 lanes), more only while the coarse digit
    would need more bins than the fine. G d = 512: keys <= FORCED = 544, coarse digits 0..17 in 32 bins
    (LO = 4 would need 64 coarse bins, LO = 6 64 fine ones)."""
    LO = 5
    while ((gd + 1) >> LO) + 2 > 1 << LO:
        LO += 1
    FORCED = (((gd + 1) >> LO) + 1) << LO
    assert FORCED < 2 ** 15, "keys are int16"
    return LO, FORCED, triton.next_power_of_2((FORCED >> LO) + 1)


@triton_op("kvcompress::spotlight_select", mutates_args={})
def spotlight_select(q_codes: torch.Tensor, codes: torch.Tensor, pos: torch.Tensor, input_pos: torch.Tensor,
                     k: torch.Tensor, K: int, d: int, sinks: int, recent: int,
                     slot_is_pos: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cache.hamming_select, exactly (same slots, same order): q_codes [B, H, G, W]
    and codes [B, H, S, W] (packed int64), pos [B, H, S], input_pos and k [B] -> (idx, ok) [B, H, K].
    slot_is_pos: pos is known to be s where s <= input_pos, -1 after (KVCache.slot_is_position), and is not read."""
    B, H, G, W = q_codes.shape
    S = codes.shape[2]
    LO, FORCED, NBH = _spotlight_digits(G * d)
    # <= 32 chunks: every fine program re-reads the row's n_chunk x NBH coarse histogram (<= 4 KB)
    chunk = max(1024, triton.next_power_of_2(triton.cdiv(S, 32)))
    n_chunk = triton.cdiv(S, chunk)
    NCP = triton.next_power_of_2(n_chunk)
    dev = codes.device
    keys = torch.empty(B, H, S, dtype=torch.int16, device=dev)  # keys <= FORCED; half of int32's traffic
    hc = torch.empty(B * H, n_chunk, NBH, dtype=torch.int32, device=dev)
    hf = torch.empty(B * H, n_chunk, 2 ** LO, dtype=torch.int32, device=dev)
    row = torch.empty(B * H, 3, dtype=torch.int32, device=dev)  # t, ties left out, slots read
    offsets = torch.empty(B * H, n_chunk, 2, dtype=torch.int32, device=dev)
    idx = torch.empty(B, H, K, dtype=torch.long, device=dev)
    ok = torch.empty(B, H, K, dtype=torch.int8, device=dev)
    q_codes, codes, pos, input_pos, k = (x.contiguous() for x in (q_codes, codes, pos, input_pos, k))  # flat indexing
    wrap_triton(_spotlight_keys_kernel)[(B * H, n_chunk)](  # BLOCK 1024, 4 warps: fastest of 5 (1024 bins)
        q_codes, codes, pos, input_pos, keys, hc, S, H, n_chunk, sinks, recent, CHUNK=chunk,
        G=G, W=W, BEST=G * d + 1, FORCED=FORCED, LO=LO, NBH=NBH, BLOCK=1024, POPC=dev.type == "cuda",
        SLOT_IS_POS=slot_is_pos)
    wrap_triton(_spotlight_fine_kernel)[(B * H, n_chunk)](
        keys, hc, k, hf, S, H, n_chunk, CHUNK=chunk, LO=LO, FORCED=FORCED, NBH=NBH, NBL=2 ** LO, NCP=NCP, BLOCK=1024)
    wrap_triton(_spotlight_threshold_kernel)[(B * H,)](
        hc, hf, k, row, offsets, H, n_chunk, LO=LO, FORCED=FORCED, NBH=NBH, NBL=2 ** LO, NCP=NCP)
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
    the top bit down; 32 counts over the row instead of a sort. n = 0 gives 2^32 - 1 (nothing above).
    Measured on the H200 (2026-11-29, batch 1 and 8, 2,112 pages): 34 us per layer; a 4-bit radix with
    eight 32-bin tl.histogram steps was slower (44 us), so the bitwise search stays."""
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


# ---- prompt scores: cache.prompt_attention (H2O all rows, SnapKV the last w, TOVA the last one) ----
# Per-key column sums of the causal softmax of the last `rows` prompt queries, averaged over each KV
# head's query group. The torch path holds a [B, H, C, T] chunk of probabilities; at T = 32k that is a
# few rows per chunk and ~550 s of H2O prefill. Two passes of QK^T over the causal half, never T x T:
#   1. _prompt_lse_kernel: per query row the log-sum-exp of its visible logits (flash-attention's
#      online max/sum, no V) -> lse [B, H, rows] fp32;
#   2. _prompt_colsum_kernel: per key block, recompute the logits of every later query row of the
#      group, p = exp(s - lse), sum over rows -> [B, H_kv, T].
# Cost: 2 x (2 D T^2 / 2) FLOP and T^2 / 2 exps per head per pass (rows = T); memory is q, k, pos
# and lse, read once per tile: compute-bound like flash attention's forward, with no PV product, so
# the exps weigh as much as the matmuls (H100/H200: ~1000 TFLOP/s of bf16 MMA vs ~4 T exp/s).
# Visibility (pos[j] >= 0 and pos[j] <= pos[i]) implies j <= i: positions increase with the index
# among real tokens and padding (-1) only comes first (generate.pad_batch). So pass 1 visits key blocks
# up to its last row, pass 2 row blocks from its first key, both skip the left padding (PAD [B]:
# how many), and the exact pos mask is applied inside. Logits are in log2 units (scale folds log2 e)
# so the exps are exp2. RANGE: compiled code loops with runtime bounds (pipelined for-loops); the
# interpreter cannot (its scalars are 1-element arrays, which numpy 2 refuses to int()), so it runs
# the same steps in a while loop.

@triton.jit
def _prompt_dot(a, b, SCALE: tl.constexpr, IEEE: tl.constexpr):
    """a [M, D] @ b [N, D]^T in fp32, times SCALE: logits in log2 units."""
    if IEEE:  # fp32 inputs (the interpreter's tests): tf32 would cost the 1e-4 they check
        s = tl.dot(a, tl.trans(b), input_precision="ieee")
    else:
        s = tl.dot(a, tl.trans(b))
    return s * SCALE


@triton.jit
def _prompt_lse_step(q, qpos, Kb, Pb, start, T, skt, m_i, l_i, SCALE: tl.constexpr,
                     D: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
    """Online max m_i and sum l_i of exp2 over one block of keys starting at `start`."""
    keys = start + tl.arange(0, BN)
    kpos = tl.load(Pb + keys, mask=keys < T, other=-1)
    k = tl.load(Kb + keys[:, None] * skt + tl.arange(0, D)[None, :], mask=(keys < T)[:, None], other=0.0)
    s = _prompt_dot(q, k, SCALE, IEEE)  # [rows, keys]
    vis = (kpos[None, :] >= 0) & (kpos[None, :] <= qpos[:, None])
    m_new = tl.maximum(m_i, tl.max(tl.where(vis, s, -1.0e30), 1))  # -1e30: finite, no inf - inf
    p = tl.where(vis, tl.exp2(s - m_new[:, None]), 0.0)
    return m_new, l_i * tl.exp2(m_i - m_new) + tl.sum(p, 1)


@triton.jit
def _prompt_lse_kernel(Q, K, P, PAD, LSE, T, first, R, H, n_rb, sqb, sqh, sqt, skb, skh, skt,
                       SCALE: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
                       BN: tl.constexpr, IEEE: tl.constexpr, RANGE: tl.constexpr):
    """Program (sequence x query head, block of counted rows): lse of each row, base 2."""
    bh = tl.program_id(0)
    m = n_rb - 1 - tl.program_id(1)  # the last rows see the most keys: start those first
    b, h = bh // H, bh % H
    rows = first + m * BM + tl.arange(0, BM)
    qpos = tl.load(P + b * T + rows, mask=rows < T, other=-1)
    q = tl.load(Q + b.to(tl.int64) * sqb + h * sqh + rows[:, None] * sqt + tl.arange(0, D)[None, :],
                mask=(rows < T)[:, None], other=0.0)
    Kb = K + b.to(tl.int64) * skb + (h // G) * skh
    lo = tl.load(PAD + b) // BN * BN  # key blocks of padding only: no query sees them
    hi = tl.minimum(first + (m + 1) * BM, T)  # keys after the block's last row: none visible
    m_i = tl.full([BM], -1.0e30, tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    if RANGE:
        for start in range(lo, hi, BN):
            m_i, l_i = _prompt_lse_step(q, qpos, Kb, P + b * T, start, T, skt, m_i, l_i, SCALE, D, BN, IEEE)
    else:
        start = lo
        while start < hi:
            m_i, l_i = _prompt_lse_step(q, qpos, Kb, P + b * T, start, T, skt, m_i, l_i, SCALE, D, BN, IEEE)
            start += BN
    lse = tl.where(l_i > 0, m_i + tl.log2(l_i), 1.0e30)  # padding rows: exp2(s - 1e30) = 0 in pass 2
    tl.store(LSE + bh * R + rows - first, lse, mask=rows < T)


@triton.jit
def _prompt_colsum_step(Q, LSE, P, k, kpos, it, lo, first, T, R, H, b, hk, sqb, sqh, sqt, acc,
                        SCALE: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, IEEE: tl.constexpr):
    """Adds the probabilities of query head hk G + it % G, row block it // G (from lo), to acc [BN, BM]."""
    h = hk * G + it % G
    rows = lo + (it // G) * BM + tl.arange(0, BM)
    qpos = tl.load(P + b * T + rows, mask=rows < T, other=-1)
    q = tl.load(Q + b.to(tl.int64) * sqb + h * sqh + rows[:, None] * sqt + tl.arange(0, D)[None, :],
                mask=(rows < T)[:, None], other=0.0)
    lse = tl.load(LSE + (b * H + h) * R + rows - first, mask=rows < T, other=1.0e30)
    s = _prompt_dot(k, q, SCALE, IEEE)  # [keys, rows]
    vis = (kpos[:, None] >= 0) & (kpos[:, None] <= qpos[None, :])
    return acc + tl.where(vis, tl.exp2(s - lse[None, :]), 0.0)


@triton.jit
def _prompt_colsum_kernel(Q, K, P, PAD, LSE, OUT, T, first, R, H, H_kv, sqb, sqh, sqt, skb, skh, skt,
                          SCALE: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
                          BN: tl.constexpr, IEEE: tl.constexpr, RANGE: tl.constexpr):
    """Program (sequence x KV head, block of keys): column sums over the group's counted rows / G."""
    bh, n = tl.program_id(0), tl.program_id(1)  # key block 0 is seen by the most rows: it starts first
    b, hk = bh // H_kv, bh % H_kv
    keys = n * BN + tl.arange(0, BN)
    kpos = tl.load(P + b * T + keys, mask=keys < T, other=-1)
    k = tl.load(K + b.to(tl.int64) * skb + hk * skh + keys[:, None] * skt + tl.arange(0, D)[None, :],
                mask=(keys < T)[:, None], other=0.0)
    pad = tl.load(PAD + b)
    lo = tl.maximum(tl.maximum(n * BN, first), pad)  # rows before the block, not counted, or padding
    n_it = tl.where(n * BN + BN > pad, tl.cdiv(T - lo, BM) * G, 0)  # (row block, query head) steps
    acc = tl.zeros([BN, BM], tl.float32)  # summed over rows once at the end: no reduction per step
    if RANGE:
        for it in range(0, n_it):
            acc = _prompt_colsum_step(Q, LSE, P, k, kpos, it, lo, first, T, R, H, b, hk, sqb, sqh, sqt,
                                      acc, SCALE, G, D, BM, IEEE)
    else:
        it = 0
        while it < n_it:
            acc = _prompt_colsum_step(Q, LSE, P, k, kpos, it, lo, first, T, R, H, b, hk, sqb, sqh, sqt,
                                      acc, SCALE, G, D, BM, IEEE)
            it += 1
    tl.store(OUT + bh * T + keys, tl.sum(acc, 1) / G, mask=keys < T)


@triton_op("kvcompress::prompt_colsum", mutates_args={})
def prompt_colsum(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, rows: int) -> torch.Tensor:
    """cache.prompt_attention: q [B, H, T, D], k [B, H_kv, T, D], pos [B, T] (-1 = left padding), the last
    `rows` queries counted -> [B, H_kv, T] fp32, the group-mean softmax mass each key receives."""
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    R = min(rows, T)
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))  # head_dim indexed flat
    pos = pos.contiguous()
    pad = (pos < 0).sum(-1, dtype=torch.int32)
    lse = torch.empty(B, H, R, device=q.device, dtype=torch.float32)
    out = torch.empty(B, H_kv, T, device=q.device, dtype=torch.float32)
    # log2 e: logits in log2 units, exps as exp2. A constexpr (one per D): inductor would pass a float
    # argument as fp64 and turn the [M, N] multiply into fp64.
    flags = dict(SCALE=D ** -0.5 * 1.4426950408889634, G=H // H_kv, D=D, IEEE=q.dtype == torch.float32, RANGE=q.is_cuda)
    # Both passes use flash attention's forward tile, M 128 x N 64 on 8 warps (two Hopper warpgroups of
    # M 64 each), with the operand each program keeps as M: pass 1 its 128 query rows against 64-key
    # blocks, pass 2 its 128 keys against 64-row blocks ([keys, rows] logits). Not tuned on a GPU yet.
    n_rb = triton.cdiv(R, 128)
    wrap_triton(_prompt_lse_kernel)[(B * H, n_rb)](
        q, k, pos, pad, lse, T, T - R, R, H, n_rb, q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), BM=128, BN=64, num_warps=8, **flags)
    wrap_triton(_prompt_colsum_kernel)[(B * H_kv, triton.cdiv(T, 128))](
        q, k, pos, pad, lse, out, T, T - R, R, H, H_kv, q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), BM=64, BN=128, num_warps=8, **flags)
    return out


# ---- decode GEMMs: y = x W^T for the few rows of a decode step (batch <= 16) ----------------------------
# A decode step streams every weight once (15 GB at Llama-3-8B); cuBLAS's kernels for M = 1..8 streamed wo at
# 2.5 TB/s of the H200's 4.2 and w2 at 3.7 (BENCHMARKS.md, session 14). Here each program owns BLOCK_N output
# features and the whole K (no split, no reduction launch): it streams its [BLOCK_N, K] slab of W in
# [BLOCK_N, BLOCK_K] tiles (pipelined by num_stages) against x's rows padded to 16 (tl.dot's minimum; the MMA's
# spare rows cost nothing in a bandwidth-bound loop). An int8 W (quant.Int8Linear: per-output scales) streams
# half the bytes; its codes become the MMA's 16-bit operand in registers and the scales apply once, to the sums.

@triton.jit
def _linear_kernel(X, W, S, Y, M, N, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
                   INT8: tl.constexpr):
    """Program n: Y[:, n BLOCK_N ...] = X [M, K] @ W[n BLOCK_N ..., :]^T, K a multiple of BLOCK_K. IEEE: fp32
    operands (the interpreter's tests) multiplied in fp32, not tf32. INT8: W int8 codes, Y = (X @ W^T) S[None, :]
    in fp32 before the output's rounding. Triton 3.6 casts int8 to bf16 without an int-to-float conversion (LOP3,
    PRMT, HADD2 in the sm_90 SASS: 4.5 instructions a weight against 2.0 for a bf16 W; tune_attend.py sass)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, 16)
    acc = tl.zeros([16, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + m[:, None] * K + k[None, :], mask=m[:, None] < M, other=0.0)
        w = tl.load(W + cols.to(tl.int64)[:, None] * K + k[None, :], mask=cols[:, None] < N, other=0)
        if INT8:
            w = w.to(x.dtype)
        acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee" if IEEE else None)
    if INT8:
        acc = acc * tl.load(S + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + m[:, None] * N + cols[None, :], acc.to(Y.dtype.element_ty),
             mask=(m[:, None] < M) & (cols[None, :] < N))


# Launch setting: `python scripts/tune_attend.py linear` on the H200 (2026-11-30; BENCHMARKS.md, session 14):
# the fastest for Llama-3-8B's wo and w2 at batch 1 and 8 (11.1 and 30.1 us at batch 1, cuBLAS 13.5 and 31.4;
# other models' shapes were not tuned). For the wider projections cuBLAS was as fast or faster (w1 and w3
# stacked: 54.7 us, this kernel's best 55.5), so model.Linear calls this kernel only where out_features <=
# in_features. INT8_TUNE: int8 weights, every projection (no cuBLAS kernel takes int8 weights), from `tune_attend.py
# linear8` (H200, 2026-12-02; BENCHMARKS.md, session 21): "wide" where N >= 4 K (w1 and w3 stacked, the output
# projection: 33.5 and 135.8 us at batch 1, against 36.6 and 156.2 at the narrow setting), "narrow" elsewhere.
LINEAR_TUNE = dict(block_n=32, block_k=512, warps=4, stages=3)
INT8_TUNE = {"narrow": dict(block_n=32, block_k=512, warps=4, stages=3),
             "wide": dict(block_n=64, block_k=256, warps=4, stages=3)}


@triton_op("kvcompress::decode_linear", mutates_args={})
def decode_linear(x: torch.Tensor, w: torch.Tensor, scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., K] (at most 16 rows) @ w [N, K]^T -> [..., N] in x's dtype, fp32 accumulation. An int8 w takes
    its per-output scales [N] (quant.Int8Linear): x @ (w scales[:, None])^T."""
    K, N = x.shape[-1], w.shape[0]
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    int8 = w.dtype == torch.int8
    t = INT8_TUNE["wide" if N >= 4 * K else "narrow"] if int8 else LINEAR_TUNE
    block_k = math.gcd(K, t["block_k"])  # a divisor of K (no mask along K): 576 -> 64 (SmolLM2)
    assert M <= 16 and block_k >= 16 and w.stride(1) == 1 and w.stride(0) == K and int8 == (scales is not None), \
        "decode_linear: at most 16 rows, K a multiple of 16, W contiguous, scales with int8 W only"
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    wrap_triton(_linear_kernel)[(triton.cdiv(N, t["block_n"]),)](
        x2, w, scales if int8 else w, y, M, N, K=K, BLOCK_N=t["block_n"], BLOCK_K=block_k,
        IEEE=x.dtype == torch.float32, INT8=int8,
        num_warps=t["warps"], num_stages=t["stages"])
    return y.view(*x.shape[:-1], N)


# ---- eviction's choice: the slot that takes the new token -----------------------------------------------------
# cache.KVCache.choose_slot in one launch. Inductor made three of its torch form (the order-preserving score bits,
# per-chunk minima, the argmin of those), 7.4 us a layer at 32k x 8 for 1.7 MB of keys (BENCHMARKS.md, session 14).
# Here each program takes EVICT_CHUNK candidates of a (sequence, KV head) row and stores their least key and its
# index; the row's last program to finish (an atomic ticket per row, which it resets) reduces those. One program
# per row (a serial scan of 3.3k slots) took 8 us a layer inside the decode step at batch 1 (BENCHMARKS.md).

@triton.jit
def _evict_slot_kernel(KEEP, POS, NOW, LIMIT, TICKET, PKEY, PIDX, SLOT, SALT, S, H, skb, skh, n_sinks, recent, frac,
                       reserve, head0, CHUNK: tl.constexpr, PART: tl.constexpr, RULE: tl.constexpr,
                       FRACTIONAL: tl.constexpr):
    """Program (row = b H + h, chunk c): the argmin over candidates i = 0..S (slot i < S, the new token at i = S) of
    the key (score's order-preserving bits, position + 1), score = +inf where protected (position < n_sinks or >
    now - recent), -inf where empty (position < 0), the candidate left out past the row's limit (not the new
    token); ties: the first index. RULE 0: scores KEEP[b, h, i] (strides skb, skh, 1); 1: the position itself
    (StreamingLLM's); 2: cache.Random's fresh uniform score, hash_uniform(SALT[0], SALT[1], b, head0 + h, now,
    position), hashed here rather than by three torch kernels a layer. FRACTIONAL: recent = round-half-even((limit
    - reserve) frac), at least 1 (H2O's recent ratio; KVCache.protected). TICKET [rows] int32 is 0 on entry and
    left 0."""
    row, c, n_ch = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    b, h = row // H, row % H
    now = tl.load(NOW + b)
    limit = tl.load(LIMIT + row)
    if FRACTIONAL:
        x = (limit - reserve).to(tl.float32) * frac
        f = tl.floor(x)
        up = (x - f > 0.5) | ((x - f == 0.5) & (f - 2.0 * tl.floor(f * 0.5) == 1.0))  # ties to even, as torch
        rec = tl.maximum(f + up.to(tl.float32), 1.0).to(tl.int64)
    else:
        rec = recent
    i = c * CHUNK + tl.arange(0, CHUNK)
    p = tl.load(POS + row.to(tl.int64) * S + i, mask=i < S, other=-1)
    p = tl.where(i == S, now, p)
    if RULE == 0:
        score = tl.load(KEEP + b.to(tl.int64) * skb + h * skh + i, mask=i <= S, other=0.0).to(tl.float32)
    elif RULE == 1:
        score = p.to(tl.float32)
    else:
        x = _hash_step(_hash_step(tl.zeros([], tl.int64), tl.load(SALT)), tl.load(SALT + 1))  # the row's: scalars
        x = _hash_step(_hash_step(_hash_step(x, b.to(tl.int64)), (head0 + h).to(tl.int64)), now)
        score = (_hash_step(x, p) >> 8).to(tl.float32)  # only the position's step per candidate
    score = tl.where((p < n_sinks) | (p > now - rec), float("inf"), score)
    score = tl.where(p < 0, float("-inf"), score)
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 -> 0.0: one key for zero
    bits = score.to(tl.int32, bitcast=True)
    key = ((bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) << 32) + p + 1  # int order = the floats' order
    key = tl.where((i < limit) | (i == S), key, 0x7FFFFFFFFFFFFFFF)  # limit <= S: nothing past S counts
    least = tl.min(key, 0)
    tl.store(PKEY + row * n_ch + c, least)
    tl.store(PIDX + row * n_ch + c, tl.min(tl.where(key == least, i, 0x7FFFFFFF), 0))
    # acq_rel: this program's partials are released before its ticket, the others' acquired by the last one
    if tl.atomic_add(TICKET + row, 1) == n_ch - 1:
        best = tl.full([], 0x7FFFFFFFFFFFFFFF, tl.int64)
        at = tl.full([], 0, tl.int32)
        j0 = 0
        while j0 < n_ch:  # a while loop: its bound is data (a for loop's would need a constant in the interpreter)
            j = j0 + tl.arange(0, PART)
            k = tl.load(PKEY + row * n_ch + j, mask=j < n_ch, other=0x7FFFFFFFFFFFFFFF, cache_modifier=".cg")
            least = tl.min(k, 0)
            first = tl.min(tl.where(k == least, j, 0x7FFFFFFF), 0)  # the first chunk holds the first index
            at = tl.where(least < best, first, at)
            best = tl.minimum(least, best)
            j0 += PART
        tl.store(SLOT + row, tl.load(PIDX + row * n_ch + at, cache_modifier=".cg").to(tl.int64))
        tl.store(TICKET + row, 0)


@triton.jit
def _hash_step(x, key):
    """One key of cache.hash_uniform, in int64 as there: x < 2^32, so no product overflows."""
    m = 0xFFFFFFFF
    x = (x * 0x27D4EB2F + key) & m
    x = (((x >> 16) ^ x) * 0x45D9F3B) & m
    x = (((x >> 16) ^ x) * 0x45D9F3B) & m
    return (x >> 16) ^ x


# candidates a program, its warps; partials reduced at a time. `python scripts/tune_attend.py evict` on the H200
# (2026-11-30, BENCHMARKS.md): 512 / 4 within 0.2 us of the best setting at batch 1 and 8 (2.9-3.9 us a call,
# the compiled torch form 5.1-14.2)
EVICT_CHUNK, EVICT_WARPS, EVICT_PART = 512, 4, 128


@triton_op("kvcompress::evict_slot", mutates_args={"ticket"})
def evict_slot(keep: torch.Tensor, pos: torch.Tensor, input_pos: torch.Tensor, limit: torch.Tensor,
               ticket: torch.Tensor, n_sinks: int, recent: int, frac: float, reserve: int, scored: bool,
               salt: Optional[torch.Tensor] = None, head0: int = 0) -> torch.Tensor:
    """cache.KVCache.choose_slot: keep [B, H_kv, S + 1] fp32 (last dim contiguous; unread unless scored: the
    positions are the scores, or with salt [2] int64 (seed, layer) cache.Random's hash of them), pos [B, H_kv, S],
    input_pos [B], limit [B, H_kv], ticket [B, H_kv] int32 zeros (left zero); sinks below position n_sinks and the
    last `recent` positions protected (frac > 0: recent is that fraction of each row's limit - reserve) -> the slot
    [B, H_kv] int64 (S: the new token). head0: the first KV head's index in the model (Random's hash takes it)."""
    B, H, S = pos.shape
    assert not scored or keep.stride(-1) == 1 and keep.dtype == torch.float32
    assert ticket.is_contiguous() and ticket.dtype == torch.int32
    n_ch = triton.cdiv(S + 1, EVICT_CHUNK)
    pkey = torch.empty(B * H, n_ch, device=pos.device, dtype=torch.long)
    pidx = torch.empty(B * H, n_ch, device=pos.device, dtype=torch.int32)
    slot = torch.empty(B, H, device=pos.device, dtype=torch.long)
    wrap_triton(_evict_slot_kernel)[(B * H, n_ch)](
        keep, pos.contiguous(), input_pos, limit.contiguous(), ticket, pkey, pidx, slot, pos if salt is None else salt,
        S, H, keep.stride(0), keep.stride(1), n_sinks, recent, frac, reserve, head0, CHUNK=EVICT_CHUNK,
        PART=EVICT_PART, RULE=0 if scored else 1 if salt is None else 2, FRACTIONAL=frac > 0, num_warps=EVICT_WARPS)
    return slot
