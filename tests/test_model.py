"""model.py and generate.py against independent references, on CPU.

- Real weights: SmolLM2-135M-Instruct logits (prefill and decode steps) and 64 greedy tokens against
  transformers' LlamaForCausalLM, which builds itself from the same GGUF (its own dequantization and
  q/k un-permutation), fp32, eager attention.
- Batching with left padding, chunked prefill, compiled vs eager decode, zero recompiles per strategy.
- Llama-3.1 RoPE scaling against the formula; Qwen2 q/k/v biases and untied outputs through
  scripts/convert_hf.py against tiny transformers models.
Tolerances are stated next to each assertion, with the measured value they were set from.
"""
import json
import math
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import cache as kv
import generate as gen
from model import ModelArgs, Transformer, load_model, rope_frequencies

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for this file: its work is small matrices (decode steps, a 135M model), where a
    second OpenMP thread buys little and, when other processes keep the cores busy, makes every barrier
    wait a scheduler slice. Measured on a loaded 2-core machine: a 300-token prefill 14.9 s on 2 threads,
    1.7 s on 1; a decode step 0.40 s vs 0.11 s; a [1, 3, 3, 64] SDPA 12 ms vs 30 us."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
CHAT = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."


@pytest.fixture(scope="module")
def ours(default_checkpoint):
    return load_model(default_checkpoint, dtype=torch.float32)


@pytest.fixture(scope="module")
def tok(default_checkpoint):
    from tokenizer import load_tokenizer
    return load_tokenizer(default_checkpoint)


@pytest.fixture(scope="module")
def essay_ids(tok):
    """~500 tokens of real English text (the first Paul Graham essay of ../shared/data)."""
    essays = sorted((DATA / "paul_graham_essays" / "essays").glob("*.txt"))
    if not essays:
        pytest.skip(f"no essays under {DATA}")
    return tok.encode(essays[0].read_text())[:500]


def fresh_caches(model, batch, max_len):
    """Full caches for a forward outside generate()."""
    caches = kv.make_caches(model.args, kv.CacheConfig(), batch, max_len, 0, "cpu", model.tok_embeddings.weight.dtype)
    model.setup_caches(caches)
    return caches


# ---- real weights against transformers ------------------------------------------------------------
DECODE_STEPS = 8


@pytest.fixture(scope="module")
def both_runs(ours, hf_gguf_model, essay_ids):
    """One prefill of the 500-token essay, then DECODE_STEPS decode steps fed HF's greedy tokens, in both
    models. Returns (ours_prefill [T, V], hf_prefill, ours_steps [N, V], hf_steps)."""
    x = torch.tensor([essay_ids])
    T = x.shape[1]
    with torch.no_grad():
        out = hf_gguf_model(x, use_cache=True)
        hf_pre, past, hf_steps, fed = out.logits[0], out.past_key_values, [], []
        nxt = hf_pre[-1].argmax()
        for i in range(DECODE_STEPS):
            fed.append(nxt)
            out = hf_gguf_model(nxt.view(1, 1), past_key_values=past, use_cache=True)
            past = out.past_key_values
            hf_steps.append(out.logits[0, -1])
            nxt = out.logits[0, -1].argmax()

        fresh_caches(ours, 1, T + DECODE_STEPS)
        our_pre = ours.prefill(x, torch.arange(T)[None], all_logits=True)[0]
        our_steps = [ours(t.view(1, 1), torch.tensor([T + i]))[0, -1] for i, t in enumerate(fed)]
    return our_pre, hf_pre, torch.stack(our_steps), torch.stack(hf_steps)


# Measured max |ours - HF|: 8.5e-5 over the 500 x 49152 prefill logits, 4.5e-5 over the decode steps;
# logits span about +-40, so ~2e-6 relative. Both sides are fp32 on the same dequantized weights; the
# difference is op order (fused qkv, interleaved vs rotate-half RoPE, SDPA vs eager softmax) summed over
# 30 layers. 3x the measured value leaves room for another CPU's kernels; a layout error (q/k
# permutation, RoPE pairing, GQA grouping, tied head) moves logits by O(1).
LOGIT_ATOL = 2.5e-4


