"""Eviction strategies (cache.py, "eviction strategies") against naive references.

Each reference is written here from the paper's definition: plain Python over tokens, lists, dicts and
Fractions, nothing imported from cache.py but the class under test (LSH's random matrices are rebuilt
here from the seeding LSH documents in code). A single cache layer is driven with scripted random keys, values
and queries (B=2, the second sequence left-padded, so the two sequences evict independently) through
prefill and many decode steps; after every step the kept positions of every (sequence, KV head) must
equal the reference's, and budget, sinks and recent window must hold. Every reference test runs on
three GQA shapes (H_kv KV heads x G query heads each, SHAPES) and, where the strategy allows it, with
and without protected tokens (WINDOWS). Continuous random data keeps float scores tie-free; integer
scores (Hamming distances, indicator counts) tie, and both sides break ties toward evicting the
oldest token, the rule cache.py documents.
"""
import copy
import math
from fractions import Fraction
from functools import partial

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import cache as kv
from conftest import hash24
from model import ModelArgs, Transformer

B, D = 2, 8
T, STEPS, PAD = 20, 25, 3  # prompt length (sequence 1 has PAD tokens of left padding), decode steps
SINKS, RECENT = 2, 3
SLOTS = 12                 # evicting strategies' budget
ROOM = 10                  # prefill-only strategies' prompt budget (slots = ROOM + STEPS)

# (H_kv, G): the tiny model's (2 x 2), the default model SmolLM2-135M's (3 x 3), Llama-3-8B's (8 x 4)
SHAPES = [(2, 2), (3, 3), (8, 4)]
H_KV, G = SHAPES[0]        # the shape of the tests that do not sweep shapes
# sinks + recent window, and none at all (--global_tokens 0 --recent_window 0: TOVA's paper setting;
# with no window a new token can be evicted on arrival)
WINDOWS = [(SINKS, RECENT), (0, 0)]
shapes = pytest.mark.parametrize("shape", SHAPES, ids=[f"{h}x{g}" for h, g in SHAPES])
windows = pytest.mark.parametrize("sinks,recent", WINDOWS, ids=["window", "unprotected"])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()  # tiny tensors: threads only add contention on a loaded CPU
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def split_argmin(monkeypatch):
    """Chunks of 5 slots, so that every test here takes choose_slot's two-pass argmin (the path of
    real cache sizes: 3,277 slots at 10% of 32k) with partial chunks and ties across chunks."""
    monkeypatch.setattr(kv, "ARGMIN_CHUNK", 5)


@pytest.mark.parametrize("n", [3, 5, 13, 40])
def test_row_argmin(n):
    """Two passes give argmin's answer, ties included (the first index), eager and compiled."""
    g = torch.Generator().manual_seed(n)
    keys = torch.randint(0, 4, (3, 2, n), generator=g)
    keys[0, 0] = kv.MAX64  # a row of unusable slots only
    keys[1, 1, -1] = -1    # the least in the last, partial chunk
    compiled = torch.compile(kv.row_argmin, fullgraph=True)
    for got in (kv.row_argmin(keys), compiled(keys)):
        assert got.tolist() == [[min(range(n), key=lambda i: (int(keys[b, h, i]), i)) for h in range(2)]
                                for b in range(3)]


def scripted(shape=(H_KV, G), seed=0):
    h_kv, g = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, h_kv * g, T + STEPS, D, generator=gen)
    k = torch.randn(B, h_kv, T + STEPS, D, generator=gen)
    v = torch.randn(B, h_kv, T + STEPS, D, generator=gen)
    pos = torch.arange(T).repeat(B, 1)
    pos[1] -= PAD
    pos[1, :PAD] = -1
    return q, k, v, pos


def run_cache(name, slots, params=None, layer=0, n_layer=1, sinks=SINKS, recent=RECENT, prompt="own",
              shape=(H_KV, G), each_step=None, protocol="stream"):
    """Drive one cache layer: prefill, then STEPS decode steps; kept positions after each (each_step,
    if given, is called with the cache after each too)."""
    cfg = kv.CacheConfig(strategy=name, global_tokens=sinks, recent_window=recent, params=params or {},
                         prompt_compression=prompt, protocol=protocol)
    q, k, v, pos = scripted(shape)
    cache = kv.REGISTRY[name](B, shape[0], slots, D, shape[1], torch.float32, layer, n_layer, cfg, STEPS)
    cache.prefill(q[:, :, :T], k[:, :, :T], v[:, :, :T], pos)
    each_step = each_step or (lambda cache: None)
    history = [kept(cache)]
    each_step(cache)
    for t in range(STEPS):
        i = T + t
        cache.decode(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], pos[:, -1] + 1 + t)
        history.append(kept(cache))
        each_step(cache)
    return cache, history


def kept(cache):
    return [[sorted(p for p in cache.pos[b, h].tolist() if p >= 0) for h in range(cache.pos.shape[1])]
            for b in range(B)]


# ---- the naive side ---------------------------------------------------------------------------------

class Seq:
    """Sequence b's real tokens as Python lists: per position, its queries (per query head) and keys."""

    def __init__(self, b, shape=(H_KV, G)):
        q, k, _, pos = scripted(shape)
        last = int(pos[b, -1])
        self.G = shape[1]
        self.q, self.k, self.prompt, self.new = {}, {}, [], []
        for i in range(T + STEPS):
            p = int(pos[b, i]) if i < T else last + 1 + i - T
            if p >= 0:
                self.q[p], self.k[p] = q[b, :, i].tolist(), k[b, :, i].tolist()
                (self.prompt if i < T else self.new).append(p)

    def probs(self, h, at, keys):
        """Softmax attention of the query at position `at` over `keys` (positions), averaged over KV
        head h's query heads: {position: probability}."""
        out = dict.fromkeys(keys, 0.0)
        for j in range(h * self.G, (h + 1) * self.G):
            logits = [sum(a * b for a, b in zip(self.q[at][j], self.k[p][h])) / math.sqrt(D) for p in keys]
            top = max(logits)
            e = [math.exp(x - top) for x in logits]
            for p, x in zip(keys, e):
                out[p] += x / sum(e) / self.G
        return out


def protect(p, now, sinks=SINKS, recent=RECENT):
    return p < sinks or p > now - recent


