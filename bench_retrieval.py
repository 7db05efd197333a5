"""Decode tokens/s of the retrieval strategies vs the full cache, at a Llama-3-8B shape with RANDOM weights.

    python bench_retrieval.py            # GPU: context 32k, batch 1 and 8, Spotlight 90%/98% pruned, Quest, full
    python bench_retrieval.py --tiny     # CPU smoke test at a tiny shape (seconds)

Weights, prompt K/V and Spotlight's hashes are random (speed does not depend on them; quality is
train_spotlight.py --eval's business). The caches are filled through each strategy's own prefill path
(codes, page bounds), then the decode step runs compiled (fullgraph, CUDA graphs on GPU) and is timed.
Printed per row: tok/s (all sequences), ms per step, KV bytes the step reads (selected rows + codes or
page bounds), and % of a roofline at --bandwidth GB/s over weights + those KV bytes.
"""
import argparse
import tempfile
import time
import traceback
from pathlib import Path

import torch

import cache as kv
import generate as gen
from bench import fill_caches, random_model, random_spotlight_hashes
from model import ModelArgs


def bench(model, args, strategy, params, B, ctx, steps, device, dtype, ckpt, bandwidth):
    torch._dynamo.reset()  # a fresh compile per configuration, never the recompile limit's eager fallback
    cfg = kv.CacheConfig(strategy=strategy, params=params, checkpoint_dir=str(ckpt))
    caches = kv.make_caches(args, cfg, B, ctx + steps + 8, steps + 8, device, dtype)
    model.setup_caches(caches)
    fill_caches(args, caches, B, ctx, device, dtype)
    step = gen.compile_decode(model, device)
    tok = torch.zeros(B, 1, dtype=torch.long, device=device)
    ip = torch.full((B,), ctx, dtype=torch.long, device=device)
    kv_read = kv.read_bytes(caches, ip)[0]  # the selection rows + the codes or page bounds scanned
    t0 = time.perf_counter()
    for _ in range(3):  # compile, capture, warm up
        tok = step(tok, ip).argmax(-1)
        ip = ip + 1
    gen.sync(device)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = step(tok, ip).argmax(-1)
        ip = ip + 1
    gen.sync(device)
    dt = (time.perf_counter() - t0) / steps
    roof = (gen.weight_bytes(model) + kv_read) / (bandwidth * 1e9)
    return dict(tok_s=B / dt, ms=dt * 1e3, kv_gb=kv_read / 1e9, roofline=roof / dt, compile_s=compile_s,
                cache_gb=kv.cache_bytes(caches) / 1e9)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny shape on CPU, a smoke test")
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--context", type=int, nargs="+", default=[32768])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prune", type=float, nargs="+", default=[0.9, 0.98])
    p.add_argument("--no_full", action="store_true", help="skip the full-cache rows (already measured)")
    p.add_argument("--quest_budget", type=float, nargs="*", default=[0.1], help="Quest rows (fractions); none to skip")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--layers", type=int, default=0, help="fewer layers for a quick look (0 = the model's)")
    p.add_argument("--bandwidth", type=float, default=3000.0, help="GB/s for the roofline (H100: ~3000)")
    p.add_argument("--check", action="store_true", help="also compare gather_attend with masked SDPA (CUDA)")
    p.add_argument("--block_mask", action="store_true", help="also read the selections through block masks")
    a = p.parse_args(argv)
    device = "cpu" if a.tiny or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    args = ModelArgs.from_name("tiny" if a.tiny else a.model)
    if a.tiny:
        args.n_layer, a.context, a.batch, a.steps = 4, [256], [1, 2], 3
    args.n_layer = a.layers or args.n_layer
    args.block_size = max(args.block_size, max(a.context) + a.steps + 8)
    model = random_model(args, device, dtype)
    ckpt = Path(tempfile.mkdtemp())
    random_spotlight_hashes(args, ckpt)
    if a.check and device == "cuda":
        check_kernel(args.head_dim)
        check_select(args.head_dim)
    runs = [] if a.no_full else [("full", {})]
    runs += [("spotlight", {"spotlight_prune": r}) for r in a.prune]
    runs += [("quest", {"quest_budget": b}) for b in a.quest_budget]
    if a.block_mask and device == "cuda":  # the same selections read through FlexAttention block masks
        runs += [(n, {**p, "block_mask": True}) for n, p in runs if n != "full"]
    print(f"{args.name} shape ({args.n_layer} layers), RANDOM weights and KV, {dtype}, {device}"
          f"{' ' + torch.cuda.get_device_name() if device == 'cuda' else ''}; {a.steps} timed steps")
    print("| context | batch | strategy | tok/s | ms/step | KV read/step (GB) | % roofline | cache (GB) |")
    print("|---|---|---|---|---|---|---|---|")
    for ctx in a.context:
        for B in a.batch:
            for name, params in runs:
                kv.GATHER_ON_CUDA = not params.get("block_mask")
                params = {k: v for k, v in params.items() if k != "block_mask"}
                label = name + "".join(f" {v:g}" for v in params.values()) + ("" if kv.GATHER_ON_CUDA else " (block mask)")
                try:
                    r = bench(model, args, name, params, B, ctx, a.steps, device, dtype, ckpt, a.bandwidth)
                except torch.OutOfMemoryError:
                    print(f"| {ctx} | {B} | {label} | out of memory | | | | |")
                    continue
                except Exception as e:  # one broken configuration must not hide the others
                    traceback.print_exc()
                    print(f"| {ctx} | {B} | {label} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} | | | | |")
                    continue
                finally:
                    model.setup_caches([None] * args.n_layer)
                    torch.cuda.empty_cache() if device == "cuda" else None
                print(f"| {ctx} | {B} | {label} | {r['tok_s']:.1f} | {r['ms']:.2f} | {r['kv_gb']:.3f} | "
                      f"{100 * r['roofline']:.0f}% | {r['cache_gb']:.2f} |", flush=True)


def check_kernel(D):
    """gather_attend vs masked SDPA on random selections (bf16)."""
    from triton_kernels import gather_attend
    g = torch.Generator(device="cuda").manual_seed(0)
    for B, H, G, S, K in [(1, 8, 4, 4096, 300), (3, 2, 3, 1000, 777)]:
        q = torch.randn(B, H, G, D, device="cuda", dtype=torch.bfloat16, generator=g)
        k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        idx = torch.rand(B, H, S, device="cuda", generator=g).argsort(-1)[..., :K]
        ok = torch.rand(B, H, K, device="cuda", generator=g) > 0.2
        mask = torch.zeros(B, H, S + 1, dtype=torch.bool, device="cuda").scatter(-1, idx.masked_fill(~ok, S), True)
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                               attn_mask=mask[:, :, None, :S])
        for how, f in (("eager", gather_attend), ("compiled", torch.compile(gather_attend, fullgraph=True))):
            err = (f(q, k, v, idx, ok).float() - ref).abs().max().item()
            print(f"gather_attend check ({how}) B={B} H={H} G={G} S={S} K={K}: max abs error {err:.2e}", flush=True)
            assert err < 2e-2


