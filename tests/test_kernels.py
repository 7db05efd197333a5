"""triton_kernels.prompt_colsum (H2O / SnapKV / TOVA prompt scores) against a plain-Python reference
written from the definition, and the torch path (cache.prompt_attention) against the same reference."""
import itertools
import math

import pytest
import torch

import cache as kv
from conftest import hash24, in_triton_interpreter

# (B, H_kv, G, T, D, left padding of sequence 1): SmolLM2's GQA (3 KV heads x 3, D 64) and a scaled-down
# Llama-3 (4 x 4); T not a multiple of any block; padding that covers a whole key block (130) or not (70, 5)
SHAPES = [(2, 3, 3, 150, 64, 70), (2, 4, 4, 37, 16, 5), (2, 1, 2, 150, 128, 130), (2, 4, 4, 37, 32, 0)]


def naive_prompt_colsum(q, k, pos, rows):
    """From the definition: key j is visible to query i iff 0 <= pos[j] <= pos[i]; softmax (scale
    1/sqrt(D)) over the visible keys of each of the last `rows` queries (padding queries count 0);
    summed over those queries and averaged over the G query heads of each KV head. Logits in float64."""
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    G = H // H_kv
    out = [[[0.0] * T for _ in range(H_kv)] for _ in range(B)]
    for b in range(B):
        p = pos[b].tolist()
        for h in range(H):
            logits = (q[b, h].double() @ k[b, h // G].double().T / math.sqrt(D)).tolist()
            for i in range(T - rows, T):
                vis = [j for j in range(T) if 0 <= p[j] <= p[i]]
                if not vis:
                    continue
                top = max(logits[i][j] for j in vis)
                e = {j: math.exp(logits[i][j] - top) for j in vis}
                total = sum(e.values())
                for j in vis:
                    out[b][h // G][j] += e[j] / total / G
    return torch.tensor(out, dtype=torch.float32)


def inputs(shape, g):
    """q, k as the model lays them out ([B, T, H, D] viewed as [B, H, T, D]: strided), pos as pad_batch."""
    B, H_kv, G, T, D, pad = shape
    q = torch.randn(B, T, H_kv * G, D, generator=g).transpose(1, 2)
    k = torch.randn(B, T, H_kv, D, generator=g).transpose(1, 2)
    k[:, :, 3] *= 4  # one key that draws most of the mass, as attention sinks do
    pos = torch.arange(T).repeat(B, 1)
    pos[1] = (torch.arange(T) - pad).clamp(min=-1)
    return q, k, pos


def check_prompt_colsum(device):
    """The kernel against naive_prompt_colsum for rows = T, 7 and 1. Runs on CUDA (bf16), or on CPU
    (fp32) in Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported: a subprocess)."""
    from triton_kernels import prompt_colsum
    g = torch.Generator().manual_seed(0)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    tol = dict(rtol=2e-2, atol=2e-3) if device == "cuda" else dict(rtol=1e-4, atol=1e-5)
    for shape in SHAPES:
        q, k, pos = (x.to(dt) if x.is_floating_point() else x for x in inputs(shape, g))
        for rows in (q.shape[2], 7, 1):
            got = prompt_colsum(q.to(device), k.to(device), pos.to(device), rows).cpu()
            torch.testing.assert_close(got, naive_prompt_colsum(q, k, pos, rows), **tol,
                                       msg=lambda m: f"{shape} rows {rows}: {m}")
    if device == "cuda":  # many blocks on the compiled path: against the torch loop (prompt_attention
        # itself calls the kernel on CUDA), which is fast there
        q, k, pos = (x.to(device, dt) if x.is_floating_point() else x.to(device)
                     for x in inputs((2, 8, 4, 1500, 128, 300), g))
        for rows in (1500, 32):
            ref = sum(p.sum(2) for _, p, _ in kv.prompt_probs(q, k, pos, rows))
            torch.testing.assert_close(prompt_colsum(q, k, pos, rows), ref, **tol)


@pytest.mark.parametrize("chunk_rows", [None, 1, 16], ids=["one_chunk", "row_by_row", "16_rows"])
def test_prompt_attention_torch_path(chunk_rows):
    """Whole, one query row at a time, and in 16-row chunks (each chunk reads only the keys it can see)."""
    g = torch.Generator().manual_seed(1)
    for shape in SHAPES[:2]:
        q, k, pos = inputs(shape, g)
        B, H, T, _ = q.shape
        chunk = {"chunk_bytes": chunk_rows * B * H * T * 4} if chunk_rows else {}
        for rows in (q.shape[2], 7, 1):
            torch.testing.assert_close(kv.prompt_attention(q, k, pos, rows, **chunk),
                                       naive_prompt_colsum(q, k, pos, rows), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA; the interpreter test below runs everywhere")
def test_prompt_colsum_on_cuda():
    check_prompt_colsum("cuda")


def test_prompt_colsum_in_interpreter():
    in_triton_interpreter("test_kernels", "check_prompt_colsum")


def check_decode_linear(device):
    """triton_kernels.decode_linear against a float64 product summed per output in Python: 1 to 16 rows, K
    with no power-of-two factor above 64 (576, SmolLM2's width: BLOCK_K 64), N not a multiple of the tile; and
    int8 codes (every value -127..127 in the first case) with per-output scales: sum_k x[m, k] q[n, k] s[n]."""
    from triton_kernels import decode_linear
    g = torch.Generator().manual_seed(0)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    for int8, (M, K, N) in itertools.product((False, True), [(1, 576, 100), (3, 256, 40), (8, 1536, 33), (16, 64, 70)]):
        x = torch.randn(M, K, generator=g).to(dt)
        if int8:
            w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
            w[0, :255] = torch.arange(-127, 128, dtype=torch.int8)[:K]
            s = (torch.rand(N, generator=g) + 0.5).to(dt)
        else:
            w, s = torch.randn(N, K, generator=g).to(dt), torch.ones(N)
        xs, ws, ss = x.double().tolist(), w.double().tolist(), s.double().tolist()
        ref = torch.tensor([[math.fsum(a * b for a, b in zip(xs[m], ws[n])) * ss[n] for n in range(N)]
                            for m in range(M)])
        # a leading batch axis, as the model's [B, 1, K]
        got = decode_linear(x.to(device)[None], w.to(device), s.to(device) if int8 else None).cpu()
        assert got.shape == (1, M, N) and got.dtype == dt
        tol = dict(rtol=1e-2, atol=2.0 if int8 else 0.2) if device == "cuda" else \
            dict(rtol=1e-5, atol=5e-2 if int8 else 1e-4)  # bf16 output rounding; fp32 sums of up to 127 x
        torch.testing.assert_close(got[0].double(), ref.double(), **tol, msg=lambda m: f"{(int8, M, K, N)}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA; the interpreter test below runs everywhere")
def test_decode_linear_on_cuda():
    check_decode_linear("cuda")


def test_decode_linear_in_interpreter():
    in_triton_interpreter("test_kernels", "check_decode_linear")


def naive_evict(keep, pos, now, limit, sinks, recent, frac, reserve):
    """The slot that takes the new token, per (sequence, KV head), from the rule cache.py documents: among the
    slots below the row's limit and the new token (candidate S, at position now), an empty slot first, then the
    lowest score, a protected one (a sink, or within the recent window) scoring +inf; ties evict the oldest
    position, then the first candidate. frac > 0: the window is round(frac (limit - reserve)), at least 1."""
    B, H, S = len(pos), len(pos[0]), len(pos[0][0])
    out = []
    for b in range(B):
        row = []
        for h in range(H):
            window = max(1, round(frac * (limit[b][h] - reserve))) if frac else recent
            cands = []
            for i in range(S + 1):
                if i < S and i >= limit[b][h]:
                    continue
                p = pos[b][h][i] if i < S else now[b]
                if p < 0:
                    score = -math.inf
                elif p < sinks or p > now[b] - window:
                    score = math.inf
                else:
                    score = keep[b][h][i]
                cands.append((score, p, i))
            row.append(min(cands)[2])
        out.append(row)
    return out


def check_evict_slot(device):
    """triton_kernels.evict_slot against naive_evict: Llama-3-8B's 8 KV heads, rows of different limits, empty
    slots, integer scores that tie (and -0.0 beside 0.0), chunks of 16 candidates (several programs a row, their
    partials reduced two at a time) and the default chunk (one a row); sinks and window, a fractional window
    (H2O's, ties to even), nothing protected; scored, by position (StreamingLLM's), and by Random's hash of the
    positions (seed, layer, sequence, head0 + head, now, position), which the kernel computes itself."""
    import triton_kernels as tk
    g = torch.Generator().manual_seed(0)
    B, H, S = 3, 8, 47
    chunk0, part0 = tk.EVICT_CHUNK, tk.EVICT_PART
    for chunk, (sinks, recent, frac, reserve), scored in itertools.product(
            (16, chunk0), [(4, 10, 0.0, 0), (0, 0, 0.5, 3), (0, 0, 0.0, 0), (2, 0, 0.25, 0)], (True, False, "random")):
        tk.EVICT_CHUNK, tk.EVICT_PART = chunk, 2 if chunk == 16 else part0  # 2: the partials in several tiles
        # distinct positions in a row, none a sink but the first four slots'
        pos = torch.stack([torch.randperm(190, generator=g)[:S] for _ in range(B * H)]).view(B, H, S) + 4
        pos[:, :, :4] = torch.arange(4)
        limit = torch.randint(S - 20, S + 1, (B, H), generator=g)
        # rows whose choice the edge of a window decides (below): none of their slots empty
        edges = [(0, 0, 47, 12, 195 - 10),  # just outside a window of 10
                 (2, 2, 46, 10, 200 - 21),  # (46 - 3) / 2 = 21.5 -> 22: just inside
                 (2, 3, 46, 11, 200 - 11),  # 46 / 4 = 11.5 -> 12: just inside
                 (1, 1, 44, 10, 250 - 20),  # (44 - 3) / 2 = 20.5 -> 20 (even, down): just outside
                 (0, 1, 42, 10, 195 - 10),  # 42 / 4 = 10.5 -> 10: just outside
                 (0, 2, 47, 10, 195 - 11)]  # 47 / 4 = 11.75 -> 12: just inside
        empty = torch.rand(B, H, S, generator=g) < 0.1
        for b, h, n, i, p in edges:
            empty[b, h], limit[b, h] = False, n
        pos[empty] = -1
        now = torch.tensor([195, 250, 200])
        keep = torch.randint(-3 if chunk == 16 else 0, 3, (B, H, S + 1), generator=g).float()  # 0 the least, or not
        keep[keep == 0] = torch.tensor([0.0, -0.0])[torch.randint(0, 2, (int((keep == 0).sum()),), generator=g)]
        for b, h, n, i, p in edges:  # the row's least score at that position
            pos[b, h][pos[b, h] == p] = pos[b, h, i].item()  # a swap: positions stay distinct
            pos[b, h, i], keep[b, h, i] = p, -100.0
        limit[2, 0], keep[2, 0, S] = 1, -200.0  # one slot: a fractional window still protects the new token
        seed, layer, head0 = 7, 5, 16  # Random's salt; a tensor-parallel rank's first head
        if scored is False:
            keep = torch.cat([pos.float(), now.float()[:, None, None].expand(B, H, 1)], -1)
        elif scored == "random":
            keep = torch.tensor([[[float(hash24(seed, layer, b, head0 + h, now[b].item(), p))
                                   for p in pos[b, h].tolist() + [now[b].item()]] for h in range(H)] for b in range(B)])
        ref = naive_evict(keep.tolist(), pos.tolist(), now.tolist(), limit.tolist(), sinks, recent, frac, reserve)
        ticket = torch.zeros(B, H, dtype=torch.int32, device=device)
        salt = torch.tensor([seed, layer], device=device) if scored == "random" else None
        got = tk.evict_slot(keep.to(device), pos.to(device), now.to(device), limit.to(device), ticket, sinks, recent,
                            frac, reserve, scored is True, salt, head0 if salt is not None else 0)
        assert got.cpu().tolist() == ref, (chunk, sinks, recent, frac, scored)
        assert not ticket.any()  # left zero for the next call
    tk.EVICT_CHUNK, tk.EVICT_PART = chunk0, part0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA; the interpreter test below runs everywhere")
def test_evict_slot_on_cuda():
    check_evict_slot("cuda")


def test_evict_slot_in_interpreter():
    in_triton_interpreter("test_kernels", "check_evict_slot")
