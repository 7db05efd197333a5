"""Convert a Hugging Face Llama / Mistral / Qwen2 checkpoint into our layout (see model.py).

    python scripts/convert_hf.py checkpoints/<repo>/hf checkpoints/<repo> [--name NAME]

HF keeps each head's q/k rows in the rotate-half order ([x0, x2, .. | x1, x3, ..] after the permute()
in transformers' convert_llama_weights_to_hf.py); model.py rotates interleaved pairs (2j, 2j+1) as Meta
does, so q/k (and Qwen2's q/k biases) are un-permuted here, once, and fused into one wqkv. The dtype of
the checkpoint is kept. `ours_to_hf` is the exact inverse, which the tests use to check the round trip.
"""
import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tokenizer.py at the repo root
import tokenizer as tk  # noqa: E402

MODEL_TYPES = ("llama", "mistral", "qwen2")
# HF name within model.layers.N. -> ours within layers.N., for tensors that only change name.
LAYER_NAMES = {"input_layernorm.weight": "attention_norm.weight", "self_attn.o_proj.weight": "attention.wo.weight",
               "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "feed_forward.w1.weight",
               "mlp.up_proj.weight": "feed_forward.w3.weight", "mlp.down_proj.weight": "feed_forward.w2.weight"}
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


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


def hf_config(c: dict, weights: dict, name: str) -> dict:
    if c.get("model_type") not in MODEL_TYPES:
        raise ValueError(f"model_type {c.get('model_type')!r} is not one of {MODEL_TYPES}")
    rope = c.get("rope_scaling") or c.get("rope_parameters") or {}  # transformers 5 writes rope_parameters
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ValueError(f"rope scaling {kind!r} is not supported (only Llama-3.1 style)")
    n_head, dim = c["num_attention_heads"], c["hidden_size"]
    cfg = dict(name=name, block_size=c["max_position_embeddings"],
               vocab_size=weights["model.embed_tokens.weight"].shape[0],  # the tensor decides
               n_layer=c["num_hidden_layers"], n_head=n_head, n_local_heads=c.get("num_key_value_heads") or n_head,
               dim=dim, intermediate_size=c["intermediate_size"], head_dim=c.get("head_dim") or dim // n_head,
               rope_base=float(c.get("rope_theta", rope.get("rope_theta", 10000.0))),
               norm_eps=float(c["rms_norm_eps"]),
               rope_scaling={k: rope[k] for k in LLAMA3_ROPE_KEYS} if kind == "llama3" else None,
               tie_embeddings=c.get("tie_word_embeddings", "lm_head.weight" not in weights),
               qkv_bias="model.layers.0.self_attn.q_proj.bias" in weights)
    window = c.get("sliding_window") if c.get("use_sliding_window", True) else None
    if window and window < cfg["block_size"]:
        print(f"note: sliding window {window} is ignored; outputs differ from HF past {window} tokens")
    return cfg


def hf_to_ours(w: dict, cfg: dict) -> dict[str, torch.Tensor]:
    w = dict(w)
    take = w.pop
    out = {"tok_embeddings.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    lm_head = w.pop("lm_head.weight", None)
    if not cfg["tie_embeddings"]:
        if lm_head is None:
            raise ValueError("config says untied embeddings but there is no lm_head.weight")
        out["output.weight"] = lm_head
    nh, nkv = cfg["n_head"], cfg["n_local_heads"]
    for i in range(cfg["n_layer"]):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        for kind in ("weight", "bias") if cfg["qkv_bias"] else ("weight",):
            parts = [hf_to_interleaved(take(f"{p}self_attn.q_proj.{kind}"), nh),
                     hf_to_interleaved(take(f"{p}self_attn.k_proj.{kind}"), nkv), take(f"{p}self_attn.v_proj.{kind}")]
            out[f"{q}attention.wqkv.{kind}"] = torch.cat(parts)
        out |= {q + ours: take(p + theirs) for theirs, ours in LAYER_NAMES.items()}
    if left := [k for k in w if not k.endswith("rotary_emb.inv_freq")]:  # old checkpoints store inv_freq
        raise ValueError(f"{len(left)} tensors not understood, e.g. {left[0]} (unsupported variant?)")
    return out


def ours_to_hf(w: dict, cfg: dict) -> dict[str, torch.Tensor]:
    hd, nh, nkv = cfg["head_dim"], cfg["n_head"], cfg["n_local_heads"]
    out = {"model.embed_tokens.weight": w["tok_embeddings.weight"], "model.norm.weight": w["norm.weight"]}
    if not cfg["tie_embeddings"]:
        out["lm_head.weight"] = w["output.weight"]
    for i in range(cfg["n_layer"]):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        for kind in ("weight", "bias") if cfg["qkv_bias"] else ("weight",):
            wq, wk, wv = w[f"{q}attention.wqkv.{kind}"].split([nh * hd, nkv * hd, nkv * hd])
            out |= {f"{p}self_attn.q_proj.{kind}": interleaved_to_hf(wq, nh),
                    f"{p}self_attn.k_proj.{kind}": interleaved_to_hf(wk, nkv), f"{p}self_attn.v_proj.{kind}": wv}
        out |= {p + theirs: w[q + ours] for theirs, ours in LAYER_NAMES.items()}
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
                    chat_format=fmt, default_system=None, stop=[sp.eos_id()])
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
    weights = read_hf_weights(hf_dir)
    cfg = hf_config(c, weights, name or out_dir.name.lower())
    cfg["tokenizer"] = hf_tokenizer(hf_dir, out_dir, c["model_type"])
    save_checkpoint(out_dir, hf_to_ours(weights, cfg), cfg)
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