def prompt_keep(scores, room, protected):
    """Keep every protected prompt token and the best-scored others up to `room` (ties: the newer)."""
    if len(scores) <= room:
        return set(scores)
    keep = {p for p in scores if protected(p)}
    rest = sorted((p for p in scores if p not in keep), key=lambda p: (scores[p], p), reverse=True)
    return keep | set(rest[:room - len(keep)])


def evict(kept_, new, score, protected, slots):
    """One step: the new token takes a free slot, else the lowest-scored unprotected token (the new
    one included; ties: the oldest) leaves."""
    if len(kept_) < slots:
        return kept_ | {new}
    victim = min((p for p in kept_ | {new} if not protected(p)), key=lambda p: (score(p), p))
    return (kept_ | {new}) - {victim}


def ref_scored(seq, slots, score, sinks=SINKS, recent=RECENT):
    """Strategies whose score needs no attention probabilities: score(p, now), higher keeps."""
    last = seq.prompt[-1]
    keep = prompt_keep({p: score(p, last) for p in seq.prompt}, slots, lambda p: protect(p, last, sinks, recent))
    out = [keep]
    for now in seq.new:
        keep = evict(keep, now, lambda p: score(p, now), lambda p: protect(p, now, sinks, recent), slots)
        out.append(keep)
    return out


def per_head(ref, h_kv=H_KV):
    """ref(b, h) -> list of kept sets per step; laid out like kept(): [step][b][h] sorted lists."""
    runs = [[ref(b, h) for h in range(h_kv)] for b in range(B)]
    return [[[sorted(runs[b][h][t]) for h in range(h_kv)] for b in range(B)] for t in range(STEPS + 1)]


def assert_same(history, expected):
    for t, (got, want) in enumerate(zip(history, expected, strict=True)):
        assert got == want, f"step {t} (0 = after prefill): cache kept {got}, reference {want}"


def assert_invariants(history, slots, sinks=SINKS, recent=RECENT, protects=True):
    for b in range(B):
        seq = Seq(b)  # positions only: the same for every shape
        for t, step in enumerate(history):
            now = seq.prompt[-1] if t == 0 else seq.new[t - 1]
            seen = [p for p in seq.prompt + seq.new if p <= now]
            for kept_ in step[b]:
                assert len(kept_) == len(set(kept_)) <= slots
                assert set(kept_) <= set(seen)
                if protects:
                    assert {p for p in seen if protect(p, now, sinks, recent)} <= set(kept_), f"step {t}"


# ---- one test per strategy ------------------------------------------------------------------------

@shapes
@pytest.mark.parametrize("sinks,recent", [*WINDOWS, (SINKS, 0)], ids=["window", "unprotected", "sinks"])
def test_streamingllm(shape, sinks, recent):
    """Sinks + the newest tokens; with no sinks, a plain sliding window. Without a window (the paper's setting
    and the strategy's default) decode takes the rolling-cache form (StreamingLLM.evict_choice)."""
    def ref(b, h):
        return ref_scored(Seq(b, shape), SLOTS, lambda p, now: p, sinks, recent)
    _, hist = run_cache("streamingllm", SLOTS, sinks=sinks, recent=recent, shape=shape)
    assert_same(hist, per_head(ref, shape[0]))
    assert_invariants(hist, SLOTS, sinks, recent)


@pytest.mark.parametrize("sinks", [0, SINKS, 4])
@pytest.mark.parametrize("slots,limits", [(SLOTS, (12, 7)), (30, (30, 26)), (30, (21, 12))],
                         ids=["compressed", "room-left", "one-each"])
def test_streamingllm_ring_takes_the_argmins_slot(sinks, slots, limits):
    """The rolling cache puts each new token where choose_slot's argmin of the positions would, for rows with
    budgets of their own (`limit`): prompts cut to them, prompts that leave slots empty, one of each."""
    cfg = kv.CacheConfig(strategy="streamingllm", global_tokens=sinks, recent_window=0)
    q, k, v, pos = scripted((8, 4))
    cache = kv.REGISTRY["streamingllm"](B, 8, slots, D, 4, torch.float32, 0, 1, cfg, STEPS)
    cache.limit.copy_(torch.tensor(limits)[:, None].expand(B, 8))
    cache.prefill(q[:, :, :T], k[:, :, :T], v[:, :, :T], pos)
    for t in range(STEPS):
        now = pos[:, -1] + 1 + t
        want = cache.choose_slot(kv.KVCache.decode_scores(cache, None, None, now), now)
        cache.decode(q[:, :, T + t:T + t + 1], k[:, :, T + t:T + t + 1], v[:, :, T + t:T + t + 1], now)
        assert torch.equal(cache.pos.gather(-1, want[..., None])[..., 0], now[:, None].expand(B, 8)), t
        assert torch.equal(cache.k.gather(2, want[..., None, None].expand(B, 8, 1, D))[:, :, 0], k[:, :, T + t])


@shapes
@windows
def test_random(shape, sinks, recent):
    def ref(b, h):
        return ref_scored(Seq(b, shape), SLOTS, lambda p, now: hash24(7, 0, b, h, now, p), sinks, recent)
    _, hist = run_cache("random", SLOTS, {"random_seed": 7}, sinks=sinks, recent=recent, shape=shape)
    assert_same(hist, per_head(ref, shape[0]))
    assert_invariants(hist, SLOTS, sinks, recent)


@shapes
@windows
def test_l2_continuous(shape, sinks, recent):
    def ref(b, h):
        seq = Seq(b, shape)
        return ref_scored(seq, SLOTS, lambda p, now: -math.sqrt(sum(x * x for x in seq.k[p][h])), sinks, recent)
    _, hist = run_cache("l2", SLOTS, sinks=sinks, recent=recent, shape=shape)
    assert_same(hist, per_head(ref, shape[0]))
    assert_invariants(hist, SLOTS, sinks, recent)


