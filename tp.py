"""Tensor parallelism over KV heads, gpt-fast's tp.py in plain torch.distributed (launched with torchrun).

Rank r of N holds KV heads [r H_kv/N, (r+1) H_kv/N) of every layer: their rows of the fused wqkv (its query
heads' q, its K and V heads), the matching columns of wo, a 1/N slice of the MLP's hidden units (rows of w13's
gate and up halves, columns of w2), and only those heads' KV cache, so per-head eviction, retrieval selection
and head budgets run where the heads are. wo and w2 produce partial sums: one all-reduce after each (a forward
hook, so the compiled decode step traces it and the CUDA graph captures NCCL's kernel). An untied output
projection is split by vocabulary rows (its logits all-gathered: it is read every step) when N divides the
vocabulary; the embedding table (a gather of B rows a step), a tied output and the norms stay
replicated. Every rank ends with the same logits. The few
strategies whose rule spans a layer's heads exchange what they need (cache.py: TOVA, AdaKV, HeadKV and
DiliLazyKV, random; each class says how). Backend: NCCL on CUDA, gloo on CPU. Imported only when
WORLD_SIZE > 1 (generate.py, eval.py --tensor_parallel, bench.py).
"""
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

import cache as kv


def rank_world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment: (0, 1) when not launched by it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init(device: str) -> str:
    """Join the process group (NCCL on CUDA, gloo on CPU); returns this rank's device (cuda:LOCAL_RANK)."""
    rank, world = rank_world()
    if device.startswith("cuda"):
        # NVLink multicast off unless set otherwise: on a shared host it can take the GPUs out of service
        for name, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
            os.environ.setdefault(name, value)
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(hours=2),
                                **({"device_id": torch.device(device)} if device.startswith("cuda") else {}))
    return device


def check_divides(args, world: int):
    """The reason `world` ranks cannot split this model, or None."""
    if args.n_local_heads % world:
        return f"{world} processes do not divide the model's {args.n_local_heads} KV heads; use a divisor of it"
    if args.intermediate_size % world:
        return f"{world} processes do not divide the model's MLP width {args.intermediate_size}"
    if args.quantization:  # quant.py's packed codes are not split here (yet): use the float checkpoint
        return f"a weight-quantized checkpoint ({args.quantization['mode']}) cannot be split yet; use the float one"
    return None


def all_reduce(x):
    """Sum over ranks; traceable (torch.compile fullgraph) and captured by CUDA graphs."""
    return funcol.all_reduce(x, "sum", dist.group.WORLD)


