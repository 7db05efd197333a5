"""train_spotlight.py against plain-loop references: the paper's positives, per-layer clipping, 128-bit
(two-word) codes, and the per-KV-head ceiling of the recall table."""
import math
from argparse import Namespace

import pytest
import torch

import cache as kv
import train_spotlight as ts
from conftest import tiny_model


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def test_positives_are_the_top_2_percent_of_the_window():
    """Each query's positives: the floor(top T) best keys by q.k of the T-token window among the keys it can
    attend; negatives: its other keys. Plain loops over (layer, head, query)."""
    g = torch.Generator().manual_seed(0)
    L, H, H_kv, T, d = 2, 4, 2, 150, 8
    q, k = torch.randn(L, H, T, d, generator=g), torch.randn(L, H_kv, T, d, generator=g)
    args = Namespace(top=0.04, queries=12, max_pos=100, max_neg=60)  # max_pos > n: every positive comes back
    qi, ia, ib, vb = ts.sample_pairs(q, k, args, torch.Generator().manual_seed(1))
    n = math.floor(0.04 * T)  # 6 keys: 4% of the whole window, not of each query's prefix
    assert ia.shape[-1] == n
    for l in range(L):
        for h in range(H):
            for j, i in enumerate(qi.tolist()):
                assert i >= n  # more keys than positives, so there are negatives
                scores = [dot(q[l, h, i].tolist(), k[l, h // (H // H_kv), t].tolist()) for t in range(i + 1)]
                best = set(sorted(range(i + 1), key=lambda t: -scores[t])[:n])
                assert set(ia[l, h, j].tolist()) == best
                for b, ok in zip(ib[l, h, j].tolist(), vb[l, h, j].tolist()):
                    assert b <= i and ok == (b not in best)


def random_hashes(L, heads, d, bits, seed=0):
    """Hashes with non-trivial weights (not the near-zero start), so gradients differ by layer."""
    h = ts.Hashes(L, heads, d, bits, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in h.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return h


def test_gradients_clipped_per_layer():
    """train_step's gradients = each layer trained alone on its own loss and clipped on its own by
    clip_grad_norm_ (fails if the loss were divided by the layer count, or the clipping were global)."""
    g = torch.Generator().manual_seed(0)
    L, H, H_kv, T, d = 3, 4, 2, 80, 8
    q, k = torch.randn(L, H, T, d, generator=g), torch.randn(L, H_kv, T, d, generator=g)
    args = Namespace(top=0.05, queries=10, max_pos=4, max_neg=16, layer_batch=0, clip=0.0)
    pairs = ts.sample_pairs(q, k, args, torch.Generator().manual_seed(5))
    alone, norms = [], []
    for l in range(L):  # each layer's own model, loss and gradient
        one = ts.Hashes(1, H_kv, d, d)
        with torch.no_grad():
            for p, full in zip(one.parameters(), random_hashes(L, H_kv, d, d).parameters()):
                p.copy_(full[l:l + 1])
        loss, _ = ts.pair_loss(one, q[l:l + 1], k[l:l + 1], tuple(x if x.dim() == 1 else x[l:l + 1] for x in pairs))
        loss.sum().backward()
        norms.append(math.sqrt(sum(float((p.grad ** 2).sum()) for p in one.parameters())))
        alone.append(one)
    args.clip = sorted(norms)[1]  # the middle norm: one layer clipped, one not, one at the limit
    for one in alone:
        torch.nn.utils.clip_grad_norm_(list(one.parameters()), args.clip)
    h = random_hashes(L, H_kv, d, d)
    ts.train_step(h, q, k, args, torch.Generator().manual_seed(5))
    for l in range(L):
        for p, ref in zip(h.parameters(), alone[l].parameters()):
            torch.testing.assert_close(p.grad[l:l + 1], ref.grad, rtol=1e-4, atol=1e-7)


def naive_hash(x, w1, b1, w2, b2, lift):
    """Spotlight's hash of one vector x (lists), lifted: y = xl + SiLU(xl W1 + b1), h = y + y W2 + b2."""
    n = len(b1)
    xl = [sum(x[i] * lift[i][j] for i in range(len(x))) for j in range(n)]
    a = [sum(xl[i] * w1[i][j] for i in range(n)) + b1[j] for j in range(n)]
    y = [xl[j] + a[j] / (1 + math.exp(-a[j])) for j in range(n)]
    return [y[j] + sum(y[i] * w2[i][j] for i in range(n)) + b2[j] for j in range(n)]


def naive_words(bits):
    """Bits -> int64 words, bit i of word w = bits[64 w + i], two's complement."""
    words = []
    for w in range(0, len(bits), 64):
        v = sum(1 << i for i, b in enumerate(bits[w:w + 64]) if b)
        words.append(v - (1 << 64) if v >= 1 << 63 else v)
    return words


def test_128_bit_codes_two_words(tmp_path):
    """head_dim 64, --bits 128: the cache's key codes are two int64 words per key, the bits of the naive
    hash; code similarity = 128 - 2 Hamming over both words."""
    H_kv, G, d, T = 2, 2, 64, 5
    h = random_hashes(1, H_kv, d, 128)
    ts.save(h, [3], tmp_path / "h.safetensors", {})
    cfg = kv.CacheConfig(strategy="spotlight", params={"spotlight_hashes": str(tmp_path / "h.safetensors")})
    cache = kv.REGISTRY["spotlight"](1, H_kv, 16, d, G, torch.float32, 3, 10 ** 6, cfg)
    g = torch.Generator().manual_seed(3)
    k, qg = torch.randn(1, H_kv, T, d, generator=g), torch.randn(1, H_kv, G, d, generator=g)
    codes, qc = cache.key_codes(k), cache.query_codes(qg)
    assert codes.shape == (1, H_kv, 1, T, 2) and qc.shape == (1, H_kv, G, 2)
    w = {n: t[0].tolist() for n, t in [*h.named_parameters(), *h.named_buffers()]}
    for head in range(H_kv):
        args = [w[n][head] for n in ("w1", "b1", "w2", "b2", "lift")]
        kbits = [[v > 0 for v in naive_hash(k[0, head, t].tolist(), *args)] for t in range(T)]
        qbits = [[v > 0 for v in naive_hash(qg[0, head, j].tolist(), *args)] for j in range(G)]
        assert codes[0, head, 0].tolist() == [naive_words(b) for b in kbits]
        assert qc[0, head].tolist() == [naive_words(b) for b in qbits]
        sim = kv.hamming_sim(qc, codes, cache.d)[0, head]  # [G, T]
        assert sim.tolist() == [[128 - 2 * sum(a != b for a, b in zip(qb, kb)) for kb in kbits] for qb in qbits]


def test_128_bit_spotlight_decodes_like_full_at_no_pruning_and_compiles_once(tmp_path):
    """A widened (2 head_dim bits) hash through generation: prune 0 reads everything (= full), and the
    compiled decode step is one graph."""
    from torch._dynamo.utils import counters
    from test_retrieval import run
    model = tiny_model(n_layer=3)
    args = model.args
    h = random_hashes(args.n_layer, args.n_local_heads, args.head_dim, 2 * args.head_dim)
    ts.save(h, list(range(args.n_layer)), tmp_path / "spotlight.safetensors", {})
    ref = run(model, args, "full", {})
    torch.testing.assert_close(run(model, args, "spotlight", {"spotlight_prune": 0.0}, tmp_path), ref,
                               rtol=1e-5, atol=1e-5)
    sparse = {"spotlight_prune": 0.9, "spotlight_recent": 4, "spotlight_sinks": 2}
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(model.forward, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = run(model, args, "spotlight", sparse, tmp_path, steps=5, step_fn=step)
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(got, run(model, args, "spotlight", sparse, tmp_path, steps=5), rtol=1e-4, atol=1e-4)


def test_ceiling_recalls_at_least_every_method(tmp_path):
    """The per-KV-head ceiling (exact q.k, one set per KV head) recalls at least as much as every method,
    in every layer, at both prune rates, on a tiny random model."""
    model = tiny_model(n_layer=4)
    margs = model.args
    h = random_hashes(margs.n_layer, margs.n_local_heads, margs.head_dim, margs.head_dim)
    ts.save(h, list(range(margs.n_layer)), tmp_path / "h.safetensors", {})
    h2 = random_hashes(margs.n_layer, margs.n_local_heads, margs.head_dim, 2 * margs.head_dim, seed=4)
    ts.save(h2, list(range(margs.n_layer)), tmp_path / "h2.safetensors", {})
    toks = torch.randint(0, margs.vocab_size, (300,), generator=torch.Generator().manual_seed(0))
    caps = [ts.capture(model, toks, "cpu")]
    args = Namespace(dense_layers=[0], page_size=4, eval_queries=24)
    methods = ts.METHODS + ("spotlight/128",)
    rec, _ = ts.recall_table(caps, margs.n_head // margs.n_local_heads, args, tmp_path / "h.safetensors", methods,
                             hashes128=tmp_path / "h2.safetensors")
    for p in rec:
        for i in range(1, margs.n_layer):
            assert 0 < rec[p]["ceiling"][i] <= 1
            for m in methods:
                assert rec[p][m][i] <= rec[p]["ceiling"][i] + 1e-9, (p, i, m, rec[p][m][i], rec[p]["ceiling"][i])
    assert ts.print_gate(rec, args.dense_layers).keys() == {"spotlight", "spotlight/128"}


def test_bad_arguments_exit_with_one_line(capsys):
    for argv in (["--seq_len", "0"], ["--top", "1.5"], ["--holdout", "wikitext2_raw"], ["--bits", "-64"]):
        with pytest.raises(SystemExit) as e:
            ts.parse_args(argv)
        assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_ceiling_reaches_the_best_per_kv_head_recall():
    """ceiling_selection's set holds the most (query head, true top-k key) hits any k-key set per KV head can:
    the sum of the k largest per-key counts of query heads whose top k holds the key (plain loops)."""
    g = torch.Generator().manual_seed(2)
    Q, H_kv, G, T, d = 6, 2, 3, 40, 4
    q, k = torch.randn(Q, H_kv, G, d, generator=g), torch.randn(H_kv, T, d, generator=g)
    qi = torch.tensor([39, 30, 25, 12, 39, 20])
    k_sel = torch.tensor([5, 3, 4, 2, 7, 1])
    sel = ts.ceiling_selection(q, k, qi, k_sel)
    for j in range(Q):
        n, keys = int(k_sel[j]), range(int(qi[j]) + 1)
        for h in range(H_kv):
            votes = [0] * T
            for gq in range(G):
                s = [dot(q[j, h, gq].tolist(), k[h, t].tolist()) for t in keys]
                for t in sorted(keys, key=lambda t: -s[t])[:n]:
                    votes[t] += 1
            got = [t for t in range(T) if sel[j, h, t]]
            assert len(got) == n and all(t <= qi[j] for t in got)
            assert sum(votes[t] for t in got) == sum(sorted(votes, reverse=True)[:n])


def test_pair_loss_matches_plain_loops():
    """Bradley-Terry loss per layer: mean over (head, query, positive a, valid negative b) of
    log(1 + exp(-(c(q).c(k_a) - c(q).c(k_b)))), c = softsign(64 h(x)); plain loops over naive_hash."""
    g = torch.Generator().manual_seed(4)
    L, H, H_kv, T, d = 2, 4, 2, 30, 4
    q, k = torch.randn(L, H, T, d, generator=g), torch.randn(L, H_kv, T, d, generator=g)
    h = random_hashes(L, H_kv, d, d)
    args = Namespace(top=0.1, queries=3, max_pos=2, max_neg=5)
    pairs = ts.sample_pairs(q, k, args, torch.Generator().manual_seed(0))
    qi, ia, ib, vb = (x.tolist() for x in pairs)
    loss, _ = ts.pair_loss(h, q, k, pairs)
    eye = [[float(i == j) for j in range(d)] for i in range(d)]
    for l in range(L):
        total, count = 0.0, 0
        for head in range(H):
            w = [p[l, head // 2].tolist() for p in (h.w1, h.b1, h.w2, h.b2)] + [eye]
            code = lambda x: [64 * v / (1 + abs(64 * v)) for v in naive_hash(x.tolist(), *w)]  # noqa: E731
            for j, i in enumerate(qi):
                cq = code(q[l, head, i])
                for a in ia[l][head][j]:
                    for b, ok in zip(ib[l][head][j], vb[l][head][j]):
                        if ok:
                            diff = dot(cq, code(k[l, head // 2, a])) - dot(cq, code(k[l, head // 2, b]))
                            total, count = total + math.log1p(math.exp(-diff)), count + 1
        assert math.isclose(float(loss[l]), total / count, rel_tol=1e-4)
