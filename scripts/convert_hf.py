"""Convert a Hugging Face Llama / Mistral / Qwen2 / Qwen3 / Gemma 3 / Phi-3 checkpoint into our layout (model.py).

    python scripts/convert_hf.py checkpoints/<repo>/hf checkpoints/<repo> [--name NAME]

HF keeps each head's q/k rows in the rotate-half order ([x0, x2, .. | x1, x3, ..] after the permute()
in transformers' convert_llama_weights_to_hf.py); model.py rotates interleaved pairs (2j, 2j+1) as Meta
does, so q/k (and Qwen2's q/k biases, and Qwen3's and Gemma 3's per-head q/k norm weights, which scale
the same head dims) are un-permuted here, once, and fused into one wqkv. Per family, also offline:
- Gemma 3: its RMSNorms multiply by (1 + w): the +1 is folded into every stored norm weight, so model.py
  has one RMSNorm; its attention scale query_pre_attn_scalar^-1/2 (not head_dim^-1/2) is folded into the
  q norm's weight, as sqrt(head_dim / query_pre_attn_scalar), so every attention and every strategy's
  scores see the model's real logits. A multimodal checkpoint (Gemma3ForConditionalGeneration, the 4B and
  up) gives its text tower; the vision tower is dropped.
- Phi-3: its fused qkv_proj is split to un-permute q and k, then fused again; gate_up_proj is split.
The dtype of the checkpoint is kept (so a bf16 Gemma's folded norms are rounded to bf16 once, here).
`ours_to_hf` is the inverse, which the tests use to check the round trip.
"""
import argparse
import json
import math
import re
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tokenizer.py and model.py at the repo root
import tokenizer as tk  # noqa: E402
from model import CONFIG_FORMAT  # noqa: E402

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")  # and "gemma3", the multimodal one
# HF name within model.layers.N. -> ours within layers.N., for tensors that only change name.
LAYER_NAMES = {"input_layernorm.weight": "attention_norm.weight", "self_attn.o_proj.weight": "attention.wo.weight",
               "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "feed_forward.w1.weight",
               "mlp.up_proj.weight": "feed_forward.w3.weight", "mlp.down_proj.weight": "feed_forward.w2.weight"}
# Gemma 3's four norms: its post_attention_layernorm is the attention output's, the MLP's input norm is "pre"
GEMMA_NORMS = {"input_layernorm.weight": "attention_norm.weight", "post_attention_layernorm.weight":
               "post_attention_norm.weight", "pre_feedforward_layernorm.weight": "ffn_norm.weight",
               "post_feedforward_layernorm.weight": "post_ffn_norm.weight"}
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# Gemma3TextConfig's defaults (transformers 5), for the keys a multimodal hub config's text_config leaves out
GEMMA3_TEXT_DEFAULTS = dict(model_type="gemma3_text", vocab_size=262208, num_attention_heads=8, num_key_value_heads=4,
                            head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072,
                            rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window=4096, rope_theta=1e6,
                            rope_local_base_freq=10000.0, tie_word_embeddings=True)
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}  # HF's name -> model.py's


def hf_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of each head from rotate-half order to interleaved pairs; works on weights and biases."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def interleaved_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's permute(): the inverse of hf_to_interleaved."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def expected_shapes(cfg: dict) -> dict[str, tuple]:
    d, hd, f = cfg["dim"], cfg["head_dim"], cfg["intermediate_size"]
    qkv = (cfg["n_head"] + 2 * cfg["n_local_heads"]) * hd
    shapes = {"tok_embeddings.weight": (cfg["vocab_size"], d), "norm.weight": (d,)}
    if not cfg["tie_embeddings"]:
        shapes["output.weight"] = (cfg["vocab_size"], d)
    for i in range(cfg["n_layer"]):
        p = f"layers.{i}."
        shapes |= {p + "attention_norm.weight": (d,), p + "attention.wqkv.weight": (qkv, d),
                   p + "attention.wo.weight": (d, cfg["n_head"] * hd), p + "ffn_norm.weight": (d,),
                   p + "feed_forward.w1.weight": (f, d), p + "feed_forward.w3.weight": (f, d),
                   p + "feed_forward.w2.weight": (d, f)}
        if cfg["qkv_bias"]:
            shapes[p + "attention.wqkv.bias"] = (qkv,)
        if cfg.get("qk_norm"):
            shapes |= {p + "attention.q_norm.weight": (hd,), p + "attention.k_norm.weight": (hd,)}
        if cfg.get("post_norms"):
            shapes |= {p + "post_attention_norm.weight": (d,), p + "post_ffn_norm.weight": (d,)}
    return shapes


