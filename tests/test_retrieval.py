"""Retrieval strategies (spotlight, spotlight_linear, lsh_retrieval, quest) against naive references."""
import math
import random

import pytest
import torch

import cache as kv
from model import ModelArgs, Transformer
from conftest import in_triton_interpreter, needs_data

RETRIEVERS = ("spotlight", "spotlight_linear", "lsh_retrieval", "quest")


def naive_popcount(x: int) -> int:
    return bin(x & (2 ** 64 - 1)).count("1")


def test_popcount_matches_bin():
    rng = random.Random(0)
    xs = [0, 1, -1, 2 ** 63 - 1, -2 ** 63, -2, 0x5555555555555555, -0x5555555555555556]
    xs += [rng.randrange(-2 ** 63, 2 ** 63) for _ in range(2000)]
    got = kv.popcount64(torch.tensor(xs, dtype=torch.long)).tolist()
    assert got == [naive_popcount(x) for x in xs]


def naive_sim(qbits, kbits):
    """d - 2 * Hamming, one bit at a time."""
    return len(qbits) - 2 * sum(int(a != b) for a, b in zip(qbits, kbits))


@pytest.mark.parametrize("d", [64, 128, 80])
def test_packed_hamming_topk_matches_bruteforce(d):
    g = torch.Generator().manual_seed(d)
    S, G, k = 200, 3, 17
    qbits = torch.rand(G, d, generator=g) > 0.5
    kbits = torch.rand(S, d, generator=g) > 0.5
    sim = kv.hamming_sim(kv.pack_bits(qbits), kv.pack_bits(kbits)[None], d)  # [G, S]
    ref = [[naive_sim(qbits[h].tolist(), kbits[j].tolist()) for j in range(S)] for h in range(G)]
    assert sim.tolist() == ref
    total = [sum(ref[h][j] for h in range(G)) for j in range(S)]  # group score, selection per KV head
    idx, ok = kv.topk_select(sim.sum(0)[None, None], torch.zeros(1, 1, S, dtype=torch.bool),
                             torch.ones(1, 1, S, dtype=torch.bool), torch.tensor([k]), k + 5)
    chosen = idx[0, 0][ok[0, 0]].tolist()
    kth = sorted(total, reverse=True)[k - 1]
    assert len(set(chosen)) == k and all(total[j] >= kth for j in chosen)  # a top-k set (ties may differ)
    assert sorted((total[j] for j in chosen), reverse=True) == sorted(total, reverse=True)[:k]


def tiny(n_layer=4, seed=0):
    torch.manual_seed(seed)
    args = ModelArgs.from_name("tiny")
    args.n_layer = n_layer
    return Transformer(args).eval(), args


def write_hashes(path, args, heads=None, scale=0.3, seed=0):
    """Random (not near-zero) Spotlight hashes for the tiny model, so they differ from sign(x)."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    H, d = heads or args.n_local_heads, args.head_dim
    state = {}
    for i in range(args.n_layer):
        for n, shape in (("w1", (H, d, d)), ("b1", (H, d)), ("w2", (H, d, d)), ("b2", (H, d))):
            state[f"layers.{i}.{n}"] = torch.randn(*shape, generator=g) * scale
    save_file(state, str(path / "spotlight.safetensors"))
    return path


def run(model, args, strategy, params, ckpt="", steps=10, B=2, T=40, step_fn=None, device="cpu"):
    """Prefill a left-padded batch, then decode `steps` tokens; every step's logits [B, steps + 1, V]."""
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(0, args.vocab_size, (B, T), generator=g)
    pos = torch.arange(T).repeat(B, 1)
    pos[1] = (pos[1] - 7).clamp(min=-1)  # left padding: the second prompt is 7 tokens shorter
    cfg = kv.CacheConfig(strategy=strategy, params=params, checkpoint_dir=str(ckpt))
    model.setup_caches(kv.make_caches(args, cfg, B, T + steps + 1, steps + 1, device, torch.float32))
    with torch.no_grad():
        out = [model.prefill(toks.to(device), pos.to(device))]
        ip = pos[:, -1].to(device) + 1
        step = step_fn or model.forward
        for _ in range(steps):
            out.append(step(torch.randint(0, args.vocab_size, (B, 1), generator=g).to(device), ip)[:, -1].clone())
            ip = ip + 1
    return torch.stack(out, 1)


