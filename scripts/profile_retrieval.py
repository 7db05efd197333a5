"""Where a retrieval decode step's time goes, one layer at a time (GPU; Llama-3-8B layer shape, RANDOM data).

    python scripts/profile_retrieval.py                      # context 32k, batch 1 and 8, Spotlight 90%/98% + Quest
    python scripts/profile_retrieval.py --context 4096 --batch 1

One layer's cache is filled with random K/V through its own prefill, then each piece of its decode step
is compiled (fullgraph) and timed as CUDA-graph replays (triton.testing.do_bench_cudagraph, median):
the whole layer step against the full cache's, and for Spotlight its parts (query hashing, the Triton
selection against the torch path's scores + top-k, the gather-attend kernel, the code write). A torch.profiler table of the
layer step (compiled, no CUDA graphs) lists its kernels. Multiply a per-layer time by the model's
non-dense layers (30 of 32) to compare with bench.py's per-token step.
"""
import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cache as kv  # noqa: E402
from bench import fill_caches, random_learned_files  # noqa: E402
from model import ModelArgs  # noqa: E402


def layer_cache(args, strategy, params, B, ctx, ckpt, layer=2):
    cfg = kv.CacheConfig(strategy=strategy, params=params, checkpoint_dir=str(ckpt))
    S = -(-(ctx + 64) // kv.ALLOC_STEP) * kv.ALLOC_STEP  # as make_caches allocates
    G = args.n_head // args.n_local_heads
    c = kv.REGISTRY[strategy](B, args.n_local_heads, S, args.head_dim, G, torch.bfloat16, layer, args.n_layer,
                              cfg).cuda()
    fill_caches(args, [c], B, ctx, "cuda", torch.bfloat16)
    return c


def cuda_graph_ms(fn):
    import triton.testing
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prune", type=float, nargs="+", default=[0.9, 0.98])
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's kernel table")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profile_retrieval.py times CUDA kernels: it needs a GPU (CPU smoke test: bench.py --gpu --tiny --cpu)")
    args = ModelArgs.from_name(a.model)
    ckpt = Path(tempfile.mkdtemp())
    random_learned_files(args, ckpt)
    H, G, D = args.n_local_heads, args.n_head // args.n_local_heads, args.head_dim
    compile_ = lambda f: torch.compile(f, fullgraph=True, dynamic=False)  # noqa: E731
    print(f"{args.name} layer shape, RANDOM K/V, bf16, {torch.cuda.get_device_name()}, context {a.context}; "
          f"median ms per layer, CUDA-graph replay")
    print("| batch | strategy | piece | ms / layer |")
    print("|---|---|---|---|")
    runs = [("full", {})] + [("spotlight", {"spotlight_prune": r}) for r in a.prune] + [("quest", {})]
    for B in a.batch:
        qg = torch.randn(B, H, G, D, device="cuda", dtype=torch.bfloat16)
        q, k_new, v_new = qg.view(B, H * G, 1, D), torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16), \
            torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16)
        ip = torch.full((B,), a.context, device="cuda")
        for name, params in runs:
            torch._dynamo.reset()
            c = layer_cache(args, name, params, B, a.context, ckpt)
            label = name + "".join(f" {v:g}" for v in params.values())
            pieces = {"layer step (write + select + attend)": compile_(lambda: c.decode(q, k_new, v_new, ip))}
            if name == "spotlight":
                sim = kv.hamming_sim(c.query_codes(qg), c.codes, c.d).sum(2)
                sel = c.select(qg, ip)
                from triton_kernels import gather_attend, spotlight_select
                pieces["query codes (hash MLP + pack)"] = compile_(lambda: c.query_codes(qg))
                forced = (c.pos < 4) | (c.pos > ip[:, None, None] - 64) | (c.pos == ip[:, None, None])
                K = sel[0].shape[-1]
                pieces["torch path: Hamming scores"] = compile_(
                    lambda: kv.hamming_sim(c.query_codes(qg), c.codes, c.d).sum(2))
                pieces[f"torch path: torch.topk selection (K={K})"] = compile_(
                    lambda: kv.topk_select(sim, forced, c.pos >= 0, c.n_select(ip + 1), K))
                pieces[f"torch path: count_select (K={K})"] = compile_(
                    lambda: kv.count_select((sim + c.d * G) // 2, forced, c.pos >= 0, c.n_select(ip + 1), K, c.d * G))
                pieces["Triton spotlight_select (codes -> selection)"] = compile_(
                    lambda: spotlight_select(c.query_codes(qg), c.codes[:, :, 0], c.pos, ip, c.n_select(ip + 1), K,
                                             c.d, 4, 64))
                pieces["gather-attend kernel"] = compile_(lambda: gather_attend(qg, c.k, c.v, *sel))
                pieces["write K/V/pos + key code"] = compile_(
                    lambda: (c.write(ip[:, None].expand(B, H), k_new, v_new, ip),
                             c.on_write(ip[:, None].expand(B, H), qg, k_new, v_new, ip)))
            for piece, fn in pieces.items():
                try:
                    print(f"| {B} | {label} | {piece} | {cuda_graph_ms(fn):.4f} |", flush=True)
                except Exception as e:  # one piece that fails to compile must not hide the others
                    print(f"| {B} | {label} | {piece} | failed: {type(e).__name__}: {str(e).splitlines()[0][:150]} |")
            if a.profile and name == "spotlight":
                step = pieces["layer step (write + select + attend)"]
                from torch.profiler import ProfilerActivity, profile
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(10):
                        step()
                    torch.cuda.synchronize()
                print(f"# profile: batch {B}, {label}, 10 layer steps (compiled, no CUDA graphs)")
                print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=70))
            del c
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