def save_checkpoint(out_dir, weights: dict, cfg: dict):
    """Check every name and shape against the config, then write; config.json last, as the 'done' mark."""
    from safetensors.torch import save_file
    want = expected_shapes(cfg)
    got = {k: tuple(v.shape) for k, v in weights.items()}
    if got != want:
        bad = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
        raise ValueError(f"{len(bad)} tensors missing or misshapen, e.g. {bad[0]}: "
                         f"want {want.get(bad[0])}, got {got.get(bad[0])}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tk.load_tokenizer(out)  # fail now, not at the first run, if the tokenizer entry is unusable
    size = sum(v.numel() * v.element_size() for v in weights.values())
    print(f"wrote {out} ({len(weights)} tensors, {size / 2**20:.0f} MiB, vocab {cfg['vocab_size']})")


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():  # only the indexed shards: Mistral repos also ship a consolidated.safetensors
        files = sorted({hf_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = [hf_dir / "model.safetensors"] if (hf_dir / "model.safetensors").exists() else \
            sorted(hf_dir.glob("pytorch_model*.bin"))
    if not files:
        raise ValueError(f"no model.safetensors(.index.json) or pytorch_model*.bin in {hf_dir}")
    weights = {}
    for f in files:
        try:
            if f.suffix == ".safetensors":
                from safetensors import safe_open
                with safe_open(f, "pt") as s:
                    weights |= {k: s.get_tensor(k) for k in s.keys()}
            else:
                weights |= torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or corrupt files: say which, in one line
            raise ValueError(f"cannot read {f}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    return weights


def text_model(c: dict, weights: dict) -> tuple[dict, dict]:
    """A multimodal Gemma 3 checkpoint's text tower: (its config, defaults filled in, and its weights under
    the text-only names, model.* and lm_head.*; the hub's language_model.model.* or transformers 5's
    model.language_model.*); any other checkpoint as it is."""
    if c.get("model_type") != "gemma3":
        return c, weights
    renames = (("language_model.model.", "model."), ("model.language_model.", "model."),
               ("language_model.lm_head.", "lm_head."))
    text = {}
    for k, v in weights.items():
        new = next((to + k[len(fro):] for fro, to in renames if k.startswith(fro)), k)
        if new.startswith(("model.", "lm_head.")) and not new.startswith(("model.vision", "model.multi_modal")):
            text[new] = v
    return GEMMA3_TEXT_DEFAULTS | {"tie_word_embeddings": c.get("tie_word_embeddings", True)} | c["text_config"], text


def hf_rope(c: dict) -> tuple[dict, dict]:
    """(global layers' RoPE parameters, sliding-window layers'), from either config style: transformers 5's
    rope_parameters (per layer type for Gemma 3) or the hub's older rope_theta + rope_scaling
    (+ Gemma 3's rope_local_base_freq)."""
    rp = c.get("rope_parameters") or {}
    if "full_attention" in rp:
        return rp["full_attention"], rp.get("sliding_attention") or {}
    g = {**rp, **(c.get("rope_scaling") or {})}
    g.setdefault("rope_theta", c.get("rope_theta", 10000.0))
    return g, {"rope_theta": c.get("rope_local_base_freq", 10000.0)}


def hf_rope_scaling(g: dict, c: dict, head_dim: int) -> dict | None:
    """config.json's rope_scaling (model.rope_frequencies) from HF's parameters `g`."""
    kind = g.get("rope_type", g.get("type", "default"))
    if float(g.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial rotary embeddings (partial_rotary_factor < 1) are not supported")
    if kind == "default":
        return None
    if kind == "llama3":
        return {"rope_type": "llama3", **{k: g[k] for k in LLAMA3_ROPE_KEYS}}
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(g["factor"])}
    if kind in ("longrope", "su"):  # Phi-3's; "su" is its first name
        orig = g.get("original_max_position_embeddings") or c["original_max_position_embeddings"]
        factor = g.get("factor") or c["max_position_embeddings"] / orig  # as transformers derives both
        attn = g.get("attention_factor") or (math.sqrt(1 + math.log(factor) / math.log(orig)) if factor > 1 else 1.0)
        short, long = [list(map(float, g[k])) for k in ("short_factor", "long_factor")]
        if len(short) != head_dim // 2 or len(long) != head_dim // 2:
            raise ValueError(f"longrope factors: {len(short)} short, {len(long)} long; want head_dim / 2 = {head_dim // 2}")
        return dict(rope_type="longrope", short_factor=short, long_factor=long, original_max_position_embeddings=orig,
                    attention_factor=float(attn))
    raise ValueError(f"rope scaling {kind!r} is not supported (llama3, linear, longrope)")


def hf_window(c: dict, n_layer: int, block_size: int) -> tuple[int, list]:
    """(sliding window, its layers) as transformers attends: the config's layer_types when it lists them,
    else Gemma 3's pattern (every sliding_window_pattern-th layer global), Qwen2/3's (the layers from
    max_window_layers on), or every layer (Mistral, Phi-3)."""
    window = c.get("sliding_window") if c.get("use_sliding_window", True) else None
    if not window or window >= block_size:
        return 0, []
    if c.get("layer_types"):
        local = [i for i, t in enumerate(c["layer_types"]) if t == "sliding_attention"]
    elif c["model_type"] == "gemma3_text":
        local = [i for i in range(n_layer) if (i + 1) % c.get("sliding_window_pattern", 6)]
    elif c["model_type"] in ("qwen2", "qwen3"):
        local = list(range(c.get("max_window_layers", n_layer), n_layer))
    else:
        local = list(range(n_layer))
    return (window, local) if local else (0, [])


def hf_config(c: dict, weights: dict, name: str) -> dict:
    """config.json's model fields (every ModelArgs field, and the format) from HF's config.json `c` (a
    text model's: see text_model) and the weights."""
    if c.get("model_type") not in MODEL_TYPES:
        raise ValueError(f"model_type {c.get('model_type')!r} is not one of {MODEL_TYPES + ('gemma3',)}")
    gemma = c["model_type"] == "gemma3_text"
    if any(c.get(k) for k in ("final_logit_softcapping", "attn_logit_softcapping", "use_bidirectional_attention")):
        raise ValueError("logit soft-capping and bidirectional attention are not supported")
    act = c.get("hidden_activation") or c.get("hidden_act") or "silu"
    if act not in ACTIVATIONS:
        raise ValueError(f"activation {act!r} is not one of {', '.join(ACTIVATIONS)}")
    g, local_rope = hf_rope(c)
    n_head, dim, n_layer, block = c["num_attention_heads"], c["hidden_size"], c["num_hidden_layers"], \
        c["max_position_embeddings"]
    head_dim = c.get("head_dim") or dim // n_head
    window, local, scaling = *hf_window(c, n_layer, block), hf_rope_scaling(g, c, head_dim)
    if local and local_rope.get("rope_type", "default") != "default":
        raise ValueError(f"sliding-window layers with rope scaling {local_rope['rope_type']!r} are not supported")
    cfg = dict(name=name, block_size=block,
               vocab_size=weights["model.embed_tokens.weight"].shape[0],  # the tensor decides
               n_layer=n_layer, n_head=n_head, n_local_heads=c.get("num_key_value_heads") or n_head,
               dim=dim, intermediate_size=c["intermediate_size"], head_dim=head_dim,
               rope_base=float(g["rope_theta"]), norm_eps=float(c["rms_norm_eps"]),
               rope_scaling=scaling,
               tie_embeddings=c.get("tie_word_embeddings", "lm_head.weight" not in weights),
               qkv_bias="model.layers.0.self_attn.q_proj.bias" in weights,
               qk_norm="model.layers.0.self_attn.q_norm.weight" in weights, post_norms=gemma,
               mlp_act=ACTIVATIONS[act], embed_scale=math.sqrt(dim) if gemma else 1.0,
               sliding_window=window, local_layers=local,
               local_rope_base=float(local_rope["rope_theta"]) if gemma and local else 0.0, format=CONFIG_FORMAT)
    if window:
        print(f"note: {len(local)} of {n_layer} layers attend to a sliding window of {window} tokens "
              "(a ring cache each, whatever the strategy)")
    return cfg


def gemma_norm_scales(c: dict | None) -> tuple[float, float] | None:
    """Gemma 3: (the +1 of its (1 + w) norms, its q norm's extra factor sqrt(head_dim / query_pre_attn_scalar),
    which makes our 1/sqrt(head_dim) attention scale its query_pre_attn_scalar^-1/2); None for others."""
    if not c or c.get("model_type") != "gemma3_text":
        return None
    return 1.0, math.sqrt((c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]) / c["query_pre_attn_scalar"])


def hf_to_ours(w: dict, cfg: dict, c: dict | None = None) -> dict[str, torch.Tensor]:
    """HF's tensors (text model names) -> ours; `c`, HF's config.json (text model's), says the family."""
    w, gemma = dict(w), gemma_norm_scales(c)
    take = w.pop
    fold = (lambda t, s=1.0: ((t.float() + 1) * s).to(t.dtype)) if gemma else (lambda t, s=1.0: t)
    out = {"tok_embeddings.weight": take("model.embed_tokens.weight"), "norm.weight": fold(take("model.norm.weight"))}
    lm_head = w.pop("lm_head.weight", None)
    if not cfg["tie_embeddings"]:
        if lm_head is None:
            raise ValueError("config says untied embeddings but there is no lm_head.weight")
        out["output.weight"] = lm_head
    nh, nkv, hd = cfg["n_head"], cfg["n_local_heads"], cfg["head_dim"]
    for i in range(cfg["n_layer"]):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        if p + "self_attn.qkv_proj.weight" in w:  # Phi-3: fused q, k, v rows
            w |= dict(zip((f"{p}self_attn.{x}_proj.weight" for x in "qkv"),
                          take(p + "self_attn.qkv_proj.weight").split([nh * hd, nkv * hd, nkv * hd])))
        if p + "mlp.gate_up_proj.weight" in w:  # Phi-3: gate rows, then up rows
            w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"] = take(p + "mlp.gate_up_proj.weight").chunk(2)
        for kind in ("weight", "bias") if cfg["qkv_bias"] else ("weight",):
            parts = [hf_to_interleaved(take(f"{p}self_attn.q_proj.{kind}"), nh),
                     hf_to_interleaved(take(f"{p}self_attn.k_proj.{kind}"), nkv), take(f"{p}self_attn.v_proj.{kind}")]
            out[f"{q}attention.wqkv.{kind}"] = torch.cat(parts)
        if cfg["qk_norm"]:  # one weight per head dim, shared by the heads: permuted as one head's rows
            out[q + "attention.q_norm.weight"] = hf_to_interleaved(
                fold(take(p + "self_attn.q_norm.weight"), gemma[1] if gemma else 1.0), 1)
            out[q + "attention.k_norm.weight"] = hf_to_interleaved(fold(take(p + "self_attn.k_norm.weight")), 1)
        names = {**LAYER_NAMES, **GEMMA_NORMS} if gemma else LAYER_NAMES
        out |= {q + ours: fold(take(p + theirs)) if "norm" in ours else take(p + theirs) for theirs, ours in names.items()}
    if left := [k for k in w if not k.endswith("rotary_emb.inv_freq")]:  # old checkpoints store inv_freq
        raise ValueError(f"{len(left)} tensors not understood, e.g. {left[0]} (unsupported variant?)")
    return out


def ours_to_hf(w: dict, cfg: dict, c: dict | None = None) -> dict[str, torch.Tensor]:
    """The inverse of hf_to_ours (Phi-3's tensors fused again when c says phi3)."""
    hd, nh, nkv, gemma = cfg["head_dim"], cfg["n_head"], cfg["n_local_heads"], gemma_norm_scales(c)
    unfold = (lambda t, s=1.0: (t.float() / s - 1).to(t.dtype)) if gemma else (lambda t, s=1.0: t)
    out = {"model.embed_tokens.weight": w["tok_embeddings.weight"], "model.norm.weight": unfold(w["norm.weight"])}
    if not cfg["tie_embeddings"]:
        out["lm_head.weight"] = w["output.weight"]
    for i in range(cfg["n_layer"]):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        for kind in ("weight", "bias") if cfg["qkv_bias"] else ("weight",):
            wq, wk, wv = w[f"{q}attention.wqkv.{kind}"].split([nh * hd, nkv * hd, nkv * hd])
            out |= {f"{p}self_attn.q_proj.{kind}": interleaved_to_hf(wq, nh),
                    f"{p}self_attn.k_proj.{kind}": interleaved_to_hf(wk, nkv), f"{p}self_attn.v_proj.{kind}": wv}
        if cfg["qk_norm"]:
            out[p + "self_attn.q_norm.weight"] = unfold(interleaved_to_hf(w[q + "attention.q_norm.weight"], 1),
                                                        gemma[1] if gemma else 1.0)
            out[p + "self_attn.k_norm.weight"] = unfold(interleaved_to_hf(w[q + "attention.k_norm.weight"], 1))
        names = {**LAYER_NAMES, **GEMMA_NORMS} if gemma else LAYER_NAMES
        out |= {p + theirs: unfold(w[q + ours]) if "norm" in ours else w[q + ours] for theirs, ours in names.items()}
        if c and c.get("model_type") == "phi3":
            out[p + "self_attn.qkv_proj.weight"] = torch.cat([out.pop(f"{p}self_attn.{x}_proj.weight") for x in "qkv"])
            out[p + "mlp.gate_up_proj.weight"] = torch.cat([out.pop(p + "mlp.gate_proj.weight"),
                                                            out.pop(p + "mlp.up_proj.weight")])
    return out


def _chat_template(hf_dir: Path) -> str:
    tc = hf_dir / "tokenizer_config.json"
    template = json.loads(tc.read_text()).get("chat_template") if tc.exists() else None
    if isinstance(template, list):  # some repos keep several named templates
        template = next((t["template"] for t in template if t.get("name") == "default"), "")
    jinja = hf_dir / "chat_template.jinja"
    return template or (jinja.read_text() if jinja.exists() else "")


def default_system(template: str) -> str | None:
    """The system prompt a ChatML template inserts when none is given (SmolLM2's, Qwen2's)."""
    m = re.search(r"<\|im_start\|>system(?:\n|\\n)([^<{}'\"]+?)<\|im_end\|>", template)
    return m.group(1).replace("\\n", "\n") if m else None


def _token(tcfg: dict, key: str) -> str | None:
    """tokenizer_config.json's bos_token/eos_token: a string, or an AddedToken dict with "content"."""
    t = tcfg.get(key)
    return t.get("content") if isinstance(t, dict) else t


def _stop_ids(hf_dir: Path, ids: list) -> list[int]:
    gen = hf_dir / "generation_config.json"
    eos = json.loads(gen.read_text()).get("eos_token_id") if gen.exists() else None
    ids = ids + (eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted({i for i in ids if i is not None})


def hf_pattern(pre: dict | None) -> str:
    """The split regex of a tokenizer.json pre-tokenizer, for the shapes byte-level checkpoints use."""
    parts = pre["pretokenizers"] if pre and pre["type"] == "Sequence" else [pre or {}]
    kinds, last = [p.get("type") for p in parts], parts[-1]
    if kinds[-1] != "ByteLevel" or last.get("add_prefix_space"):
        raise ValueError(f"pre-tokenizer {kinds} is not plain byte-level")
    if kinds == ["Split", "ByteLevel"] and not last.get("use_regex", True) and parts[0]["behavior"] == "Isolated":
        return parts[0]["pattern"]["Regex"]  # Llama-3, Qwen2
    if kinds == ["ByteLevel"] and last.get("use_regex", True):
        return tk.GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and parts[0]["individual_digits"] and last.get("use_regex", True):
        return tk.SMOLLM_PATTERN  # SmolLM2
    raise ValueError(f"pre-tokenizer {kinds} is not supported")


def _byte_level_tokenizer(tj: dict, tcfg: dict, out_dir: Path, template: str) -> dict:
    """tokenizer.json (byte-level BPE: Qwen2, SmolLM2, Llama-3 without original/) -> tiktoken file."""
    model, norm = tj["model"], (tj.get("normalizer") or {}).get("type")
    if model.get("type") != "BPE" or norm not in (None, "NFC"):
        raise ValueError(f"tokenizer.json {model.get('type')} with normalizer {norm} is not supported")
    added = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    vocab = {t: i for t, i in model["vocab"].items() if i not in added.values()}
    tk.write_tiktoken_file(out_dir / "tokenizer.model", tk.byte_level_bpe_ranks(vocab, model["merges"]))
    bos = _token(tcfg, "bos_token")
    # Llama-3's tokenizer_config has no add_bos_token: its tokenizer.json post-processor prepends BOS.
    add_bos = tcfg.get("add_bos_token", bos is not None and bos in json.dumps(tj.get("post_processor")))
    chatml, llama3 = "<|im_start|>" in template, "<|start_header_id|>" in template
    return dict(kind="tiktoken", pattern=hf_pattern(tj.get("pre_tokenizer")), special_tokens=added,
                **({"normalize": "NFC"} if norm else {}), bos_id=added.get(bos), add_bos=bool(add_bos),
                chat_format="chatml" if chatml else "llama3" if llama3 else "none",
                default_system=default_system(template) if chatml else None,
                stop=[added.get(t) for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")])


def _llama3_tokenizer(hf_dir: Path, out_dir: Path) -> dict:
    """Meta's tiktoken file as is; special token names from tokenizer.json when present (3.1 renamed some)."""
    ranks = tk.read_tiktoken_file(hf_dir / "original/tokenizer.model")
    names = ["<|begin_of_text|>", "<|end_of_text|>", *[f"<|reserved_special_token_{i}|>" for i in range(4)],
             "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>",
             *[f"<|reserved_special_token_{i}|>" for i in range(5, 251)]]  # Meta's tokenizer.py order
    special = {n: len(ranks) + i for i, n in enumerate(names)}
    if (hf_dir / "tokenizer.json").exists():
        special = {t["content"]: t["id"] for t in json.loads((hf_dir / "tokenizer.json").read_text())["added_tokens"]}
    shutil.copyfile(hf_dir / "original/tokenizer.model", out_dir / "tokenizer.model")
    return dict(kind="tiktoken", pattern=tk.LLAMA3_PATTERN, special_tokens=special, bos_id=special["<|begin_of_text|>"],
                add_bos=True, bos_token="<|begin_of_text|>", chat_format="llama3", default_system=None,
                stop=[special["<|end_of_text|>"], special["<|eot_id|>"]])


def _added_tokens(hf_dir: Path) -> dict:
    """A sentencepiece checkpoint's tokenizer.json added tokens (Phi-3's chat tokens exist only there, past
    the vocabulary; Gemma's turn markers are pieces too), matched before sentencepiece runs, and those
    that strip whitespace on their left ("l") or right ("r")."""
    tj = hf_dir / "tokenizer.json"
    added = json.loads(tj.read_text()).get("added_tokens", []) if tj.exists() else []
    strip = {t["content"]: "l" * bool(t.get("lstrip")) + "r" * bool(t.get("rstrip")) for t in added}
    return dict(special_tokens={t["content"]: t["id"] for t in added}, strip={t: s for t, s in strip.items() if s})


def hf_tokenizer(hf_dir: Path, out_dir: Path, model_type: str) -> dict:
    """Write the tokenizer file into out_dir and return config.json's "tokenizer" entry."""
    out_dir.mkdir(parents=True, exist_ok=True)
    template = _chat_template(hf_dir)
    tc = hf_dir / "tokenizer_config.json"
    tcfg = json.loads(tc.read_text()) if tc.exists() else {}
    if (hf_dir / "original/tokenizer.model").exists():
        spec = _llama3_tokenizer(hf_dir, out_dir)
    elif (hf_dir / "tokenizer.model").exists():  # Llama-2 / Mistral sentencepiece
        import sentencepiece
        sp = sentencepiece.SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))
        shutil.copyfile(hf_dir / "tokenizer.model", out_dir / "tokenizer.model")
        fmt = ("mistral" if model_type == "mistral" else "llama2") if "[INST]" in template else "none"
        piece = lambda i: sp.id_to_piece(i) if i >= 0 else None  # "<s>", "</s>"; -1: the model has none
        spec = dict(kind="sentencepiece", bos_id=sp.bos_id(), add_bos=tcfg.get("add_bos_token", True),
                    bos_token=piece(sp.bos_id()), eos_token=piece(sp.eos_id()),
                    chat_format=fmt, default_system=None, stop=[sp.eos_id()], **_added_tokens(hf_dir))
    elif (hf_dir / "tokenizer.json").exists():
        spec = _byte_level_tokenizer(json.loads((hf_dir / "tokenizer.json").read_text()), tcfg, out_dir, template)
    else:
        raise ValueError(f"no tokenizer (original/tokenizer.model, tokenizer.model or tokenizer.json) in {hf_dir}")
    spec["stop_ids"] = _stop_ids(hf_dir, spec.pop("stop"))
    # The model's own template, rendered by tokenizer.py with these strings as {{ bos_token }}/{{ eos_token }};
    # chat_format and default_system are its fallback.
    spec["chat_template"] = template or None
    for key in ("bos_token", "eos_token"):
        spec[key] = _token(tcfg, key) or spec.get(key)
    return {"file": "tokenizer.model", **spec}


def convert(hf_dir, out_dir, name: str | None = None) -> dict:
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    try:
        c = json.loads((hf_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {hf_dir / 'config.json'}: {e}") from None
    c, weights = text_model(c, read_hf_weights(hf_dir))
    cfg = hf_config(c, weights, name or out_dir.name.lower())
    cfg["tokenizer"] = hf_tokenizer(hf_dir, out_dir, c["model_type"])
    save_checkpoint(out_dir, hf_to_ours(weights, cfg, c), cfg)
    return cfg


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--name", help="config.json's name (default: out_dir's name, lower case)")
    args = ap.parse_args()
    try:
        convert(args.hf_dir, args.out_dir, args.name)
    except (ValueError, KeyError, OSError) as e:
        sys.exit(f"convert_hf: {type(e).__name__ + ': ' if isinstance(e, KeyError) else ''}{e}")


if __name__ == "__main__":
    main()