@shapes
@pytest.mark.parametrize("layer", [0, 2])
def test_l2_one_shot(layer, shape):
    """Authors' code: the prompt is cut once to the lowest norms (no sinks, no window), generated
    tokens are appended; skipped layers get full-size buffers and keep everything."""
    cfg = kv.CacheConfig(strategy="l2", max_cache_length=[str(ROOM)], params={"l2_one_shot": True})  # the prompt's
    slots = kv.REGISTRY["l2"].layer_slots(cfg, 3, T + STEPS, STEPS)
    assert slots == [T + STEPS, T + STEPS, ROOM + STEPS]  # l2_skip_layers default [0, 1]

    def ref(b, h):
        seq = Seq(b, shape)
        room = slots[layer] - STEPS
        norms = {p: -math.sqrt(sum(x * x for x in seq.k[p][h])) for p in seq.prompt}
        keep = prompt_keep(norms, room, lambda p: False)
        return [keep | set(seq.new[:t]) for t in range(STEPS + 1)]
    _, hist = run_cache("l2", slots[layer], {"l2_one_shot": True}, layer=layer, n_layer=3, shape=shape)
    assert_same(hist, per_head(ref, shape[0]))
    assert_invariants(hist, slots[layer], protects=False)


def lsh_matrix(layer, head_dim=D, lsh_dim=16, seed=0):
    """LSH's R for `layer`, rebuilt from its seeding (LSH.__init__): a torch.Generator seeded
    lsh_seed * 100003 + layer draws R = randn(head_dim, lsh_dim), one per layer, shared by its heads."""
    return torch.randn(head_dim, lsh_dim, generator=torch.Generator().manual_seed(seed * 100003 + layer)).tolist()


def simhash(x, R):
    return [sum(a * R[d][j] for d, a in enumerate(x)) >= 0 for j in range(len(R[0]))]


def packed(bits):
    return sum(bit << i for i, bit in enumerate(bits))


@shapes
@windows
@pytest.mark.parametrize("params", [{}, {"lsh_hash_key": True}, {"lsh_dim": 4}], ids=["query", "key", "dim4"])
def test_lsh(params, shape, sinks, recent):
    """Layer 1 of 2, so that the reference's R (lsh_matrix) is layer 1's, not a shared one."""
    R = lsh_matrix(1, lsh_dim=params.get("lsh_dim", 16))
    _, hist = run_cache("lsh", SLOTS, params, layer=1, n_layer=2, sinks=sinks, recent=recent, shape=shape)

    def ref(b, h):
        seq = Seq(b, shape)

        def score(p, now):  # -Hamming distance to the new token's code (the group's mean query, or its key)
            if p == now:
                return math.inf
            x = seq.k[now][h] if params.get("lsh_hash_key") else \
                [sum(c) / seq.G for c in zip(*seq.q[now][h * seq.G:(h + 1) * seq.G])]
            return -sum(a != c for a, c in zip(simhash(seq.k[p][h], R), simhash(x, R)))
        last = seq.prompt[-1]  # prompts are cut to sinks + recent (their default)
        keep = prompt_keep({p: p for p in seq.prompt}, SLOTS, lambda p: protect(p, last, sinks, recent))
        out = [keep]
        for now in seq.new:
            keep = evict(keep, now, lambda p: score(p, now), lambda p: protect(p, now, sinks, recent), SLOTS)
            out.append(keep)
        return out
    assert_same(hist, per_head(ref, shape[0]))
    assert_invariants(hist, SLOTS, sinks, recent)


@pytest.mark.parametrize("seed", [0, 3])
def test_lsh_codes_differ_per_layer(seed):
    """One R per layer (ALGORITHMS.md): the caches make_caches builds for a 2-layer model hash the same
    keys to different codes in each layer, and each layer's codes are the naive SimHash with that
    layer's own seeded R. Checked on the codes the caches produce (cache.hash, which on_prefill and
    on_write store), not on their R attribute: a layer-independent seed fails here."""
    args = ModelArgs.from_name("tiny")
    cfg = kv.CacheConfig(strategy="lsh", max_cache_length=["0.5"], params={"lsh_seed": seed})
    caches = kv.make_caches(args, cfg, 1, 64, 8, "cpu", torch.float32)
    assert len(caches) == 2
    x = torch.randn(8, args.head_dim, generator=torch.Generator().manual_seed(2))
    codes = [[c & 0xFFFF for c in cache.hash(x).tolist()] for cache in caches]  # 16 bits, as unsigned
    assert all(a != b for a, b in zip(*codes)), codes
    for layer, got in enumerate(codes):
        R = lsh_matrix(layer, args.head_dim, seed=seed)
        assert got == [packed(simhash(v, R)) for v in x.tolist()], f"layer {layer}"


def prompt_column_sums(seq, h):
    """H2O's prompt scores from the definition: each prompt token's attention summed over every causal
    prompt query."""
    acc = dict.fromkeys(seq.prompt, 0.0)
    for i in seq.prompt:
        for p, a in seq.probs(h, i, [p for p in seq.prompt if p <= i]).items():
            acc[p] += a
    return acc


def h2o_reference(seq, h, sinks, n_recent):
    """H2O for one (sequence, KV head): per step, (kept positions, {position: accumulated score}).
    Prompt and decode attention are both the group's mean (Seq.probs), summed over queries without
    normalisation; the new token enters with its own attention as its score."""
    acc = prompt_column_sums(seq, h)
    last = seq.prompt[-1]
    keep = prompt_keep(acc, SLOTS, lambda p: protect(p, last, sinks, n_recent))
    out = [(keep, acc)]
    for now in seq.new:
        a = seq.probs(h, now, sorted(keep) + [now])
        acc = {p: acc[p] + a[p] for p in keep} | {now: a[now]}
        keep = evict(keep, now, acc.get, lambda p: protect(p, now, sinks, n_recent), SLOTS)
        out.append((keep, acc))
    return out


@shapes
@pytest.mark.parametrize("sinks,recent", [(SINKS, RECENT), (0, 0.5), (0, 0)], ids=["window", "paper", "unprotected"])
def test_h2o(shape, sinks, recent):
    """Accumulated, un-normalised attention; the refilled slot restarts at the new token's own score.
    (0, 0.5): the paper's setting, no sinks and half the budget recent; (0, 0): heavy hitters only."""
    n_recent = round(recent * SLOTS) if recent < 1 else recent
    def ref(b, h):
        return [keep for keep, _ in h2o_reference(Seq(b, shape), h, sinks, n_recent)]
    _, hist = run_cache("h2o", SLOTS, sinks=sinks, recent=recent, shape=shape)
    assert_same(hist, per_head(ref, shape[0]))
    assert_invariants(hist, SLOTS, sinks, n_recent)