EVERY = {"spotlight_prune": 0.0, "quest_budget": 1.0}
SPARSE = {"spotlight_prune": 0.9, "spotlight_recent": 4, "spotlight_sinks": 2, "quest_budget": 0.2,
          "quest_page_size": 4}


@pytest.mark.parametrize("strategy", RETRIEVERS)
def test_budget_covering_everything_matches_full(strategy, tmp_path):
    model, args = tiny()
    ckpt = write_hashes(tmp_path, args)
    ref = run(model, args, "full", {})
    got = run(model, args, strategy, EVERY, ckpt)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    sparse = run(model, args, strategy, SPARSE, ckpt)  # and a real budget does read less
    assert (sparse[:, 1:] - ref[:, 1:]).abs().max() > 1e-3
    torch.testing.assert_close(sparse[:, 0], ref[:, 0])  # prefill is dense


def code_bits(cache, vec, h):
    """sign(h(vec)) with KV head h's hash, as a list of bools."""
    x = torch.zeros(1, cache.k.shape[1], 1, vec.shape[-1])
    x[0, h, 0] = vec
    return (cache.hash(x)[0, h, 0] > 0).tolist()


def naive_spotlight_selection(cache, qg, input_pos, b, h):
    """The slots one (sequence, KV head) reads, with plain loops over keys and bits."""
    p = cache.p
    qbits = [code_bits(cache, qg[b, h, g], h) for g in range(qg.shape[2])]
    n = int(input_pos[b]) + 1
    k = max(min(n, 20), n - math.floor(p["spotlight_prune"] * n))
    forced, scored = set(), []
    for j in range(n):  # slot = position in a retrieval cache
        if j < p["spotlight_sinks"] or j > n - 1 - p["spotlight_recent"] or j == n - 1:
            forced.add(j)
            continue
        kbits = code_bits(cache, cache.k[b, h, j], h)
        scored.append((sum(naive_sim(qb, kbits) for qb in qbits), j))
    return forced, scored, k


