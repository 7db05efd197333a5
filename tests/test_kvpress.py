"""NVIDIA's kvpress as a test-only reference, like transformers: where its definitions match ours, our
strategies keep exactly the prompt positions its presses keep, per layer and KV head, at equal kept counts,
on a tiny random GQA Llama built by transformers and converted by scripts/convert_hf.py. kvpress 0.5.5
needs transformers < 5.3, so it lives in its own venv, .venv-kvpress (bash scripts/setup_kvpress.sh;
setup.sh --test makes it too), and runs there as a subprocess (tests/kvpress_positions.py, which says how
kept positions are read). Without that venv these tests skip.

Matched: StreamingLLMPress = streamingllm (its n_sink as our sinks); KnormPress = l2 with l2_one_shot and
no skipped layers (kvpress compresses every layer); SnapKVPress = snapkv at kvpress's window and kernel
with avg pooling; TOVAPress = tova at our default (the mean over all of a layer's heads) with the newest
token protected, as kvpress always keeps it. Not matched by definition (stated in the class docstrings):
ObservedAttentionPress vs h2o, PyramidKVPress vs pyramid."""
import json
import subprocess
from pathlib import Path

import pytest
import torch

import cache as kv
import convert_hf
import tokenizer as tk
from conftest import Capture
from model import load_model

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
KVPRESS_PYTHON = ROOT / ".venv-kvpress/bin/python"
if not KVPRESS_PYTHON.exists():
    pytest.skip(f"no kvpress venv at {KVPRESS_PYTHON.parent.parent}: bash scripts/setup_kvpress.sh makes it "
                "(kvpress needs transformers < 5.3, so not beside ours)", allow_module_level=True)
T, RATIOS = 256, (0.3, 0.6)  # kept 179 and 102 tokens, both above SnapKV's 64-token window


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(hf_dir, our checkpoint dir) of a tiny random Llama: 3 layers, 4 query heads on 2 KV heads, weights
    at std 0.2 (transformers' 0.02 makes every attention row nearly uniform, a weak test of scores)."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("kvpress")
    (d / "hf/original").mkdir(parents=True)
    tk.write_tiktoken_file(d / "hf/original/tokenizer.model", {bytes([b]): b for b in range(256)})
    cfg = transformers.LlamaConfig(vocab_size=520, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=96, num_hidden_layers=3, max_position_embeddings=512,
                                   initializer_range=0.2, bos_token_id=256, eos_token_id=257)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d / "hf")
    convert_hf.convert(d / "hf", d / "ours")
    return d / "hf", d / "ours"


@pytest.fixture(scope="module")
def reference(tiny):
    """(prompt ids, kvpress_positions.py's JSON) for a prompt of T distinct random tokens: a repeated token
    has the same layer-0 key norm at every position (RoPE keeps norms), an exact tie that top-k breaks
    by rounding."""
    ids = torch.randperm(520, generator=torch.Generator().manual_seed(1))[:T].tolist()
    r = subprocess.run([str(KVPRESS_PYTHON), "-W", "ignore", str(ROOT / "tests/kvpress_positions.py"), str(tiny[0]),
                        ",".join(map(str, ids)), *map(str, RATIOS)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return ids, json.loads(r.stdout)


def kept_by_us(model, ids, cfg: kv.CacheConfig):
    """[layer][head] -> sorted positions our caches hold after a prefill of ids (budget: cfg's)."""
    caches = kv.make_caches(model.args, cfg, 1, len(ids), 0, "cpu", torch.float32)
    model.setup_caches(caches)
    model.prefill(torch.tensor([ids]), torch.arange(len(ids))[None])
    return [[sorted(p[p >= 0].tolist()) for p in c.pos[0]] for c in caches]


def matching_config(strategy: str, n: int, ref: dict) -> kv.CacheConfig:
    """Our strategy at kvpress's settings, keeping n prompt tokens per KV head."""
    snap = ref["snapkv"]
    return {"streamingllm": kv.CacheConfig("streamingllm", [n], global_tokens=ref["streamingllm"]["n_sink"]),
            "l2": kv.CacheConfig("l2", [n], params={"l2_one_shot": True, "l2_skip_layers": []}),
            "snapkv": kv.CacheConfig("snapkv", [n], params={"snap_window": snap["window_size"], "snap_pool": "avg",
                                                            "snap_kernel": snap["kernel_size"]}),
            "tova": kv.CacheConfig("tova", [n], recent_window=1)}[strategy]


@pytest.mark.parametrize("strategy, press", [("streamingllm", "streamingllm"), ("l2", "knorm"),
                                             ("snapkv", "snapkv"), ("tova", "tova")])
def test_same_positions_as_kvpress(tiny, reference, strategy, press):
    ids, ref = reference
    model = load_model(tiny[1], dtype=torch.float32)
    for ratio in RATIOS:
        want = ref["kept"][press][str(ratio)]
        n = len(want[0][0])
        assert n == int(T * (1 - ratio)) and all(len(h) == n for layer in want for h in layer)
        got = kept_by_us(model, ids, matching_config(strategy, n, ref))
        for layer, (g, w) in enumerate(zip(got, want)):
            for h in range(len(w)):
                assert g[h] == w[h], (f"{strategy} vs kvpress {press} at ratio {ratio}, layer {layer}, KV head {h}: "
                                      f"only ours {sorted(set(g[h]) - set(w[h]))}, only kvpress's "
                                      f"{sorted(set(w[h]) - set(g[h]))}")


def test_h2o_differs_from_observed_attention_by_definition(tiny, reference):
    """kvpress's H2O-like ObservedAttentionPress keeps the top-n keys by MEAN attention over the queries that
    saw each key, with no recent window; our h2o's prompt score is the SUM (H2O's, favouring early tokens)
    and half the budget is a recent window. The mean rule on our own prompt attention gives exactly its
    positions, so the two differ by that definition alone, and the difference shows (H2O's docstring)."""
    ids, ref = reference
    model = load_model(tiny[1], dtype=torch.float32)
    caps = [Capture(c) for c in kv.make_caches(model.args, kv.CacheConfig(), 1, T, 0, "cpu", torch.float32)]
    model.setup_caches(caps)
    pos = torch.arange(T)[None]
    model.prefill(torch.tensor([ids]), pos)
    for ratio in RATIOS:
        want = ref["kept"]["observed_attention"][str(ratio)]
        n = len(want[0][0])
        mean = [kv.prompt_attention(c.q, c.k, pos)[0] / torch.arange(T, 0, -1) for c in caps]  # [H_kv, T] each
        assert [[sorted(m.topk(n).indices.tolist()) for m in layer] for layer in mean] == want
        assert kept_by_us(model, ids, kv.CacheConfig("h2o", [n])) != want
