"""Decode-speed benchmarks behind the README's tables. Timings only: nothing here asserts a speed.

    python bench.py --gpu                # every strategy at 32k x 8 beside the full cache (19 rows in 224 s on a fresh H200)
    python bench.py --gpu --batches 1 --prefill --profile
    python bench.py --gpu --strategies full snapkv spotlight:spotlight_prune=0.98 --contexts 4096 32768 --batches 1 8
    python bench.py --gpu --tiny --cpu   # the same code path at a tiny shape on CPU (the tests run it)
    torchrun --nproc_per_node 2 bench.py --gpu --contexts 4096 32768 --batches 1 8 --strategies full snapkv
                                         # tensor parallel over 2 GPUs (tp.py); scripts/bench_tp.sh: 1 vs 2 GPUs
    python bench.py --gpu --strategies full --contexts 4096 --batches 1 --weights bf16 int8 int4   # quant.py
    python bench.py --cpu_vs_hf          # CPU, default model: ours (fp32/int8/int4, eager/compiled/frozen) vs transformers

--gpu: a model of the named shape with RANDOM weights (decode speed does not depend on weight values),
bf16, the decode step compiled as generate.compile_decode does (one compiled layer reused by every layer,
the whole step one CUDA graph). The prompt's KV is not computed by the model: each layer's cache gets
random q/k/v of the context length through its own `prefill`, so a strategy scores the prompt (its
Triton scoring kernels on CUDA), compresses it and builds its auxiliary state exactly as after a real
prompt. Then --warmup decode steps (the first compiles and captures) and --steps timed ones. Each row:
tok/s over the batch, ms/step, bytes read per step (weights without the embedding table, tied output
counted, + the K/V rows the step attends to + any index it scans, from cache.read_bytes), % of the
roofline at a bandwidth measured on the same device (a device-to-device copy; --bandwidth GB/s
overrides), the ratio to the full cache measured in the same process, and how long fill, compile and
timing took. --weights int8 / int4: the same random model quantized in memory (quant.py; every packed
kernel first checked against its dequantized weights, else the weights' rows fail), each quantized row
also reported against the float row of the same strategy, context and batch. --prefill adds one layer's plain prefill (attention + MLP, full cache) times the layer
count, against which each strategy's prompt scoring is reported (marked OVER past issue 10's 2×).

Benchmarks that cannot lie: a row fails loudly, naming the cause, if a timed step recompiled, broke
the graph, or ran without its CUDA graph (DecodeGraph replays are counted), and the run exits non-zero;
a warning is printed when another process is using the GPU before or after the run.

Under torchrun (WORLD_SIZE > 1) the model and caches are split by KV heads (tp.py; NCCL, NVLink multicast
off: NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1, which tp.init sets
when unset, because multicast can take a shared host's GPUs out of service). Every rank builds the same
random weights and keeps its slice; the captured CUDA graph holds the NCCL all-reduces; the honesty
checks run on every rank and a row fails if any rank's failed; bytes, roofline and cache GB are per GPU
(rank 0's); rank 0 prints. `--n_layer` cuts a shape's layers (llama-3-70b at 80 layers does not fit one
H200, so its 1-GPU reference runs fewer, stated in the title).

--cpu_vs_hf: the default model (SmolLM2-135M-Instruct): transformers in fp32 (its default), ours in fp32
and int8/int4 (--weights; quantized in memory as scripts/quantize.py does), eager, compiled and compiled
frozen (generate.frozen_decode: weights folded into the graph, inductor's max-autotune GEMMs); the same
prompt token ids and the same number of greedy new tokens for all (transformers gets min_new_tokens =
max_new_tokens). Decode tok/s excludes prefill: ours from generate()'s own timer (first decode step
apart), transformers' as (max_new_tokens - 1) / (time(max_new_tokens) - time(1 token)). Median of
--repeats, interleaved: each repeat runs every implementation once, so load on a shared machine falls on all.
"""
import argparse
import ast
import datetime
import gc
import math
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
import quant
from model import ModelArgs, Transformer, load_model

RANDOM = "random weights; decode speed does not depend on weight values"
CHAT = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."


def device_name(device, load=None) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return f"CPU {cpu}, {torch.get_num_threads()} threads, load average {load or os.getloadavg()[0]:.1f} at start"


