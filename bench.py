"""Decode-speed benchmarks behind the README's tables. Timings only: nothing here asserts.

    python bench.py --cpu_vs_hf      # our generate() (eager and compiled) vs transformers' generate(), CPU
    python bench.py --gpu --shape llama-3-8b --contexts 4096 32768 --batches 1 8 --out results/gpu.md
    python bench.py --gpu --tiny     # the same GPU code path at a tiny shape, on whatever device there is

--cpu_vs_hf: the default model (SmolLM2-135M-Instruct) in fp32, the same prompt token ids and the same
number of greedy new tokens for both (transformers gets min_new_tokens = max_new_tokens). Decode tok/s
excludes prefill: ours from generate()'s own timer (first decode step apart), transformers' as
(max_new_tokens - 1) / (time(max_new_tokens) - time(1 token)). Median of --repeats runs.

--gpu: a model of the named shape with RANDOM weights (decode speed does not depend on weight values),
bf16, decode compiled with generate.compile_decode (fullgraph, CUDA graphs). The prompt's KV is not
computed by the model: each layer's cache gets random q/k/v of the context length through its own
`prefill`, so a strategy compresses and builds its auxiliary state exactly as after a real prompt,
without a 32k x 8-token forward pass. Then --steps decode steps are timed after --warmup steps.
Bytes per step = weights without the embedding table (tied output counted) + the K/V rows the step
attends to (counted from the cache's own attend_mask); roofline at --bandwidth (3.0 TB/s, the H100's
measured device copy rate, shared/PERFORMANCE.md).
"""
import argparse
import datetime
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import cache as kv
import generate as gen
from model import ModelArgs, Transformer, load_model, rope_frequencies

RANDOM = "random weights; decode speed does not depend on weight values"
CHAT = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."


def device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return f"CPU {cpu}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at start"


def header(device, title) -> list[str]:
    return [f"### {title}", "", f"- device: {device_name(device)}", f"- date: {datetime.date.today()}",
            f"- torch {torch.__version__}", f"- command: `python {' '.join(sys.argv)}`", ""]


# ---- CPU: ours vs transformers -----------------------------------------------------------------------
def hf_from_gguf(gguf: Path):
    import transformers
    d = Path(tempfile.mkdtemp())
    (d / "model.gguf").symlink_to(gguf.resolve())  # alone: transformers must not see our config.json
    return transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file="model.gguf", dtype=torch.float32).eval()


def time_hf(hf, prompt, n):
    x = torch.tensor([prompt])
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0, out[0, len(prompt):].tolist()


def cpu_vs_hf(a):
    ck = Path(a.checkpoint_path)
    from tokenizer import load_tokenizer
    model, tok = load_model(ck, dtype=torch.float32), load_tokenizer(ck)
    prompt = tok.encode_prompt(a.prompt)
    N, cfg = a.max_new_tokens, kv.CacheConfig()
    hf = hf_from_gguf(ck / "source.gguf")
    rows = {}

    def ours(name, step=None):
        runs = [gen.generate(model, [prompt], N, cfg, decode_step=step) for _ in range(a.repeats)]
        rates = [r.decode_steps / r.decode_s for r in runs]
        rows[name] = (statistics.median(rates), statistics.median(r.prefill_s for r in runs), runs[0].tokens[0])
        print(f"{name}: {rows[name][0]:.1f} tok/s", flush=True)

    ours("ours, eager")
    t0 = time.perf_counter()
    step = gen.compile_decode(model, "cpu")
    gen.generate(model, [prompt], 3, cfg, decode_step=step)  # compiles
    compile_s = time.perf_counter() - t0
    ours("ours, compiled", step)
    one, full = [], []
    for _ in range(a.repeats):
        one.append(time_hf(hf, prompt, 1)[0])
        t, hf_tokens = time_hf(hf, prompt, N)
        full.append(t)
    rows["transformers generate (DynamicCache, sdpa)"] = ((N - 1) / (statistics.median(full) - statistics.median(one)),
                                                         statistics.median(one), hf_tokens)
    lines = header("cpu", f"Decode speed on CPU: {ck.name}, fp32, batch 1, {len(prompt)}-token prompt, "
                          f"{N} greedy new tokens, median of {a.repeats}")
    lines += ["| implementation | decode tok/s | ms / token | prefill + 1st token ms | tokens identical to transformers |",
              "|---|---|---|---|---|"]
    for name, (rate, pre, toks) in rows.items():
        lines.append(f"| {name} | {rate:.1f} | {1000 / rate:.1f} | {pre * 1000:.0f} | {'yes' if toks == hf_tokens else 'NO'} |")
    lines += ["", f"Compile time of our decode step (inductor, CPU): {compile_s:.0f} s. transformers {_hf_version()}."]
    return lines


