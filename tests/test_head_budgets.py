"""Head-level budgets (AdaKV, HeadKV, DiliLazyKV) against naive references written from the papers: the
allocation rules (sums, floors), AdaKV's safeguard and flattened top-k, the kept set per head, the real
bytes of the flat per-head storage, and a batch equal to its sequences run alone."""
import json
import math

import pytest
import torch

import cache as kv
import generate as gen
from conftest import in_triton_interpreter, tiny_model


def write_scores(d, args, seed=0):
    """Stand-in for head_scores.py's two files: random scores keyed "layer-head" per query head."""
    g = torch.Generator().manual_seed(seed)
    for kind in ("infscore", "headkv"):
        scores = {f"{l}-{h}": {kind: float(torch.rand(1, generator=g))} for l in range(args.n_layer) for h in range(args.n_head)}
        (d / "head_scores").mkdir(exist_ok=True)
        (d / "head_scores" / f"{'dililazy' if kind == 'infscore' else 'headkv'}.json").write_text(json.dumps({"scores": scores}))
    return d


def naive_group_scores(path, kind, n_layer, n_kv, G):
    table = json.loads(path.read_text())["scores"]
    return [[sum(table[f"{l}-{h * G + g}"][kind] for g in range(G)) / G for h in range(n_kv)] for l in range(n_layer)]


def naive_caps(rule, s, B, w, beta, temp=1.0):
    """The papers' caps for every (layer, KV head), plain Python: B the average prompt budget per head."""
    N = sum(len(row) for row in s)
    total = sum(map(sum, s))
    s = [[x / total for x in row] for row in s]
    Bp = B - w
    pool = math.floor(Bp / beta)
    if rule == "headkv":
        sa = [[x ** temp for x in row] for row in s]
        z = sum(map(sum, sa))
        return [[round(x / z * pool * N + (Bp - pool)) + w for x in row] for row in sa]
    sa = [[x ** temp for x in row] for row in s]
    sa = [[x + 0.01 * x / sum(row) for x in row] for row in sa]
    z = sum(map(sum, sa))
    return [[round(x / z * (pool * N - 0.5 * N) + (Bp - pool) + 0.5) + w for x in row] for row in sa]


@pytest.mark.parametrize("name, kind, beta", [("headkv", "headkv", 1.01), ("dililazy", "infscore", 1.351)])
def test_offline_budgets_follow_the_papers_and_sum_to_the_pool(tmp_path, name, kind, beta):
    model = tiny_model(n_layer=4, n_kv=3, n_head=9)
    write_scores(tmp_path, model.args)
    S, new = 120, 10  # average slots per head, of which 10 for new tokens
    cfg = kv.CacheConfig(strategy=name, max_cache_length=[str(S)], checkpoint_dir=str(tmp_path))
    caches = kv.make_caches(model.args, cfg, 1, 400, new, "cpu", torch.float32)
    got = [c.budgets(None, torch.full((1, 3), S - new))[0].tolist() for c in caches]
    s = naive_group_scores(tmp_path / "head_scores" / f"{name}.json", kind, 4, 3, 3)
    want = naive_caps(name, s, S - new, 32, beta)
    assert got == want
    Bp, N = S - new - 32, 12
    assert all(c >= 32 + Bp - math.floor(Bp / beta) for row in got for c in row)  # every head's floor
    assert abs(sum(map(sum, got)) - N * (S - new)) <= N / 2 + 1  # the pool is shared out, up to rounding
    assert len({tuple(r) for r in got}) > 1  # layers differ


def naive_adakv(scores, B, alpha):
    """scores [H][T] (floats), per-head budget B: the safeguard floor(alpha B) per head, then the layer's
    H B best of the rest jointly; ties to the later token, then the lower head. -> tokens kept per head."""
    H, T = len(scores), len(scores[0])
    a = math.floor(alpha * B)
    keep = [set(sorted(range(T), key=lambda t: (-scores[h][t], -t))[:a]) for h in range(H)]
    rest = sorted(((h, t) for h in range(H) for t in range(T) if t not in keep[h]),
                  key=lambda ht: (-scores[ht[0]][ht[1]], -ht[1], ht[0]))
    for h, t in rest[:H * B - sum(map(len, keep))]:
        keep[h].add(t)
    return keep