def check_select(d, G=4, prune=0.9, sinks=4, recent=64):
    """spotlight_select vs cache.hamming_select (the torch path) on random codes: the same slots, in order."""
    from triton_kernels import spotlight_select
    g = torch.Generator(device="cuda").manual_seed(0)
    for B, H, S, ctx in [(1, 8, 33792, 32768), (3, 2, 5000, 2345)]:
        qc, kc = (kv.pack_bits(torch.rand(B, H, n, d, device="cuda", generator=g) > 0.5) for n in (G, S))
        pos = torch.arange(S, device="cuda").expand(B, H, S).clone()
        pos[pos >= ctx] = -1
        pos[-1, :, :100] = -1  # left padding
        ip = torch.full((B,), ctx - 1, device="cuda")
        k = torch.maximum((ip + 1).clamp(max=20), (ip + 1) - ((ip + 1).double() * prune).floor().long())
        K = min(S, int(k.max()) + sinks + recent + 1)
        ref = kv.hamming_select(qc, kc[:, :, None], pos, ip, k, K, d, sinks, recent)
        for how, f in (("eager", spotlight_select), ("compiled", torch.compile(spotlight_select, fullgraph=True))):
            idx, ok = f(qc, kc, pos, ip, k, K, d, sinks, recent)
            same = torch.equal(idx, ref[0]) and torch.equal(ok, ref[1])
            print(f"spotlight_select check ({how}) B={B} H={H} S={S}: {'identical' if same else 'DIFFERENT'} "
                  f"to hamming_select, {int(ok.sum())} slots read", flush=True)
            assert same


if __name__ == "__main__":
    main()