def _hf_version():
    import transformers
    return transformers.__version__


# ---- GPU: random-weight model of a real shape ---------------------------------------------------------
def random_model(args: ModelArgs, device, dtype) -> Transformer:
    """Allocated straight on the device in `dtype` (no fp32 copy of 8B parameters on the way)."""
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    model = model.to_empty(device=device).eval().requires_grad_(False)
    g = torch.Generator(device=device).manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0, 0.02, generator=g)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.rope = rope_frequencies(args, args.block_size).to(device)  # fp32, as load_model keeps it
    return model


def random_spotlight_hashes(args: ModelArgs, d: Path) -> Path:
    """Stand-ins for train_spotlight.py's hashes (same names and shapes): speed does not depend on them."""
    from safetensors.torch import save_file
    H, D = args.n_local_heads, args.head_dim
    save_file({f"layers.{i}.{n}": torch.randn(H, D, D) * 0.1 if n.startswith("w") else torch.zeros(H, D)
               for i in range(args.n_layer) for n in ("w1", "b1", "w2", "b2")}, d / "spotlight.safetensors")
    return d


@torch.no_grad()
def fill_caches(args, caches, batch, context, device, dtype):
    """Each layer's prompt KV: random q/k/v of `context` tokens through the cache's own prefill (its
    prompt compression and auxiliary state included), one layer at a time to bound memory."""
    pos = torch.arange(context, device=device).expand(batch, -1)
    for c in caches:
        q = torch.randn(batch, args.n_head, context, args.head_dim, device=device, dtype=dtype)
        k = torch.randn(batch, args.n_local_heads, context, args.head_dim, device=device, dtype=dtype)
        v = torch.randn_like(k)
        c.prefill(q, k, v, pos)
        del q, k, v


@torch.no_grad()
def bench_one(model, a, strategy, context, batch, device, dtype, spot_dir) -> dict:
    steps = a.warmup + a.steps
    cfg = kv.CacheConfig(strategy=strategy, max_cache_length=[str(a.budget)], checkpoint_dir=str(spot_dir))
    caches = kv.make_caches(model.args, cfg, batch, context + steps + 1, steps + 1, device, dtype)
    model.setup_caches(caches)
    fill_caches(model.args, caches, batch, context, device, dtype)
    input_pos = torch.full((batch,), context, device=device)
    kv_read = kv.read_bytes(caches, input_pos)[0]
    torch._dynamo.reset()
    step = gen.compile_decode(model, device)
    tok = torch.randint(0, model.args.vocab_size, (batch, 1), device=device)
    t0 = time.perf_counter()
    for i in range(steps):
        if i == a.warmup:
            gen.sync(device)
            compile_s, t0 = time.perf_counter() - t0, time.perf_counter()
        logits = step(tok, input_pos)
        tok = logits[:, -1].argmax(-1, keepdim=True)  # a new tensor: safe from the next graph replay
        input_pos = input_pos + 1
    gen.sync(device)
    dt = (time.perf_counter() - t0) / a.steps
    kept = sum(int((c.pos >= 0).sum()) for c in caches) / (len(caches) * caches[0].pos.shape[1] * batch * (context + steps))
    for layer in model.layers:
        layer.attention.kv_cache = None
    del caches, step
    torch._dynamo.reset()  # drops the graphs and the CUDA graph pool, so the next shape starts clean
    bytes_step = gen.weight_bytes(model) + kv_read
    return dict(strategy=strategy, context=context, batch=batch, kept=kept, tok_s=batch / dt, ms=dt * 1000,
                gb=bytes_step / 1e9, roof=batch * a.bandwidth * 1e12 / bytes_step, compile_s=compile_s)