def all_gather(x, dim: int):
    """Every rank's x, concatenated along `dim` in rank order; traceable like all_reduce. Gathered along dim 0
    and re-cut here: along another dim, torch 2.11's funcol splits it in a function dynamo will not trace
    (a graph break, so a fullgraph compile of the step fails)."""
    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # its newer name (torch 2.13)
    y = gather(x.contiguous(), 0, dist.group.WORLD)
    return y if dim == 0 else torch.cat(y.chunk(y.shape[0] // x.shape[0], 0), dim)


def all_gather_heads(x):
    """x [B, H_local, ...] of every rank -> [B, H, ...], heads in rank order (the single-process layout)."""
    return all_gather(x, 1)


def sum_over_ranks(n: int) -> int:
    """An integer summed over ranks (eager: the whole model's cache bytes for eval's records)."""
    t = torch.tensor([n], dtype=torch.long, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return int(t.item())


def _reduce_hook(module, inputs, output):
    # one function for every layer's wo and w2 (not a closure each): the regional compile of one
    # TransformerBlock.forward reused by all layers (generate.compile_decode) then guards on one object
    return all_reduce(output)


def _gather_vocab_hook(module, inputs, output):
    return all_gather(output, output.ndim - 1)  # the rank's slice of the vocabulary's logits -> all of them


def _rows(w, sizes, rank):
    """Rank's slice along dim 0 of each of the consecutive blocks of w given by `sizes` (each split N ways)."""
    world = dist.get_world_size()
    return torch.cat([b.chunk(world)[rank] for b in w.split(sizes)]).clone()  # clone: own only the slice


def shard_model(model, device):
    """Keep this rank's heads and MLP slice of a loaded (unsharded) model, in place, then move it to
    `device`. Sets cache.SHARD so make_caches gives each layer only this rank's heads."""
    rank, world = dist.get_rank(), dist.get_world_size()
    a = model.args
    if reason := check_divides(a, world):
        raise ValueError(reason)
    D, Hq, Hkv = a.head_dim, a.n_head, a.n_local_heads
    P = torch.nn.Parameter
    for layer in model.layers:
        att, ff = layer.attention, layer.feed_forward
        att.wqkv.weight = P(_rows(att.wqkv.weight, [Hq * D, Hkv * D, Hkv * D], rank), requires_grad=False)
        if att.wqkv.bias is not None:
            att.wqkv.bias = P(_rows(att.wqkv.bias, [Hq * D, Hkv * D, Hkv * D], rank), requires_grad=False)
        att.wo.weight = P(_rows(att.wo.weight.t(), [Hq * D], rank).t().contiguous(), requires_grad=False)
        att.n_head, att.n_kv = Hq // world, Hkv // world  # query heads of the rank's KV heads: contiguous
        ff.w13.weight = P(_rows(ff.w13.weight, [a.intermediate_size] * 2, rank), requires_grad=False)
        ff.w2.weight = P(_rows(ff.w2.weight.t(), [a.intermediate_size], rank).t().contiguous(), requires_grad=False)
        att.wo.register_forward_hook(_reduce_hook)
        ff.w2.register_forward_hook(_reduce_hook)
    if splits_output(model, world):
        model.output.weight = P(_rows(model.output.weight, [a.vocab_size], rank), requires_grad=False)
        model.output.register_forward_hook(_gather_vocab_hook)
    kv.SHARD = (rank, world)
    return model.to(device)


def splits_output(model, world: int) -> bool:
    """Whether N ranks split the output projection (untied, N divides the vocabulary)."""
    return not model.args.tie_embeddings and model.args.vocab_size % world == 0


def weight_split(model, world: int | None = None) -> tuple[int, int]:
    """(bytes of this rank's sharded weights, bytes of its replicated ones: embedding, norms, a tied or
    unsplit output). `world`: classify a whole model's weights as `world` ranks would split them."""
    world = world or (dist.get_world_size() if dist.is_initialized() else 1)
    sharded = replicated = 0
    for name, p in model.named_parameters():  # a tied output is the embedding table: counted once
        n = p.numel() * p.element_size()
        if (name.startswith("layers.") and any(s in name for s in ("wqkv", "wo", "w13", "w2"))) or \
                (name == "output.weight" and splits_output(model, world)):
            sharded += n
        else:
            replicated += n
    return sharded, replicated


def memory_line(model, cache_bytes: int) -> str:
    """This rank's weight and cache bytes: the sharded weights and the cache are 1/N of one process's
    (AdaKV's cache excepted, see cache.AdaKV); the replicated weights are whole on every rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    sharded, replicated = weight_split(model)
    return (f"rank {rank} of {world}: weights {sharded / 2**20:.2f} MiB sharded + {replicated / 2**20:.2f} MiB replicated "
            f"(embedding, norms{', output' if not splits_output(model, world) else ''}); cache {cache_bytes / 2**20:.2f} MiB "
            f"(bytes: sharded {sharded}, replicated {replicated}, cache {cache_bytes})")


def print_memory_lines(model, cache_bytes: int):
    """Every rank's memory_line, printed by rank 0 in rank order (lines printed by several processes at
    once can interleave mid-line)."""
    lines = [None] * dist.get_world_size()
    dist.all_gather_object(lines, memory_line(model, cache_bytes))
    if dist.get_rank() == 0:
        print("\n".join(lines), flush=True)


def close():
    if dist.is_initialized():
        dist.destroy_process_group()