def test_prefill_logits_match_transformers(both_runs):
    ours, hf, _, _ = both_runs
    assert ours.shape == hf.shape == (500, 49152)
    diff = (ours - hf).abs().max().item()
    assert diff < LOGIT_ATOL, f"max |ours - HF| = {diff:.2e}"
    assert torch.equal(ours.argmax(-1), hf.argmax(-1))


def test_decode_logits_match_transformers(both_runs):
    """Decode steps write the cache at slot = position and attend through cache.py's decode path."""
    _, _, ours, hf = both_runs
    diff = (ours - hf).abs().max().item()  # measured 4.5e-5
    assert diff < LOGIT_ATOL, f"max |ours - HF| over {DECODE_STEPS} decode steps = {diff:.2e}"
    assert torch.equal(ours.argmax(-1), hf.argmax(-1))


def test_greedy_64_tokens_match_transformers_generate(ours, hf_gguf_model, tok):
    prompt = tok.encode_prompt(CHAT)
    res = gen.generate(ours, [prompt], 64, kv.CacheConfig())  # no stop ids: exactly 64 tokens
    with torch.no_grad():
        hf = hf_gguf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=0)
    want = hf[0, len(prompt):].tolist()
    assert not set(want) & set(tok.stop_ids), "pick a prompt whose answer is longer: min_new_tokens bent HF's argmax"
    assert res.tokens[0] == want, tok.decode(res.tokens[0]) + "\n---\n" + tok.decode(want)


def test_batch_of_three_prompts_equals_single_sequences(ours, tok, essay_ids):
    """Left padding (position -1) must be invisible: each row of a batch decodes as it would alone."""
    prompts = [tok.encode_prompt("Name three colours."), tok.encode_prompt(CHAT), essay_ids[:150]]
    assert len({len(p) for p in prompts}) == 3
    batch = gen.generate(ours, prompts, 32, kv.CacheConfig()).tokens
    for i, p in enumerate(prompts):
        assert batch[i] == gen.generate(ours, [p], 32, kv.CacheConfig()).tokens[0], f"prompt {i}"


def test_chunked_prefill_equals_unchunked(ours, essay_ids):
    """Chunks of 64 queries (several per prompt, one straddling the padding edge) against one chunk."""
    a, b = essay_ids[:300], essay_ids[100:230]
    tokens, pos = gen.pad_batch([a, b], "cpu")
    runs = []
    with torch.no_grad():
        for chunk in (1024, 64):
            caches = fresh_caches(ours, 2, 300)
            logits = ours.prefill(tokens, pos, chunk=chunk, all_logits=True)
            runs.append((logits, [(c.k.clone(), c.v.clone(), c.pos.clone()) for c in caches]))
    (full, full_kv), (chunked, chunked_kv) = runs
    real = pos >= 0
    # measured: bit-identical logits and cache; the 1e-5 slack is for CPUs whose matmul kernels block
    # differently by row count. Logits at padding positions are meaningless by design and excluded.
    assert (full - chunked)[real].abs().max() < 1e-5
    for (k1, v1, p1), (k2, v2, p2) in zip(full_kv, chunked_kv):
        assert torch.equal(p1, p2)
        assert torch.allclose(k1, k2, atol=1e-5, rtol=0) and torch.allclose(v1, v2, atol=1e-5, rtol=0)


