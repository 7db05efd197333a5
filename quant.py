"""Weight-only quantization, gpt-fast style: the weights are stored in fewer bits, activations stay in floating point.

- int8: per output channel, symmetric: q = round(w / s), s = max|w_row| / 127, q in [-127, 127].
- int4: per group of `groupsize` input channels, asymmetric (min/max, as gpt-fast and torchao's tinygemm
  layout): q = round((w - min) / s), s = (max - min) / 15, q in [0, 15]; stored as (scale, zero) with
  zero = min + 8 s, since the kernels dequantize (q - 8) * scale + zero.
- The output projection is int8 in both modes (as llama.cpp's Q4 mixes keep theirs at 6+ bits): int4 at
  group 32 cost the default model a sixth of its top-1 agreement, all of it from this one matrix, and
  bought little time (a [49152, 576] int4 GEMV took 1.5 ms on one core, the int8 one 1.9 ms).
- Embeddings: the table is gathered, not streamed, but it is a fifth of a small model's bytes; it is int8 per
  row (gathered, then scaled). A tied output projection is that same int8 table (a row's scale is its output
  channel's): one tensor serves both.

Kernels (torch's own, and on CUDA our int8 decode GEMM; checked at import, else a plain dequantize-then-matmul,
slower but exact):
- CPU int8: aten._weight_int8pack_mm with bf16 activations (its fp32 path measured 3x slower than an fp32
  F.linear on this machine's one core, the bf16 one 3x faster); the result is cast back to the model's dtype.
- CPU int4: aten._weight_int4pack_mm_for_cpu, bf16 activations likewise (fp32: 25x slower than bf16).
- CUDA int8: a decode step (at most 16 rows, 16-bit activations) runs triton_kernels.decode_linear, which
  streams the int8 codes once, converts them to the MMA's operand in registers and applies the scales to the
  sums; more rows (prefill): the weight dequantized, then a matmul (it writes the weight in bf16 first).
- CUDA int4: aten._weight_int4pack_mm (tinygemm), bf16 only, on the tiled layout of
  _convert_weight_to_int4pack (K a multiple of 32; innerKTiles the largest of 8, 4, 2 that divides K / 16).
A checkpoint holds the portable form (int4: two codes a byte, the even column in the high nibble); `finish`
packs it for the device it was loaded on.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

MODES = ("int8", "int4")
GROUPSIZES = (32, 64, 128, 256)
LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")
ATEN = torch.ops.aten
HAS = {n: hasattr(ATEN, n) for n in ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu",
                                     "_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm",
                                     "_convert_weight_to_int4pack")}


# ---- quantize / dequantize (plain tensors) ----------------------------------------------------------
def quantize_int8(w: torch.Tensor):
    """w [N, K] -> (q int8 [N, K], scales fp32 [N]); a zero row gets scale 1 (its codes are all 0)."""
    w = w.float()
    amax = w.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def dequantize_int8(q, scales):
    return q.float() * scales.float()[:, None]


def quantize_int4(w: torch.Tensor, groupsize: int):
    """w [N, K] -> (codes uint8 [N, K/2], scales_and_zeros fp32 [K/g, N, 2]). A constant group (max = min)
    gets scale 1e-12: its codes are 0 and it dequantizes to min exactly (in fp32)."""
    N, K = w.shape
    g = w.float().reshape(N, K // groupsize, groupsize)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8).reshape(N, K)
    zeros = lo + 8 * scales
    return pack_nibbles(q), torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()


def pack_nibbles(q):  # [N, K] in 0..15 -> [N, K/2] uint8, the even column in the high nibble (CUDA's input)
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)


def unpack_nibbles(codes):
    return torch.stack([codes >> 4, codes & 15], dim=-1).reshape(codes.shape[0], -1)


def dequantize_int4(codes, scales_and_zeros, groupsize):
    q = unpack_nibbles(codes).float()
    N, K = q.shape
    sz = scales_and_zeros.float().transpose(0, 1)  # [N, K/g, 2]
    return ((q.reshape(N, K // groupsize, groupsize) - 8) * sz[..., :1] + sz[..., 1:]).reshape(N, K)


# ---- modules -----------------------------------------------------------------------------------------
class Int8Linear(nn.Module):
    """y = (x @ q^T) * scales (+ bias); q int8 [out, in], scales [out] in the model's dtype."""

    def __init__(self, in_features, out_features, bias=False):
        super().__init__()
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

        self.register_buffer("scales_mm", None, persistent=False)  # `pack`: as the kernel takes them (bf16 on CPU)

    def pack(self, check=False):
        cpu = self.weight.is_cpu and HAS["_weight_int8pack_mm"]
        self.weight = aligned(self.weight)
        # a buffer, not a cast in the graph: inductor's lowering of the CPU op wants its scales realized
        self.scales_mm = self.scales.to(torch.bfloat16) if cpu else self.scales
        if check:
            verify(self, dequantize_int8(self.weight, self.scales_mm))

    def forward(self, x):
        y = int8_matmul(x.reshape(-1, x.shape[-1]), self.weight, self.scales_mm).reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def int8_matmul(x, q, scales):
    """x [M, K] @ dequantized(q)^T -> [M, N] in x's dtype; scales bf16 on CPU (Int8Linear.pack)."""
    if x.is_cpu and scales.dtype == torch.bfloat16 and HAS["_weight_int8pack_mm"]:
        return ATEN._weight_int8pack_mm(x.to(torch.bfloat16), q, scales).to(x.dtype)
    if x.is_cuda and x.shape[0] <= 16 and x.shape[1] % 16 == 0 and x.dtype in (torch.bfloat16, torch.float16):
        from triton_kernels import decode_linear  # a decode step: the codes streamed once, never dequantized
        return decode_linear(x, q, scales)
    return F.linear(x, q.to(x.dtype)) * scales.to(x.dtype)


