"""Minimal GPU decode smoke benchmark (full cache, Llama-3-8B dims, RANDOM weights: decode speed does not
depend on weight values). Usage: python scripts/gpu_decode_smoke.py 1x4096 8x32768 (batch x context).
The prompt KV is random, written straight into the cache buffers. bench.py --gpu is the full benchmark."""
import sys, time, torch
sys.path.insert(0, ".")
import cache as kv
from model import Transformer, ModelArgs
print(torch.__version__, torch.cuda.get_device_name())
a = ModelArgs.from_name("llama-3.1-8b")  # same dims as Llama-3-8B, RoPE table long enough for 32k
with torch.device("meta"):
    m = Transformer(a)
m = m.to_empty(device="cuda").to(torch.bfloat16)
for p in m.parameters():
    p.data.normal_(0, 0.02)
m.build_rope("cuda")
m.eval().requires_grad_(False)
cfgs = [tuple(map(int, c.split("x"))) for c in sys.argv[1:]]
for B, ctx in cfgs:
    caches = kv.make_caches(a, kv.CacheConfig(), B, ctx + 256, 256, "cuda", torch.bfloat16)
    m.setup_caches(caches)
    for c in caches:
        c.pos[:, :, :ctx] = torch.arange(ctx, device="cuda"); c.k.normal_(); c.v.normal_()
    step = torch.compile(m.forward, fullgraph=True, mode="reduce-overhead")
    tok = torch.zeros(B, 1, dtype=torch.long, device="cuda"); ip = torch.full((B,), ctx, device="cuda")
    t = time.perf_counter()
    for i in range(3): step(tok, ip + i)
    torch.cuda.synchronize(); ct = time.perf_counter() - t; t = time.perf_counter()
    for i in range(50): step(tok, ip + 3 + i)
    torch.cuda.synchronize(); print(f"B={B} ctx={ctx} compile {ct:.0f}s  {50 / (time.perf_counter() - t):.1f} tok/s/seq (random weights)", flush=True)
    if B == 8 and ctx == 4096:
        from torch.profiler import profile, ProfilerActivity
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(5): step(tok, ip + 60 + i)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15), flush=True)
    del caches, step; m.setup_caches([None] * a.n_layer); torch.cuda.empty_cache()