def test_adakv_safeguard_and_flattened_top_k():
    g = torch.Generator().manual_seed(5)
    cfg = kv.CacheConfig(strategy="adakv", max_cache_length=["40"])
    for trial in range(5):
        H, T, B = 3, 90, 30
        scores = torch.randint(0, 12, (2, H, T), generator=g).float()  # small integers: many ties
        scores[1, 0] *= 10  # one head far ahead: it wins most of the layer's budget
        c = kv.REGISTRY["adakv"](2, H, 40, 16, 3, torch.float32, 0, 1, cfg, max_new_tokens=10)
        caps = c.budgets(scores, torch.full((2, H), B))
        kept = kv.best_in_row(scores, caps)
        for b in range(2):
            want = naive_adakv(scores[b].tolist(), B, 0.2)
            assert caps[b].tolist() == [len(k) for k in want]
            assert [set(torch.nonzero(kept[b, h]).flatten().tolist()) for h in range(H)] == want
            assert sum(caps[b].tolist()) == H * B
            assert min(caps[b].tolist()) >= math.floor(0.2 * B)
        assert caps[1, 0] > 2 * B  # the strong head took more than an even share


@pytest.mark.parametrize("name", ["adakv", "headkv", "dililazy"])
def test_kept_tokens_are_each_heads_best_by_snapkv_and_bytes_are_the_budgets(tmp_path, name):
    model = tiny_model()
    write_scores(tmp_path, model.args)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, 256, (160,), generator=g).tolist()
    cfg = kv.CacheConfig(strategy=name, max_cache_length=["70"], checkpoint_dir=str(tmp_path))
    caches = []
    gen.generate(model, [prompt], 1, cfg, on_caches=caches.append)  # prefill + the first token
    caches = caches[0]
    for c in caches:
        # reference: SnapKV's scores of this layer's prompt, recomputed; each head keeps its top caps
        assert c.count.sum() > 0
        L = c.k.shape[1]
        assert L == int(c.cap.sum()) or name == "adakv"  # flat: the heads' capacities, not H x the largest
        assert kv.cache_bytes([c]) == (2 * L * 16 * 4 + L * 8) + 4 * 2 * 8  # K, V, pos; limit, start, count, cap
        runs = [set(c.pos[0, c.start[0, h]:c.start[0, h] + c.count[0, h]].tolist()) for h in range(2)]
        assert all(len(r) == int(c.count[0, h]) for h, r in enumerate(runs))
        assert all(max(r) < 160 for r in runs)  # prompt positions only (no decode step yet)
    for c in caches:  # 70 prompt slots per head on average (the budget never counts new tokens)
        want = 2 * 70 if name == "adakv" else c.budgets(None, torch.full((1, 2), 70))[0].clamp(max=160).sum()
        assert c.count.sum() == want


def test_kept_set_is_snapkvs_choice_within_each_head():
    """Prefill with a scripted layer: the tokens each head keeps are its caps best by snap_scores."""
    g = torch.Generator().manual_seed(3)
    B, H, G, T, D = 2, 3, 3, 120, 16
    q, k, v = torch.randn(B, H * G, T, D, generator=g), torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    pos = torch.arange(T).expand(B, T).clone()
    pos[1, :30] = -1  # left padding
    cfg = kv.CacheConfig(strategy="adakv", max_cache_length=["50"])
    c = kv.REGISTRY["adakv"](B, H, 50, D, G, torch.float32, 0, 1, cfg, max_new_tokens=10)
    c.prefill(q, k, v, pos)
    scores = kv.snap_scores(q, k, pos, c.p).masked_fill(pos[:, None] < 0, -math.inf)
    for b in range(B):
        want = naive_adakv(scores[b].tolist(), 40, 0.2)
        for h in range(H):
            got = c.pos[b, c.start[b, h]:c.start[b, h] + c.count[b, h]]
            assert sorted(pos[b, sorted(want[h])].tolist()) == got.tolist()  # position order
            torch.testing.assert_close(c.k[b, c.start[b, h]:c.start[b, h] + c.count[b, h]], k[b, h, sorted(want[h])])