def gpu(a):
    device = "cuda" if torch.cuda.is_available() and not a.cpu else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    args = ModelArgs.from_name("tiny" if a.tiny else a.shape)
    if a.tiny:  # 3 layers: strategies with dense first layers still get a sparse one
        args.n_layer = 3
    a.contexts = a.contexts or ([256, 400] if a.tiny else [4096, 32768])
    a.steps = a.steps or (20 if a.tiny else 100)
    a.budget = a.budget or ("0.5" if a.tiny else "0.1")
    args.block_size = max(args.block_size, max(a.contexts) + a.warmup + a.steps + 1)  # a longer RoPE table only
    model = random_model(args, device, dtype)
    spot_dir = random_spotlight_hashes(args, Path(tempfile.mkdtemp()))
    title = (f"Decode speed, {args.name} shape ({RANDOM}), {str(dtype).removeprefix('torch.')}, "
             f"compiled decode{' + CUDA graphs' if device == 'cuda' else ''}, {a.steps} timed steps")
    lines = header(device, title) + [
        f"Prompt KV: random q/k/v of the context length through each cache's own prefill (no model forward). "
        f"Budget for compressing strategies: --max_cache_length {a.budget}. Bytes/step = "
        f"{gen.weight_bytes(model) / 1e9:.3g} GB of weights (embedding table excluded) + K/V rows attended + index scanned; "
        f"roofline at {a.bandwidth} TB/s.", "",
        "| strategy | context | batch | KV kept | tok/s (all sequences) | ms / step | GB read / step | "
        "roofline tok/s | % of roofline | compile s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for strategy in a.strategies:
        for context in a.contexts:
            for batch in a.batches:
                try:
                    r = bench_one(model, a, strategy, context, batch, device, dtype, spot_dir)
                except (torch.OutOfMemoryError, ValueError, FileNotFoundError) as e:
                    msg = str(e).splitlines()[0][:120]
                    print(f"{strategy} {context} x{batch}: skipped ({type(e).__name__}: {msg}) ({RANDOM})", flush=True)
                    lines.append(f"| {strategy} | {context} | {batch} | - | {type(e).__name__} | | | | | |")
                    gc.collect()
                    torch.cuda.empty_cache() if device == "cuda" else None
                    continue
                print(f"{strategy} {context} x{batch}: {r['tok_s']:.1f} tok/s, {100 * r['tok_s'] / r['roof']:.0f}% of "
                      f"roofline, compile {r['compile_s']:.0f} s ({RANDOM})", flush=True)
                lines.append(f"| {strategy} | {context} | {batch} | {100 * r['kept']:.0f}% | {r['tok_s']:.1f} | "
                             f"{r['ms']:.2f} | {r['gb']:.3g} | {r['roof']:.0f} | {100 * r['tok_s'] / r['roof']:.0f}% | "
                             f"{r['compile_s']:.0f} |")
                gc.collect()
                torch.cuda.empty_cache() if device == "cuda" else None
    if a.hf:
        del model  # its weights would sit beside transformers' copy
        gc.collect()
        torch.cuda.empty_cache() if device == "cuda" else None
        lines += ["", *hf_rows(a, args, device, dtype)]
    return lines


def hf_rows(a, args, device, dtype) -> list[str]:
    """transformers' generate() on a random-weight LlamaForCausalLM of the same shape, with its default
    dynamic cache (eager) or --hf_cache static (its own compile policy); decode tok/s from two
    generate() lengths, so prefill is subtracted."""
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.intermediate_size,
                                   num_hidden_layers=args.n_layer, num_attention_heads=args.n_head,
                                   num_key_value_heads=args.n_local_heads, head_dim=args.head_dim,
                                   max_position_embeddings=args.block_size, rope_theta=args.rope_base,
                                   tie_word_embeddings=args.tie_embeddings)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 on the device: no fp32 copy of the weights on the way
    try:
        with torch.device(device):
            hf = transformers.LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    cache = {"cache_implementation": "static"} if a.hf_cache == "static" else {}
    out = [f"transformers {transformers.__version__} generate() with its {a.hf_cache} cache, same shape ({RANDOM}):", "",
           "| context | batch | tok/s (all sequences) |", "|---|---|---|"]
    for context in a.contexts:
        for batch in a.batches:
            x = torch.randint(0, args.vocab_size, (batch, context), device=device)
            try:
                t = {}
                for n in (1, 1 + a.steps, 1, 1 + a.steps):  # second pair timed: the first compiles
                    gen.sync(device)
                    t0 = time.perf_counter()
                    hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                pad_token_id=0, **cache)
                    gen.sync(device)
                    t[n] = time.perf_counter() - t0
                rate = batch * a.steps / (t[1 + a.steps] - t[1])
                out.append(f"| {context} | {batch} | {rate:.1f} |")
            except torch.OutOfMemoryError:
                out.append(f"| {context} | {batch} | out of memory |")
            print(out[-1] + f" ({RANDOM})", flush=True)
            gc.collect()
            torch.cuda.empty_cache() if device == "cuda" else None
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu_vs_hf", action="store_true")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--out", help="also write the markdown table here")
    g = p.add_argument_group("--cpu_vs_hf")
    g.add_argument("--checkpoint_path", default=gen.DEFAULT_CHECKPOINT)
    g.add_argument("--prompt", default=CHAT)
    g.add_argument("--max_new_tokens", type=int, default=64)
    g.add_argument("--repeats", type=int, default=3)
    g.add_argument("--threads", type=int, help="torch CPU threads (1 on a shared, busy machine: with every core "
                   "taken, each OpenMP barrier waits a scheduler slice)")
    g = p.add_argument_group("--gpu")
    g.add_argument("--shape", default="llama-3-8b", help=f"one of {', '.join(kv_shapes())}")
    g.add_argument("--tiny", action="store_true", help="the tiny shape, a few steps: runs anywhere, for testing")
    g.add_argument("--cpu", action="store_true", help="run the --gpu path on the CPU even if CUDA is present")
    g.add_argument("--contexts", type=int, nargs="+", help="prompt lengths (default 4096 32768; tiny: 256 400)")
    g.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    g.add_argument("--strategies", nargs="*", default=["full"], help=f"of {', '.join(sorted(kv.REGISTRY))}")
    g.add_argument("--budget", help="--max_cache_length of compressing strategies (default 0.1; tiny: 0.5)")
    g.add_argument("--steps", type=int, help="timed decode steps (default 100; tiny: 20)")
    g.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile, CUDA graph capture), >= 1")
    g.add_argument("--bandwidth", type=float, default=3.0, help="roofline memory bandwidth, TB/s")
    g.add_argument("--hf", action="store_true", help="also transformers' generate() on the same shape")
    g.add_argument("--hf_cache", choices=["dynamic", "static"], default="dynamic",
                   help="its default dynamic cache (eager), or a static cache (which it compiles itself)")
    a = p.parse_args()
    if a.cpu_vs_hf == a.gpu:
        p.error("give one of --cpu_vs_hf, --gpu")
    if a.warmup < 1:
        p.error("--warmup must be >= 1: the first step compiles")
    if unknown := [s for s in a.strategies if s not in kv.REGISTRY]:
        p.error(f"unknown strategies {unknown}; known: {', '.join(sorted(kv.REGISTRY))}")
    if a.threads:
        torch.set_num_threads(a.threads)
    lines = cpu_vs_hf(a) if a.cpu_vs_hf else gpu(a)
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)


def kv_shapes():
    from model import CONFIGS
    return list(CONFIGS)


if __name__ == "__main__":
    main()
