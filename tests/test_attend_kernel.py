"""triton_kernels.attend_scores and dense_attend (the dense modes of the attention kernel) against a naive
reference written from the definition, on CUDA or in Triton's interpreter on CPU."""
import math

import pytest
import torch

from kvstore import attend_new_torch
from conftest import in_triton_interpreter


def naive_attend(q, k, v, filled, k_new=None, v_new=None):
    """Per query row: softmax over the valid cached slots (and the new token, if given) of q.k / sqrt(D),
    in float64 plain Python. -> out [B][H][G][D], probs [B][H][S (+ 1)] averaged over the group."""
    B, H, G, D = q.shape
    S = k.shape[2]
    q, k, v, filled = q.tolist(), k.tolist(), v.tolist(), filled.tolist()
    outs, probs = [], []
    for b in range(B):
        outs.append([]), probs.append([])
        for h in range(H):
            keys = [(s, k[b][h][s], v[b][h][s]) for s in range(S) if filled[b][h][s]]
            if k_new is not None:
                keys.append((S, k_new[b, h, 0].tolist(), v_new[b, h, 0].tolist()))
            row_probs = [0.0] * (S + (k_new is not None))
            outs[b].append([])
            for g in range(G):
                logits = [sum(x * y for x, y in zip(q[b][h][g], kr)) / math.sqrt(D) for _, kr, _ in keys]
                top = max(logits)
                e = [math.exp(x - top) for x in logits]
                z = sum(e)
                outs[b][h].append([sum(p / z * vr[i] for p, (_, _, vr) in zip(e, keys)) for i in range(D)])
                for p, (s, _, _) in zip(e, keys):
                    row_probs[s] += p / z / G
            probs[b].append(row_probs)
    return torch.tensor(outs), torch.tensor(probs)