@shapes
def test_h2o_context_protocol_recent_half_of_the_budget(shape):
    """Protocol context: the cache holds the budget plus a reserve for what is appended (never evicted).
    H2O's recent window is half the budget, not half of budget + reserve: the prompt keeps its newest
    round(SLOTS / 2) tokens and its heaviest hitters up to SLOTS, then every new token is appended."""
    _, hist = run_cache("h2o", SLOTS + STEPS, sinks=None, recent=None, shape=shape, protocol="context")

    def ref(b, h):
        seq = Seq(b, shape)
        last = seq.prompt[-1]
        keep = prompt_keep(prompt_column_sums(seq, h), SLOTS, lambda p: protect(p, last, 0, round(SLOTS / 2)))
        return [keep | set(seq.new[:t]) for t in range(STEPS + 1)]
    assert_same(hist, per_head(ref, shape[0]))


@shapes
def test_h2o_scores_are_group_mean_accumulations(shape):
    """H2O's accumulated score of every cached token, after prefill and after each decode step, equals
    the naive accumulation of GROUP-MEAN probabilities in prompt and decode alike. Decode scores summed
    over the G query heads (prompt scores being means) would weigh each generated query G times a prompt
    query; the kept positions alone need not show that, the scores do. The paper's window (0, 0.5)."""
    got = []  # per step, [b][h]: {position: the cache's score}

    def scores(cache):
        got.append([[{p: s for p, s in zip(cache.pos[b, h].tolist(), cache.score[b, h].tolist()) if p >= 0}
                     for h in range(shape[0])] for b in range(B)])
    run_cache("h2o", SLOTS, sinks=0, recent=0.5, shape=shape, each_step=scores)
    for b in range(B):
        for h in range(shape[0]):
            for t, (keep, acc) in enumerate(h2o_reference(Seq(b, shape), h, 0, round(0.5 * SLOTS))):
                want = {p: acc[p] for p in keep}
                assert got[t][b][h] == pytest.approx(want, rel=1e-5, abs=1e-6), f"step {t}, sequence {b}, head {h}"


def test_prompt_compression_by_another_strategy():
    """--prompt_compression h2o on an l2 cache: the prompt is cut by H2O's column sums (with l2's
    sinks + recent protected), then l2 evicts by norm."""
    def ref(b, h):
        seq = Seq(b)
        acc = prompt_column_sums(seq, h)
        keep = prompt_keep(acc, SLOTS, lambda p: protect(p, seq.prompt[-1]))
        out = [keep]
        for now in seq.new:
            keep = evict(keep, now, lambda p: -math.sqrt(sum(x * x for x in seq.k[p][h])), lambda p: protect(p, now), SLOTS)
            out.append(keep)
        return out
    _, hist = run_cache("l2", SLOTS, prompt="h2o")
    assert_same(hist, per_head(ref))
    with pytest.raises(ValueError):  # layer-averaged TOVA needs every head to hold the same tokens
        run_cache("tova", SLOTS, prompt="l2")


tova_modes = pytest.mark.parametrize("per_head_flag", [False, True], ids=["layer_mean", "per_head"])


@shapes
@windows
@tova_modes
def test_tova(per_head_flag, shape, sinks, recent):
    """Lowest attention of the current query leaves (the new token may); by default averaged over all
    heads of the layer, so every head drops the same token. Prefill: the last prompt query."""
    def ref_seq(b, heads):
        seq = Seq(b, shape)

        def score(at, keys):  # mean over the query heads of `heads`
            per = [seq.probs(h, at, keys) for h in heads]
            return {p: sum(s[p] for s in per) / len(per) for p in keys}
        last = seq.prompt[-1]
        keep = prompt_keep(score(last, seq.prompt), SLOTS, lambda p: protect(p, last, sinks, recent))
        out = [keep]
        for now in seq.new:
            s = score(now, sorted(keep) + [now])
            keep = evict(keep, now, s.get, lambda p: protect(p, now, sinks, recent), SLOTS)
            out.append(keep)
        return out
    if per_head_flag:
        ref = lambda b, h: ref_seq(b, [h])  # noqa: E731
    else:
        layer = [ref_seq(b, range(shape[0])) for b in range(B)]  # one run per sequence serves all its heads
        ref = lambda b, h: layer[b]  # noqa: E731
    _, hist = run_cache("tova", SLOTS, {"tova_per_head": per_head_flag}, sinks=sinks, recent=recent, shape=shape)
    assert_same(hist, per_head(ref, shape[0]))
    assert_invariants(hist, SLOTS, sinks, recent)


@shapes
@tova_modes
def test_tova_drops_the_new_token(per_head_flag, shape):
    """TOVA ranks the new token with the cached ones, so the token just arrived is the one dropped when
    it gets the lowest attention (no sinks or window, the paper's setting). Every slot full, every query
    head looks along u, the cached keys lie near u and the new key points away: the step's output still
    attends to the new token, then the cache (positions, keys, values) is left exactly as it was.
    Control: the same new key pointing along u enters every head."""
    h_kv, g = shape
    n, u = 6, torch.eye(D)[0]
    gen = torch.Generator().manual_seed(1)
    k = u + 0.3 * torch.randn(1, h_kv, n, D, generator=gen)  # q.k > 0 for every cached key
    v = torch.randn(1, h_kv, n + 1, D, generator=gen)
    q = (3 * u).expand(1, h_kv * g, 1, D)
    cfg = kv.CacheConfig(strategy="tova", global_tokens=0, recent_window=0, params={"tova_per_head": per_head_flag})
    for sign in (-1, 1):
        cache = kv.REGISTRY["tova"](1, h_kv, n, D, g, torch.float32, 0, 1, cfg, 1)
        cache.prefill(torch.randn(1, h_kv * g, n, D, generator=gen), k, v[:, :, :n], torch.arange(n)[None])
        before = [buf.clone() for buf in (cache.pos, cache.k, cache.v)]
        k_new = (2 * sign * u).expand(1, h_kv, 1, D)
        out = cache.decode(q, k_new, v[:, :, n:], torch.tensor([n]))
        keys, values = torch.cat([k, k_new], 2), v  # attention over the cache and the new token
        want = ((q.view(1, h_kv, g, D) @ keys.transpose(-1, -2)) / math.sqrt(D)).softmax(-1) @ values
        torch.testing.assert_close(out, want.view(1, h_kv * g, 1, D))
        if sign < 0:
            assert (cache.pos != n).all()
            for buf, old in zip((cache.pos, cache.k, cache.v), before):
                assert torch.equal(buf, old)
        else:
            assert ((cache.pos == n).sum(-1) == 1).all() and (cache.pos >= 0).all()


