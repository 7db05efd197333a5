"""One Llama-family transformer (Llama-2/3/3.1, Mistral, Qwen2, SmolLM2) in plain PyTorch.

Grouped-query attention, interleaved (Meta) RoPE with Llama-3.1 frequency scaling, RMSNorm, SwiGLU,
tied or untied output, optional q/k/v bias. Attention hands keys and values to its layer's cache
object (cache.py) and knows nothing of compression strategies.

Two entry points with their own compile policy (STYLE.md 5):
- `prefill(tokens, pos)`: the whole (left-padded) prompt, layer by layer; attention and MLP run in
  token chunks so a long prompt needs O(chunk * length) extra memory, and each layer's prompt KV is
  handed to its cache once, so a compressing strategy sees the whole prompt before it chooses.
- `forward(tokens, input_pos)`: one decode step, [B, 1] tokens at per-sequence positions [B];
  static shapes, compiled with fullgraph=True.
Positions are per sequence; padding tokens have position -1 and are never cached or attended.
"""
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelArgs:
    name: str = "tiny"
    block_size: int = 2048  # the model's maximum context
    vocab_size: int = 32000
    n_layer: int = 2
    n_head: int = 4
    n_local_heads: int = 2  # KV heads
    dim: int = 64
    intermediate_size: int = 128
    head_dim: int = 16
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    rope_scaling: dict | None = None  # Llama-3.1: factor, low/high_freq_factor, original_max_position_embeddings
    tie_embeddings: bool = False
    qkv_bias: bool = False

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        if name not in CONFIGS:
            raise ValueError(f"unknown model config {name!r}; known: {', '.join(CONFIGS)}")
        return cls(name=name, **CONFIGS[name])

    @classmethod
    def from_json(cls, path) -> "ModelArgs":
        """A converted checkpoint's config.json: every field, and nothing else but the tokenizer's entry
        (a missing rope_base must not quietly become 10000)."""
        raw = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        if missing := sorted(known - raw.keys()):
            raise ValueError(f"{path} lacks {', '.join(missing)}")
        if unknown := sorted(raw.keys() - known - {"tokenizer"}):
            raise ValueError(f"{path} has unknown keys {', '.join(unknown)}")
        return cls(**{k: raw[k] for k in known})