def header(device, title, load=None) -> list[str]:
    return [f"### {title}", "", f"- device: {device_name(device, load)}", f"- date: {datetime.date.today()}",
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


def weights_spec(weights: str, groupsize: int) -> dict | None:
    """--weights fp32 | bf16 (the run's float dtype: None) | int8 | int4 (quant.py, in memory)."""
    return None if weights in FLOAT else {"mode": weights} | ({"groupsize": groupsize} if weights == "int4" else {})


FLOAT = ("fp32", "bf16")


def cpu_vs_hf(a):
    """Ours (each --weights, eager and compiled) and transformers' generate(), interleaved: each repeat runs
    every implementation once, so a load that comes and goes on a shared machine falls on all of them."""
    ck, a.load = Path(a.checkpoint_path), os.getloadavg()[0]  # the table is written at the end
    from tokenizer import load_tokenizer
    prompt, N, cfg = load_tokenizer(ck).encode_prompt(a.prompt), a.max_new_tokens, kv.CacheConfig()
    runs, compile_s = {}, {}
    for w in a.weights:
        model = load_model(ck, dtype=torch.float32)
        if model.args.quantization:
            raise SystemExit(f"bench.py: {ck} is quantized; give the float checkpoint (--weights quantizes in memory)")
        if spec := weights_spec(w, a.groupsize):
            quant.quantize_model(model, spec)
        steps = {"eager": None, "compiled": gen.compile_decode(model, "cpu"),
                 "compiled, frozen": gen.compile_decode(model, "cpu", frozen=True)}
        for mode, s in steps.items():
            if s:  # the first compile apart (the frozen step compiles again for each generate call: first step)
                t0 = time.perf_counter()
                gen.generate(model, [prompt], 3, cfg, decode_step=s)
                compile_s[w, mode] = time.perf_counter() - t0
            runs[w, mode] = lambda m=model, s=s: ours_once(m, prompt, N, cfg, s)
    hf = hf_from_gguf(ck / "source.gguf")
    runs["hf"] = lambda: hf_once(hf, prompt, N)
    results = {k: [] for k in runs}
    for r in range(a.repeats):
        for k, run in runs.items():
            results[k].append(run())
            print(f"repeat {r + 1}: {k}: {results[k][-1][0]:.1f} tok/s", flush=True)
    return cpu_table(a, ck, prompt, results, compile_s)


def ours_once(model, prompt, n, cfg, step):
    r = gen.generate(model, [prompt], n, cfg, decode_step=step)
    return r.decode_steps / r.decode_s, r.prefill_s, r.tokens[0]


def hf_once(hf, prompt, n):
    """Decode tok/s from two generate() lengths, so prefill is subtracted."""
    one, full = time_hf(hf, prompt, 1)[0], time_hf(hf, prompt, n)
    return (n - 1) / (full[0] - one), one, full[1]


def cpu_table(a, ck, prompt, results, compile_s) -> list[str]:
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v), v[0][2]) for k, v in results.items()}
    hf_rate, _, hf_tokens = med["hf"]
    lines = header("cpu", f"Decode speed on CPU: {ck.name}, batch 1, {len(prompt)}-token prompt, {a.max_new_tokens} "
                          f"greedy new tokens, median of {a.repeats} interleaved repeats", a.load)
    lines += ["| implementation | weights | decode tok/s | ms / token | vs transformers | prefill + 1st token ms | "
              "greedy tokens equal to transformers' |", "|---|---|---|---|---|---|---|"]
    for k, (rate, pre, toks) in med.items():
        name, w = ("transformers generate (DynamicCache, sdpa)", "fp32") if k == "hf" else (f"ours, {k[1]}", k[0])
        w += f", groups of {a.groupsize}" if w == "int4" else ""
        same = next((i for i, (x, y) in enumerate(zip(toks, hf_tokens)) if x != y), len(hf_tokens))
        equal = "all" if same == len(hf_tokens) == len(toks) else f"first {same} of {len(hf_tokens)}"
        lines.append(f"| {name} | {w} | {rate:.1f} | {1000 / rate:.1f} | {rate / hf_rate:.2f}× | {pre * 1000:.0f} | {equal} |")
    lines += ["", "First compile of our decode step (inductor, CPU; frozen: with max-autotune, and again for every "
                  "new set of caches, outside the timed steps): " + ", ".join(f"{w} {m} {s:.0f} s" for (w, m), s in compile_s.items())
              + f". transformers {_hf_version()}. Load average at the end: {os.getloadavg()[0]:.1f}."]
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
    model.build_rope(device)  # fp32, as load_model keeps it (to_empty left the tables uninitialised)
    return model