class Int4Linear(nn.Module):
    """Groupwise int4: `weight` holds the portable codes [out, in/2] until `pack` turns them into the
    device kernel's layout; scales_and_zeros [in/g, out, 2] (bf16 once packed: what the kernels take)."""

    def __init__(self, in_features, out_features, bias=False, groupsize=64):
        super().__init__()
        self.in_features, self.out_features, self.groupsize, self.layout = in_features, out_features, groupsize, "codes"
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.empty(in_features // groupsize, out_features, 2))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    @torch.no_grad()
    def pack(self, check=False):
        """The codes in the layout of this device's kernel (once, after loading and moving)."""
        w, sz = self.weight, self.scales_and_zeros.to(torch.bfloat16)
        reference = dequantize_int4(w, sz, self.groupsize) if check else None
        if w.is_cpu and HAS["_convert_weight_to_int4pack_for_cpu"] and HAS["_weight_int4pack_mm_for_cpu"]:
            self.weight, self.layout = ATEN._convert_weight_to_int4pack_for_cpu(unpack_nibbles(w).int(), 1), "cpu"
        elif w.is_cuda and HAS["_convert_weight_to_int4pack"] and self.in_features % 32 == 0 and self.out_features % 8 == 0:
            tiles = next(t for t in (8, 4, 2) if self.in_features % (16 * t) == 0)
            self.weight, self.layout = ATEN._convert_weight_to_int4pack(w.contiguous(), tiles), "cuda"
        else:  # no kernel for this device or shape: dequantize at every call (slow, exact)
            sz, self.layout = self.scales_and_zeros, "dequantize"
        self.scales_and_zeros = sz
        if check:
            verify(self, reference)

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        if self.layout == "cpu":
            y = ATEN._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), self.weight, self.groupsize, self.scales_and_zeros)
        elif self.layout == "cuda":
            y = ATEN._weight_int4pack_mm(x2.to(torch.bfloat16), self.weight, self.groupsize, self.scales_and_zeros)
        else:
            y = F.linear(x2, dequantize_int4(self.weight, self.scales_and_zeros, self.groupsize).to(x.dtype))
        y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


@torch.no_grad()
def verify(module, w_ref):
    """The packed kernel against F.linear of the dequantized weights on random bf16 rows (1 and 3: both
    paths); a wrong layout is off by the outputs' own size, bf16 rounding by well under 2% of it."""
    for rows in (1, 3):
        x = torch.randn(rows, w_ref.shape[1], device=w_ref.device).to(torch.bfloat16)
        ref = F.linear(x.float(), w_ref.float()) + (0 if module.bias is None else module.bias.float())
        err = (module(x).float() - ref).abs().max()
        if not err <= 0.02 * ref.abs().max() + 1e-3:
            raise RuntimeError(f"{type(module).__name__} {tuple(w_ref.shape)} on {w_ref.device}: the kernel is off by "
                               f"{err:.3g} (outputs up to {ref.abs().max():.3g}) from its dequantized weights")