_L31 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
CONFIGS = {
    "smollm2-135m": dict(block_size=8192, vocab_size=49152, n_layer=30, n_head=9, n_local_heads=3, dim=576,
                         intermediate_size=1536, head_dim=64, rope_base=100000.0, tie_embeddings=True),
    "smollm2-360m": dict(block_size=8192, vocab_size=49152, n_layer=32, n_head=15, n_local_heads=5, dim=960,
                         intermediate_size=2560, head_dim=64, rope_base=100000.0, tie_embeddings=True),
    "smollm2-1.7b": dict(block_size=8192, vocab_size=49152, n_layer=24, n_head=32, n_local_heads=32, dim=2048,
                         intermediate_size=8192, head_dim=64, rope_base=130000.0, tie_embeddings=True),
    "llama-2-7b": dict(block_size=4096, vocab_size=32000, n_layer=32, n_head=32, n_local_heads=32, dim=4096,
                       intermediate_size=11008, head_dim=128),
    "llama-3-8b": dict(block_size=8192, vocab_size=128256, n_layer=32, n_head=32, n_local_heads=8, dim=4096,
                       intermediate_size=14336, head_dim=128, rope_base=500000.0),
    "llama-3.1-8b": dict(block_size=131072, vocab_size=128256, n_layer=32, n_head=32, n_local_heads=8, dim=4096,
                         intermediate_size=14336, head_dim=128, rope_base=500000.0, rope_scaling=_L31),
    "mistral-7b": dict(block_size=32768, vocab_size=32768, n_layer=32, n_head=32, n_local_heads=8, dim=4096,
                       intermediate_size=14336, head_dim=128, rope_base=1000000.0),  # v0.3
    "qwen2-7b": dict(block_size=32768, vocab_size=152064, n_layer=28, n_head=28, n_local_heads=4, dim=3584,
                     intermediate_size=18944, head_dim=128, rope_base=1000000.0, norm_eps=1e-6, qkv_bias=True),
    "tiny": dict(block_size=512, vocab_size=256, n_layer=2, n_head=4, n_local_heads=2, dim=64,
                 intermediate_size=128, head_dim=16),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()  # normalise in fp32 as the reference implementations do
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_frequencies(args: ModelArgs, length: int) -> torch.Tensor:
    """[length, head_dim // 2, 2] (cos, sin) table for positions 0..length-1."""
    inv = 1.0 / (args.rope_base ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim))
    if args.rope_scaling:  # Llama-3.1: stretch long wavelengths, keep short ones, blend in between
        s = args.rope_scaling
        wavelen = 2 * math.pi / inv
        low_wl = s["original_max_position_embeddings"] / s["low_freq_factor"]
        high_wl = s["original_max_position_embeddings"] / s["high_freq_factor"]
        smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
            s["high_freq_factor"] - s["low_freq_factor"])
        blended = (1 - smooth) * inv / s["factor"] + smooth * inv
        inv = torch.where(wavelen > low_wl, inv / s["factor"], torch.where(wavelen < high_wl, inv, blended))
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] in the interleaved layout; rope [B, T, D//2, 2] for each token's position."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = rope[..., 0].unsqueeze(2), rope[..., 1].unsqueeze(2)
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = args.n_head, args.n_local_heads, args.head_dim
        self.wqkv = nn.Linear(args.dim, (args.n_head + 2 * args.n_local_heads) * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_head * args.head_dim, args.dim, bias=False)
        self.kv_cache = None  # set by Transformer.setup_caches

    def qkv(self, x, rope):
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split([self.n_head * self.head_dim, self.n_kv * self.head_dim,
                                      self.n_kv * self.head_dim], dim=-1)
        q = apply_rope(q.view(B, T, self.n_head, self.head_dim), rope)
        k = apply_rope(k.view(B, T, self.n_kv, self.head_dim), rope)
        v = v.view(B, T, self.n_kv, self.head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]

    def forward(self, x, rope, input_pos):  # decode: x [B, 1, dim], input_pos [B]
        q, k, v = self.qkv(x, rope)
        y = self.kv_cache.decode(q, k, v, input_pos)  # [B, n_head, 1, D]
        return self.wo(y.transpose(1, 2).reshape(x.shape[0], 1, -1))

    def feed(self, x, rope, pos):  # x [B, n, dim], pos [B, n]: n decode steps, projections batched
        q, k, v = self.qkv(x, rope)
        y = torch.cat([self.kv_cache.decode(q[:, :, j:j + 1], k[:, :, j:j + 1], v[:, :, j:j + 1], pos[:, j])
                       for j in range(x.shape[1])], dim=2)  # the cache takes one token at a time
        return self.wo(y.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))

    def prefill(self, x, rope, pos, chunk):  # x [B, T, dim], pos [B, T]
        q, k, v = self.qkv(x, rope)
        self.kv_cache.prefill(q, k, v, pos)
        out = torch.cat([causal_attention(q[:, :, i:i + chunk], k, v, pos[:, i:i + chunk], pos)
                         for i in range(0, q.shape[2], chunk)], dim=2)
        return self.wo(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


def causal_attention(q, k, v, q_pos, k_pos):
    """Prompt attention of a chunk of queries against every prompt key; padding (pos -1) is masked.
    q [B, H, C, D], k/v [B, H_kv, T, D]; the mask is [B, 1, C, T], never T x T."""
    allowed = (k_pos[:, None, None, :] >= 0) & (k_pos[:, None, None, :] <= q_pos[:, None, :, None])
    allowed = allowed | (q_pos[:, None, :, None] < 0)  # padding queries attend to anything: no NaN rows
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=q.shape[1] != k.shape[1])


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(args.dim, args.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rope, input_pos):
        h = x + self.attention(self.attention_norm(x), rope, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))

    def feed(self, x, rope, pos):
        h = x + self.attention.feed(self.attention_norm(x), rope, pos)
        return h + self.feed_forward(self.ffn_norm(h))

    def prefill(self, x, rope, pos, chunk):
        h = x + self.attention.prefill(self.attention_norm(x), rope, pos, chunk)
        return h + torch.cat([self.feed_forward(self.ffn_norm(h[:, i:i + chunk]))
                              for i in range(0, h.shape[1], chunk)], dim=1)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("rope", rope_frequencies(args, args.block_size), persistent=False)

    def setup_caches(self, caches: list[nn.Module]):
        """One cache object per layer (built by cache.make_caches); replaces any previous ones. The
        generation count tells a captured CUDA graph (generate.DecodeGraph) that its buffers are gone."""
        for layer, cache in zip(self.layers, caches, strict=True):
            layer.attention.kv_cache = cache
        self.cache_generation = getattr(self, "cache_generation", 0) + 1

    def forward(self, tokens, input_pos, layer_step=None):
        """One decode step: tokens [B, 1], input_pos [B] -> logits [B, 1, vocab] (fp32). `layer_step`, if
        given, runs each block (generate.compile_decode: one compiled TransformerBlock.forward for all)."""
        rope = self.rope[input_pos].unsqueeze(1)  # [B, 1, D/2, 2]
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer_step(layer, x, rope, input_pos) if layer_step else layer(x, rope, input_pos)
        return self.output(self.norm(x)).float()

    def feed(self, tokens, input_pos, all_logits: bool = False):
        """Teacher-force tokens [B, n] from positions input_pos [B]: the computation of n decode steps
        (each layer's cache takes, scores and evicts the tokens one at a time, in order), but layer by
        layer, so each weight matrix is read once for the n tokens. -> the last token's logits
        [B, vocab] (every token's [B, n, vocab] with all_logits)."""
        pos = input_pos[:, None] + torch.arange(tokens.shape[1], device=tokens.device)
        rope = self.rope[pos]
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer.feed(x, rope, pos)
        return self.output(self.norm(x if all_logits else x[:, -1])).float()

    def prefill(self, tokens, pos, chunk: int = 1024, all_logits: bool = False):
        """Prompt tokens [B, T] at positions pos [B, T] (-1 = left padding) -> last-token logits
        [B, vocab] (or every token's [B, T, vocab] with all_logits, for scoring and tests)."""
        rope = self.rope[pos.clamp(min=0)]
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer.prefill(x, rope, pos, chunk)
        if all_logits:
            return self.output(self.norm(x)).float()
        return self.output(self.norm(x[:, -1])).float()


def load_model(checkpoint_dir, device="cpu", dtype=torch.bfloat16) -> Transformer:
    """Load a converted checkpoint (scripts/): config.json + model.safetensors, memory-mapped."""
    from safetensors.torch import load_file
    checkpoint_dir = Path(checkpoint_dir)
    args = ModelArgs.from_json(checkpoint_dir / "config.json")
    with torch.device("meta"):
        model = Transformer(args)
    state = load_file(checkpoint_dir / "model.safetensors", device="cpu")  # mmap: pages load on demand
    if args.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.rope = torch.empty(0)  # the meta-device table cannot be moved; the real one is set below
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    model.rope = rope_frequencies(args, args.block_size).to(device)  # stays fp32 whatever the dtype
    return model
