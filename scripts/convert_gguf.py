"""Convert a llama.cpp GGUF of architecture "llama" (SmolLM2, Llama 3.x) or "qwen3" into our layout.

    python scripts/convert_gguf.py model.gguf checkpoints/<name> [--name NAME]

Every tensor is dequantized to float32, which holds Q4_1/Q8_0 values exactly. For "llama", no q/k
permutation: llama.cpp's converter already permuted HF's rotate-half rows into Meta's interleaved pairs,
the layout model.py wants (tests/test_convert.py checks this against transformers' own GGUF loader);
Llama 3.1/3.2's frequency scaling arrives as llama.cpp's per-dimension divisors (rope_freqs). For
"qwen3", llama.cpp keeps HF's rotate-half rows (its NEOX RoPE), so q/k and the q/k norm weights are
un-permuted here as convert_hf.py does. The byte-level BPE vocabulary is written as a tiktoken file, by
tokenizer.byte_level_bpe_ranks. Gemma 3 and Phi-3 GGUFs are refused: their vocabulary is sentencepiece's
("llama" tokenizer model), which this script cannot write, and Gemma's lacks query_pre_attn_scalar.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # convert_hf, when imported from elsewhere
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tokenizer.py
import tokenizer as tk  # noqa: E402
from convert_hf import default_system, hf_to_interleaved, save_checkpoint  # noqa: E402
from model import CONFIG_FORMAT  # noqa: E402

# llama.cpp name within blk.N. -> ours within layers.N. (q/k/v are fused separately)
LAYER_NAMES = {"attn_norm": "attention_norm", "attn_output": "attention.wo", "ffn_norm": "ffn_norm",
               "ffn_gate": "feed_forward.w1", "ffn_up": "feed_forward.w3", "ffn_down": "feed_forward.w2"}
PRE_TOKENIZERS = {"smollm": tk.SMOLLM_PATTERN, "llama-bpe": tk.LLAMA3_PATTERN, "qwen2": tk.QWEN2_PATTERN}
ARCHS = ("llama", "qwen3")
# llama.cpp's norms of q and k per head (Qwen3)
QK_NORMS = {"attn_q_norm": "attention.q_norm", "attn_k_norm": "attention.k_norm"}
CONTROL = 3  # llama.cpp's token type for control tokens (<|im_start|>, <|endoftext|>, ...)


def read_gguf(path, with_tensors: bool = True):
    """(metadata, tensors as float32 torch tensors [out, in]); any read error becomes one line."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    try:
        reader = GGUFReader(path)
        meta = {k: f.contents() for k, f in reader.fields.items()}
        # numpy shapes are already [out, in]: GGUF lists ne0 (the inner, `in` axis) first.
        tensors = {t.name: torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
                   for t in reader.tensors if with_tensors}
    except Exception as e:  # truncated or corrupt files fail in numpy/struct with long tracebacks
        raise ValueError(f"cannot read GGUF {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    return meta, tensors


def _f32(x) -> float:
    """GGUF stores floats as float32 (1e-5 -> 9.9999997e-06); keep the short decimal it came from."""
    return float(str(np.float32(x)))


def gguf_config(meta: dict, tensors: dict, name: str) -> dict:
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise ValueError(f"architecture {arch!r} is not one of {', '.join(ARCHS)} (Gemma 3 and Phi-3 GGUFs carry a "
                         "sentencepiece vocabulary this script cannot write: convert their HF checkpoints)")
    g = lambda key, default=None: meta.get(f"{arch}.{key}", default)
    n_head, dim = g("attention.head_count"), g("embedding_length")
    head_dim = g("attention.key_length", dim // n_head)
    if g("rope.dimension_count", head_dim) != head_dim:
        raise ValueError("partial rotary embeddings are not supported")
    if g("rope.scaling.type", "none") != "none" or g("attention.sliding_window"):
        raise ValueError("rope scaling or sliding windows in GGUF metadata are not supported; convert the HF checkpoint")
    freqs = tensors.get("rope_freqs.weight")  # Llama 3.1/3.2: llama.cpp's divisors of each frequency
    return dict(name=name, block_size=g("context_length"), vocab_size=tensors["token_embd.weight"].shape[0],
                n_layer=g("block_count"), n_head=n_head, n_local_heads=g("attention.head_count_kv", n_head),
                dim=dim, intermediate_size=g("feed_forward_length"), head_dim=head_dim,
                rope_base=_f32(g("rope.freq_base", 10000.0)), norm_eps=_f32(g("attention.layer_norm_rms_epsilon")),
                rope_scaling=None if freqs is None else dict(rope_type="factors", factors=freqs.tolist()),
                tie_embeddings="output.weight" not in tensors, qkv_bias="blk.0.attn_q.bias" in tensors,
                qk_norm="blk.0.attn_q_norm.weight" in tensors, post_norms=False, mlp_act="silu", embed_scale=1.0,
                sliding_window=0, local_layers=[], local_rope_base=0.0, format=CONFIG_FORMAT)


def gguf_weights(t: dict, cfg: dict, rotate_half: bool = False) -> dict[str, torch.Tensor]:
    """`rotate_half`: q/k rows in HF's order (every architecture but "llama"): un-permute them."""
    t = dict(t)
    t.pop("rope_freqs.weight", None)  # in the config
    out = {"tok_embeddings.weight": t.pop("token_embd.weight"), "norm.weight": t.pop("output_norm.weight")}
    if not cfg["tie_embeddings"]:
        out["output.weight"] = t.pop("output.weight")
    heads = dict(q=cfg["n_head"], k=cfg["n_local_heads"], v=0)
    fix = lambda w, n: hf_to_interleaved(w, n) if rotate_half and n else w
    for i in range(cfg["n_layer"]):
        p, q = f"blk.{i}.", f"layers.{i}."
        for kind in ("weight", "bias") if cfg["qkv_bias"] else ("weight",):
            out[f"{q}attention.wqkv.{kind}"] = torch.cat([fix(t.pop(f"{p}attn_{x}.{kind}"), n) for x, n in heads.items()])
        names = {**LAYER_NAMES, **QK_NORMS} if cfg["qk_norm"] else LAYER_NAMES
        out |= {f"{q}{ours}.weight": fix(t.pop(f"{p}{theirs}.weight"), 1 if theirs in QK_NORMS else 0)
                for theirs, ours in names.items()}
    if t:
        raise ValueError(f"{len(t)} tensors not understood, e.g. {next(iter(t))}")
    return out


def gguf_tokenizer(meta: dict, out_dir: Path) -> dict:
    """Write the vocabulary as a tiktoken file and return config.json's "tokenizer" entry."""
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"tokenizer {meta.get('tokenizer.ggml.model')!r} is not byte-level BPE ('gpt2')")
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"pre-tokenizer {pre!r} is not supported (known: {sorted(PRE_TOKENIZERS)})")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    special = {tok: i for i, (tok, ty) in enumerate(zip(tokens, types)) if ty == CONTROL}
    vocab = {tok: i for i, (tok, ty) in enumerate(zip(tokens, types)) if ty != CONTROL}
    out_dir.mkdir(parents=True, exist_ok=True)
    tk.write_tiktoken_file(out_dir / "tokenizer.model", tk.byte_level_bpe_ranks(vocab, meta["tokenizer.ggml.merges"]))
    template = meta.get("tokenizer.chat_template", "")
    chatml = "<|im_start|>" in template
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    stops = [eos, *map(special.get, ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>"))]
    # Qwen's own tokenizer.json normalizes to NFC first (llama.cpp does not; we follow the model's source)
    return dict(kind="tiktoken", file="tokenizer.model", pattern=PRE_TOKENIZERS[pre], special_tokens=special,
                **({"normalize": "NFC"} if pre == "qwen2" else {}),
                bos_id=bos, add_bos=bool(meta.get("tokenizer.ggml.add_bos_token")),
                stop_ids=sorted({s for s in stops if s is not None}),
                # The model's own template, rendered by tokenizer.py; chat_format/default_system: its fallback.
                chat_template=template or None, bos_token=None if bos is None else tokens[bos],
                eos_token=None if eos is None else tokens[eos],
                chat_format="chatml" if chatml else "llama3" if "<|start_header_id|>" in template else "none",
                default_system=default_system(template) if chatml else None)


def convert(gguf_path, out_dir, name: str | None = None) -> dict:
    out_dir = Path(out_dir)
    meta, tensors = read_gguf(gguf_path)
    # "SmolLM2-135M-Instruct.Q4_1.gguf" -> "smollm2-135m-instruct"
    cfg = gguf_config(meta, tensors, name or Path(gguf_path).name.split(".")[0].lower())
    cfg["tokenizer"] = gguf_tokenizer(meta, out_dir)
    save_checkpoint(out_dir, gguf_weights(tensors, cfg, meta["general.architecture"] != "llama"), cfg)
    return cfg


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf")
    ap.add_argument("out_dir")
    ap.add_argument("--name", help="config.json's name (default: the file name before its first dot, lower case)")
    args = ap.parse_args()
    try:
        convert(args.gguf, args.out_dir, args.name)
    except (ValueError, KeyError, OSError) as e:
        sys.exit(f"convert_gguf: {type(e).__name__ + ': ' if isinstance(e, KeyError) else ''}{e}")


if __name__ == "__main__":
    main()
