"""Every cache strategy on a tiny random model (6 KV heads, 12 query heads, MLP width 96: split 2 or 3
ways), run in one process (tests/test_tp.py) or as one rank of `torchrun ... tests/tp_worker.py OUT`,
which shards the model (tp.py) and saves each rank's logits, tokens, bytes and (with the word `compile`)
the compiled step's logits, tokens and compile counts to OUT/rank<r>.pt.

On GPUs (fp32; the decode step compiled as generate.compile_decode does: inductor, one CUDA graph holding
NCCL's all-reduces), the same against one GPU, ~2-3 minutes on a 2-GPU host:
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    python tests/tp_worker.py /tmp/tp compile cuda                     # one GPU -> /tmp/tp/one.pt
    torchrun --nproc_per_node 2 tests/tp_worker.py /tmp/tp compile cuda
    python tests/tp_worker.py /tmp/tp compare 2                        # a line per case; exit 1 on a mismatch
"""
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
import cache as kv  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402

SPARSE = {"snap_window": 8, "spotlight_prune": 0.9, "spotlight_recent": 4, "spotlight_sinks": 2, "quest_budget": 0.2, "quest_page_size": 4}
CASES = [(name, {}) for name in sorted(kv.REGISTRY)] + [
    ("l2", {"l2_one_shot": True, "l2_skip_layers": [0]}), ("lsh", {"lsh_hash_key": True}), ("tova", {"tova_per_head": True}),
    ("scissorhands", {"sh_drop": 3}), ("adakv", {"ada_alpha": 0.5}), ("snapkv", {"prompt_compression": "tova"})]
# the step with a collective in a strategy (tova), a global head index (random), and generate.compile_decode's
# CUDA layout on CPU: one compiled TransformerBlock.forward reused by every layer ("regional")
COMPILED = ["full", "tova", "random", "tova regional"]
B, T, STEPS = 2, 40, 12