# ---- compiled decode, on a tiny random model (real-model inductor compile: ~2.5 min on 2 cores) ----
def tiny_model(n_layer=3, seed=0):
    """3 layers: strategies with dense first layers (quest, spotlight) still have a sparse one."""
    torch.manual_seed(seed)
    args = ModelArgs.from_name("tiny")
    args.n_layer = n_layer
    model = Transformer(args).eval().requires_grad_(False)
    with torch.no_grad():  # larger than nn.Linear's init, so logits are far from ties
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def test_compiled_decode_equals_eager():
    """generate.compile_decode (inductor, fullgraph) gives the eager tokens, 64 of them, in a batch of 2."""
    torch._dynamo.reset()
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (40, 25)]
    eager = gen.generate(model, prompts, 64, kv.CacheConfig()).tokens
    compiled = gen.generate(model, prompts, 64, kv.CacheConfig(), decode_step=gen.compile_decode(model, "cpu")).tokens
    assert compiled == eager


def test_regional_compile_equals_eager_and_compiles_one_layer():
    """compile_decode's regional mode (the default on CUDA, where DecodeGraph then replays it): one
    compiled TransformerBlock.forward serves every layer, gives the eager tokens, and never recompiles
    while the cache fills and evicts (an evicting, attention-scored strategy)."""
    torch._dynamo.reset()
    model = tiny_model(n_layer=3)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (40, 25)]
    cfg = kv.CacheConfig(strategy="h2o", max_cache_length=["30"])
    eager = gen.generate(model, prompts, 40, cfg).tokens
    before = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = gen.generate(model, prompts, 40, cfg, decode_step=gen.compile_decode(model, "cpu", regional=True))
    assert compiled.tokens == eager
    assert counters["stats"]["unique_graphs"] - before == 1  # three layers, one graph
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from model import TransformerBlock
    assert len(_debug_get_cache_entry_list(TransformerBlock.forward.__code__)) == 1  # the graph is the layer's


def symbolic_slots_case(device, regional, tmp_path):
    """generate.SymbolicSlots: PyramidKV's and HeadKV's layers each have their own slot count, and a second batch
    of other lengths (a fractional budget) has others again; every one runs through one compiled graph whose
    tokens equal eager's."""
    from test_head_budgets import write_scores
    torch._dynamo.reset()
    model = tiny_model(n_layer=4).to(device)
    write_scores(tmp_path, model.args)
    g = torch.Generator().manual_seed(3)
    batches = [[torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths] for lengths in ((200, 150), (180, 120))]
    for name in ("pyramid", "headkv"):
        cfg = kv.CacheConfig(strategy=name, max_cache_length=["0.5"], checkpoint_dir=str(tmp_path))
        step, before, sizes = gen.compile_decode(model, device, regional=regional), counters["stats"]["unique_graphs"], set()
        for prompts in batches:
            eager = gen.generate(model, prompts, 12, cfg, device=device,
                                 on_caches=lambda cs: sizes.add(tuple(c.pos.shape[-1] for c in cs))).tokens
            assert gen.generate(model, prompts, 12, cfg, decode_step=step, device=device).tokens == eager, name
        assert len(sizes) == 2 and all(len(set(s)) == 4 for s in sizes)  # every layer its own size, both batches
        assert counters["stats"]["unique_graphs"] - before == 1, name


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA: triton_kernels.evict_slot with a symbolic slot count"))])
def test_evicting_caches_for_prompts_of_many_lengths_share_one_compiled_graph(device):
    """eval.py's compiled decode over prompts of many lengths (a fractional budget: SymbolicSlots always):
    StreamingLLM and L2 evict every step (on CUDA through evict_slot, whose slot count is then a symbol); one
    graph for both batches' sizes, eager's tokens."""
    torch._dynamo.reset()
    model = tiny_model(n_layer=2).to(device)
    g = torch.Generator().manual_seed(3)
    batches = [[torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths] for lengths in ((200, 150), (180, 120))]
    for name in ("streamingllm", "l2"):
        cfg = kv.CacheConfig(strategy=name, max_cache_length=["0.5"])
        step, before, sizes = gen.compile_decode(model, device, symbolic_slots=True), counters["stats"]["unique_graphs"], set()
        for prompts in batches:
            eager = gen.generate(model, prompts, 12, cfg, device=device,
                                 on_caches=lambda cs: sizes.add(cs[0].pos.shape[-1])).tokens
            assert gen.generate(model, prompts, 12, cfg, decode_step=step, device=device).tokens == eager, name
        assert len(sizes) == 2 and counters["stats"]["unique_graphs"] - before == 1, name