@shapes
@windows
@pytest.mark.parametrize("w,m", [(6, 1), (6, 3), (400, 1), (2100, 1)])  # 2100: past fp32 means (exact keys)
def test_scissorhands(w, m, shape, sinks, recent):
    """Indicator A_tj >= 1/n_t, last w kept per token, lowest mean indicator dropped (m at once when
    full), sinks + recent protected, a refilled slot's history restarts."""
    def ref(b, h):
        seq = Seq(b, shape)
        hist = {p: [] for p in seq.prompt}
        for i in seq.prompt[-w:]:  # the last w prompt queries (no padding among them here)
            a = seq.probs(h, i, [p for p in seq.prompt if p <= i])
            for p in a:
                hist[p].append(a[p] >= 1 / len(a))

        def mean(p):
            return Fraction(sum(hist[p]), len(hist[p]))
        last = seq.prompt[-1]
        keep = prompt_keep({p: mean(p) for p in seq.prompt}, SLOTS, lambda p: protect(p, last, sinks, recent))
        out = [keep]
        for now in seq.new:
            a = seq.probs(h, now, sorted(keep) + [now])
            for p in keep:
                hist[p] = (hist[p] + [a[p] >= 1 / len(a)])[-w:]
            hist[now] = [a[now] >= 1 / len(a)]
            if len(keep) == SLOTS:
                cands = sorted((p for p in keep if not protect(p, now, sinks, recent)), key=lambda p: (mean(p), p))
                keep = keep - set(cands[:m])
            keep = keep | {now}
            out.append(keep)
        return out
    cache, hist = run_cache("scissorhands", SLOTS, {"sh_history": w, "sh_drop": m}, sinks=sinks, recent=recent,
                            shape=shape)
    assert_same(hist, per_head(ref, shape[0]))
    assert_invariants(hist, SLOTS, sinks, recent)
    assert cache.hist.dtype == torch.uint8 and cache.hist.shape[2] == -(-w // 8)  # w bits per slot, packed


def snap_reference(seq, h, room, w, kernel, pool):
    """SnapKV: the last w prompt queries' attention summed per earlier key (group mean), pooled along
    the prefix (stride 1, zero padding kernel // 2; avg counts the padding), top (room - w) + window."""
    P = seq.prompt
    if len(P) <= room:
        keep = set(P)
    else:
        win, prefix = P[-w:], P[:-w]
        att = [0.0] * len(prefix)
        for i in win:
            a = seq.probs(h, i, [p for p in P if p <= i])
            for x, p in enumerate(prefix):
                att[x] += a[p]
        r = kernel // 2
        pooled = {}
        for x, p in enumerate(prefix):
            around = [att[y] if 0 <= y < len(att) else 0.0 for y in range(x - r, x + r + 1)]
            pooled[p] = max(around) if pool == "max" else sum(around) / kernel
        keep = set(win) | prompt_keep(pooled, room - len(win), lambda p: False)
    return [keep | set(seq.new[:t]) for t in range(STEPS + 1)]


@shapes
@pytest.mark.parametrize("pool,kernel", [("max", 3), ("avg", 5)])
def test_snapkv(pool, kernel, shape):
    """Prefill-only: no sinks or window but the observation window, which is always kept."""
    params = {"snap_window": 4, "snap_kernel": kernel, "snap_pool": pool}
    _, hist = run_cache("snapkv", ROOM + STEPS, params, shape=shape)
    assert_same(hist, per_head(lambda b, h: snap_reference(Seq(b, shape), h, ROOM, 4, kernel, pool), shape[0]))
    assert_invariants(hist, ROOM + STEPS, protects=False)
    for b in range(B):  # the observation window is always kept
        assert all(set(Seq(b).prompt[-4:]) <= set(kept_) for kept_ in hist[0][b])


def pyramid_formula(B_, n_layer, T_, w, beta=20.0):
    """PyramidKV's per-layer prompt budgets, in floats (before rounding)."""
    lo = (B_ - w) / beta
    hi = 2 * (B_ - w) - lo
    if hi > T_ - w:
        hi, lo = T_ - w, 2 * (B_ - w) - (T_ - w)
    return [w + hi - layer * (hi - lo) / (n_layer - 1) for layer in range(n_layer)]


@pytest.mark.parametrize("B_,n_layer,T_,w", [(128, 32, 4096, 32), (64, 32, 4096, 8), (100, 7, 230, 8), (10, 4, T, 4)])
def test_pyramid_budgets(B_, n_layer, T_, w):
    """Mean exactly B (the official floors overshoot), each within 1 of the float formula, shrinking."""
    cfg = kv.CacheConfig(strategy="pyramid", max_cache_length=[str(B_)], params={"snap_window": w})  # + 5 new tokens
    slots = kv.REGISTRY["pyramid"].layer_slots(cfg, n_layer, T_ + 5, 5)
    budgets = [s - 5 for s in slots]
    assert sum(budgets) == B_ * n_layer
    assert all(abs(b - f) < 1 for b, f in zip(budgets, pyramid_formula(B_, n_layer, T_, w)))
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > budgets[-1]


def test_pyramid_short_prompts():
    """Prompts shorter than 2(B - w) (or than B) get B in every layer, as in the official code."""
    cfg = kv.CacheConfig(strategy="pyramid", max_cache_length=["128"])  # B = 128, then 10 new tokens
    for T_ in (100, 2 * (128 - 32) - 1):
        # not compressed; a token budget is capped at the whole sequence (so budgets keep one shape), + 10 new
        assert kv.REGISTRY["pyramid"].layer_slots(cfg, 32, T_ + 10, 10) == [min(128, T_ + 10) + 10] * 32
    assert len(set(kv.REGISTRY["pyramid"].layer_slots(cfg, 32, 2 * (128 - 32) + 10, 10))) > 1


@shapes
@pytest.mark.parametrize("layer", [0, 2, 3])
def test_pyramid(layer, shape):
    params = {"snap_window": 4, "snap_kernel": 3, "snap_pool": "max"}
    cfg = kv.CacheConfig(strategy="pyramid", max_cache_length=[str(ROOM)], params=params)
    slots = kv.REGISTRY["pyramid"].layer_slots(cfg, 4, T + STEPS, STEPS)
    assert [s - STEPS for s in slots] == [16, 12, 8, 4]  # 15.7, 11.9, 8.1, 4.3 rounded to mean 10
    _, hist = run_cache("pyramid", slots[layer], params, layer=layer, n_layer=4, shape=shape)
    assert_same(hist, per_head(lambda b, h: snap_reference(Seq(b, shape), h, slots[layer] - STEPS, 4, 3, "max"),
                               shape[0]))


def test_budget_patterns():
    """uniform: B everywhere; pyramid: most slots in layer 0, fewest last; funnel: reversed; all with
    mean B and every layer above the floor (sinks + recent + 1)."""
    def slots(pattern, values=("64",)):
        cfg = kv.CacheConfig(strategy="h2o", max_cache_length=list(values), budget_pattern=pattern, global_tokens=4,
                             recent_window=10)
        return kv.REGISTRY["h2o"].layer_slots(cfg, 6, 200, 8)
    assert slots("uniform") == [64] * 6
    pyr, fun = slots("pyramid"), slots("funnel")
    assert sum(pyr) == sum(fun) == 64 * 6 and pyr == fun[::-1] and pyr == sorted(pyr, reverse=True)
    assert min(pyr) >= 4 + 10 + 1 and pyr[0] > pyr[-1]
    assert slots("uniform", ["0.5"]) == [96] * 6  # half the prompt: 200 tokens of which 8 generated
    assert slots("uniform", [str(i + 20) for i in range(6)])[5] == 25
    with pytest.raises(ValueError):
        slots("pyramid", [str(i + 20) for i in range(6)])
    with pytest.raises(ValueError):
        slots("zigzag")
    with pytest.raises(ValueError):  # below sinks + recent + 1
        slots("uniform", ["12"])


# ---- model-level properties -----------------------------------------------------------------------

VARIANTS = [("streamingllm", {}), ("random", {}), ("l2", {}), ("l2", {"l2_one_shot": True, "l2_skip_layers": [0]}), ("lsh", {}),
            ("lsh", {"lsh_hash_key": True, "lsh_dim": 64}), ("h2o", {}), ("tova", {}), ("tova", {"tova_per_head": True}),
            ("scissorhands", {}), ("scissorhands", {"sh_drop": 3}), ("snapkv", {}), ("pyramid", {})]


def prefilled(name, params, budget, steps, prompt=40, **config):
    """The tiny model (seed 0) with `name` caches holding a prefilled 2-sequence batch (the second left-
    padded by 5), sized for `steps` more tokens (config: more CacheConfig fields); returns (model, caches, next
    positions, prefill logits)."""
    torch.manual_seed(0)
    args = ModelArgs.from_name("tiny")
    model = Transformer(args).eval()
    tokens = torch.randint(0, args.vocab_size, (B, prompt))
    pos = torch.arange(prompt).repeat(B, 1)
    pos[1] -= 5
    pos[1, :5] = -1
    cfg = kv.CacheConfig(strategy=name, max_cache_length=[budget], params=params, **config)
    caches = kv.make_caches(args, cfg, B, prompt + steps + 1, steps + 1, "cpu", torch.float32)
    model.setup_caches(caches)
    with torch.no_grad():
        logits = model.prefill(tokens, pos)
    return model, caches, pos[:, -1] + 1, logits


def tiny_run(name, params, budget, steps, step_fn=None, prompt=40):
    model, caches, now, logits = prefilled(name, params, budget, steps, prompt)
    step_fn = step_fn(model) if step_fn else model.forward
    out = [logits]
    with torch.no_grad():
        tok = out[-1].argmax(-1, keepdim=True)
        for i in range(steps):
            out.append(step_fn(tok, now + i)[:, -1].clone())
            tok = out[-1].argmax(-1, keepdim=True)
    return caches, out


@pytest.mark.skipif(torch.__version__ < "2.13", reason="generate.CPU_OPTIONS is set from torch 2.13 (2.11 miscompiled)")
@pytest.mark.parametrize("name,bits", [("h2o", 16), ("tova", 16), ("scissorhands", 16), ("h2o", 4)])
def test_cpu_decode_step_writes_the_cache_in_place(name, bits):
    """generate.compile_decode's CPU step allocates no temporary the shape of a K/V store buffer: it writes the new
    row in place instead of copying the buffer each step (H2O, TOVA and Scissorhands attend before they write;
    inductor's reorder_for_locality moved their read of V after the write, which made it copy:
    generate.CPU_OPTIONS), in the model dtype and 4-bit codes alike; and its tokens are eager's."""
    from torch._inductor.utils import run_and_get_code
    import generate
    steps = 3
    model, caches, now, _ = prefilled(name, {}, "0.5", steps, kv_bits=bits, kv_group=4, kv_residual=4)
    shapes = {tuple(b.shape) for c in caches for b in c.store.buffers() if b.dim() >= 4}  # K/V, codes, scales
    tok = torch.zeros(B, 1, dtype=torch.long)
    torch._dynamo.reset()
    with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):
        got, code = run_and_get_code(generate.compile_decode(model, "cpu"), tok, now)
    temps = [sh for sh in shapes for c in code if f"empty_strided_cpu({sh}" in c]
    assert shapes and code and not temps, temps
    model, *_ = prefilled(name, {}, "0.5", steps, kv_bits=bits, kv_group=4, kv_residual=4)
    with torch.no_grad():
        torch.testing.assert_close(got, model(tok, now), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,params", VARIANTS)
def test_budget_covering_sequence_matches_full(name, params):
    _, want = tiny_run("full", {}, "1.0", 8)
    caches, got = tiny_run(name, params, str(40 + 8 + 1), 8)  # slots for the prompt and every new token (prefilled sizes for one more)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,params", [("snapkv", {}), ("pyramid", {}), ("l2", {"l2_one_shot": True})])
@pytest.mark.parametrize("budget", ["0.5", "1.0"])
def test_prefill_only_caches_fill_a_prefix_and_append_at_offset(name, params, budget):
    """Prefill-only caches append the token at position p in slot offset + p (KVCache.decode), which is right only
    if each row's filled slots are a prefix of its slots and offset + p their number: checked after the prefill
    (compressed, and not: slot = position, the left-padded row's padding dropped) and after every step. A row
    with room takes the new token in the slot after its prefix; a full row's last slot takes it, the rest
    unchanged."""
    steps = 8
    model, caches, now, _ = prefilled(name, params, budget, steps)
    managed = [c for c in caches if c.prefill_only]
    assert managed
    for c in managed:
        n = (c.pos >= 0).sum(-1)
        assert torch.equal(c.offset + now[:, None], n)
        assert torch.equal(c.pos >= 0, torch.arange(c.n_slots) < n[..., None])
    grew_somewhere, full_somewhere = False, False
    with torch.no_grad():
        for i in range(steps + 8):  # past the reserve of the longer row
            before = [c.pos.clone() for c in managed]
            model(torch.zeros(B, 1, dtype=torch.long), now + i)
            for c, pos in zip(managed, before):
                held, room = (pos >= 0).sum(-1), c.limit.clamp(max=c.n_slots)
                grew = held < room
                slot = torch.where(grew, held, room - 1)  # a prefix grows; a full row's last slot takes the token
                assert torch.equal((c.pos >= 0).sum(-1), held + grew.long())
                assert (c.pos.gather(-1, slot[..., None])[..., 0] == (now[:, None] + i).expand_as(slot)).all()
                other = torch.arange(c.n_slots) != slot[..., None]
                assert torch.equal(c.pos[other], pos[other])
                grew_somewhere |= bool(grew.any())
                full_somewhere |= bool((~grew).any())
    assert grew_somewhere and full_somewhere


@pytest.mark.parametrize("name,params", [v for v in VARIANTS if v[0] in ("streamingllm", "random", "l2", "lsh", "h2o",
                                                                         "scissorhands") and not v[1].get("l2_one_shot")])
def test_a_protected_new_token_is_never_dropped_and_written_without_a_read(name, params, monkeypatch):
    """Evicting policies with a recent window protect the token just arrived, and StreamingLLM's position score
    keeps the newest, so choose_slot never returns S (drop) for it: `drops` is False and write skips reading the
    old row. Checked at half the prompt over 12 steps of the 2-sequence batch (one row left-padded): each step's
    position enters every row of every evicting layer, and the logits and every cache buffer equal a run forced
    through the reading write (drops True)."""
    def run():
        model, caches, now, logits = prefilled(name, params, "0.5", 12)
        out = [logits]
        with torch.no_grad():
            for i in range(12):
                out.append(model(out[-1].argmax(-1, keepdim=True)[:, :1], now + i)[:, -1])
                for c in caches:
                    if c.evicts:
                        assert ((c.pos == (now + i)[:, None, None]).sum(-1) == 1).all(), f"step {i}: new token dropped"
        assert all(((c.pos >= 0).sum(-1) == c.limit).all() for c in caches if c.evicts)  # full: every step evicted
        return out, [{k: t.clone() for k, t in c.state_dict().items()} for c in caches], caches
    out, bufs, caches = run()
    assert any(c.evicts for c in caches) and not any(c.drops for c in caches if c.evicts)
    monkeypatch.setattr(kv.KVCache, "drops", property(lambda self: True))
    out2, bufs2, _ = run()
    for a, b in zip(out, out2, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for c1, c2 in zip(bufs, bufs2, strict=True):
        assert c1.keys() == c2.keys() and all(torch.equal(c1[k], c2[k]) for k in c1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: triton_kernels.evict_slot (its interpreter test in "
                    "test_kernels runs everywhere)")
@pytest.mark.parametrize("protocol", ["stream", "context"])
@pytest.mark.parametrize("name,params", [v for v in VARIANTS if kv.REGISTRY[v[0]].evicts and not v[1].get("l2_one_shot")])
def test_choose_slot_on_cuda_equals_torch(name, params, protocol):
    """choose_slot's CUDA kernel (taken here by every policy), given the cache's own sinks, window (H2O's fractional
    one: of each row's limit less the reserve, which protocol context makes non-zero) and limits, picks what its
    torch form picks, after the prefill and every decode step of run_cache, for integer scores that tie; by
    position (keep None) too, or for Random by its hash, which the kernel then computes itself."""
    g = torch.Generator().manual_seed(1)
    checked = []

    def check(cache):
        gpu = copy.deepcopy(cache).cuda()
        gpu.needs_attn = False  # the attention-scored policies keep the torch form on CUDA: take the kernel anyway
        now = cache.pos.amax((1, 2)) + 1
        keep = torch.randint(-2, 2, (*cache.pos.shape[:2], cache.n_slots + 1), generator=g).float()
        assert torch.equal(gpu.choose_slot(keep.cuda(), now.cuda()).cpu(), cache.choose_slot(keep, now))
        # keep None: the positions are the scores, or Random's hash of them, which the kernel computes itself
        own = type(cache).decode_scores is kv.Random.decode_scores
        by_pos = (cache.decode_scores if own else partial(kv.KVCache.decode_scores, cache))(None, None, now)
        assert torch.equal(gpu.choose_slot(None, now.cuda()).cpu(), cache.choose_slot(by_pos, now))
        checked.append(True)
    for sinks, recent in [(None, None), (SINKS, RECENT), (0, 0)]:  # the strategy's own (H2O: half of the budget)
        run_cache(name, SLOTS, params, sinks=sinks, recent=recent, each_step=check, protocol=protocol)
    assert len(checked) == 3 * (STEPS + 1)


@pytest.mark.parametrize("name,params", VARIANTS)
def test_zero_recompiles(name, params):
    """The decode step compiles once (fullgraph) and never again while the cache fills and evicts."""
    torch._dynamo.reset()
    counters.clear()
    compiled = lambda model: torch.compile(model.forward, fullgraph=True, backend="eager")  # noqa: E731
    with torch._dynamo.config.patch(error_on_recompile=True):
        caches, _ = tiny_run(name, params, "0.5", 14, compiled)
    assert counters["stats"]["unique_graphs"] == 1
    assert min(c.n_slots for c in caches) < 40  # the 40-token prompt was cut (evicting ones then evict each step)


FEED_VARIANTS = [("full", {}), *VARIANTS, ("spotlight_linear", {"spotlight_recent": 4}), ("lsh_retrieval", {}),
                 ("quest", {"quest_page_size": 4})]


@pytest.mark.parametrize("name,params", FEED_VARIANTS)
def test_chunked_feed_equals_decode_steps(name, params):
    """Transformer.feed (a question fed after a compressed context; teacher forcing) is n decode steps
    done layer by layer: the same logits and cache contents as one token per step."""
    n = 12
    feed = torch.randint(0, ModelArgs.from_name("tiny").vocab_size, (B, n), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model, caches_steps, now, _ = prefilled(name, params, "0.5", n)
        steps = torch.stack([model.forward(feed[:, j:j + 1].clone(), now + j)[:, -1] for j in range(n)], 1)
        model, caches_chunk, _, _ = prefilled(name, params, "0.5", n)
        chunked = model.feed(feed, now, all_logits=True)
    torch.testing.assert_close(chunked, steps, rtol=1e-5, atol=1e-5)
    for a, b in zip(caches_steps, caches_chunk, strict=True):
        assert torch.equal(a.pos, b.pos)
        torch.testing.assert_close(a.k, b.k)
        torch.testing.assert_close(a.v, b.v)
    if kv.REGISTRY[name].evicts:  # the fed tokens really went through eviction
        assert min(c.n_slots for c in caches_steps) < 40 + n


def expected_bytes(name, params, slots, B_, H, D_, elt):
    """K + V + positions + per-row limits + each strategy's auxiliary buffers, counted by hand."""
    n = 0
    for S in slots:
        n += 2 * B_ * H * S * D_ * elt + B_ * H * S * 8 + B_ * H * 8  # K, V, positions, per-row budgets
        n += B_ * H * 8  # the filled slots' count
        if kv.REGISTRY[name].evicts and not params.get("l2_one_shot"):
            n += B_ * H * 4  # evict_slot's ticket (int32)
        if name == "lsh":
            L = params.get("lsh_dim", 16)
            n += B_ * H * S * (2 if L <= 16 else 4 if L <= 32 else 8) + D_ * L * 4  # codes + R (fp32)
        elif name == "h2o":
            n += B_ * H * (S + 1) * 4                          # accumulated scores, then the new token's
        elif name == "random":
            n += 2 * 8                                         # the salt (seed, layer)
        elif name == "l2" and not params.get("l2_one_shot"):
            n += B_ * H * S * 4                                # each slot's key norm (fp32)
        elif name == "scissorhands":
            w = params.get("sh_history", 400)
            # bit ring + 2 counts + origin + new bit + held
            n += B_ * H * S * (-(-w // 8)) + 2 * B_ * H * S * 2 + 8 + B_ * H + B_ * H * 8
            n += B_ * H * (S + 1) * 4  # the decode scores (mean indicators, then the new token's +inf)
    return n


@pytest.mark.parametrize("name,params", VARIANTS + [("lsh", {"lsh_dim": 24}), ("scissorhands", {"sh_history": 64})])
def test_cache_bytes(name, params):
    args = ModelArgs.from_name("tiny")
    cfg = kv.CacheConfig(strategy=name, max_cache_length=["0.5"], params=params)
    caches = kv.make_caches(args, cfg, 3, 300, 20, "cpu", torch.bfloat16)
    slots = [c.n_slots for c in caches]
    assert max(slots) <= 300 and (min(slots) < 300 or name == "l2")
    assert kv.cache_bytes(caches) == expected_bytes(name, params, slots, 3, args.n_local_heads, args.head_dim, 2)


@pytest.mark.parametrize("L,dtype", [(4, torch.int16), (16, torch.int16), (17, torch.int32), (32, torch.int32),
                                     (64, torch.int64)])
def test_lsh_bit_packing(L, dtype):
    """lsh_dim bits in one integer per slot (not a byte per bit); Hamming distances exact."""
    cfg = kv.CacheConfig(strategy="lsh", params={"lsh_dim": L})
    cache = kv.REGISTRY["lsh"](1, 2, 16, D, G, torch.float32, 3, 4, cfg)
    assert cache.codes.dtype == dtype and cache.R.shape == (D, L)
    x = torch.randn(50, D, generator=torch.Generator().manual_seed(1))
    codes = cache.hash(x)
    R = lsh_matrix(3, D, L)
    width = torch.iinfo(dtype).bits
    unsigned = [c & ((1 << width) - 1) for c in codes.tolist()]
    want = [packed(simhash(v, R)) for v in x.tolist()]
    assert unsigned == want
    ham = cache.hamming(codes[:, None], codes[None, :]).tolist()
    assert ham == [[bin(a ^ b).count("1") for b in want] for a in want]


@pytest.mark.parametrize("name", ["streamingllm", "h2o"])
def test_attention_loss_probe(name):
    """Debug mode: full-cache attention mass on tokens the compressed cache had evicted when it
    attended (h2o attends before it evicts), per step and sequence, mean over query heads."""
    q, k, v, pos = scripted()
    cfg = kv.CacheConfig(strategy=name, global_tokens=SINKS, recent_window=RECENT)
    cache = kv.REGISTRY[name](B, H_KV, SLOTS, D, G, torch.float32, 0, 1, cfg, STEPS)
    probe = kv.AttentionLossProbe(cache, T + STEPS, STEPS)
    probe.prefill(q[:, :, :T], k[:, :, :T], v[:, :, :T], pos)
    for t in range(STEPS):
        i = T + t
        before = kept(cache)
        probe.decode(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], pos[:, -1] + 1 + t)
        attended = before if name == "h2o" else kept(cache)
        for b in range(B):
            seq, now = Seq(b), Seq(b).new[t]
            every = [p for p in seq.prompt + seq.new if p <= now]
            mass = sum(sum(a for p, a in seq.probs(h, now, every).items() if p not in set(attended[b][h]) | {now})
                       for h in range(H_KV)) / H_KV
            assert abs(probe.loss[b, t].item() - mass) < 1e-5
    assert probe.loss[:, -1].min() > 0
    full = kv.KVCache(B, H_KV, T + STEPS, D, G, torch.float32, 0, 1, kv.CacheConfig(), STEPS)
    probe = kv.AttentionLossProbe(full, T + STEPS, STEPS)
    probe.prefill(q[:, :, :T], k[:, :, :T], v[:, :, :T], pos)
    for t in range(3):
        probe.decode(q[:, :, T + t:T + t + 1], k[:, :, T + t:T + t + 1], v[:, :, T + t:T + t + 1], pos[:, -1] + 1 + t)
    assert probe.loss[:, :3].abs().max() == 0 and probe.loss[:, 3:].isnan().all()