def tiny_model():
    torch.manual_seed(0)
    args = ModelArgs.from_name("tiny")
    args.n_layer, args.n_head, args.n_local_heads, args.intermediate_size, args.dim = 3, 12, 6, 96, 48
    model = Transformer(args).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def learned_files(d: Path, args):
    """Random Spotlight hashes (one per KV head) and head scores (per query head), seeded: every rank
    and the single process write the same files."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    H, D = args.n_local_heads, args.head_dim
    save_file({f"layers.{i}.{n}": torch.randn(H, D, D, generator=g) * 0.3 if n[0] == "w" else torch.randn(H, D, generator=g)
               for i in range(args.n_layer) for n in ("w1", "b1", "w2", "b2")}, str(d / "spotlight.safetensors"))
    (d / "head_scores").mkdir(exist_ok=True)
    for kind, key in (("headkv", "headkv"), ("dililazy", "infscore")):
        scores = {f"{l}-{h}": {key: float(torch.rand(1, generator=g))} for l in range(args.n_layer) for h in range(args.n_head)}
        (d / "head_scores" / f"{kind}.json").write_text(json.dumps({"scores": scores}))
    return d


def run_case(model, name, params, ckpt, step=None):
    """A left-padded batch of 2 prompts, half-budget caches, STEPS greedy steps -> (logits [B, STEPS+1, V],
    tokens [B, STEPS], cache bytes)."""
    a = model.args
    params = dict(params)
    prompt_rule = params.pop("prompt_compression", "own")
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(0, a.vocab_size, (B, T), generator=g)
    pos = torch.arange(T).repeat(B, 1)
    pos[1] = (pos[1] - 7).clamp(min=-1)
    cfg = kv.CacheConfig(strategy=name, max_cache_length=["0.5"], prompt_compression=prompt_rule,
                         params={**SPARSE, **params}, checkpoint_dir=str(ckpt))
    dev = model.tok_embeddings.weight.device
    toks, pos = toks.to(dev), pos.to(dev)
    caches = kv.make_caches(a, cfg, B, T + STEPS + 1, STEPS + 1, dev, torch.float32)
    model.setup_caches(caches)
    with torch.no_grad():
        out = [model.prefill(toks, pos)]
        ip, tok, toks_out = pos[:, -1] + 1, out[0].argmax(-1, keepdim=True), []
        for _ in range(STEPS):
            toks_out.append(tok)
            out.append((step or model.forward)(tok, ip)[:, -1].clone())
            tok, ip = out[-1].argmax(-1, keepdim=True), ip + 1
    return torch.stack(out, 1).cpu(), torch.cat(toks_out, 1).cpu(), kv.cache_bytes(caches)


def run_all(model, ckpt, compiled=()):
    """{case: (logits, tokens, cache bytes)} eagerly for every case; for `compiled` strategies also a run of
    the decode step compiled (fullgraph) -> {name: (logits, tokens, graphs compiled, graph breaks)}."""
    from torch._dynamo.utils import counters
    eager = {f"{n} {p}": run_case(model, n, p, ckpt) for n, p in CASES}
    comp = {}
    for name in compiled:
        torch._dynamo.reset()
        counters.clear()
        if model.tok_embeddings.weight.is_cuda:  # as generate.py --compile: inductor, one CUDA graph
            import generate as gen
            step = gen.compile_decode(model, "cuda")
        elif name.endswith(" regional"):
            from model import TransformerBlock
            block = torch.compile(TransformerBlock.forward, fullgraph=True, backend="eager")
            step = lambda tok, ip: model.forward(tok, ip, layer_step=block)  # noqa: E731
        else:
            step = torch.compile(model.forward, fullgraph=True, backend="eager")
        with torch._dynamo.config.patch(error_on_recompile=True):
            logits, tokens, _ = run_case(model, name.split()[0], {}, ckpt, step)
        comp[name] = (logits, tokens, counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()))
    return eager, comp


def main(out: Path, compiled=(), device="cpu"):
    """Under torchrun: this rank's share -> OUT/rank<r>.pt; else one process -> OUT/one.pt."""
    import tp
    torch.set_num_threads(1)
    one = tp.rank_world()[1] == 1
    device = device if one else tp.init(device)
    model = tiny_model()
    (ckpt := out / f"files{tp.rank_world()[0]}{'one' if one else ''}").mkdir(parents=True)
    learned_files(ckpt, model.args)
    model = model.to(device) if one else tp.shard_model(model, device)
    eager, comp = run_all(model, ckpt, compiled)
    torch.save({"eager": eager, "compiled": comp, "weights": tp.weight_split(model)},
               out / ("one.pt" if one else f"rank{tp.rank_world()[0]}.pt"))
    tp.close()


def compare(out: Path, n: int) -> bool:
    """Print each case's verdict, ranks against one process (GPU runs); True if all agree."""
    ref, ok = torch.load(out / "one.pt"), True
    for i in range(n):
        got = torch.load(out / f"rank{i}.pt")
        for case, (logits, tokens, *_) in [*ref["eager"].items(), *ref["compiled"].items()]:
            g = got["eager"].get(case) or got["compiled"][case]
            same, diff = torch.equal(g[1], tokens), (g[0] - logits).abs().max().item()
            extra = f", compiled {g[2]} graph(s), {g[3]} break(s)" if case in ref["compiled"] else ""
            bad = not same or diff > 1e-2 or (extra and (g[2], g[3]) != (1, 0))
            print(f"rank {i} {case}: tokens {'identical' if same else 'DIFFER'}, max logit difference {diff:.2e}"
                  f"{extra}{' <- MISMATCH' if bad else ''}")
            ok = ok and not bad
    print("all ranks match one process" if ok else "MISMATCH: see the lines marked above")
    return ok


if __name__ == "__main__":
    words = sys.argv[2:]
    if "compare" in words:
        sys.exit(0 if compare(Path(sys.argv[1]), int(words[words.index("compare") + 1])) else 1)
    main(Path(sys.argv[1]), COMPILED if "compile" in words else (), "cuda" if "cuda" in words else "cpu")