def cases(g):
    """(q, k, v, pos, k_new, v_new) at small GQA shapes: SmolLM2's (H_kv 3, G 3, D 64), Llama-3's
    group (G 4) with D 32 and 128; S not a multiple of the block; empty slots in the middle and at the
    end; one (sequence, head) with every cached slot empty (only the new token is attended). The last case's
    keys ramp towards the group's mean query, so its logits climb ~50 over the slots: the running max grows
    tile after tile, and what was summed must be rescaled each time."""
    for H, G, D, S, ramp in [(3, 3, 64, 37, 0), (3, 3, 64, 300, 0), (2, 4, 32, 300, 0), (2, 4, 128, 130, 0),
                             (2, 4, 64, 300, 6)]:
        B = 2
        q = 2 * torch.randn(B, H, G, D, generator=g)  # x2: peakier softmaxes than randn's
        k, v = torch.randn(B, H, S, D, generator=g), torch.randn(B, H, S, D, generator=g)
        k += ramp * torch.linspace(0, 1, S)[:, None] * q.mean(2, keepdim=True)
        k_new, v_new = torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g)
        filled = torch.rand(B, H, S, generator=g) > 0.2
        filled[0, :, S // 3:S // 3 + 20] = False  # a run of empty slots in the middle
        filled[:, :, -7:] = False                 # and at the end
        filled[1, 0] = False                      # nothing cached at all
        pos = torch.randperm(S, generator=g).expand(B, H, S).masked_fill(~filled, -1)  # -1 = empty slot
        yield q, k, v, pos, k_new, v_new


def check_attend_scores(device, symbolic=False):
    """attend_scores against naive_attend (and DenseStore.attend_with_new's torch path, attend_new_torch,
    against it too); dense_attend against naive_attend without a new token. fp32 in the interpreter, bf16 on CUDA.
    symbolic: the launch a symbolic cache size gets (a runtime loop bound, a fixed number of splits)."""
    from triton_kernels import attend_scores, dense_attend
    g = torch.Generator().manual_seed(0)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    tol = dict(atol=2e-2, rtol=2e-2) if device == "cuda" else dict(atol=1e-5, rtol=1e-5)
    for case in cases(g):
        case = tuple(x.to(dt) if x.is_floating_point() else x for x in case)  # the reference sees bf16 values too
        q, k, v, pos, k_new, v_new = (x.float() if x.is_floating_point() else x for x in case)
        filled = pos >= 0
        want_out, want_probs = naive_attend(q, k, v, filled, k_new, v_new)
        assert want_probs[1, 0, -1] == 1.0  # the empty row: all mass on the new token
        out, probs = attend_scores(*(x.to(device) for x in case), symbolic)
        assert out.dtype == dt and probs.dtype == torch.float32 and probs.shape == want_probs.shape
        torch.testing.assert_close(out.float().cpu(), want_out, **tol)
        torch.testing.assert_close(probs.cpu(), want_probs, **tol)
        if device == "cpu":
            got = attend_new_torch(q, k, v, pos >= 0, k_new, v_new)
            torch.testing.assert_close(got[0], want_out, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[1], want_probs, atol=1e-5, rtol=1e-5)
        pos[1, 0, 0] = 0  # dense_attend has no new token: every row needs a filled slot
        B, H, S = pos.shape
        start = torch.randint(0, 5, (B, H), generator=g)  # each row reads its own run of slots
        start[1, 0] = 0  # that row's one filled slot
        length = torch.randint(5, S - 5, (B, H), generator=g)
        slot = torch.arange(S)
        run = (slot >= start[..., None]) & (slot < (start + length)[..., None])
        want_out, _ = naive_attend(q, k, v, (pos >= 0) & run)
        out = dense_attend(*(x.to(device) for x in (case[0], case[1], case[2], pos, torch.stack([start, length], -1))),
                           S - 5, False, symbolic)
        torch.testing.assert_close(out.float().cpu(), want_out, **tol)


def check_merge_kernel(device):
    """_merge_kernel (dense_attend's, gather_attend's and attend_scores' merge of the splits' partials, and
    attend_scores' max and normaliser) against the merge written
    out per query row in float64: out = sum_s exp(m_s - M) po_s / sum_s exp(m_s - M) l_s, M = max_s m_s. Split
    counts below, at and above its 32-split tile (several tiles, a partial last one), an empty split (the
    kernel's m = -1e30, l = 0, po = 0), which must weigh nothing, and split maxima far apart (exp of them
    overflows fp32 unless the largest is subtracted first)."""
    from triton_kernels import _merge_out
    g = torch.Generator().manual_seed(0)
    for B, H, splits, G, D, spread in [(1, 2, 3, 4, 32, 3), (2, 3, 32, 3, 64, 3), (1, 2, 70, 4, 128, 60)]:
        pm = spread * torch.randn(B, H, splits, G, generator=g)
        pl = torch.rand(B, H, splits, G, generator=g) * 50 + 1
        po = torch.randn(B, H, splits, G, D, generator=g) * pl[..., None]
        pm[0, 0, -1], pl[0, 0, -1], po[0, 0, -1] = -1.0e30, 0.0, 0.0  # an empty split
        want = torch.zeros(B, H, G, D, dtype=torch.float64)
        want_m, want_z = torch.zeros(B, H, G, dtype=torch.float64), torch.zeros(B, H, G, dtype=torch.float64)
        for b in range(B):
            for h in range(H):
                for r in range(G):
                    top = max(pm[b, h, :, r].tolist())
                    w = [math.exp(x - top) for x in pm[b, h, :, r].tolist()]
                    z = sum(wi * li for wi, li in zip(w, pl[b, h, :, r].tolist()))
                    want[b, h, r] = sum(wi * po[b, h, i, r].double() for i, wi in enumerate(w)) / z
                    want_m[b, h, r], want_z[b, h, r] = top, z
        for dt in (torch.float32, torch.bfloat16):
            got = _merge_out(po.to(device), pm.to(device), pl.to(device), dt)
            assert got.dtype == dt and got.shape == (B, H, G, D)
            tol = 1e-5 if dt == torch.float32 else 1e-2
            torch.testing.assert_close(got.double().cpu(), want.to(dt).double(), atol=tol, rtol=tol)
            out, m, z = _merge_out(po.to(device), pm.to(device), pl.to(device), dt, stats=True)  # and max, normaliser
            assert torch.equal(out, got) and m.dtype == z.dtype == torch.float32
            torch.testing.assert_close(m.double().cpu(), want_m, atol=0, rtol=0)
            torch.testing.assert_close(z.double().cpu(), want_z, atol=1e-5, rtol=1e-5)


def test_merge_kernel_in_interpreter():
    in_triton_interpreter("test_attend_kernel", "check_merge_kernel")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA; the interpreter test above runs everywhere")
def test_merge_kernel_on_cuda():
    check_merge_kernel("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA; the interpreter test below runs everywhere")
def test_attend_scores_on_cuda():
    check_attend_scores("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: the interpreter needs a constant loop bound")
def test_attend_scores_as_a_symbolic_cache_size_launches_them_on_cuda():
    check_attend_scores("cuda", symbolic=True)


def test_attend_scores_in_interpreter():
    in_triton_interpreter("test_attend_kernel", "check_attend_scores")


def test_tune_attend_sass_finds_the_main_loop():
    """scripts/tune_attend.py sass (no GPU): the loop it counts is the kernel's tile loop, whose tensor-core
    work is known: m16n8k16 MMAs for q.K^T ([16, D] x [D, BLOCK]) and p.V ([16, BLOCK] x [BLOCK, D]), shared
    by 4 warps: 2 (16 / 16) (BLOCK / 8) (D / 16) / 4 per thread; the partials' global stores and the exit
    come after the loop, outside it."""
    pytest.importorskip("triton")
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import triton_kernels as tk
    import tune_attend as TA
    base = dict(G=4, GP=16, D=128, DENSE=True, SCORES=False, CHUNK=4096)
    for fn, consts in ((tk._attend_kernel, dict(base, BLOCK=64, RAGGED=False)),
                       (tk._attend_quant_kernel, dict(base, BLOCK=128, BITS=4, QG=32, ALIGNED=True, NATIVE=True,
                                                          ASM=True, PLANAR=True))):
        n, ops, _ = TA.loop_sass(fn, TA.SASS_POINTERS, consts, 4, 3)
        assert ops["HMMA"] == 2 * (consts["BLOCK"] // 8) * (128 // 16) // 4 and n > 10 * ops["HMMA"]
        assert ops["STG"] == 0 and ops["EXIT"] == 0, ops
