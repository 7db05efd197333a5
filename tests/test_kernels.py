"""triton_kernels.prompt_colsum (H2O / SnapKV / TOVA prompt scores) against a plain-Python reference
written from the definition, and the torch path (cache.prompt_attention) against the same reference."""
import math

import pytest
import torch

import cache as kv
from conftest import in_triton_interpreter

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
    with no power-of-two factor above 64 (576, SmolLM2's width: BLOCK_K 64), N not a multiple of the tile."""
    from triton_kernels import decode_linear
    g = torch.Generator().manual_seed(0)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    for M, K, N in [(1, 576, 100), (3, 256, 40), (8, 1536, 33), (16, 64, 70)]:
        x, w = torch.randn(M, K, generator=g).to(dt), torch.randn(N, K, generator=g).to(dt)
        xs, ws = x.double().tolist(), w.double().tolist()
        ref = torch.tensor([[math.fsum(a * b for a, b in zip(xs[m], ws[n])) for n in range(N)] for m in range(M)])
        got = decode_linear(x.to(device)[None], w.to(device)).cpu()  # a leading batch axis, as the model's [B, 1, K]
        assert got.shape == (1, M, N) and got.dtype == dt
        tol = dict(rtol=1e-2, atol=0.2) if device == "cuda" else dict(rtol=1e-5, atol=1e-4)  # bf16 output rounding
        torch.testing.assert_close(got[0].double(), ref.double(), **tol, msg=lambda m: f"{(M, K, N)}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA; the interpreter test below runs everywhere")
def test_decode_linear_on_cuda():
    check_decode_linear("cuda")


def test_decode_linear_in_interpreter():
    in_triton_interpreter("test_kernels", "check_decode_linear")