@pytest.mark.parametrize("name", ["adakv", "headkv", "dililazy"])
def test_batch_of_different_lengths_equals_single_and_compiles_once(tmp_path, name):
    model = tiny_model()
    write_scores(tmp_path, model.args)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (170, 90)]
    cfg = kv.CacheConfig(strategy=name, max_cache_length=["0.5"], checkpoint_dir=str(tmp_path))
    batch = gen.generate(model, prompts, 24, cfg).tokens
    for b, p in enumerate(prompts):
        assert batch[b] == gen.generate(model, [p], 24, cfg).tokens[0], f"sequence {b}"
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    step, before = torch.compile(model.forward, fullgraph=True, backend="eager"), counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = gen.generate(model, prompts, 24, cfg, decode_step=step).tokens
    assert compiled == batch and counters["stats"]["unique_graphs"] - before == 1


def test_attention_reads_only_each_heads_run():
    """attend_runs (the CPU path; CUDA's dense_attend runs are tested in test_attend_kernel) equals plain
    attention of each head's group over its own tokens."""
    g = torch.Generator().manual_seed(6)
    cfg = kv.CacheConfig(strategy="adakv", max_cache_length=["40"])
    c = kv.REGISTRY["adakv"](2, 3, 40, 16, 2, torch.float32, 0, 1, cfg, max_new_tokens=5)
    L = c.k.shape[1]
    c.k.copy_(torch.randn(2, L, 16, generator=g))
    c.v.copy_(torch.randn(2, L, 16, generator=g))
    c.pos.copy_(torch.arange(L).expand(2, L))
    c.start.copy_(torch.tensor([[0, 30, 70], [0, 50, 60]]))
    c.count.copy_(torch.tensor([[20, 35, 40], [45, 3, 60]]))
    qg = torch.randn(2, 3, 2, 16, generator=g)
    out = c.attend_runs(qg)
    for b in range(2):
        for h in range(3):
            s, n = int(c.start[b, h]), int(c.count[b, h])
            ref = torch.softmax(qg[b, h] @ c.k[b, s:s + n].T / 4.0, -1) @ c.v[b, s:s + n]
            torch.testing.assert_close(out[b, h], ref)


def check_flat_runs(device):
    """dense_attend over a flat per-sequence buffer expanded over heads with stride 0 (HeadBudgetCache's
    CUDA path) equals each head's plain attention over its own run."""
    from triton_kernels import dense_attend
    g = torch.Generator().manual_seed(7)
    B, H, G, L, D = 2, 3, 3, 400, 64
    k, v = torch.randn(B, L, D, generator=g), torch.randn(B, L, D, generator=g)
    pos = torch.arange(L).expand(B, L).clone()
    pos[0, 100:] = -1  # an unwritten tail
    qg = torch.randn(B, H, G, D, generator=g)
    # runs of very different lengths: ragged mode splits the 300-slot run over 2 programs, and the
    # second program of each short run finds its chunk empty
    runs = torch.tensor([[[0, 40], [40, 30], [70, 30]], [[0, 5], [5, 300], [305, 25]]])
    expand = lambda x: x[:, None].expand(B, H, *x.shape[1:])  # noqa: E731
    dt, tol = (torch.bfloat16, 2e-2) if device == "cuda" else (torch.float32, 1e-5)
    qg, k, v = (x.to(dt).float() for x in (qg, k, v))  # the reference sees the kernel's values
    for n, ragged in ((300, False), (L, True)):  # dense's bound: the longest run; ragged's: the buffer
        out = dense_attend(*(x.to(device, dt) for x in (qg, expand(k), expand(v))),
                           *(x.to(device) for x in (expand(pos), runs)), n, ragged).float().cpu()
        for b in range(B):
            for h in range(H):
                s, n = runs[b, h].tolist()
                keep = [t for t in range(s, s + n) if pos[b, t] >= 0]
                ref = torch.softmax(qg[b, h] @ k[b, keep].T / D ** 0.5, -1) @ v[b, keep]
                torch.testing.assert_close(out[b, h], ref, atol=tol, rtol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA; the interpreter test below runs everywhere")
def test_flat_runs_on_cuda():
    check_flat_runs("cuda")


def test_flat_runs_in_interpreter():
    in_triton_interpreter("test_head_budgets", "check_flat_runs")