def random_learned_files(args: ModelArgs, d: Path) -> Path:
    """Stand-ins for train_spotlight.py's hashes and head_scores.py's head scores (same names and shapes):
    speed does not depend on their values."""
    import json
    from safetensors.torch import save_file
    H, D = args.n_local_heads, args.head_dim
    save_file({f"layers.{i}.{n}": torch.randn(H, D, D) * 0.1 if n.startswith("w") else torch.zeros(H, D)
               for i in range(args.n_layer) for n in ("w1", "b1", "w2", "b2")}, d / "spotlight.safetensors")
    (d / "head_scores").mkdir(exist_ok=True)
    for kind, key in (("headkv", "headkv"), ("dililazy", "infscore")):
        scores = {f"{l}-{h}": {key: float(torch.rand(1))} for l in range(args.n_layer) for h in range(args.n_head)}
        (d / "head_scores" / f"{kind}.json").write_text(json.dumps({"scores": scores}))
    return d


@torch.no_grad()
def fill_caches(args, caches, batch, context, device, dtype):
    """Each layer's prompt KV: random q/k/v of `context` tokens through the cache's own prefill (its
    prompt scoring, compression and auxiliary state included), one layer at a time to bound memory.
    Head counts are the cache's own (tensor parallel: this rank's)."""
    pos = torch.arange(context, device=device).expand(batch, -1)
    for c in caches:
        q = torch.randn(batch, c.n_kv * c.n_group, context, args.head_dim, device=device, dtype=dtype)
        k = torch.randn(batch, c.n_kv, context, args.head_dim, device=device, dtype=dtype)
        v = torch.randn_like(k)
        c.prefill(q, k, v, pos)
        del q, k, v


ALL = ["full", "streamingllm", "random", "l2", "l2:l2_one_shot=true", "lsh", "h2o", "tova", "scissorhands", "snapkv",
       "pyramid", "adakv", "headkv", "dililazy", "spotlight:spotlight_prune=0.9", "spotlight:spotlight_prune=0.98",
       "spotlight_linear", "lsh_retrieval", "quest:quest_budget=0.1"]


def parse_spec(spec: str) -> tuple[str, dict]:
    """'name' or 'name:key=value,key=value' (values: true/false, numbers or text) -> (strategy, params)."""
    name, _, rest = spec.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        low = value.lower()
        params[key] = low == "true" if low in ("true", "false") else _number(value)
    return name, params


def _number(value):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


class BenchError(Exception):
    """A measurement that would mislead: a recompile, a graph break or a lost CUDA graph in timed steps."""