@pytest.mark.parametrize("regional", [True, False])
def test_layers_and_prompts_of_different_cache_sizes_share_one_compiled_graph(regional, tmp_path):
    symbolic_slots_case("cpu", regional, tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: the Triton attention with a runtime loop bound")
def test_layers_of_different_cache_sizes_share_one_compiled_graph_on_cuda(tmp_path):
    symbolic_slots_case("cuda", True, tmp_path)


@pytest.mark.parametrize("strategy", ["streamingllm", "l2", "h2o", "tova", "snapkv", "pyramid"])
def test_fractional_budget_is_each_sequences_own_in_a_batch(strategy):
    """A batch of a long and a short prompt with --max_cache_length 0.5: each sequence keeps half of its
    own tokens (not of the longest's) and decodes exactly as it does alone."""
    model = tiny_model()
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (150, 45)]
    cfg, kept = kv.CacheConfig(strategy=strategy, max_cache_length=["0.5"]), []
    batch = gen.generate(model, prompts, 20, cfg, on_caches=kept.append)
    used = sum((c.pos >= 0).sum(dim=(1, 2)) for c in kept[0]) / (len(kept[0]) * model.args.n_local_heads)
    for b, p in enumerate(prompts):
        alone = gen.generate(model, [p], 20, cfg)
        assert batch.tokens[b] == alone.tokens[0], f"sequence {b}"
        own = 0.5 * len(p) + (20 if kv.REGISTRY[strategy].prefill_only else 0)  # + the appended new tokens
        assert abs(used[b].item() - own) <= 2  # half its own prompt (+ rounding), not the longest's


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: model.Linear's decode kernel (decode_linear)")
def test_decode_gemm_kernel_gives_cublas_tokens(monkeypatch):
    """model.Linear sends a decode step's wo and w2 (at most 16 rows, out <= in) to decode_linear and nothing
    else; batch-2 greedy tokens equal cuBLAS's (model.DECODE_GEMM off), eager, and compiled as generate runs it."""
    import model as M
    import triton_kernels as tk
    model = tiny_model().to("cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (40, 25)]
    cfg = kv.CacheConfig(strategy="h2o", max_cache_length=["30"])
    monkeypatch.setattr(M, "DECODE_GEMM", False)
    cublas = gen.generate(model, prompts, 16, cfg, device="cuda").tokens
    monkeypatch.setattr(M, "DECODE_GEMM", True)
    real, shapes = tk.decode_linear, []
    monkeypatch.setattr(tk, "decode_linear", lambda x, w: shapes.append((x.shape, w.shape)) or real(x, w))
    assert gen.generate(model, prompts, 16, cfg, device="cuda").tokens == cublas
    a = model.args
    assert set(shapes) == {((2, 1, a.n_head * a.head_dim), (a.dim, a.n_head * a.head_dim)),
                           ((2, 1, a.intermediate_size), (a.dim, a.intermediate_size))}
    assert len(shapes) == 15 * a.n_layer * 2  # 15 decode steps (the first token is prefill's), wo and w2
    monkeypatch.setattr(tk, "decode_linear", real)
    compiled = {}  # against cuBLAS compiled alike (inductor's bf16 fusions round otherwise than eager)
    for on in (False, True):
        monkeypatch.setattr(M, "DECODE_GEMM", on)
        torch._dynamo.reset()
        step = gen.compile_decode(model, "cuda")
        compiled[on] = gen.generate(model, prompts, 16, cfg, decode_step=step, device="cuda").tokens
    assert compiled[True] == compiled[False]


def strategy_config(name, prompt_len, max_new_tokens, checkpoint_dir="") -> kv.CacheConfig:
    """A budget that makes the strategy do its work: evicting ones start over budget (prompt compression,
    then an eviction every step); prefill-only ones compress the prompt; retrieval ones ignore it."""
    cls = kv.REGISTRY[name]
    budget = max_new_tokens + prompt_len // 2 if cls.prefill_only else prompt_len - 20
    layers = {k: [0] for k in cls.defaults if k.endswith(("dense_layers", "skip_layers"))}
    return kv.CacheConfig(strategy=name, max_cache_length=[str(budget)], params=layers,
                          checkpoint_dir=str(checkpoint_dir))


def decode_graphs(model, cfg, prompts, steps=200, backend="eager"):
    """Compile model.forward as generate.compile_decode does (fullgraph=True; `backend` "inductor" for the
    real thing, "eager" to test only tracing and guards, in a second) and run one decode step (warm-up)
    plus `steps` more. Returns (graphs compiled by the warm-up step, graphs compiled after it, tokens).
    Reusable for any strategy and model."""
    torch._dynamo.reset()
    compiled, graphs = torch.compile(model.forward, fullgraph=True, backend=backend), []

    def step(*a):
        out = compiled(*a)
        graphs.append(counters["stats"]["unique_graphs"])
        return out

    before = counters["stats"]["unique_graphs"]
    res = gen.generate(model, prompts, steps + 2, cfg, decode_step=step)  # the first token comes from prefill
    assert len(graphs) == steps + 1
    return graphs[0] - before, graphs[-1] - graphs[0], res.tokens


def test_one_compiled_step_serves_prompts_of_many_lengths():
    """eval.py reuses one compiled step over a whole dataset: 12 prompt lengths must neither crash nor
    compile a graph each."""
    model = tiny_model()
    torch._dynamo.reset()
    step = torch.compile(model.forward, fullgraph=True, backend="eager")
    before = counters["stats"]["unique_graphs"]
    for n in range(20, 140, 10):
        gen.generate(model, [list(range(3, 3 + n))], 4, kv.CacheConfig(), decode_step=step)
    assert counters["stats"]["unique_graphs"] - before <= 4


def write_random_spotlight_hashes(path: Path, args: ModelArgs):
    """Stand-in for train_spotlight.py's output (same names and shapes), so the test needs no training."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    d, H = args.head_dim, args.n_local_heads
    w = {}
    for i in range(args.n_layer):
        w |= {f"layers.{i}.w1": torch.randn(H, d, d, generator=g) * 0.1, f"layers.{i}.b1": torch.zeros(H, d),
              f"layers.{i}.w2": torch.randn(H, d, d, generator=g) * 0.1, f"layers.{i}.b2": torch.zeros(H, d)}
    save_file(w, path / "spotlight.safetensors")


@pytest.mark.parametrize("strategy", sorted(kv.REGISTRY))
def test_no_recompiles_over_200_decode_steps(strategy, tmp_path):
    """One graph for the whole decode, whatever the step: positions, budgets and evictions are tensors,
    never Python values that guards would specialise on. Also: the traced step gives the eager tokens."""
    model = tiny_model()
    write_random_spotlight_hashes(tmp_path, model.args)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (80, 50)]
    cfg = strategy_config(strategy, 80, 202, tmp_path)
    try:
        kv.make_caches(model.args, cfg, 2, 282, 202, "cpu", torch.float32)
    except FileNotFoundError as e:  # a learned strategy whose files this test cannot fake
        pytest.skip(f"{strategy} needs trained files: {e}")
    warm, after, tokens = decode_graphs(model, cfg, prompts)
    assert warm == 1, f"{strategy}: {warm} graphs for the first decode steps"
    assert after == 0, f"{strategy}: {after} recompiles over 200 decode steps after warm-up"
    assert tokens == gen.generate(model, prompts, 202, cfg).tokens


# ---- RoPE scaling and other architectures ---------------------------------------------------------
def llama31_inv_freq_reference(base, head_dim, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    """Meta's apply_scaling (llama-models, Llama-3.1), written out per frequency."""
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / base ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < original_max_position_embeddings / high_freq_factor:
            out.append(freq)
        elif wavelen > original_max_position_embeddings / low_freq_factor:
            out.append(freq / factor)
        else:
            smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return torch.tensor(out, dtype=torch.float64)


def test_rope_llama31_scaling_matches_formula_and_transformers():
    args = ModelArgs.from_name("llama-3.1-8b")
    s = {k: v for k, v in args.rope_scaling.items() if k != "rope_type"}
    inv = llama31_inv_freq_reference(args.rope_base, args.head_dim, **s)
    assert (inv < 1 / args.rope_base ** (torch.arange(0, 128, 2) / 128)).any()  # scaling did something
    positions = torch.tensor([0, 1, 7, 1000, 8191, 8192, 65537, 131071])
    table = rope_frequencies(args, args.block_size)[positions]  # [P, 64, 2]
    angles = positions[:, None].double() * inv[None]
    want = torch.stack([angles.cos(), angles.sin()], -1).float()
    # fp64 on both sides, rounded to fp32 once: agreement to fp32 rounding of values in [-1, 1]
    assert torch.allclose(table, want, atol=1e-6, rtol=0)

    mru = pytest.importorskip("transformers.modeling_rope_utils")
    cfg = pytest.importorskip("transformers").LlamaConfig(
        head_dim=128, hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
        rope_parameters=dict(rope_type="llama3", rope_theta=args.rope_base, **s))
    hf_inv, scale = mru.ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    assert scale == 1.0
    assert torch.allclose(hf_inv.double(), inv, rtol=1e-6, atol=0)  # HF computes in fp32


TINY_HF = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
               num_hidden_layers=2, vocab_size=300, initializer_range=0.1, tie_word_embeddings=False)