@pytest.mark.parametrize("strategy", ["spotlight", "lsh_retrieval"])
def test_spotlight_selection_matches_naive(strategy, tmp_path):
    model, args = tiny()
    ckpt = write_hashes(tmp_path, args)
    params = {"spotlight_prune": 0.8, "spotlight_recent": 5, "spotlight_sinks": 3}
    run(model, args, strategy, params, ckpt, steps=6, T=60)  # codes written at prefill and decode
    cache = model.layers[3].attention.kv_cache
    g = torch.Generator().manual_seed(5)
    qg = torch.randn(2, args.n_local_heads, args.n_head // args.n_local_heads, args.head_dim, generator=g)
    input_pos = (cache.pos.amax(dim=(1, 2)))
    idx, ok = cache.select(qg, input_pos)
    for b in range(2):
        for h in range(args.n_local_heads):
            forced, scored, k = naive_spotlight_selection(cache, qg, input_pos, b, h)
            got = set(idx[b, h][ok[b, h]].tolist())
            assert forced <= got and len(got) == len(forced) + k
            kth = sorted(s for s, _ in scored)[::-1][k - 1]
            assert all(s >= kth for s, j in scored if j in got)
            assert sum(s > kth for s, _ in scored) <= k <= sum(s >= kth for s, _ in scored)


@pytest.mark.parametrize("strategy,per_query_head", [("spotlight", False), ("spotlight", True), ("lsh_retrieval", False)])
def test_decode_selects_with_the_query_codes_hashed_beside_the_new_key(strategy, per_query_head, tmp_path, monkeypatch):
    """Spotlight.on_write hashes the query's rows with the new key's and hands the query's codes to select
    (q_index); the logits of every step equal a run whose select hashes the query itself (q_index dropped), for
    per-KV-head and per-query-head hashes (Gh > 1), and the prune reads a sliver (the codes matter)."""
    model, args = tiny()
    ckpt = write_hashes(tmp_path, args, heads=args.n_head if per_query_head else None)
    got = run(model, args, strategy, SPARSE, ckpt, steps=8)
    for c in (layer.attention.kv_cache for layer in model.layers[2:]):  # layers 0, 1: dense
        assert c.gh == (args.n_head // args.n_local_heads if per_query_head else 1)
        filled = (c.pos >= 0)[:, :, None, :, None].expand_as(c.codes)  # every key's codes, prefill's and decode's
        assert torch.equal(c.codes[filled], c.key_codes(c.k)[filled])
    write = kv.Spotlight.on_write
    monkeypatch.setattr(kv.Spotlight, "on_write", lambda self, *a: [write(self, *a), None][1])
    want = run(model, args, strategy, SPARSE, ckpt, steps=8)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (got[:, 1:] - run(model, args, strategy, EVERY, ckpt, steps=8)[:, 1:]).abs().max() > 1e-3


def test_read_bytes_counts_the_selection_and_the_codes():
    """kv.read_bytes (what generate.py prints): the K/V rows of each layer's selection, counted here from
    the naive selection, plus the packed codes scanned; the full cache reads all it holds."""
    model, args = tiny()
    params = {"spotlight_prune": 0.8, "spotlight_recent": 5, "spotlight_sinks": 3}
    run(model, args, "lsh_retrieval", params, steps=6, T=60)
    caches = [layer.attention.kv_cache for layer in model.layers]
    input_pos = caches[0].pos.amax(dim=(1, 2))
    qg = torch.zeros(2, args.n_local_heads, args.n_head // args.n_local_heads, args.head_dim)
    row = 2 * args.head_dim * 4  # K and V, fp32
    want = held = 0
    for c in caches:
        held += int((c.pos >= 0).sum()) * row
        if c.dense:
            want += int((c.pos >= 0).sum()) * row
            continue
        want += c.codes.numel() * 8
        for b in range(2):
            for h in range(args.n_local_heads):
                forced, _, k = naive_spotlight_selection(c, qg, input_pos, b, h)
                want += (len(forced) + k) * row
    assert kv.read_bytes(caches, input_pos) == (want, held) and want < held
    run(model, args, "full", {}, steps=6, T=60)
    caches = [layer.attention.kv_cache for layer in model.layers]
    read, held = kv.read_bytes(caches, caches[0].pos.amax(dim=(1, 2)))
    assert read == held == sum(int((c.pos >= 0).sum()) for c in caches) * row


def naive_quest(keys, n, ps):
    """Per-page min and max of keys [n, D] (plain loops)."""
    pages = []
    for start in range(0, n, ps):
        rows = keys[start:min(n, start + ps)].tolist()
        pages.append(([min(r[i] for r in rows) for i in range(len(rows[0]))],
                      [max(r[i] for r in rows) for i in range(len(rows[0]))]))
    return pages


@pytest.mark.parametrize("group", ["max", "mean"])
def test_quest_bounds_and_selection_match_naive(group):
    model, args = tiny()
    ps = 4
    params = {"quest_page_size": ps, "quest_budget": 0.3, "quest_group": group}
    run(model, args, "quest", params, steps=9, T=37)  # prompt ends mid-page; decode crosses pages
    cache = model.layers[2].attention.kv_cache
    g = torch.Generator().manual_seed(3)
    qg = torch.randn(2, args.n_local_heads, args.n_head // args.n_local_heads, args.head_dim, generator=g)
    input_pos = cache.pos.amax(dim=(1, 2))
    idx, ok = cache.select(qg, input_pos)
    for b in range(2):
        n = int(input_pos[b]) + 1
        for h in range(args.n_local_heads):
            pages = naive_quest(cache.k[b, h], n, ps)
            for p, (mn, mx) in enumerate(pages):
                assert cache.kmin[b, h, p].tolist() == mn and cache.kmax[b, h, p].tolist() == mx
            scores = []
            for mn, mx in pages:
                per_q = [sum(max(q[i] * mx[i], q[i] * mn[i]) for i in range(len(q))) for q in qg[b, h].tolist()]
                scores.append(max(per_q) if group == "max" else sum(per_q) / len(per_q))
            n_pages = max(1, math.ceil(math.ceil(0.3 * n) / ps))
            cur = (n - 1) // ps
            rest = sorted((p for p in range(len(pages)) if p != cur), key=lambda p: -scores[p])[:n_pages - 1]
            want = {j for p in [cur, *rest] for j in range(p * ps, min(n, p * ps + ps))}
            assert set(idx[b, h][ok[b, h]].tolist()) == want


def test_spotlight_without_hashes_says_how_to_train(tmp_path):
    _, args = tiny()
    cfg = kv.CacheConfig(strategy="spotlight", checkpoint_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"python train_spotlight.py --checkpoint_path"):
        kv.make_caches(args, cfg, 1, 64, 8, "cpu", torch.float32)


@pytest.mark.parametrize("strategy", ["spotlight", "quest"])
def test_decode_compiles_once(strategy, tmp_path):
    from torch._dynamo.utils import counters
    model, args = tiny(n_layer=3)
    ckpt = write_hashes(tmp_path, args)
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(model.forward, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = run(model, args, strategy, SPARSE, ckpt, steps=6, step_fn=step)
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(got, run(model, args, strategy, SPARSE, ckpt, steps=6), rtol=1e-4, atol=1e-4)


@needs_data("pg19_test_gutenberg", "wikitext2_raw", "paul_graham_essays")
def test_tiny_training_lowers_loss_and_raises_recall(default_checkpoint, tmp_path):
    import train_spotlight as ts
    args = ts.parse_args(["--checkpoint_path", str(default_checkpoint), "--device", "cpu", "--steps", "24",
                          "--seq_len", "384", "--queries", "24", "--eval_every", "24",
                          "--eval_queries", "12", "--lr", "3e-3"])
    model, tokenizer = ts.load(args)
    held = ts.windows(ts.token_stream(tokenizer, [args.holdout]), 512, 1, seed=7)[0]
    G = model.args.n_head // model.args.n_local_heads
    log = ts.train(model, tokenizer, args, tmp_path / "spotlight.safetensors", held, G)
    first, last = sum(log["loss"][:4]) / 4, sum(log["loss"][-4:]) / 4
    assert last < first - 0.02, (first, last)
    (_, before), (_, after) = log["recall"][0], log["recall"][-1]
    assert after["spotlight"] > before["spotlight"] + 0.01, (before, after)
    assert after["spotlight"] > after["spotlight_linear"]


def naive_count_selection(score, forced, filled, n_best):
    """The slots one row reads: forced filled ones, then the n_best best-scored others, ties to the
    later slot; returned in slot order (plain Python)."""
    others = sorted((j for j in range(len(score)) if filled[j] and not forced[j]), key=lambda j: (-score[j], -j))
    return sorted([j for j in range(len(score)) if filled[j] and forced[j]] + others[:n_best])


def test_count_select_matches_naive():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        B, H, S, vmax = 2, 3, int(torch.randint(5, 400, (1,), generator=g)), int(torch.randint(1, 40, (1,), generator=g))
        score = torch.randint(0, vmax + 1, (B, H, S), generator=g)
        forced, filled = torch.rand(B, H, S, generator=g) < 0.1, torch.rand(B, H, S, generator=g) < 0.8
        k = torch.randint(0, S, (B,), generator=g)
        K = min(S, int(k.max()) + int(forced.sum(-1).max()) + 2)
        idx, ok = kv.count_select(score, forced, filled, k, K, vmax)
        for b in range(B):
            for h in range(H):
                want = naive_count_selection(score[b, h].tolist(), forced[b, h].tolist(), filled[b, h].tolist(), int(k[b]))
                assert idx[b, h][ok[b, h]].tolist() == want and ok[b, h].tolist() == [i < len(want) for i in range(K)]


def check_triton_kernels(device):
    """triton_kernels.py against independent references: gather_attend against masked SDPA, and
    spotlight_select against the naive selection over plain-Python Hamming scores, also at the edges of its
    two-level select (check_spotlight_edges). Runs on CUDA, or on CPU in Triton's interpreter
    (TRITON_INTERPRET=1, set before triton is imported: a subprocess)."""
    from triton_kernels import gather_attend
    g = torch.Generator().manual_seed(0)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    for B, H, G, S, K, D in [(2, 3, 4, 700, 300, 64), (1, 2, 3, 200, 77, 64)]:
        q = torch.randn(B, H, G, D, generator=g)
        k, v = torch.randn(B, H, S, D, generator=g), torch.randn(B, H, S, D, generator=g)
        idx = torch.rand(B, H, S, generator=g).argsort(-1)[..., :K]
        ok = torch.rand(B, H, K, generator=g) > 0.2
        mask = torch.zeros(B, H, S + 1, dtype=torch.bool).scatter(-1, idx.masked_fill(~ok, S), True)[:, :, None, :S]
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        got = gather_attend(*(x.to(device, dt) for x in (q, k, v)), idx.to(device), ok.to(device)).float().cpu()
        torch.testing.assert_close(got, ref, atol=2e-2 if device == "cuda" else 1e-5, rtol=2e-2 if device == "cuda" else 1e-5)
    sinks, recent = 4, 16
    for B, H, G, d, S, ctx in [(2, 3, 3, 64, 2500, 2300), (1, 2, 4, 128, 1500, 1499)]:
        qbits, kbits = torch.rand(B, H, G, d, generator=g) > 0.5, torch.rand(B, H, S, d, generator=g) > 0.5
        pos = torch.arange(S).expand(B, H, S).clone()
        ip = torch.tensor([ctx - 1, ctx - 9][:B])
        pos[pos > ip[:, None, None]] = -1
        k = ((ip + 1) * 0.1).long() + 1
        # a retrieval cache's rows (slot s holds position s up to the newest): the kernel derives them, unread
        check_spotlight_select(device, qbits, kbits, pos, ip, k, sinks, recent, slot_is_pos=True)
        pos[-1, :, :40] = -1  # left padding
        check_spotlight_select(device, qbits, kbits, pos, ip, k, sinks, recent)
    check_spotlight_edges(device, g, sinks, recent)


def check_spotlight_edges(device, g, sinks, recent):
    """spotlight_select where its two-level select could slip, at G d = 1024 (G d + 3 just above 2^10:
    6-bit fine digits, 64 keys per coarse digit) in chunks of 1024 slots. Sequence 0: a run of equal codes
    across both chunk boundaries, cut inside by the threshold; 1: n exactly at a coarse boundary (t = 512 =
    8 << 6, every key of digit 8 read); 2: one slot more (t = 511, digit 7's last fine digit); 3: fewer
    filled slots than n."""
    B, H, G, d, S = 4, 1, 8, 128, 2200
    qbits, kbits = torch.rand(B, H, G, d, generator=g) > 0.5, torch.rand(B, H, S, d, generator=g) > 0.5
    kbits[:, :, 900:1150] = kbits[:, :, 2000:2100] = kbits[:, :, 900:901]
    for b, parity in ((1, 0), (2, 1)):  # G even: a row's keys all have the parity of 1 + its queries' bits
        qbits[b, 0, 0, 0] ^= (1 + int(qbits[b].sum()) + parity) % 2 == 1  # 1: key 512 exists; 2: t = 511
    pos = torch.arange(S).expand(B, H, S).clone()
    pos[3, :, :1800] = -1
    ip = torch.full((B,), S - 1)
    scores = [[naive_code_scores(qbits[b, h], kbits[b, h]) for h in range(H)] for b in range(B)]
    keys = [[1 + (s + G * d) // 2 for s in scores[b][0][sinks:S - recent]] for b in range(B)]  # not forced
    tie = keys[0][900 - sinks]  # the run's key; k: the tied slots from 1000 on are read
    k = [sum(x > tie for x in keys[0]) + sum(x == tie for x in keys[0][1000 - sinks:])]
    k += [sum(x >= 512 for x in keys[1]), sum(x >= 512 for x in keys[2]) + 1]  # the median key is ~513
    k = torch.tensor(k + [1500])
    want = check_spotlight_select(device, qbits, kbits, pos, ip, k, sinks, recent, scores)
    assert 1000 in want[0][0] and 999 not in want[0][0]  # the cut falls inside the run, in chunk 0
    assert 512 in keys[1] and 512 not in keys[2]  # t = 512 (fine digit 0) and 511 (the last fine digit)


def naive_code_scores(qbits, kbits):
    """Summed code similarity (d - 2 Hamming) of one row's keys kbits [S, d] to its queries qbits [G, d],
    in plain Python: a code as one integer, Hamming = the bits set in the xor."""
    d = qbits.shape[-1]
    q, k = ([int("".join("1" if x else "0" for x in r), 2) for r in bits.tolist()] for bits in (qbits, kbits))
    return [sum(d - 2 * bin(qi ^ ki).count("1") for qi in q) for ki in k]


def check_spotlight_select(device, qbits, kbits, pos, ip, k, sinks, recent, scores=None, slot_is_pos=False):
    """spotlight_select against naive_count_selection over naive_code_scores, every row; -> the slots
    each row reads, [b][h]. slot_is_pos: the kernel is told pos = slot (up to ip) and gets a pos it must not read."""
    from triton_kernels import spotlight_select
    B, H, _, d = qbits.shape
    K = int(k.max()) + sinks + recent + 1
    given = torch.full_like(pos, -1) if slot_is_pos else pos
    got = spotlight_select(*(x.to(device) for x in (kv.pack_bits(qbits), kv.pack_bits(kbits), given, ip, k)),
                           K, d, sinks, recent, slot_is_pos)
    wants = [[] for _ in range(B)]
    for b in range(B):
        for h in range(H):
            p = pos[b, h].tolist()
            score = scores[b][h] if scores else naive_code_scores(qbits[b, h], kbits[b, h])
            forced = [0 <= x < sinks or x > ip[b] - recent or x == ip[b] for x in p]
            want = naive_count_selection(score, forced, [x >= 0 for x in p], int(k[b]))
            idx, ok = got[0][b, h].cpu(), got[1][b, h].cpu()
            assert idx[ok].tolist() == want and ok.tolist() == [i < len(want) for i in range(K)], (b, h)
            wants[b].append(want)
    return wants


def naive_hash_words(x, lift, w1, b1, w2, b2):
    """One row x [d] of one head through Spotlight's hash in float64, written out: h = x lift (or x), then
    y = h + SiLU(h W1 + b1), h = y + y W2 + b2 when w1 is given -> (h as floats, the code words as Python
    ints in int64's range, bit i of word w = h[64 w + i] > 0)."""
    h = [float(v) for v in x]
    if lift is not None:
        h = [sum(h[i] * float(lift[i][j]) for i in range(len(h))) for j in range(len(lift[0]))]
    if w1 is not None:
        n = len(h)
        a = [sum(h[i] * float(w1[i][j]) for i in range(n)) + float(b1[j]) for j in range(n)]
        y = [h[j] + a[j] / (1 + math.exp(-a[j])) for j in range(n)]
        h = [y[j] + sum(y[i] * float(w2[i][j]) for i in range(n)) + float(b2[j]) for j in range(n)]
    words = []
    for w in range(len(h) // 64):
        u = sum(1 << i for i in range(64) if h[64 * w + i] > 0)
        words.append(u - (1 << 64) if u >= 1 << 63 else u)
    return h, words


def check_hash_codes(device):
    """triton_kernels.hash_codes against naive_hash_words, every row and head, for Spotlight's MLP hash at
    d = n = 64 and 128 and with a lift (d 64, 128 bits), lsh_retrieval's x R, and spotlight_linear's sign(x);
    one row (a new key), a GQA group, a group that is not a power of two, and a decode step's query rows with
    its new key's (x2, a strided view as Spotlight.on_write passes it). A bit whose float64 value is within 1e-4
    of 0 may go either way (fp32 sums)."""
    from triton_kernels import hash_codes
    g = torch.Generator().manual_seed(3)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    for kind, d, n, N, N2 in [("mlp", 64, 64, 4, 0), ("mlp", 128, 128, 1, 0), ("mlp", 64, 128, 5, 0),
                              ("simhash", 64, 64, 3, 0), ("sign", 128, 128, 4, 0), ("mlp", 128, 128, 4, 1),
                              ("mlp", 64, 128, 3, 2), ("simhash", 64, 64, 4, 1), ("sign", 64, 64, 2, 1)]:
        B, H = 2, 3
        x = torch.randn(B, H, N, d, generator=g).to(dt)
        x2 = torch.randn(B, N2, H, d, generator=g).to(dt).transpose(1, 2) if N2 else None  # strided, as k_new is
        lift = torch.randn(H, d, n, generator=g) / d ** 0.5 if kind == "simhash" or n > d else None
        w1, w2 = (torch.randn(H, n, n, generator=g) / n ** 0.5 if kind == "mlp" else None for _ in range(2))
        b1, b2 = (torch.randn(H, n, generator=g) * 0.1 if kind == "mlp" else None for _ in range(2))
        got = hash_codes(*(t.to(device) if t is not None else None for t in (x, x2, lift, w1, b1, w2, b2))).cpu()
        assert got.shape == (B, H, N + N2, n // 64) and got.dtype == torch.long, (kind, got.shape)
        rows = x if x2 is None else torch.cat([x, x2], 2)
        for b in range(B):
            for h in range(H):
                for r in range(N + N2):
                    hv, want = naive_hash_words(rows[b, h, r].double().tolist(), *(
                        t[h].tolist() if t is not None else None for t in (lift, w1, b1, w2, b2)))
                    for w, word in enumerate(want):
                        diff = (int(got[b, h, r, w]) ^ word) & (2 ** 64 - 1)
                        near = sum(1 << i for i in range(64) if abs(hv[64 * w + i]) < 1e-4)
                        assert diff & ~near == 0, (kind, b, h, r, w, bin(diff))


def test_hash_codes_in_interpreter():
    in_triton_interpreter("test_retrieval", "check_hash_codes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA; the interpreter test above runs everywhere")
def test_hash_codes_on_cuda():
    check_hash_codes("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA (the kernel itself: the interpreter test above)")
@pytest.mark.parametrize("strategy", ["spotlight", "spotlight_linear", "lsh_retrieval"])
def test_hash_kernel_gives_the_torch_codes_in_decode(strategy, tmp_path, monkeypatch):
    """cache.HASH_KERNEL on: every layer's key codes after a decode, and the logits, equal the torch path's (a bit
    may differ only where its sum is within rounding of 0: at most 1 in 10^4), eager and compiled into one graph."""
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    args = ModelArgs.from_name("tiny")
    args.n_layer, args.dim, args.head_dim = 3, 256, 64  # head_dim 64: hash_codes' smallest code
    model = Transformer(args).eval().cuda()
    ckpt = write_hashes(tmp_path, args)
    got = {}
    for on, compiled in ((False, False), (True, False), (True, True)):
        monkeypatch.setattr(kv, "HASH_KERNEL", on)
        torch._dynamo.reset()
        counters.clear()
        step = torch.compile(model.forward, fullgraph=True) if compiled else None
        logits = run(model, args, strategy, SPARSE, ckpt, steps=8, step_fn=step, device="cuda")
        codes = torch.stack([layer.attention.kv_cache.codes for layer in model.layers[2:]])  # layers 0, 1: dense
        got[on, compiled] = logits, codes
        assert not compiled or counters["stats"]["unique_graphs"] == 1
    for key in ((True, False), (True, True)):
        torch.testing.assert_close(got[key][0], got[False, False][0], rtol=1e-4, atol=1e-4)
        diff = sum(bin(int(x) & (2 ** 64 - 1)).count("1") for x in (got[key][1] ^ got[False, False][1]).flatten().tolist())
        assert diff <= got[key][1].numel() * 64 // 10 ** 4, (key, diff)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA; the interpreter test below runs everywhere")
def test_triton_kernels_on_cuda():
    check_triton_kernels("cuda")


def test_triton_kernels_in_interpreter():
    in_triton_interpreter("test_retrieval", "check_triton_kernels")