class Int8Embedding(nn.Module):
    """Rows gathered in int8, then scaled: only the looked-up rows are dequantized."""

    def __init__(self, num, dim):
        super().__init__()
        self.register_buffer("weight", torch.empty(num, dim, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(num))

    def forward(self, tokens):
        return F.embedding(tokens, self.weight).to(self.scales.dtype) * self.scales[tokens, None]


# ---- whole models ------------------------------------------------------------------------------------
def check_spec(spec: dict, args) -> dict:
    """A checkpoint's or a flag's {"mode": ..., "groupsize": ...}, checked against the model's shapes."""
    mode = spec.get("mode") if isinstance(spec, dict) else None
    if mode not in MODES or set(spec) - {"mode", "groupsize"}:
        raise ValueError(f"quantization {spec!r}: give mode int8 or int4 (and a groupsize for int4)")
    if mode == "int8":
        return {"mode": mode}
    g = spec.get("groupsize")
    inputs = {args.dim, args.n_head * args.head_dim, args.intermediate_size}
    if g not in GROUPSIZES:
        raise ValueError(f"int4 groupsize {g!r}: give one of {', '.join(map(str, GROUPSIZES))}")
    if bad := sorted(k for k in inputs if k % g):
        raise ValueError(f"int4 groupsize {g} does not divide the input width(s) {', '.join(map(str, bad))} of "
                         f"{args.name}'s layers; give one of {', '.join(str(x) for x in GROUPSIZES if not any(k % x for k in inputs))}")
    return {"mode": mode, "groupsize": g}


def targets(model):
    """(parent module, attribute) of every projection that is quantized: the blocks' and the output."""
    for layer in model.layers:
        for path in LINEARS:
            parent, name = path.split(".")
            yield getattr(layer, parent), name
    yield model, "output"


def empty_linear(lin: nn.Linear, spec, name="") -> nn.Module:
    if spec["mode"] == "int8" or name == "output":  # the output projection: int8 in both modes (docstring)
        return Int8Linear(lin.in_features, lin.out_features, lin.bias is not None)
    return Int4Linear(lin.in_features, lin.out_features, lin.bias is not None, spec["groupsize"])


def swap(model, spec):
    """Empty quantized modules in place of the Linear layers and the embedding (load_model: under
    torch.device('meta'), then filled by load_state_dict(assign=True) and `finish`ed)."""
    for parent, name in targets(model):
        setattr(parent, name, empty_linear(getattr(parent, name), spec, name))
    model.tok_embeddings = Int8Embedding(model.args.vocab_size, model.args.dim)


def tie(model):
    """A tied output projection in int8 is the embedding's int8 table and scales themselves."""
    if model.args.tie_embeddings and isinstance(model.output, Int8Linear):
        model.output.weight, model.output.scales = model.tok_embeddings.weight, model.tok_embeddings.scales


def aligned(t):
    """t, or a copy at a fresh (64-byte aligned) address: a memory-mapped checkpoint places tensors 8-byte
    aligned, and the CPU int8 kernel (torch 2.13) crashed on a [48, 576] input against such a weight."""
    return t if t.data_ptr() % 64 == 0 else t.clone()


def finish(model, check=False):
    """After loading and moving to the device: re-tie (a move copies each module's buffers apart) and pack;
    `check`: each packed kernel against its dequantized weights (`verify`; bench.py's quantized rows)."""
    model.tok_embeddings.weight = aligned(model.tok_embeddings.weight)
    tie(model)
    for m in model.modules():
        if isinstance(m, Int8Linear) or isinstance(m, Int4Linear) and m.layout == "codes":
            m.pack(check)
    return model


@torch.no_grad()
def quantize_model(model, spec, pack=True, check=False):
    """Quantize a loaded model in place, keeping each tensor on its device, scales in the model's dtype.
    pack=False leaves int4 in the portable layout (scripts/quantize.py saves that)."""
    spec = check_spec(spec, model.args)
    dtype = model.norm.weight.dtype
    for parent, name in targets(model):
        lin = getattr(parent, name)
        with torch.device("meta"):
            new = empty_linear(lin, spec, name)
        w = lin.weight
        if isinstance(new, Int8Linear):
            new.weight, new.scales = quantize_int8(w)
        else:
            new.weight, new.scales_and_zeros = quantize_int4(w, spec["groupsize"])
        if lin.bias is not None:
            new.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        setattr(parent, name, new.to(dtype))  # casts the float scales only
    with torch.device("meta"):
        emb = Int8Embedding(model.args.vocab_size, model.args.dim)
    emb.weight, emb.scales = quantize_int8(model.tok_embeddings.weight)
    model.tok_embeddings = emb.to(dtype)
    model.args.quantization = spec
    tie(model)
    return finish(model, check) if pack else model


def state_to_save(model) -> dict:
    """The quantized model's tensors for a checkpoint: contiguous, the tied int8 output left out (load ties it)."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.args.tie_embeddings and isinstance(model.output, Int8Linear):
        del state["output.weight"], state["output.scales"]
    return state


def complete(state: dict, model, path) -> dict:
    """load_model: a checkpoint's tensors plus what a tied int8 output takes from the embedding; a missing
    tensor is named (load_state_dict's own message puts the names past its first line)."""
    if model.args.tie_embeddings and isinstance(model.output, Int8Linear) and "tok_embeddings.scales" in state:
        state |= {"output.weight": state["tok_embeddings.weight"], "output.scales": state["tok_embeddings.scales"]}
    if missing := [k for k in model.state_dict() if k not in state]:
        raise ValueError(f"{path} lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    return state


def stored_bytes(model) -> int:
    """The quantized projections' codes and scales as stored (a tied int8 output counted: it is streamed)."""
    return sum(t.numel() * t.element_size() for parent, name in targets(model)
               for k, t in getattr(parent, name).state_dict().items() if k != "bias")  # bias: a parameter