def compile_counts() -> tuple:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def measure_bandwidth(device) -> float:
    """Device-to-device copy rate in GB/s (bytes read + written), median of 20 copies of 2 GiB (CUDA) or
    256 MiB (CPU): the roofline's denominator, measured where the decode step runs."""
    n = (2 << 30) if torch.device(device).type == "cuda" else (256 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(23):
        gen.sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        gen.sync(device)
        times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * n / statistics.median(times[3:]) / 1e9


def other_gpu_processes() -> list[str]:
    """Compute processes on the GPU, as nvidia-smi lists them: called before this process touches CUDA,
    and at the end, when this process is one of them (its pid as nvidia-smi sees it may differ from ours).
    Under torchrun: on this rank's GPU only (the other ranks have theirs)."""
    import shutil
    import subprocess
    if not shutil.which("nvidia-smi"):
        return ["(nvidia-smi not found: cannot tell whether the GPU is shared)"]
    gpu = ["-i", os.environ["LOCAL_RANK"]] if int(os.environ.get("WORLD_SIZE", 1)) > 1 else []
    r = subprocess.run(["nvidia-smi", *gpu, "--query-compute-apps=pid,process_name,used_memory", "--format=csv,noheader"],
                       capture_output=True, text=True)
    return [line for line in r.stdout.splitlines() if line.strip()]


@torch.no_grad()
def bench_one(model, a, spec, context, batch, device, dtype, spot_dir, bits=16) -> dict:
    strategy, params = parse_spec(spec)
    steps = a.warmup + a.steps
    cfg = kv.CacheConfig(strategy=strategy, max_cache_length=[str(a.budget)], params=params, checkpoint_dir=str(spot_dir),
                         kv_bits=bits, kv_group=a.kv_group, kv_residual=a.kv_residual)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the peak of this configuration alone (weights included)
    caches = kv.make_caches(model.args, cfg, batch, context + steps + 1, steps + 1, device, dtype)
    model.setup_caches(caches)
    gen.sync(device)
    t0 = time.perf_counter()
    fill_caches(model.args, caches, batch, context, device, dtype)
    gen.sync(device)
    fill_s = time.perf_counter() - t0
    input_pos = torch.full((batch,), context, device=device)
    kv_read = kv.read_bytes(caches, input_pos)[0]
    step = gen.compile_decode(model, device)
    tok = torch.randint(0, model.args.vocab_size, (batch, 1), device=device)
    t0 = time.perf_counter()
    for i in range(steps):
        if i == a.warmup:
            gen.sync(device)
            compile_s, t0 = time.perf_counter() - t0, time.perf_counter()
            counts, replays = compile_counts(), getattr(step, "replays", None)
        logits = step(tok, input_pos)
        tok = logits[:, -1].argmax(-1, keepdim=True)  # a new tensor: safe from the next graph replay
        input_pos = input_pos + 1
    gen.sync(device)
    timed_s = time.perf_counter() - t0
    check_honest(step, device, a.steps, counts, replays)
    kept = 1 - kv.compression_ratio(caches, torch.full((batch,), context + steps, device=device))
    prof = profile_step(step, tok, input_pos) if a.profile else None
    cache_gb = kv.cache_bytes(caches) / 1e9
    peak_gb = torch.cuda.max_memory_allocated() / 1e9 if torch.device(device).type == "cuda" else float("nan")
    model.setup_caches([None] * len(caches))
    del caches, step
    dt = timed_s / a.steps
    bytes_step = gen.weight_bytes(model) + kv_read
    spec = spec if bits == 16 else f"{spec} @{bits}-bit"
    return dict(spec=spec, peak_gb=peak_gb, context=context, batch=batch, kept=kept, tok_s=batch / dt, ms=dt * 1000, gb=bytes_step / 1e9,
                roof=batch * a.bandwidth * 1e9 / bytes_step, cache_gb=cache_gb, fill_s=fill_s, compile_s=compile_s,
                timed_s=timed_s, profile=prof)


def check_honest(step, device, steps, counts, replays):
    """Fail loudly if the timed steps were not what they claim to be."""
    graphs, breaks = compile_counts()
    if graphs != counts[0]:
        raise BenchError(f"the decode step recompiled {graphs - counts[0]} time(s) during the timed steps")
    if breaks != counts[1]:
        raise BenchError(f"{breaks - counts[1]} graph break(s) during the timed steps")
    if torch.device(device).type == "cuda":
        if not isinstance(step, gen.DecodeGraph):
            raise BenchError("the decode step is not a CUDA graph")
        if step.replays - replays != steps or step.captures != 1:
            raise BenchError(f"{steps - (step.replays - replays)} of {steps} timed steps ran without their CUDA graph "
                             f"({step.captures} captures)")


def profile_step(step, tok, input_pos, n=5) -> list[str]:
    """The kernels of n decode steps (torch.profiler), per step, largest first: the graph's replays, or
    the same step run outside the graph if the profiler does not see into replays."""
    from torch.profiler import ProfilerActivity, profile
    cuda = tok.is_cuda
    t = (lambda e: e.device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    for fn in (step, getattr(step, "step", None)):
        with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
            for _ in range(n):
                fn(tok, input_pos)
            gen.sync(tok.device)
        rows = [e for e in prof.key_averages() if t(e) > 0]
        if sum(e.count for e in rows) >= 10 * n or not isinstance(step, gen.DecodeGraph):
            break
    total = sum(t(e) for e in rows)
    out = [f"  {t(e) / n:8.1f} us/step {e.count / n:5.0f}x  {100 * t(e) / total:4.1f}%  {e.key[:110]}"
           for e in sorted(rows, key=t, reverse=True)[:30]]
    where = "graph replays" if fn is step else "the step outside its graph"
    return [f"  kernels ({where}): {total / n / 1000:.3f} ms/step in {sum(e.count for e in rows) / n:.0f} launches"] + out


@torch.no_grad()
def plain_prefill_s(model, context, batch, device, dtype) -> float:
    """One layer's plain prefill (attention + MLP over a random prompt, full cache) times the layer count:
    the time a prompt's prefill takes before any strategy scores it."""
    args, layer = model.args, model.layers[0]
    cfg = kv.CacheConfig()
    layer.attention.kv_cache = kv.make_caches(args, cfg, batch, context, 0, device, dtype)[0]
    x = torch.randn(batch, context, args.dim, device=device, dtype=dtype)
    pos = torch.arange(context, device=device).expand(batch, -1)
    rope = model.ropes(pos)[1 if layer.attention.window else 0]  # layer 0: a sliding-window one in Gemma 3
    times = []
    for _ in range(3):
        gen.sync(device)
        t0 = time.perf_counter()
        layer.prefill(x, rope, pos, 1024)
        gen.sync(device)
        times.append(time.perf_counter() - t0)
    layer.attention.kv_cache = None
    return min(times[1:]) * args.n_layer


SHAPES = {"llama-3-70b": dict(block_size=8192, vocab_size=128256, n_layer=80, n_head=64, n_local_heads=8, dim=8192,
                              intermediate_size=28672, head_dim=128, rope_base=500000.0)}  # bench.py's only


def start_tp(args, device):
    """Under torchrun: join the group, return (tp module, this rank's device); ranks > 0 print nothing."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return None, device
    import tp  # tensor parallel: imported only here
    if reason := tp.check_divides(args, tp.rank_world()[1]):
        sys.exit(f"bench.py: {reason}")
    device = tp.init(device)
    if tp.rank_world()[0]:
        sys.stdout = open(os.devnull, "w")
    return tp, device


def agree(err):
    """Tensor parallel: every rank's failure of a row, as (rank, exception) pairs on every rank, so all ranks
    report one verdict (a rank's recompile or lost graph fails the row). One process: [(0, err)] or []."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return [(0, err)] if err else []
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, err and (type(err).__name__, str(err), isinstance(err, BenchError)))
    return [(i, BenchError(m) if bench else RuntimeError(f"{kind}: {m}")) for i, x in enumerate(seen) if x
            for kind, m, bench in [x]]


def gpu(a):
    device = "cuda" if torch.cuda.is_available() and not a.cpu else "cpu"
    busy = other_gpu_processes() if device == "cuda" else []
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = "tiny" if a.tiny else a.shape
    args = ModelArgs(name=shape, **SHAPES[shape]) if shape in SHAPES else ModelArgs.from_name(shape)
    if a.tiny:  # 3 layers: strategies with dense first layers still get a sparse one
        args.n_layer = 3
    args.n_layer = a.n_layer or args.n_layer
    tp, device = start_tp(args, device)
    a.contexts = a.contexts or ([256, 400] if a.tiny else [32768])
    a.batches = a.batches or ([1, 2] if a.tiny else [8])
    a.steps = a.steps or (10 if a.tiny else 50)
    a.budget = a.budget or ("0.5" if a.tiny else "0.1")
    a.bandwidth = a.bandwidth or measure_bandwidth(device)
    specs = ["full"] + [s for s in (a.strategies or ALL) if s != "full"]  # full first: the ratios' reference
    args.block_size = max(args.block_size, max(a.contexts) + a.warmup + a.steps + 1)  # a longer RoPE table only
    if tp and any(w not in FLOAT for w in a.weights):
        raise SystemExit("error: --weights int8/int4 under torchrun: quantized weights are not split by tp.py yet")
    spot_dir = random_learned_files(args, Path(tempfile.mkdtemp()))
    world = tp.rank_world()[1] if tp else 1
    layers = f", {args.n_layer} of its {full_layers(shape)} layers" if args.n_layer != full_layers(shape) else ""
    title = (f"Decode speed, {args.name} shape{layers} ({RANDOM}), {str(dtype).removeprefix('torch.')}, "
             f"compiled decode{' as one CUDA graph' if device == 'cuda' else ''}, {a.steps} timed steps"
             + (f", tensor parallel over {world} {'GPUs' if device == 'cuda' else 'processes'} (tp.py; bytes, "
                f"roofline and cache GB per rank)" if tp else ""))
    lines = header(device, title) + [
        f"Prompt KV: random q/k/v of the context length through each cache's own prefill (no model forward). "
        f"Budget of compressing strategies: --max_cache_length {a.budget}. Bytes/step = weights (embedding table "
        f"excluded; quantized: codes and scales, each kernel first checked against its dequantized weights) + K/V rows "
        f"attended + index scanned; roofline at {a.bandwidth:.0f} GB/s "
        f"({'given' if a.bandwidth_given else 'measured: device-to-device copy'})."
        + (f" Kernel launch settings: {tuning()}." if device == "cuda" else ""), "",
        "| strategy | context | batch | KV kept | tok/s | ms / step | GB read / step | % of roofline | vs full | "
        "cache GB | cache vs full | peak GB | fill s | compile s | timed s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    failed, results = [], {}
    for w in a.weights:
        results[w] = weight_rows(a, w, args, specs, device, dtype, spot_dir, lines, failed, tp)
    lines += weights_vs_float(a.weights, results)
    if a.hf:
        lines += ["", *hf_rows(a, args, device, dtype)]
    if device == "cuda" and len(now := other_gpu_processes()) > 1:  # this process is one of them now
        busy += [f"at the end: {p}" for p in now]
    if busy:
        lines += ["", "WARNING: other compute processes were seen on the GPU (timings may be low): " + "; ".join(busy)]
    if failed:
        lines += ["", "FAILED (these rows would mislead):", *failed]
    if tp:
        tp.close()
    return lines, bool(failed)


def weight_rows(a, w, args, specs, device, dtype, spot_dir, lines, failed, tp) -> dict:
    """Every context x batch x strategy row with --weights w (int8/int4: the random model quantized in memory)."""
    model, plain, results = random_model(args, device, dtype), {}, {}  # seeded: the same weights on every rank
    model = tp.shard_model(model, device) if tp else model  # tensor parallel: each rank keeps its slice
    if spec := weights_spec(w, a.groupsize):
        try:
            quant.quantize_model(model, spec, check=True)
        except (RuntimeError, ValueError) as e:  # a kernel that disagrees with its weights: no row may use it
            failed.append(f"{w} weights: {e}")
            return results
    label = (lambda s: s) if spec is None else (lambda s: f"{s}, {w} weights")
    print(f"{w} weights: {gen.weight_bytes(model) / 1e9:.3g} GB read per step", flush=True)
    for context in a.contexts:
        for batch in a.batches:
            if a.prefill:
                plain[context, batch] = plain_prefill_s(model, context, batch, device, dtype)
                print(f"plain prefill of {batch} x {context} tokens: {plain[context, batch]:.2f} s "
                      f"(one layer's attention + MLP x {args.n_layer}; {RANDOM})", flush=True)
            full = None
            for spec, bits in [(s, b) for s in specs for b in a.kv_bits]:
                try:
                    r, err = bench_one(model, a, spec, context, batch, device, dtype, spot_dir, bits), None
                except (torch.OutOfMemoryError, ValueError, FileNotFoundError, BenchError) as e:
                    err = e.with_traceback(None)  # its frames hold the failed run's tensors: free_memory must free them
                name = spec if bits == 16 else f"{spec} @{bits}-bit"
                if errors := agree(err):
                    for rank, e in errors:
                        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" + (f" (rank {rank})" if tp else "")
                        if isinstance(e, BenchError):
                            failed.append(f"{label(name)} {context} x{batch}: {msg}")
                        lines.append(f"| {label(name)} | {context} | {batch} | FAILED: {msg} |")
                        print(lines[-1], flush=True)
                    free_memory(model, device)
                    continue
                full = r if spec == "full" and bits == 16 else full
                results[name, context, batch] = r
                lines.append(row(r | {"spec": label(name)}, full, plain.get((context, batch))))
                print(lines[-1] + f"  ({RANDOM})", flush=True)
                if r["profile"]:
                    print("\n".join(r["profile"]), flush=True)
                free_memory(model, device)
    del model  # before the next weights' model (or transformers') is built
    free_memory(None, device)
    return results


def weights_vs_float(weights, results) -> list[str]:
    """Each quantized row's speed over the float row of the same strategy, context and batch."""
    base = next((w for w in weights if w in FLOAT), None)
    out = [f"- {w} weights / {base} weights, {k[0]} at {k[1]} x {k[2]}: {r['tok_s'] / results[base][k]['tok_s']:.2f}×"
           for w in weights if w not in FLOAT for k, r in results[w].items() if base and k in results[base]]
    return ["", "Quantized weights against float weights (same run):", *out] if out else []


def tuning():
    import model
    import triton_kernels
    gemm = (f"triton_kernels.decode_linear for projections no wider than their input (wo, w2), "
            f"{triton_kernels.LINEAR_TUNE}" if model.DECODE_GEMM else "cuBLAS (--no_decode_gemm)")
    gemm += f"; int8 weights: triton_kernels.decode_linear, {triton_kernels.INT8_TUNE}"
    evict = (f"triton_kernels.evict_slot, {triton_kernels.EVICT_CHUNK} slots and {triton_kernels.EVICT_WARPS} "
             "warps a program" if kv.EVICT_KERNEL else "torch (--no_evict_kernel)")
    codes = "triton_kernels.hash_codes" if kv.HASH_KERNEL else "torch (--no_hash_kernel)"
    inductor = f"; inductor settings: {', '.join(INDUCTOR_SET)} (--inductor)" if INDUCTOR_SET else ""
    return (f"{triton_kernels.TUNE}; decode GEMMs: {gemm}; eviction's choice: {evict}; Spotlight's decode codes: "
            f"{codes}; the decode step's inductor options: {gen.CUDA_OPTIONS}{inductor}")


INDUCTOR_SET = []  # --inductor's settings, named in the output


SCORING_LIMIT = 2.0  # issue 10: prompt scoring within 2x a plain prefill; marked when over (a 2.41x went unseen)


def row(r, full, plain_s) -> str:
    vs = f"{r['tok_s'] / full['tok_s']:.2f}×" if full and r is not full else ""
    fill = f"{r['fill_s']:.1f}"
    if plain_s and full and r is not full:  # the strategy's prefill = plain prefill + its scoring and compaction
        ratio = (plain_s + r["fill_s"] - full["fill_s"]) / plain_s
        fill += f" ({ratio:.2f}× plain prefill{f', OVER {SCORING_LIMIT:g}×' if ratio > SCORING_LIMIT else ''})"
    cache_vs = f"{100 * r['cache_gb'] / full['cache_gb']:.1f}%" if full and r is not full else ""
    peak = "-" if math.isnan(r["peak_gb"]) else f"{r['peak_gb']:.1f}"  # CUDA's max allocated; none on CPU
    return (f"| {r['spec']} | {r['context']} | {r['batch']} | {100 * r['kept']:.0f}% | {r['tok_s']:.1f} | {r['ms']:.2f} | "
            f"{r['gb']:.3g} | {100 * r['tok_s'] / r['roof']:.0f}% | {vs} | {r['cache_gb']:.2f} | {cache_vs} | "
            f"{peak} | {fill} | "
            f"{r['compile_s']:.0f} | {r['timed_s']:.1f} |")


def free_memory(model, device):
    if model is not None:
        model.setup_caches([None] * model.args.n_layer)
    torch._dynamo.reset()  # drops compiled graphs, so the next configuration starts clean
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


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
    g.add_argument("--weights", nargs="+", choices=["fp32", "bf16", "int8", "int4"], help="ours with these weights "
                   "(--cpu_vs_hf default: fp32 int8 int4; --gpu default: bf16): int8/int4 quantized in memory (quant.py)")
    g.add_argument("--groupsize", type=int, default=32, choices=quant.GROUPSIZES, help="int4's group (default 32)")
    g = p.add_argument_group("--gpu")
    g.add_argument("--shape", default="llama-3-8b", help=f"one of {', '.join(kv_shapes())}")
    g.add_argument("--n_layer", type=int, help="run only this many of the shape's layers (said in the title)")
    g.add_argument("--tiny", action="store_true", help="the tiny shape, a few steps: runs anywhere, for testing")
    g.add_argument("--cpu", action="store_true", help="run the --gpu path on the CPU even if CUDA is present")
    g.add_argument("--contexts", type=int, nargs="+", help="prompt lengths (default 32768; tiny: 256 400)")
    g.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 8; tiny: 1 2)")
    g.add_argument("--strategies", nargs="*", help="name or name:key=value,... (default: every strategy, "
                   f"{' '.join(ALL)}); the full cache always runs first, as the ratios' reference")
    g.add_argument("--budget", help="--max_cache_length of compressing strategies (default 0.1; tiny: 0.5)")
    g.add_argument("--steps", type=int, help="timed decode steps (default 50; tiny: 10)")
    g.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, CUDA graph capture), >= 1")
    g.add_argument("--kv_bits", type=int, nargs="+", default=[16], choices=[2, 4, 8, 16],
                   help="run each strategy at each of these K/V widths (16: model dtype; the vs-full reference is 16-bit full)")
    g.add_argument("--kv_group", type=int, default=32, help="KIVI group (generate.py --kv_group)")
    g.add_argument("--kv_residual", type=int, default=128, help="KIVI full-precision residual (generate.py --kv_residual)")
    g.add_argument("--bandwidth", type=float, help="roofline memory bandwidth in GB/s (default: measured here)")
    g.add_argument("--prefill", action="store_true", help="also time a plain prefill and compare prompt scoring to it")
    g.add_argument("--profile", action="store_true", help="also list each configuration's kernels (torch.profiler)")
    g.add_argument("--kernel_tune", help="JSON of launch settings from scripts/tune_attend.py (triton_kernels.TUNE entries) "
                   "instead of the committed ones")
    g.add_argument("--no_decode_gemm", action="store_true", help="every decode GEMM by cuBLAS (model.DECODE_GEMM off)")
    g.add_argument("--no_evict_kernel", action="store_true", help="eviction's choice in torch (cache.EVICT_KERNEL off)")
    g.add_argument("--inductor", nargs="+", default=[], metavar="KEY=VALUE",
                   help="set torch._inductor.config.KEY to a Python literal for the run (A/B an inductor setting, "
                   "e.g. reorder_for_locality=False, which generate.CPU_OPTIONS sets for CPU steps)")
    g.add_argument("--no_hash_kernel", action="store_true",
                   help="Spotlight's decode codes in torch (cache.HASH_KERNEL off), not by triton_kernels.hash_codes")
    g.add_argument("--hf", action="store_true", help="also transformers' generate() on the same shape")
    g.add_argument("--hf_cache", choices=["dynamic", "static"], default="dynamic",
                   help="its default dynamic cache (eager), or a static cache (which it compiles itself)")
    a = p.parse_args()
    if a.cpu_vs_hf == a.gpu:
        p.error("give one of --cpu_vs_hf, --gpu")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and (a.cpu_vs_hf or a.hf):
        p.error("under torchrun only --gpu runs (tensor parallel); --cpu_vs_hf and --hf are one process's")
    if a.warmup < 1:
        p.error("--warmup must be >= 1: the first step compiles")
    if unknown := [s for s in a.strategies or [] if parse_spec(s)[0] not in kv.REGISTRY]:
        p.error(f"unknown strategies {unknown}; known: {', '.join(sorted(kv.REGISTRY))}")
    if a.bandwidth is not None and a.bandwidth <= 0:
        p.error("--bandwidth is in GB/s and must be > 0")
    a.bandwidth_given = a.bandwidth is not None
    a.weights = a.weights or (["fp32", "int8", "int4"] if a.cpu_vs_hf else ["bf16"])
    if a.cpu_vs_hf and "bf16" in a.weights:
        p.error("--cpu_vs_hf runs fp32 (transformers' default): give --weights from fp32, int8, int4")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.kernel_tune:
        import json
        import triton_kernels
        triton_kernels.TUNE.update(json.loads(Path(a.kernel_tune).read_text()))
    if a.no_decode_gemm:
        import model
        model.DECODE_GEMM = False
    if a.no_evict_kernel:
        kv.EVICT_KERNEL = False
    if a.no_hash_kernel:
        kv.HASH_KERNEL = False
    for setting in a.inductor:
        key, _, value = setting.partition("=")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            value = key = None
        if key is None or not hasattr(torch._inductor.config, key):
            p.error(f"--inductor {setting}: give KEY=VALUE, KEY a torch._inductor.config setting, VALUE a Python literal")
        setattr(torch._inductor.config, key, value)
        if key in gen.CUDA_OPTIONS:  # compile_decode's own options would override the global setting
            gen.CUDA_OPTIONS[key] = value
        INDUCTOR_SET.append(setting)
    lines, failed = (cpu_vs_hf(a), False) if a.cpu_vs_hf else gpu(a)
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if a.out and os.environ.get("RANK", "0") == "0":
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
    if failed:
        sys.exit("bench.py: some rows failed their honesty checks (see FAILED above)")


def kv_shapes():
    from model import CONFIGS
    return [*CONFIGS, *SHAPES]


def full_layers(shape) -> int:
    from model import CONFIGS
    return (SHAPES.get(shape) or CONFIGS[shape])["n_layer"] if shape != "tiny" else 3


if __name__ == "__main__":
    main()
