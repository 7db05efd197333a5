"""Quest's page selection: the Triton kernels (triton_kernels.quest_scores, quest_pick, quest_select) and
the torch path (cache.Quest.pick) against a naive reference written from the definition, in plain
Python: page bounds from the stored keys, score = sum_d max(q_d M_d, q_d m_d) per query row, the group's
mean or max, candidates = filled pages before the current one, the current page always read, and of
pages tied at the threshold the later ones read first."""
import math

import pytest
import torch

import cache as kv
from conftest import in_triton_interpreter


def naive_bounds(keys, now, ps):
    """Per page (min, max) of the stored keys [S][D] at positions 0..now, element by element."""
    pages = []
    for start in range(0, now + 1, ps):
        rows = keys[start:min(now + 1, start + ps)]
        pages.append(([min(r[i] for r in rows) for i in range(len(rows[0]))],
                      [max(r[i] for r in rows) for i in range(len(rows[0]))]))
    return pages


def naive_scores(q_rows, pages, group):
    """Each page's bound for each query row, combined over the group by mean or max."""
    out = []
    for lo, hi in pages:
        per_q = [sum(max(q[i] * hi[i], q[i] * lo[i]) for i in range(len(q))) for q in q_rows]
        out.append(max(per_q) if group == "max" else sum(per_q) / len(per_q))
    return out


def naive_tokens(scores, now, ps, n_sel):
    """The tokens read: the current page, plus the n_sel best earlier pages, ties to the later page."""
    cur = now // ps
    best = sorted(range(cur), key=lambda p: (-scores[p], -p))[:n_sel]
    return {t for p in [cur, *best] for t in range(p * ps, p * ps + ps) if t <= now}


def naive_n_sel(budget, n, ps):
    """Pages read besides the current one with n tokens seen (budget: a fraction, or a token count)."""
    tokens = math.ceil(budget * n) if budget <= 1 else min(n, budget)
    return max(1, math.ceil(tokens / ps)) - 1


def as_sets(idx, ok):
    """(idx, ok) [B, H, N] -> the set of tokens read, per row."""
    idx, ok = idx.cpu(), ok.cpu()
    return [[set(idx[b, h][ok[b, h]].tolist()) for h in range(idx.shape[1])] for b in range(idx.shape[0])]


def well_separated_and_tied(B, H, P, g):
    """Page scores two ways: distinct floats, and small integers (many ties, -0.0 next to 0.0)."""
    tied = torch.randint(-3, 4, (B, H, P), generator=g).float()
    tied[..., ::5] = -0.0  # the order key must tie -0.0 with 0.0, as torch's comparisons do
    tied[..., 1::7] = 0.0
    return [torch.randn(B, H, P, generator=g), tied]


# (B, H, G, D, page_size, S): P = 38 pages (S not a multiple of the page), 32 pages, 38 pages
SHAPES = [(2, 3, 3, 64, 16, 600), (2, 2, 4, 32, 4, 150), (1, 2, 4, 32, 16, 512)]


