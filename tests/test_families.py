"""Issue #16's families (Qwen3, Gemma 3, Llama 3.2, Phi-3 with and without LongRoPE) against transformers:
tiny random models (tests/families.py) saved by transformers, converted by scripts/convert_hf.py, loaded
by model.load_model. Logits (prefill and decode steps, prompts past Gemma's and Phi-3's windows and past
LongRoPE's original context), greedy tokens, a left-padded batch, compiled decode; the sliding-window
ring (its bytes, what it holds, the strategy's layers); every strategy on every family without a
recompile; config.json's format rule. Tolerances: fp32 on both sides, measured values next to each."""
import json

import pytest
import torch
from torch._dynamo.utils import counters

import cache as kv
import convert_hf
import families
import generate as gen
from model import ModelArgs, load_model
from test_head_budgets import write_scores
from test_model import decode_graphs, strategy_config, write_random_spotlight_hashes

transformers = pytest.importorskip("transformers")
W = families.WINDOW


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices; see test_model.one_thread
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=list(families.FAMILIES))
def fam(request, tmp_path_factory):
    """(name, transformers' model (fp32, eager attention), ours (fp32), checkpoint dir) for one family."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp(request.param)
    families.FAMILIES[request.param](root / "hf").save_pretrained(root / "hf")
    convert_hf.convert(root / "hf", root / "out", name=request.param)
    hf = transformers.AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    return request.param, hf, load_model(root / "out", dtype=torch.float32), root / "out"


def prompt(n, seed=0, vocab=330):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def both(hf, ours, ids, steps):
    """Prefill ids in both models, then `steps` decode steps fed transformers' greedy tokens: (ours, theirs)
    logits [len(ids) + steps, vocab], prompt rows then one row per step."""
    x = torch.tensor([ids])
    out = hf(x, use_cache=True)
    theirs, past = [out.logits[0]], out.past_key_values
    ours.setup_caches(kv.make_caches(ours.args, kv.CacheConfig(), 1, len(ids) + steps, steps, "cpu", torch.float32))
    mine = [ours.prefill(x, torch.arange(len(ids))[None], all_logits=True)[0]]
    for i in range(steps):
        nxt = theirs[-1][-1:].argmax(-1)[None]
        step = hf(nxt, past_key_values=past, use_cache=True)
        theirs.append(step.logits[0])
        past = step.past_key_values
        mine.append(ours(nxt, torch.tensor([len(ids) + i]))[0])
    return torch.cat(mine), torch.cat(theirs)


def test_logits_match_transformers(fam):
    """A 40-token prompt (Gemma's and tiny Phi-3's windows are 16) and 8 decode steps; for LongRoPE also an
    80-token one, past the original context of 64, where both switch to the long factors."""
    name, hf, ours, _ = fam
    for n in (40, 80) if name == "phi3_longrope" else (40,):
        mine, theirs = both(hf, ours, prompt(n), 8)
        assert theirs.std() > 0.5  # far from uniform: the comparison has teeth
        # measured max |diff| 1e-6 .. 4e-6 over logits of std ~0.9; each mutation tried moved them by > 0.1
        assert (mine - theirs).abs().max() < 2e-5, f"{name}, {n}-token prompt"


def test_greedy_tokens_match_transformers_generate(fam):
    name, hf, ours, _ = fam
    ids = prompt(40, seed=1)
    res = gen.generate(ours, [ids], 24, kv.CacheConfig())  # no stop ids: exactly 24 tokens
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, 40, dtype=torch.long), max_new_tokens=24,
                           min_new_tokens=24, do_sample=False, pad_token_id=0)[0, 40:].tolist()
    assert res.tokens[0] == want


def test_left_padded_batch_equals_each_alone(fam):
    """Padding must be invisible, in the ring too (its prompt slots are found past each row's padding)."""
    name, hf, ours, _ = fam
    prompts = [prompt(40, seed=2), prompt(23, seed=3), prompt(9, seed=4)]  # longer and shorter than the window
    batch = gen.generate(ours, prompts, 12, kv.CacheConfig()).tokens
    assert batch == [gen.generate(ours, [p], 12, kv.CacheConfig()).tokens[0] for p in prompts]


def test_compiled_decode_equals_eager(fam):
    """generate.compile_decode (inductor, fullgraph) against eager, for the family whose decode step differs
    most from Llama's (Gemma: rings beside a global layer, four norms, GELU, embedding scale; 25 s of
    inductor on 2 busy cores); the others are traced (backend "eager") in
    test_every_strategy_runs_without_recompiles, whose tokens equal eager's too."""
    name, hf, ours, _ = fam
    if name != "gemma3":
        pytest.skip("inductor compile time: one family")
    torch._dynamo.reset()
    prompts = [prompt(40, seed=5), prompt(25, seed=6)]
    eager = gen.generate(ours, prompts, 30, kv.CacheConfig()).tokens
    assert gen.generate(ours, prompts, 30, kv.CacheConfig(), decode_step=gen.compile_decode(ours, "cpu")).tokens == eager


def test_window_ring_bytes_and_contents(fam):
    """Gemma's local layers (and all of tiny Phi-3's) hold a ring of W slots: allocated at W whatever the
    sequence and the strategy, holding exactly the last W positions after a prompt longer than W and after
    every decode step; a strategy's budget, bytes and compression ratio cover the global layers only."""
    name, hf, ours, _ = fam
    args = ours.args
    if not args.sliding_window:
        pytest.skip("no sliding-window layers")
    local = [i for i in range(args.n_layer) if i in args.local_layers]
    assert args.sliding_window == W and local == [0, 1]  # Gemma: 2 of 3 layers; tiny Phi-3: both
    B, T, steps = 2, 40, 6
    cfg = kv.CacheConfig(strategy="h2o", max_cache_length=["20"])
    kept = []
    res = gen.generate(ours, [prompt(T, seed=7), prompt(T - 5, seed=8)], steps + 1, cfg, on_caches=kept.append)
    caches = kept[0]
    H, D = args.n_local_heads, args.head_dim
    row = 2 * D * 4 + 8  # K and V in fp32, and the position
    for i, c in enumerate(caches):
        if i in local:
            assert isinstance(c, kv.WindowCache) and c.n_slots == W
            last = torch.tensor([T, T - 5]) + steps - 1  # each row's newest position
            want = sorted(range(int(last[0]) - W + 1, int(last[0]) + 1))
            assert sorted(c.pos[0, 0].tolist()) == want  # exactly the last W positions
            assert sorted(c.pos[1, 1].tolist()) == sorted(range(int(last[1]) - W + 1, int(last[1]) + 1))
            assert kv.cache_bytes([c]) == B * H * W * row + 2 * B * H * 8  # + its `limit` and `count`
        else:
            assert type(c) is kv.REGISTRY["h2o"] and c.n_slots == 20
    managed = [c for i, c in enumerate(caches) if i not in local]
    seen = torch.tensor([T, T - 5]) + steps
    # the ratio is the strategy's: over its layers only (20 of each row's tokens kept), 0 if it has none
    want = float(1 - (20 / seen).mean()) if managed else 0.0
    assert res.compression_ratio == pytest.approx(want)
    assert res.cache_bytes == kv.cache_bytes(caches)  # what generate.py prints: the rings' real bytes included
    assert res.kv_held == (len(local) * W + len(managed) * 20) * B * H * 2 * D * 4


def test_ring_attends_only_its_window_in_decode(fam):
    """With every layer's cache as large as the sequence, the local layers still attend to W tokens: the
    logits equal transformers' (test_logits_match_transformers) only because the ring forgets; a full
    cache in place of a ring gives other logits (the negative control that the window matters here)."""
    name, hf, ours, _ = fam
    if not ours.args.sliding_window:
        pytest.skip("no sliding-window layers")
    ids = prompt(40, seed=9)
    mine, theirs = both(hf, ours, ids, 4)
    assert (mine - theirs).abs().max() < 2e-5
    full = [kv.KVCache(1, ours.args.n_local_heads, 64, ours.args.head_dim, 2, torch.float32, i, ours.args.n_layer,
                       kv.CacheConfig()) for i in range(ours.args.n_layer)]
    ours.setup_caches(full)
    x = torch.tensor([ids])
    with torch.no_grad():
        ours.prefill(x, torch.arange(40)[None])
        step = ours(theirs[39:40].argmax(-1)[None], torch.tensor([40]))[0]
    assert (step - theirs[40]).abs().max() > 0.01


def test_head_budgets_share_the_pool_among_the_strategys_layers(fam, tmp_path):
    """HeadKV and DiliLazyKV split one pool over every head the strategy manages: on Gemma, the global
    layer's (a ring layer keeps its window, not a share), so those heads' budgets still sum to theirs."""
    name, hf, ours, _ = fam
    if name != "gemma3":
        pytest.skip("the family with rings beside global layers")
    write_scores(tmp_path, ours.args)
    for strategy in ("headkv", "dililazy"):
        cfg = kv.CacheConfig(strategy=strategy, max_cache_length=["60"], checkpoint_dir=str(tmp_path))
        caches = kv.make_caches(ours.args, cfg, 1, 84, 4, "cpu", torch.float32)
        ours.setup_caches(caches)
        with torch.no_grad():
            ours.prefill(torch.tensor([prompt(80, seed=12)]), torch.arange(80)[None])
        managed = [c for c in caches if not isinstance(c, kv.WindowCache)]
        held = sum(int(c.count.sum()) for c in managed)  # 2 KV heads, each an average prompt budget of 60
        assert len(managed) == 1 and abs(held - 2 * 60) <= 2, (strategy, held)


def test_head_scores_recorder_reads_rings_by_position(fam):
    """head_scores.py's recorder puts each slot's attention at its position: a ring layer's rows are the
    window's (summing to 1 over the last W positions, 0 before), a global layer's reach further back."""
    name, hf, ours, out_dir = fam
    if name != "gemma3":
        pytest.skip("the family with rings beside global layers")
    from head_scores import answer
    from tokenizer import load_tokenizer
    _, rows = answer(ours, load_tokenizer(out_dir), prompt(40, seed=13), lambda p: p[:, -2 * W:], 2, "cpu")
    rows = rows[0]  # the first step (position 39): [layers, H, 2W positions]
    for layer in (0, 1):
        assert torch.allclose(rows[layer, :, -W:].sum(-1), torch.ones(1)) and rows[layer, :, :-W].abs().max() == 0
    assert rows[2, :, :-W].sum() > 0.05


TRACED = ("gemma3", "qwen3", "phi3_longrope")  # the decode code each adds: rings + four norms, q/k norms, LongRoPE


@pytest.mark.parametrize("strategy", sorted(kv.REGISTRY))
def test_every_strategy_runs_without_recompiles(fam, strategy, tmp_path):
    """Each strategy on each family (budgets that make it evict or select; random head scores and Spotlight
    hashes). Traced with fullgraph=True for the families whose decode step adds code (one graph, no
    recompile over the steps, eager's tokens; ~1.2 s a run on 2 busy cores); eager for Llama 3.2 (Llama-3.1's
    step, tied) and tiny Phi-3, all of whose layers are rings, so every strategy must give full's tokens
    (their `full` runs traced too)."""
    name, hf, ours, _ = fam
    write_random_spotlight_hashes(tmp_path, ours.args)
    write_scores(tmp_path, ours.args)
    prompts = [prompt(80, seed=10), prompt(50, seed=11)]
    cfg = strategy_config(strategy, 80, 10, tmp_path)
    eager = gen.generate(ours, prompts, 10, cfg).tokens
    if name in TRACED or strategy == "full":
        with torch._dynamo.config.patch(error_on_recompile=True):
            warm, after, tokens = decode_graphs(ours, cfg, prompts, steps=8)
        assert (warm, after) == (1, 0), f"{name}/{strategy}: {warm} graphs to warm up, {after} recompiles"
        assert tokens == eager
    elif name == "phi3":
        assert eager == gen.generate(ours, prompts, 10, kv.CacheConfig()).tokens


def test_config_format_rule(tmp_path):
    """Format 2 (what the converters write) must carry every field; a format-1 file (no "format": written
    before the new fields existed, by converters that refused every model they change) gets their
    defaults, and its untyped rope_scaling is Llama-3.1's."""
    args = ModelArgs.from_name("llama-3.1-8b")
    full = dict(vars(args)) | {"format": 2}
    (tmp_path / "v2.json").write_text(json.dumps(full))
    assert ModelArgs.from_json(tmp_path / "v2.json") == args
    for key in ("qk_norm", "sliding_window", "embed_scale"):
        (tmp_path / "bad.json").write_text(json.dumps({k: v for k, v in full.items() if k != key}))
        with pytest.raises(ValueError, match=f"lacks {key}"):
            ModelArgs.from_json(tmp_path / "bad.json")
    v1 = {k: v for k, v in full.items() if k not in (*ModelArgs.__dataclass_fields__.keys() - {
        "name", "block_size", "vocab_size", "n_layer", "n_head", "n_local_heads", "dim", "intermediate_size",
        "head_dim", "rope_base", "norm_eps", "rope_scaling", "tie_embeddings", "qkv_bias"}, "format")}
    v1["rope_scaling"] = {k: v for k, v in v1["rope_scaling"].items() if k != "rope_type"}
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    assert ModelArgs.from_json(tmp_path / "v1.json") == args
    (tmp_path / "v1.json").write_text(json.dumps({k: v for k, v in v1.items() if k != "rope_base"}))
    with pytest.raises(ValueError, match="lacks rope_base"):
        ModelArgs.from_json(tmp_path / "v1.json")
    (tmp_path / "v3.json").write_text(json.dumps(full | {"format": 3}))
    with pytest.raises(ValueError, match="format 3"):
        ModelArgs.from_json(tmp_path / "v3.json")
