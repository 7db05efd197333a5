"""One decoder-only transformer for the Llama family and its relatives, in plain PyTorch.

Grouped-query attention, interleaved (Meta) RoPE, RMSNorm, a gated MLP, tied or untied output. What each
family adds (a ModelArgs field each; the converters in scripts/ make every layout change offline):
- Llama-2/3, Mistral, SmolLM2: the base. Llama-3.1: RoPE frequency scaling. Llama-3.2: that, tied at 1B/3B.
- Qwen2: q/k/v biases. Qwen3: an RMSNorm over each q and k head before RoPE (`qk_norm`).
- Gemma 3: qk_norm; four norms a block (`post_norms`); a GELU-tanh MLP; embeddings times sqrt(dim); five
  layers of six attend to the last `sliding_window` tokens with their own RoPE base, the others with
  linear RoPE scaling. Its (1 + w) norms and its query_pre_attn_scalar are folded into stored weights.
- Phi-3: LongRoPE at 128k (short/long factors, an attention factor); mini-4k's config windows every layer
  (2,047 tokens); its fused qkv/gate-up are split offline.
Attention hands keys and values to its layer's cache object (cache.py) and knows nothing of compression
strategies; a sliding-window layer gets a ring of window slots (cache.WindowCache) whatever the strategy.

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
from dataclasses import dataclass, field, fields
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
    rope_scaling: dict | None = None  # {"rope_type": llama3 | linear | longrope | factors, ...}: rope_frequencies
    tie_embeddings: bool = False
    qkv_bias: bool = False
    # config.json format 2 (below: each has the value format 1 implied)
    qk_norm: bool = False  # RMSNorm over each q and k head before RoPE
    post_norms: bool = False  # a norm on each sublayer's output too, before the residual add
    mlp_act: str = "silu"  # or "gelu_tanh"
    embed_scale: float = 1.0  # embeddings times this (in the weights' dtype)
    sliding_window: int = 0  # the `local_layers` attend to the last sliding_window tokens only
    local_layers: list = field(default_factory=list)
    local_rope_base: float = 0.0  # the local layers' own (unscaled) RoPE base; 0: the global table
    # not a field (converters write every field): scripts/quantize.py's checkpoints add it to config.json
    quantization = None  # weight-only {"mode": "int8"} or {"mode": "int4", "groupsize": g}: quant.py

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        if name not in CONFIGS:
            raise ValueError(f"unknown model config {name!r}; known: {', '.join(CONFIGS)}")
        return cls(name=name, **CONFIGS[name])

    @classmethod
    def from_json(cls, path) -> "ModelArgs":
        """A converted checkpoint's config.json: every field (a missing rope_base must not quietly become 10000),
        and nothing else but the tokenizer's entry and the format. A format-1 file (no "format") predates the
        FORMAT_2 fields: each takes its default, what the code did then (format-1 converters refused the rest)."""
        raw = json.loads(Path(path).read_text())
        known, fmt = {f.name for f in fields(cls)}, raw.get("format", 1)
        if fmt not in (1, CONFIG_FORMAT):
            raise ValueError(f"{path} has format {fmt!r}; this code reads formats 1 and {CONFIG_FORMAT}")
        if missing := sorted(known - raw.keys() - (set(FORMAT_2) if fmt == 1 else set())):
            raise ValueError(f"{path} lacks {', '.join(missing)}")
        if unknown := sorted(raw.keys() - known - {"tokenizer", "format", "quantization"}):
            raise ValueError(f"{path} has unknown keys {', '.join(unknown)}")
        args = cls(**{k: raw[k] for k in known & raw.keys()})
        if "quantization" in raw:
            args.quantization = raw["quantization"]
        if fmt == 1 and args.rope_scaling:  # format 1 knew one scaling, Llama-3.1's, and wrote no type
            args.rope_scaling = {"rope_type": "llama3", **args.rope_scaling}
        return args


CONFIG_FORMAT = 2  # what the converters write: every field, FORMAT_2's included
FORMAT_2 = ("qk_norm", "post_norms", "mlp_act", "embed_scale", "sliding_window", "local_layers", "local_rope_base")


def _gemma3(n_layer, dim, n_head, n_kv, ff, window=1024, **kw):
    """Gemma 3: layers 0-4 local, 5 global, ... (query_pre_attn_scalar lives in the converted weights)."""
    return dict(block_size=131072, vocab_size=262208, n_layer=n_layer, n_head=n_head, n_local_heads=n_kv, dim=dim,
                intermediate_size=ff, head_dim=256, rope_base=1e6, norm_eps=1e-6, tie_embeddings=True,
                rope_scaling=dict(rope_type="linear", factor=8.0), qk_norm=True, post_norms=True,
                mlp_act="gelu_tanh", embed_scale=math.sqrt(dim), sliding_window=window,
                local_layers=[i for i in range(n_layer) if (i + 1) % 6], local_rope_base=10000.0) | kw


_L31 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=8192)
_L32 = dict(block_size=131072, vocab_size=128256, n_local_heads=8, intermediate_size=8192, rope_base=500000.0,
            rope_scaling=_L31 | dict(factor=32.0), tie_embeddings=True)
_Q3 = dict(block_size=40960, vocab_size=151936, n_local_heads=8, head_dim=128, rope_base=1e6, norm_eps=1e-6,
           qk_norm=True)
_PHI3 = dict(vocab_size=32064, n_layer=32, n_head=32, n_local_heads=32, dim=3072, intermediate_size=8192, head_dim=96)
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
    "llama-3.2-1b": _L32 | dict(n_layer=16, n_head=32, dim=2048, head_dim=64),
    "llama-3.2-3b": _L32 | dict(n_layer=28, n_head=24, dim=3072, head_dim=128),
    "mistral-7b": dict(block_size=32768, vocab_size=32768, n_layer=32, n_head=32, n_local_heads=8, dim=4096,
                       intermediate_size=14336, head_dim=128, rope_base=1000000.0),  # v0.3
    "qwen2-7b": dict(block_size=32768, vocab_size=152064, n_layer=28, n_head=28, n_local_heads=4, dim=3584,
                     intermediate_size=18944, head_dim=128, rope_base=1000000.0, norm_eps=1e-6, qkv_bias=True),
    "qwen3-0.6b": _Q3 | dict(n_layer=28, n_head=16, dim=1024, intermediate_size=3072, tie_embeddings=True),
    "qwen3-4b": _Q3 | dict(n_layer=36, n_head=32, dim=2560, intermediate_size=9728, tie_embeddings=True),
    "qwen3-8b": _Q3 | dict(n_layer=36, n_head=32, dim=4096, intermediate_size=12288),
    "gemma-3-1b": _gemma3(26, 1152, 4, 1, 6912, window=512, block_size=32768, vocab_size=262144, rope_scaling=None),
    "gemma-3-4b": _gemma3(34, 2560, 8, 4, 10240),
    "gemma-3-12b": _gemma3(48, 3840, 16, 8, 15360),
    "phi-3-mini-4k": _PHI3 | dict(block_size=4096, sliding_window=2047, local_layers=list(range(32))),  # as HF
    # LongRoPE factors: placeholders (1.0) for bench.py's random weights; a checkpoint's config.json has the real ones
    "phi-3-mini-128k": _PHI3 | dict(block_size=131072, rope_scaling=dict(
        rope_type="longrope", short_factor=[1.0] * 48, long_factor=[1.0] * 48, original_max_position_embeddings=4096,
        attention_factor=math.sqrt(1 + math.log(32) / math.log(4096)))),
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


def rope_frequencies(args: ModelArgs, length: int, local: bool = False) -> torch.Tensor:
    """[length, head_dim // 2, 2] (cos, sin) for positions 0..length-1; `local`: the sliding-window layers' own
    base, unscaled (Gemma 3). LongRoPE (Phi-3): the short factors' rows, then the long ones', times the attention
    factor; prefill picks a set per run by the prompt's length, as transformers does for a prompt (past the
    original context mid-generation, transformers re-encodes everything with the long set; a cache cannot)."""
    base, s = (args.local_rope_base, None) if local else (args.rope_base, args.rope_scaling)
    inv = 1.0 / (base ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim))
    kind, scale = s["rope_type"] if s else "default", 1.0
    if kind == "llama3":  # Llama-3.1: stretch long wavelengths, keep short ones, blend in between
        wavelen = 2 * math.pi / inv
        low_wl = s["original_max_position_embeddings"] / s["low_freq_factor"]
        high_wl = s["original_max_position_embeddings"] / s["high_freq_factor"]
        smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
            s["high_freq_factor"] - s["low_freq_factor"])
        blended = (1 - smooth) * inv / s["factor"] + smooth * inv
        inv = torch.where(wavelen > low_wl, inv / s["factor"], torch.where(wavelen < high_wl, inv, blended))
    elif kind == "linear":  # Gemma 3's global layers: positions divided by the factor
        inv = inv / s["factor"]
    elif kind == "factors":  # llama.cpp's per-dimension divisors (a Llama 3.x GGUF's rope_freqs)
        inv = inv / torch.tensor(s["factors"], dtype=torch.float64)
    elif kind == "longrope":
        inv = torch.stack([inv / torch.tensor(s[f], dtype=torch.float64) for f in ("short_factor", "long_factor")])
        scale = s["attention_factor"]
    elif kind != "default":
        raise ValueError(f"unknown rope_type {kind!r}")
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv[..., None, :]  # [(2,) length, D/2]
    return (torch.stack([angles.cos(), angles.sin()], dim=-1) * scale).float().reshape(-1, args.head_dim // 2, 2)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] in the interleaved layout; rope [B, T, D//2, 2] for each token's position."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = rope[..., 0].unsqueeze(2), rope[..., 1].unsqueeze(2)
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], dim=-1)
    return out.flatten(-2).type_as(x)


DECODE_GEMM = True  # Linear's decode-step kernel on CUDA (bench.py --no_decode_gemm times cuBLAS instead)


class Linear(nn.Linear):
    """nn.Linear; on CUDA a decode step's call (at most 16 rows, 16-bit, no bias) of a projection at most as wide
    as its input (wo, w2) runs triton_kernels.decode_linear, which streamed Llama-3-8B's wo and w2 at 3.0 and
    3.9 TB/s on the H200 where cuBLAS took 2.5 and 3.7 (BENCHMARKS.md, session 14); cuBLAS kept the wider ones."""

    def forward(self, x):
        if (DECODE_GEMM and x.is_cuda and self.bias is None and x.numel() <= 16 * x.shape[-1]
                and self.in_features % 16 == 0 and self.out_features <= self.in_features
                and x.dtype in (torch.bfloat16, torch.float16) and self.weight.dtype == x.dtype):
            from triton_kernels import decode_linear  # Triton: imported only on CUDA
            return decode_linear(x, self.weight)
        return F.linear(x, self.weight, self.bias)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int = 0):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = args.n_head, args.n_local_heads, args.head_dim
        self.wqkv = Linear(args.dim, (args.n_head + 2 * args.n_local_heads) * args.head_dim, bias=args.qkv_bias)
        self.wo = Linear(args.n_head * args.head_dim, args.dim, bias=False)
        # Qwen3, Gemma 3: per-head norms (their weights permuted like q/k's head dims by the converter)
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps) if args.qk_norm else nn.Identity()
        # a sliding-window layer: prefill masks beyond the window, the cache (a ring) holds only the window
        self.window = args.sliding_window if layer in args.local_layers else 0
        self.kv_cache = None  # set by Transformer.setup_caches

    def qkv(self, x, rope):
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split([self.n_head * self.head_dim, self.n_kv * self.head_dim,
                                      self.n_kv * self.head_dim], dim=-1)
        q = apply_rope(self.q_norm(q.view(B, T, self.n_head, self.head_dim)), rope)
        k = apply_rope(self.k_norm(k.view(B, T, self.n_kv, self.head_dim)), rope)
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
        out = torch.cat([causal_attention(q[:, :, i:i + chunk], k, v, pos[:, i:i + chunk], pos, self.window)
                         for i in range(0, q.shape[2], chunk)], dim=2)
        return self.wo(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


def causal_attention(q, k, v, q_pos, k_pos, window=0):
    """Prompt attention of a chunk of queries against every prompt key; padding (pos -1) is masked, and keys
    `window` or more back if given. q [B, H, C, D], k/v [B, H_kv, T, D]; the mask is [B, 1, C, T], never T x T."""
    kp, qp = k_pos[:, None, None, :], q_pos[:, None, :, None]
    allowed = (kp >= 0) & (kp <= qp) & ((kp > qp - window) if window else True)
    allowed = allowed | (qp < 0)  # padding queries attend to anything: no NaN rows
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=q.shape[1] != k.shape[1])


ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}  # Gemma: GELU-tanh


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        # gate (w1) and up (w3) stacked: one GEMM reads both (checkpoints keep w1, w3: fuse_gate_up)
        self.w13 = Linear(args.dim, 2 * args.intermediate_size, bias=False)
        self.w2 = Linear(args.intermediate_size, args.dim, bias=False)  # down
        self.act = ACTIVATIONS[args.mlp_act]

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(self.act(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int = 0):
        super().__init__()
        self.attention = Attention(args, layer)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        # Gemma 3's sandwich: each sublayer's output normed too, before the residual add
        self.post_attention_norm = RMSNorm(args.dim, args.norm_eps) if args.post_norms else nn.Identity()
        self.post_ffn_norm = RMSNorm(args.dim, args.norm_eps) if args.post_norms else nn.Identity()

    def mlp(self, h):
        return self.post_ffn_norm(self.feed_forward(self.ffn_norm(h)))

    def forward(self, x, rope, input_pos):
        h = x + self.post_attention_norm(self.attention(self.attention_norm(x), rope, input_pos))
        return h + self.mlp(h)

    def feed(self, x, rope, pos):
        h = x + self.post_attention_norm(self.attention.feed(self.attention_norm(x), rope, pos))
        return h + self.mlp(h)

    def prefill(self, x, rope, pos, chunk):
        h = x + self.post_attention_norm(self.attention.prefill(self.attention_norm(x), rope, pos, chunk))
        return h + torch.cat([self.mlp(h[:, i:i + chunk]) for i in range(0, h.shape[1], chunk)], dim=1)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.build_rope()

    def build_rope(self, device=None):
        """fp32 RoPE tables whatever the weights' dtype (so: again after a cast): `rope`, `rope_local` (Gemma's
        local layers), `rope_offset` (the first row of the run's LongRoPE factor set; else 0)."""
        a = self.args
        self.register_buffer("rope", rope_frequencies(a, a.block_size).to(device), persistent=False)
        local = rope_frequencies(a, a.block_size, local=True).to(device) if a.local_rope_base else None
        self.register_buffer("rope_local", local, persistent=False)
        self.register_buffer("rope_offset", torch.zeros((), dtype=torch.long, device=device), persistent=False)

    def setup_caches(self, caches: list[nn.Module]):
        """One cache object per layer (built by cache.make_caches); replaces any previous ones. The
        generation count tells a captured CUDA graph (generate.DecodeGraph) that its buffers are gone."""
        for layer, cache in zip(self.layers, caches, strict=True):
            layer.attention.kv_cache = cache
        self.cache_generation = getattr(self, "cache_generation", 0) + 1

    def ropes(self, pos):
        """The RoPE rows [*pos.shape, D/2, 2] of positions pos, for global and for sliding-window layers."""
        rope = self.rope[pos + self.rope_offset]
        return rope, (rope if self.rope_local is None else self.rope_local[pos])

    def embed(self, tokens):  # Gemma: times sqrt(dim), rounded to the weights' dtype as transformers does
        x = self.tok_embeddings(tokens)
        return x if self.args.embed_scale == 1.0 else x * torch.tensor(self.args.embed_scale, dtype=x.dtype)

    def forward(self, tokens, input_pos, layer_step=None):
        """One decode step: tokens [B, 1], input_pos [B] -> logits [B, 1, vocab] (fp32). `layer_step`, if
        given, runs each block (generate.compile_decode: one compiled TransformerBlock.forward for all)."""
        ropes = self.ropes(input_pos[:, None])  # [B, 1, D/2, 2] each
        x = self.embed(tokens)
        for layer in self.layers:
            rope = ropes[1 if layer.attention.window else 0]
            x = layer_step(layer, x, rope, input_pos) if layer_step else layer(x, rope, input_pos)
        return self.output(self.norm(x)).float()

    def feed(self, tokens, input_pos, all_logits: bool = False):
        """Teacher-force tokens [B, n] from positions input_pos [B]: the computation of n decode steps
        (each layer's cache takes, scores and evicts the tokens one at a time, in order), but layer by
        layer, so each weight matrix is read once for the n tokens. -> the last token's logits
        [B, vocab] (every token's [B, n, vocab] with all_logits)."""
        pos = input_pos[:, None] + torch.arange(tokens.shape[1], device=tokens.device)
        ropes = self.ropes(pos)
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer.feed(x, ropes[1 if layer.attention.window else 0], pos)
        return self.output(self.norm(x if all_logits else x[:, -1])).float()

    def prefill(self, tokens, pos, chunk: int = 1024, all_logits: bool = False):
        """Prompt tokens [B, T] at positions pos [B, T] (-1 = left padding) -> last-token logits
        [B, vocab] (or every token's [B, T, vocab] with all_logits, for scoring and tests)."""
        s = self.args.rope_scaling
        if s and s["rope_type"] == "longrope":  # this run's factor set, by the prompt's length (rope_frequencies)
            self.rope_offset.fill_(self.args.block_size if tokens.shape[1] > s["original_max_position_embeddings"] else 0)
        ropes = self.ropes(pos.clamp(min=0))
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer.prefill(x, ropes[1 if layer.attention.window else 0], pos, chunk)
        return self.output(self.norm(x if all_logits else x[:, -1])).float()


def fuse_gate_up(state: dict) -> dict:
    """A checkpoint's gate and up projections (feed_forward.w1, .w3, as every converter and older quantize.py
    runs write them) stacked as FeedForward's w13, gate first; int4's scales_and_zeros [in / g, out, 2] stack
    on their output axis (1), every other tensor on axis 0."""
    for k in [k for k in state if ".feed_forward.w1." in k]:
        gate, up = state.pop(k), state.pop(k.replace(".w1.", ".w3."))
        state[k.replace(".w1.", ".w13.")] = torch.cat([gate, up], dim=1 if k.endswith("scales_and_zeros") else 0)
    return state


def load_model(checkpoint_dir, device="cpu", dtype=torch.bfloat16) -> Transformer:
    """Load a converted checkpoint (scripts/; quantize.py's too): config.json + model.safetensors, memory-mapped."""
    from safetensors.torch import load_file
    checkpoint_dir = Path(checkpoint_dir)
    args = ModelArgs.from_json(checkpoint_dir / "config.json")
    quant = None
    if args.quantization:  # scripts/quantize.py's checkpoints: quantized modules in place of the Linear layers
        import quant
    with torch.device("meta"):
        model = Transformer(args)
        if quant:
            quant.swap(model, quant.check_spec(args.quantization, args))
    state = fuse_gate_up(load_file(checkpoint_dir / "model.safetensors", device="cpu"))  # mmap: pages load on demand
    if quant:  # a tied output: the embedding's int8 table and scales
        state = quant.complete(state, model, checkpoint_dir / "model.safetensors")
    elif args.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    if args.tie_embeddings and not quant:
        model.output.weight = model.tok_embeddings.weight
    model.rope = model.rope_local = model.rope_offset = None  # meta tensors cannot be moved: built below
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    model.build_rope(device)  # fp32 whatever the dtype
    return quant.finish(model) if quant else model