def check_pick(device, pick):
    """pick(scores, input_pos, n_sel, K, ps, S) against the naive selection on given scores (exact);
    the kernel also against Quest.pick tensor for tensor (same pages, same order, same unused entries)."""
    g = torch.Generator().manual_seed(0)
    for B, H, _, _, ps, S in SHAPES:
        P = -(-S // ps)
        ip = torch.tensor([S - 1, S // 2 + 3][:B])
        for scores in well_separated_and_tied(B, H, P, g):
            cur = ip // ps  # n_sel: none, a few, half (the threshold often at 0 in the tied case), all
            for n_sel in (torch.zeros(B, dtype=torch.long), torch.tensor([3, 1][:B]), cur // 2, cur):
                K = min(P, int(n_sel.max()) + 3)  # unused pages in the shorter row: ok False there
                idx, ok = pick(*(x.to(device) for x in (scores, ip, n_sel)), K, ps, S)
                assert idx.shape == ok.shape == (B, H, K * ps) and int(idx.max()) <= S - 1
                got = as_sets(idx, ok)
                for b in range(B):
                    for h in range(H):
                        want = naive_tokens(scores[b, h].tolist(), int(ip[b]), ps, int(n_sel[b]))
                        assert got[b][h] == want, (B, H, ps, b, h, n_sel.tolist())
                ref = kv.Quest.pick(scores, ip, n_sel, K, ps, S)
                assert torch.equal(idx.cpu(), ref[0]) and torch.equal(ok.cpu(), ref[1])


def bounds_tensors(keys, ip, ps, P, g):
    """kmax/kmin [B, H, P, D] from the naive per-page bounds; pages past the current one hold noise
    (the kernel must neither read nor score them)."""
    B, H, _, D = keys.shape
    kmax, kmin = torch.randn(B, H, P, D, generator=g) * 100, torch.randn(B, H, P, D, generator=g) * 100
    pages = {}
    for b in range(B):
        for h in range(H):
            pages[b, h] = naive_bounds(keys[b, h].tolist(), int(ip[b]), ps)
            for p, (lo, hi) in enumerate(pages[b, h]):
                kmin[b, h, p], kmax[b, h, p] = torch.tensor(lo), torch.tensor(hi)
    return kmax, kmin, pages


def check_quest_select(device):
    """The kernels on `device` (CUDA, or CPU in Triton's interpreter) against the naive reference:
    quest_pick exactly on given scores; quest_scores within a tolerance on random data (the kernel sums
    in another order); quest_select exactly on small-integer data, where every sum is exact."""
    from triton_kernels import quest_pick, quest_scores, quest_select
    check_pick(device, quest_pick)
    g = torch.Generator().manual_seed(1)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    for B, H, G, D, ps, S in SHAPES:
        P = -(-S // ps)
        ip = torch.tensor([S - 1, S // 3][:B])
        for integer in (False, True):
            keys = torch.randint(-3, 4, (B, H, S, D), generator=g).float() if integer else torch.randn(B, H, S, D, generator=g)
            q = torch.randint(-2, 3, (B, H, G, D), generator=g).float() if integer else torch.randn(B, H, G, D, generator=g)
            keys, q = keys.to(dt).float(), q.to(dt).float()  # the naive side sees the stored (rounded) values
            kmax, kmin, pages = bounds_tensors(keys, ip, ps, P, g)
            args = [x.to(device) for x in (q.to(dt), kmax.to(dt), kmin.to(dt), ip)]
            for group in ("mean", "max"):
                got = quest_scores(*args, ps, group == "max").cpu()
                for b in range(B):
                    for h in range(H):
                        want = naive_scores(q[b, h].tolist(), pages[b, h], group)
                        cur = int(ip[b]) // ps
                        torch.testing.assert_close(got[b, h, :cur + 1], torch.tensor(want), rtol=1e-5, atol=1e-4)
                        assert bool((got[b, h, cur + 1:] == -math.inf).all())
                if not integer or (group == "mean" and G % 2):  # mean over 3 rows: sums not exact
                    continue
                n_sel = torch.tensor([naive_n_sel(0.3, int(n), ps) for n in ip + 1])
                K = naive_n_sel(0.3, S, ps) + 1
                sel = as_sets(*quest_select(*args, n_sel.to(device), K, ps, S, group == "max"))
                for b in range(B):
                    for h in range(H):
                        scores = naive_scores(q[b, h].tolist(), pages[b, h], group)
                        assert sel[b][h] == naive_tokens(scores, int(ip[b]), ps, int(n_sel[b])), (G, group, b, h)


def test_torch_pick_matches_naive():
    check_pick("cpu", kv.Quest.pick)


@pytest.mark.parametrize("group", ["mean", "max"])
def test_torch_select_matches_naive_on_integer_data(group):
    """Quest.select on CPU (page_scores + pick, the budget's page count) on exact small-integer data."""
    B, H, G, D, ps, S = 2, 2, 4, 32, 4, 150
    cfg = kv.CacheConfig(strategy="quest", params={"quest_page_size": ps, "quest_budget": 0.3, "quest_group": group})
    cache = kv.Quest(B, H, S, D, G, torch.float32, 2, 4, cfg)
    g = torch.Generator().manual_seed(2)
    keys, q = torch.randint(-3, 4, (B, H, S, D), generator=g).float(), torch.randint(-2, 3, (B, H, G, D), generator=g).float()
    ip = torch.tensor([S - 1, 61])
    kmax, kmin, pages = bounds_tensors(keys, ip, ps, -(-S // ps), g)
    cache.kmax.copy_(kmax)
    cache.kmin.copy_(kmin)
    sel = as_sets(*cache.select(q, ip))
    for b in range(B):
        for h in range(H):
            scores = naive_scores(q[b, h].tolist(), pages[b, h], group)
            assert sel[b][h] == naive_tokens(scores, int(ip[b]), ps, naive_n_sel(0.3, int(ip[b]) + 1, ps))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA; the interpreter test below runs everywhere")
def test_quest_kernels_on_cuda():
    check_quest_select("cuda")


def test_quest_kernels_in_interpreter():
    in_triton_interpreter("test_quest_kernel", "check_quest_select")