def tiny_hf(kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "qwen2":  # q/k/v biases (zero at init: randomised below), untied head
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(max_position_embeddings=256, **TINY_HF))
    else:  # untied, head_dim != hidden / heads, Llama-3.1 scaling active within the test's positions
        rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=64)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            max_position_embeddings=256, head_dim=32, rope_parameters=rope, **TINY_HF))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    return model.eval()


@pytest.mark.parametrize("kind", ["qwen2", "llama31"])
def test_converted_tiny_hf_model_matches_transformers(kind, tmp_path):
    """save_pretrained -> scripts/convert_hf.py's functions -> model.load_model: prefill and decode logits."""
    import convert_hf
    from safetensors.torch import save_file
    hf = tiny_hf(kind)
    hf.save_pretrained(tmp_path / "hf")
    weights = convert_hf.read_hf_weights(tmp_path / "hf")
    cfg = convert_hf.hf_config(json.loads((tmp_path / "hf/config.json").read_text()), weights, kind)
    assert not cfg["tie_embeddings"] and cfg["qkv_bias"] == (kind == "qwen2")
    (tmp_path / "ours").mkdir()
    save_file(convert_hf.hf_to_ours(weights, cfg), tmp_path / "ours/model.safetensors")
    (tmp_path / "ours/config.json").write_text(json.dumps(cfg))
    ours = load_model(tmp_path / "ours", dtype=torch.float32)
    assert ours.output.weight.data_ptr() != ours.tok_embeddings.weight.data_ptr()

    x = torch.randint(0, 300, (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = hf(x, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        hf_step = hf(nxt, past_key_values=out.past_key_values).logits[:, -1]
        fresh_caches(ours, 2, 101)
        pre = ours.prefill(x, torch.arange(100).expand(2, -1), all_logits=True)
        step = ours(nxt, torch.tensor([100, 100]))[:, -1]
    assert out.logits.std() > 0.5  # logits far from uniform: the comparison has teeth
    # measured max |diff|: qwen2 1.3e-6 / 1.2e-6, llama31 3.3e-6 / 1.4e-6 (prefill / decode), logits of
    # std ~0.8; dropping the q/k/v biases moves them by 4.4
    assert (pre - out.logits).abs().max() < 1e-5
    assert (step - hf_step).abs().max() < 1e-5
