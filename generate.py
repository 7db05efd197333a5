"""Generate with a compressed static KV cache: `python generate.py --cache_strategy lsh`.

Runs on the default model (SmolLM2-135M-Instruct) with no arguments. Prefill is eager and chunked
(model.prefill); the decode step is compiled with fullgraph=True (CUDA graphs on GPU) and never
syncs with the host except every `STOP_CHECK` steps to see whether every sequence has stopped.
Every run prints the numbers the README reports from this one code path. Under torchrun
(`torchrun --nproc_per_node N generate.py ...`) the model and its caches are split by KV heads over the N
processes (tp.py); rank 0 prints the text and the numbers, every rank its own weight and cache bytes.
"""
import argparse
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

import cache as kv
from model import load_model

ROOT = Path(__file__).resolve().parent  # defaults resolve here, not in the current folder
DEFAULT_CHECKPOINT = str(ROOT / "checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct")
PREPARE_DEFAULT = "bash scripts/prepare_default.sh"
DEFAULT_PROMPT = "Explain in a few sentences why a language model's KV cache grows with the length of the text."
STOP_CHECK = 32  # decode steps between host syncs that test whether every sequence hit a stop token


class UserError(Exception):
    """Bad input: reported as one line and a non-zero exit, never a traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (`error: ...`) and exit 2, as UserError's are."""

    def error(self, message):
        raise UserError(message)


def flag_bool(text: str) -> bool:
    """A boolean flag's value: true/false, yes/no, on/off, 1/0; anything else is an error."""
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true or false)")


def set_threads(n: int | None = None) -> int:
    """torch's CPU threads: n, or one per idle core (at most 8). With every core busy, each OpenMP
    barrier waits a scheduler slice: on a 2-core machine with one core busy, 2 threads decoded the default
    model at 4.6 tok/s and 1 thread at 13.2; with both idle, 2 threads 22.8 and 1 thread 14.3."""
    if n is not None and n < 1:
        raise UserError(f"--threads {n}: give at least 1")
    n = n or idle_cores()
    torch.set_num_threads(n)
    return n


def idle_cores(window: float = 0.1) -> int:
    """Cores this process may use that are idle now: /proc/stat sampled over `window` seconds (the load
    average where there is no /proc)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        def sample():
            head = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
            ticks = [int(x) for x in head]
            return sum(ticks), ticks[3] + ticks[4]  # all, idle + iowait
        (t0, i0), _, (t1, i1) = sample(), time.sleep(window), sample()
        busy = (os.cpu_count() or 1) * (1 - (i1 - i0) / max(t1 - t0, 1))
    except (OSError, IndexError, ValueError):
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(8, cores - round(busy)))


@dataclass
class Result:
    tokens: list            # generated token ids per sequence, cut at the first stop token
    prefill_s: float
    decode_s: float
    decode_steps: int
    cache_bytes: int
    compression_ratio: float
    compile_s: float = 0.0
    kv_read: int = 0        # cache bytes the next decode step reads (kv.read_bytes) ...
    kv_held: int = 0        # ... and the K/V bytes the caches hold
    ring_bytes: int = 0     # of cache_bytes, the sliding-window layers' rings (kv.WindowCache)
    uncut: list = None      # every token generated per sequence, past its stop too (a batch runs on)


def load(checkpoint_dir, device, dtype, tp=None):
    """Model and tokenizer from a converted checkpoint, with a one-line error for every failure. With `tp`
    (tensor parallel) the model is read on the CPU (memory-mapped), and only this rank's slice moves to
    `device`."""
    from tokenizer import load_tokenizer
    path = Path(checkpoint_dir)
    if not (path / "model.safetensors").exists() or not (path / "config.json").exists():
        hint = PREPARE_DEFAULT if path == Path(DEFAULT_CHECKPOINT) else "bash scripts/prepare.sh <hf_repo_id>"
        raise UserError(f"no checkpoint at {path}; prepare it with: {hint}")
    try:
        model = load_model(path, device="cpu" if tp else device, dtype=dtype)
        tokenizer = load_tokenizer(path)
        if tp and (reason := tp.check_divides(model.args, tp.rank_world()[1])):
            raise UserError(f"torchrun --nproc_per_node {tp.rank_world()[1]}: {reason}")
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:  # unreadable weights/config/tokenizer
        raise UserError(f"checkpoint at {path} is unreadable or corrupt ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); re-run {PREPARE_DEFAULT} "
                        f"or scripts/prepare.sh") from None
    return (tp.shard_model(model, device) if tp else model), tokenizer


def start_tp(args):
    """Launched by torchrun (WORLD_SIZE > 1): join the group, return (tp module, this rank's device);
    else (None, args.device). Ranks other than 0 print nothing; rank 0 prints every rank's bytes (tp.memory_line)."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return None, args.device
    if getattr(args, "debug_attention_loss", False):
        raise UserError("--debug_attention_loss runs in one process only (not under torchrun)")
    import tp  # tensor parallel: imported only here
    device = tp.init(args.device)
    if tp.rank_world()[0]:
        sys.stdout = open(os.devnull, "w")
    return tp, device


def pad_batch(prompts: list[list[int]], device):
    """Left-pad token lists into tokens [B, T] and positions [B, T] (-1 marks padding)."""
    T = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), T, dtype=torch.long)
    pos = torch.full((len(prompts), T), -1, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, T - len(p):] = torch.tensor(p)
        pos[i, T - len(p):] = torch.arange(len(p))
    return tokens.to(device), pos.to(device)


def sample(logits, temperature: float = 0.0, top_k: int | None = None):
    """logits [B, vocab] -> [B, 1]. Greedy at temperature 0; no host sync either way."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    probs = logits.softmax(dim=-1)
    # Gumbel-style sampling via exponential noise: multinomial without a device-to-host copy
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(dim=-1, keepdim=True)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# inductor's options for a CPU decode step. reorder_for_locality moves each producer down to its first consumer: it put
# the attention's read of V (attend_new_torch) after the cache write in the policies that attend before they choose
# the slot (H2O, TOVA, Scissorhands), and inductor, which writes a buffer in place only when nothing reads it after the
# write, then copied the whole K/V buffer every step: H2O at 50% of a 3.3k-token prompt decoded at 20.4 tok/s with it
# and 28.0 without, TOVA 16.4 and 21.7, Scissorhands 18.7 and 25.3 (BENCHMARKS.md, session 17). On CUDA the
# attention is one op before the write; bench.py --inductor reorder_for_locality=False times it there. From torch 2.13
# only: 2.11's inductor (the GPU image's), with the pass off, wrote the new K/V row wrong in the layers whose slot
# count is a symbol (PyramidKV's, SymbolicSlots), so compiled tokens left eager's (tests/test_model.py caught it).
CPU_OPTIONS = {"reorder_for_locality": False} if torch.__version__ >= "2.13" else {}
# CUDA: inductor's combo kernels launch a layer's independent small kernels as one (the q and k/v RoPE writes, the
# new token's position, the attention's row bounds): at 32k x 8 a decode step went from 464 launches to 400 for the
# full cache (+0.7% tok/s) and from 464 to 432 for StreamingLLM; in one A/B against the full cache of each run,
# StreamingLLM 2.26x -> 2.34x, Random 2.28x -> 2.31x, H2O 2.13x -> 2.19x, L2 2.21x either way (H200, BENCHMARKS.md
# session 19). bench.py --inductor combo_kernels=False times the step without them.
CUDA_OPTIONS = {"combo_kernels": True}


def compile_decode(model, device, regional=None, frozen=False, symbolic_slots=None):
    """The decode step, compiled with fullgraph=True and static shapes (dynamic=False: never dynamo's
    automatic dynamic shapes), except the caches' slot counts where symbolic_slots (SymbolicSlots).
    regional (the default on CUDA): one TransformerBlock.forward is compiled and every layer reuses it
    (dynamo lifts each layer's weights and cache buffers as graph inputs), so a 32-layer model compiles
    one layer, or one per kind of layer (Spotlight's dense layers); the whole step is then replayed as one
    CUDA graph (DecodeGraph), so no per-layer Python runs either.
    Otherwise (CPU) the whole forward is one graph: 30 compiled regions' call overhead cost ~20% of a
    CPU step of the default model.
    frozen (CPU): see frozen_decode."""
    # eviction budgets follow each prompt's length, so a run over many lengths meets many cache sizes, each
    # compiled once unless SymbolicSlots makes them symbols; dynamo's default limit (8) would fail fullgraph
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(1024, getattr(torch._dynamo.config, name)))
    cuda = torch.device(device).type == "cuda"
    options = CUDA_OPTIONS if cuda else CPU_OPTIONS
    if frozen:
        if cuda or regional:
            raise ValueError("a frozen decode step is CPU only and one graph (not regional)")
        return frozen_decode(model)
    if not (cuda if regional is None else regional):
        return SymbolicSlots(model, torch.compile(model.forward, fullgraph=True, dynamic=False, options=options),
                             symbolic_slots)
    from model import TransformerBlock
    block = torch.compile(TransformerBlock.forward, fullgraph=True, dynamic=False, options=options)
    step = SymbolicSlots(model, lambda tokens, input_pos: model.forward(tokens, input_pos, layer_step=block),
                         symbolic_slots)
    return DecodeGraph(model, step) if cuda else step


class SymbolicSlots:
    """A compiled decode step for which a cache's slot count is a symbol, not a constant, when the sizes vary:
    the layers' sizes differ (PyramidKV's and the head-budget strategies' per-layer budgets; 32 regional
    graphs, ~170 s of compiling on the H200, became one), or `always` (eval.py with a fractional budget: each
    prompt length its own sizes, one graph for them all). Each layer's cache buffers are marked dynamic
    (maybe_mark_dynamic: code that needs a constant specialises it, which costs a graph, never an error) along
    every dimension after the batch whose size is the slot count; dynamo forces module buffers static unless
    told otherwise (the config below, read when it traces). Sizes that do not vary stay constants: the dense
    attention kernel's loop bound is a constant only then (triton_kernels._chunk_bound)."""
    TRACE_CONFIG = {"force_parameter_static_shapes": False, "force_nn_module_property_static_shapes": False}

    def __init__(self, model, step, always=None):
        self.model, self.step, self.always, self.generation = model, step, always, None

    def __call__(self, tokens, input_pos):
        if self.generation != getattr(self.model, "cache_generation", 0):
            self.generation = getattr(self.model, "cache_generation", 0)
            caches = [layer.attention.kv_cache for layer in self.model.layers]
            if self.always or len({c.pos.shape[-1] for c in caches}) > 1:
                for c in caches:
                    mark_slots_dynamic(c)
        with torch._dynamo.config.patch(self.TRACE_CONFIG):
            return self.step(tokens, input_pos)


def mark_slots_dynamic(cache):
    """Every buffer dimension of a layer's cache (its store's included) past the first (the batch) whose size is
    the slot count, S = pos.shape[-1]. A dimension that equals S by chance (head_dim) is marked too: where
    it must be a constant, dynamo specialises it, which is only the static graph again."""
    S = cache.pos.shape[-1]
    cache.store.symbolic = True  # dynamo shows a symbolic size to Python as an int: the kernels are told
    for buf in cache.buffers():
        for d in range(1, buf.dim()):
            if buf.shape[d] == S:
                torch._dynamo.maybe_mark_dynamic(buf, d)


FROZEN_OPTIONS = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN", **CPU_OPTIONS}


def frozen_decode(model, options=FROZEN_OPTIONS):
    """The CPU decode step compiled with inductor's freezing and max-autotune: every weight becomes a
    constant, so inductor can pack it for its own CPP GEMM templates (weight-only int8 and int4 micro-kernels,
    autotuned against aten's; a plain compile calls aten's int8 kernel: 2.48x against 1.86x transformers' decode
    in BENCHMARKS.md). Freezing folds every buffer the step reads but
    does not write, a cache's per-prompt state (limits, budgets) included; that is safe only because dynamo
    then guards each module buffer's identity, so a new set of caches (each generate() call) compiles again,
    about 20 s for the default model (the first, autotuning, about 2 minutes), and the old graph stays in
    memory (~200 MB each for int8). For one long generation or a benchmark, not for an eval over many prompts.
    Freezing is read when dynamo traces, not only by inductor, hence the patch around every call; it is also
    in the options, so these graphs never share dynamo's cache entries with a plain compile of model.forward
    (same options, same backend: a frozen call ran the plain graph)."""
    compiled = torch.compile(model.forward, fullgraph=True, dynamic=False, options={**options, "freezing": True})

    def step(tokens, input_pos):
        with torch._inductor.config.patch(freezing=True):
            return compiled(tokens, input_pos)
    return step


class DecodeGraph:
    """A decode step replayed as one CUDA graph. The first call with a set of caches (a new
    model.cache_generation) or batch size runs the step (compiling it if needed) and then captures it
    with scratch inputs (capture records kernels without running them, so the caches see one step);
    every later call copies tokens and positions in and replays. A replay runs no Python, so nothing
    can recompile or fall out of the graph unnoticed; `captures` and `replays` count what happened
    (bench.py checks them). The returned logits are overwritten by the next replay: clone to keep."""

    def __init__(self, model, step):
        self.model, self.step = model, step
        self.key, self.graph, self.captures, self.replays = None, None, 0, 0

    def __call__(self, tokens, input_pos):
        key = (getattr(self.model, "cache_generation", 0), tuple(tokens.shape))
        if key == self.key:
            self.tokens.copy_(tokens)
            self.input_pos.copy_(input_pos)
            self.graph.replay()
            self.replays += 1
            return self.out
        self.key, self.graph, self.out = None, None, None  # frees the old graph's memory pool
        side = torch.cuda.Stream()  # warm up off the capture stream, as torch.cuda.graph's docs ask
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.step(tokens, input_pos)
        torch.cuda.current_stream().wait_stream(side)
        from torch._dynamo.utils import counters
        graphs = counters["stats"]["unique_graphs"]
        self.tokens, self.input_pos, self.graph = tokens.clone(), input_pos.clone(), torch.cuda.CUDAGraph()
        # tensor parallel (tp.py): NCCL's watchdog thread queries CUDA events meanwhile, which a "global"
        # capture counts as an error; "thread_local" checks this thread only (as torch's cudagraph trees do)
        mode = "thread_local" if torch.distributed.is_available() and torch.distributed.is_initialized() else "global"
        with torch.cuda.graph(self.graph, capture_error_mode=mode):
            self.out = self.step(self.tokens, self.input_pos)
        if counters["stats"]["unique_graphs"] != graphs:
            raise RuntimeError("the decode step compiled again while being captured: a guard failed between "
                               "two identical calls (input strides or a Python value that changes)")
        self.key, self.captures = key, self.captures + 1
        return out


@torch.no_grad()
def generate(model, prompts, max_new_tokens, cache_cfg: kv.CacheConfig, *, temperature=0.0, top_k=None,
             stop_ids=(), decode_step=None, device="cpu", on_caches=None, suffixes=None) -> Result:
    """Prefill a batch of prompts (token lists of any lengths), then decode max_new_tokens steps.

    `suffixes` (one token list per prompt, all of one length) are fed through decode steps after the
    prefill, before the first sampled token: text placed after a compressed prompt sees only what the
    cache kept (eval.py's query-agnostic mode). prefill_s then covers them (time to first token)."""
    B = len(prompts)
    n_sfx = len(suffixes[0]) if suffixes else 0
    max_len = max(len(p) for p in prompts) + n_sfx + max_new_tokens
    if max_len > model.args.block_size:
        raise UserError(f"prompt of {max_len - max_new_tokens} tokens + {max_new_tokens} new tokens exceeds "
                        f"the model's maximum context of {model.args.block_size}")
    dtype = model.norm.weight.dtype  # not the embedding table: int8 in a quantized model
    try:  # suffix tokens take the slots a prefill-only strategy reserves for new tokens
        if max(float(v) for v in cache_cfg.max_cache_length) > model.args.block_size:  # a typo, not a budget
            raise ValueError(f"--max_cache_length {' '.join(map(str, cache_cfg.max_cache_length))} exceeds the "
                             f"model's maximum context of {model.args.block_size} tokens")
        caches = kv.make_caches(model.args, cache_cfg, B, max_len, n_sfx + max_new_tokens, device, dtype,
                                lengths=[len(p) + n_sfx + max_new_tokens for p in prompts], fed=n_sfx)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    model.setup_caches(caches)
    if on_caches:
        on_caches(caches)
    step = decode_step or model.forward
    tokens, pos = pad_batch(prompts, device)

    sync(device)
    t0 = time.perf_counter()
    logits = model.prefill(tokens, pos)
    input_pos = pos[:, -1] + 1
    compile_s = 0.0
    if n_sfx:
        # a compiled step compiles on its first call (eager feeding reports 0)
        logits, input_pos, compile_s = feed(model, decode_step, torch.tensor(suffixes, device=device), input_pos, device)
    next_tok = sample(logits, temperature, top_k)
    sync(device)
    prefill_s = time.perf_counter() - t0 - compile_s

    stops = torch.tensor(list(stop_ids) or [-1], device=device)
    done = torch.isin(next_tok[:, 0], stops)
    out = [next_tok]
    t0, steps = time.perf_counter(), 0
    for i in range(max_new_tokens - 1):
        logits = step(next_tok, input_pos)
        next_tok = sample(logits[:, -1].clone(), temperature, top_k)
        input_pos = input_pos + 1
        done = done | torch.isin(next_tok[:, 0], stops)
        out.append(next_tok)
        steps += 1
        if i == 0:  # the first call compiles (or captures a CUDA graph): time it apart from decoding
            sync(device)
            compile_s, t0, steps = compile_s + time.perf_counter() - t0, time.perf_counter(), 0
        if (i + 1) % STOP_CHECK == 0 and bool(done.all()):
            break
    sync(device)
    decode_s = time.perf_counter() - t0
    generated = torch.cat(out, dim=1).tolist()
    seen = torch.tensor([len(p) for p in prompts], device=device) + n_sfx + len(out) - 1
    return Result([cut_at_stop(g, stop_ids) for g in generated], prefill_s, decode_s, steps,
                  kv.cache_bytes(caches), kv.compression_ratio(caches, seen), compile_s,
                  *kv.read_bytes(caches, input_pos),
                  ring_bytes=kv.cache_bytes([c for c in caches if isinstance(c, kv.WindowCache)]), uncut=generated)


def feed(model, step, tokens, input_pos, device, all_logits=False):
    """Teacher-force tokens [B, n] from positions input_pos [B]. Returns the logits after the last one
    [B, vocab] (after each one [B, n, vocab] with all_logits), the next positions, and the first step's
    time (a compiled step compiles on it). Eager (step None): Transformer.feed, the same n decode steps
    with each weight read once; compiled: one compiled (CUDA-graphed) step per token."""
    if step is None:
        return model.feed(tokens, input_pos, all_logits), input_pos + tokens.shape[1], 0.0
    t0, first, rows = time.perf_counter(), 0.0, []
    for j in range(tokens.shape[1]):
        # a fresh [B, 1] with strides (1, 1) like sampled tokens: the slice's (n, 1) strides would recompile
        column = tokens[:, j:j + 1].clone(memory_format=torch.contiguous_format)
        logits = step(column, input_pos)[:, -1]
        if all_logits:
            rows.append(logits.clone())  # the next replay of the CUDA graph overwrites its output
        input_pos = input_pos + 1
        if j == 0:
            sync(device)
            first = time.perf_counter() - t0
    return (torch.stack(rows, 1) if all_logits else logits.clone()), input_pos, first


def cut_at_stop(tokens, stop_ids):
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[:i]
    return tokens


def strategy_flags(parser):
    """Every hyperparameter of every registered strategy becomes a --flag; its help names each strategy
    that has it with that strategy's default (head_beta: headkv 1.01, dililazy 1.351)."""
    owners = {}
    for cls in kv.REGISTRY.values():
        for key, default in cls.defaults.items():
            owners.setdefault(key, []).append((cls.name, default))
    for key, pairs in owners.items():
        default = pairs[0][1]
        kind = dict(type=flag_bool) if isinstance(default, bool) else \
            dict(nargs="*", type=type(default[0]) if default else int) if isinstance(default, (list, tuple)) else \
            dict(type=type(default))
        shown = sorted({f"{n} (default {d})" if len({str(x) for _, x in pairs}) > 1 else n for n, d in pairs})
        help_ = ", ".join(shown) + ("" if len({str(x) for _, x in pairs}) > 1 else f" (default {default})")
        parser.add_argument(f"--{key}", default=None, help=help_, **kind)
    return list(owners)


def strategy_table() -> str:
    """Every strategy's defaults (protection, hyperparameters) and their source, for --help."""
    rows = ["strategies (defaults; --flags override them):"]
    for name, cls in sorted(kv.REGISTRY.items()):
        sinks, window = cls.protection(kv.CacheConfig())
        kind = "keeps every token" if not (cls.evicts or cls.prefill_only) else \
            f"sinks {sinks}, recent {window:g}" if cls.protects else "no sinks or window"
        params = ", ".join(f"{k} {v}" for k, v in cls.defaults.items() if v != "")
        rows.append(f"  {name:<17} {kind}{'; ' + params if params else ''}{' [' + cls.source + ']' if cls.source else ''}")
    return "\n".join(rows)


def add_cache_args(parser):
    """The cache flags shared by generate.py and eval.py."""
    g = parser.add_argument_group("cache")
    g.add_argument("--cache_strategy", default="full", help=f"one of: {', '.join(sorted(kv.REGISTRY))}")
    g.add_argument("--max_cache_length", nargs="+", default=None,
                   help=f"fraction (<= 1) of each prompt's tokens, or tokens; one value or one per layer (default "
                        f"{DEFAULT_BUDGET} for strategies that compress; unused by the others). Generated tokens never count")
    g.add_argument("--global_tokens", type=int, default=None,
                   help="attention sinks kept (default: the strategy's own; see the table below)")
    g.add_argument("--recent_window", type=float, default=None,
                   help="most recent tokens kept, below 1 a fraction of each layer's slots (default: the strategy's own)")
    g.add_argument("--budget_pattern", default="uniform", choices=["uniform", "pyramid", "funnel"],
                   help="per-layer shape of one --max_cache_length value")
    g.add_argument("--prompt_compression", default="own",
                   help="strategy whose rule cuts prompts longer than the budget ('own' = the strategy's)")
    g.add_argument("--kv_bits", type=int, default=16, choices=[2, 4, 8, 16],
                   help="store K/V as KIVI codes of this many bits (16: the model dtype, off); any strategy")
    g.add_argument("--kv_group", type=int, default=32,
                   help="KIVI group: keys share a scale per channel over this many tokens, values per token over "
                        "this many channels (must divide head_dim)")
    g.add_argument("--kv_residual", type=int, default=128,
                   help="newest tokens kept in full precision before they are quantized (a multiple of --kv_group, "
                        "at least one group)")
    g.add_argument("--cache_config", help="YAML file (see cache_configs/); the command line overrides it")
    return strategy_flags(g)


def parse_with_config(parser, argv=None):
    """Parse argv; values from --cache_config fill in only what the command line did not set."""
    args = parser.parse_args(argv)
    if args.cache_config:
        import yaml
        path = Path(args.cache_config)
        if not path.exists():
            path = ROOT / "cache_configs" / f"{args.cache_config}.yaml"
        if not path.exists():
            parser.error(f"no cache config {args.cache_config} (looked in cache_configs/)")
        try:
            conf = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(conf, dict):
            raise UserError(f"{path} must be a YAML mapping of flag: value, not a {type(conf).__name__}")
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(conf) - known)
        if unknown:
            parser.error(f"{path}: unknown keys {', '.join(unknown)}")
        if "max_cache_length" in conf and not isinstance(conf["max_cache_length"], list):
            conf["max_cache_length"] = [conf["max_cache_length"]]
        parser.set_defaults(**conf)
        args = parser.parse_args(argv)  # the command line wins over the YAML
    return args


DEFAULT_BUDGET = "0.5"  # of each sequence's tokens, when a compressing strategy is given no --max_cache_length


def compresses(strategy: str) -> bool:
    cls = kv.REGISTRY[strategy]
    return cls.evicts or cls.prefill_only


def cache_config_from_args(args, param_keys, checkpoint_dir="") -> kv.CacheConfig:
    """The CacheConfig of parsed flags, each checked (bad values are a UserError naming the flag)."""
    if args.cache_strategy not in kv.REGISTRY:
        raise UserError(f"unknown cache strategy {args.cache_strategy!r}; known: {', '.join(sorted(kv.REGISTRY))}")
    args.budget_defaulted = args.max_cache_length is None
    if args.budget_defaulted:
        args.max_cache_length = [DEFAULT_BUDGET if compresses(args.cache_strategy) else "1.0"]
    try:
        for v in args.max_cache_length:
            kv.budget_value(v)
    except ValueError as e:
        raise UserError(str(e)) from None
    for flag, value in (("--global_tokens", args.global_tokens), ("--recent_window", args.recent_window)):
        if value is not None and value < 0:
            raise UserError(f"{flag} {value:g}: give a count >= 0")
    if args.kv_group < 1 or args.kv_residual < args.kv_group or args.kv_residual % args.kv_group:
        raise UserError(f"--kv_group {args.kv_group} --kv_residual {args.kv_residual}: the group must be >= 1 and the "
                        "residual a multiple of it, at least one group (the newest token enters through it)")
    params = {k: getattr(args, k) for k in param_keys if getattr(args, k, None) is not None}
    return kv.CacheConfig(kv_bits=args.kv_bits, kv_group=args.kv_group, kv_residual=args.kv_residual,
                          strategy=args.cache_strategy, max_cache_length=[str(v) for v in args.max_cache_length],
                          global_tokens=args.global_tokens, recent_window=args.recent_window,
                          budget_pattern=args.budget_pattern, protocol=getattr(args, "protocol", "stream"),
                          prompt_compression=args.prompt_compression, params=params,
                          checkpoint_dir=str(checkpoint_dir))


def read_prompts(values):
    prompts = []
    for p in values or [DEFAULT_PROMPT]:
        if p.endswith(".txt"):
            if not Path(p).exists():
                raise UserError(f"prompt file {p} does not exist")
            try:
                p = Path(p).read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise UserError(f"prompt file {p} is not UTF-8 text") from None
        prompts.append(p)
    return prompts


def check_device(device: str, dtype: str | None) -> torch.dtype:
    """--device and --dtype, checked: one line for a device this machine lacks or a dtype we don't run."""
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: give cpu or cuda (cuda:N)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: this machine has no CUDA GPU (torch {torch.__version__}); use --device cpu")
    if kind == "cuda" and ":" in device and not int(device.split(":")[1] or 0) < torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    name = dtype or ("bfloat16" if kind == "cuda" else "float32")
    if name not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype {dtype}: give float32, bfloat16 or float16")
    return getattr(torch, name)


def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0], epilog=strategy_table(),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", action="append", help="text or a .txt path; repeat for a batch")
    parser.add_argument("--checkpoint_path", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--num_samples", type=int, default=1, help="generations per prompt batch")
    parser.add_argument("--batch_size", type=int, default=None, help="sequences per batch (prompts are cycled)")
    parser.add_argument("--no_chat", action="store_true", help="do not apply the chat template")
    parser.add_argument("--compile", action="store_true", help="compile the decode step (fullgraph)")
    parser.add_argument("--freeze", action="store_true", help="CPU, with --compile: weights folded into the graph "
                        "and packed for inductor's GEMM templates (max-autotune); faster decode, each sample compiles "
                        "again, about 20 s (the first on a machine about 2 minutes)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per idle core, at most 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--debug_attention_loss", action="store_true",
                        help="run a full cache beside the compressed one; report the attention mass on evicted tokens")
    param_keys = add_cache_args(parser)
    args = parse_with_config(parser, argv)

    if args.freeze and (not args.compile or args.device != "cpu" or int(os.environ.get("WORLD_SIZE", 1)) > 1):
        raise UserError("--freeze is for a compiled CPU decode step in one process: give it with --compile and "
                        "--device cpu, not under torchrun")
    torch.manual_seed(args.seed)  # under torchrun every rank draws the same samples from the same logits
    dtype = check_device(args.device, args.dtype)
    for flag, value, low in (("--max_new_tokens", args.max_new_tokens, 1), ("--num_samples", args.num_samples, 1),
                             ("--batch_size", args.batch_size, 1), ("--top_k", args.top_k, 1)):
        if value is not None and value < low:
            raise UserError(f"{flag} {value}: give at least {low}")
    if args.temperature < 0:
        raise UserError(f"--temperature {args.temperature:g}: give 0 (greedy) or more")
    cfg = cache_config_from_args(args, param_keys, args.checkpoint_path)
    threads = set_threads(args.threads) if args.device == "cpu" else None
    tp, args.device = start_tp(args)
    model, tokenizer = load(args.checkpoint_path, args.device, dtype, tp)
    texts = read_prompts(args.prompt)
    batch = args.batch_size or len(texts)
    texts = [texts[i % len(texts)] for i in range(batch)]
    prompts = [tokenizer.encode_prompt(t, chat=not args.no_chat) for t in texts]
    if empty := [i for i, p in enumerate(prompts) if not p]:
        raise UserError(f"prompt {empty[0]} is empty (no tokens{' with --no_chat' if args.no_chat else ''})")
    print(settings_line(cfg, args, threads))
    step = compile_decode(model, args.device, frozen=args.freeze) if args.compile else None
    for n in range(args.num_samples):
        probes = []
        max_len = max(map(len, prompts)) + args.max_new_tokens
        attach = (lambda caches: probes.extend(kv.attach_attention_loss(model, max_len, args.max_new_tokens))
                  ) if args.debug_attention_loss else None
        res = generate(model, prompts, args.max_new_tokens, cfg, temperature=args.temperature, top_k=args.top_k,
                       stop_ids=tokenizer.stop_ids, decode_step=step, device=args.device, on_caches=attach)
        for i, toks in enumerate(res.tokens):
            print(f"--- sample {n} sequence {i} ({len(prompts[i])} prompt tokens) ---")
            print(tokenizer.decode(toks))
        report(res, model, prompts, args)
        if tp:
            tp.print_memory_lines(model, res.cache_bytes)
        if probes:
            print_attention_loss(torch.stack([p.loss for p in probes]).cpu())
    if tp:
        tp.close()


def settings_line(cfg, args, threads) -> str:
    """What this run does that the user may not have asked for: the budget, the threads."""
    if compresses(cfg.strategy):
        default = " (the default; --max_cache_length to change)" if args.budget_defaulted else ""
        budget = f"budget {' '.join(cfg.max_cache_length)} of each prompt's tokens{default}"
    else:
        budget = "no compression (every token kept)"
    cpu = f"; {threads} CPU thread(s) ({'--threads' if args.threads else 'one per idle core; --threads to set'})" \
        if threads else ""
    return f"{cfg.strategy}: {budget}{cpu}"


def print_attention_loss(loss):
    """loss [n_layer, B, steps]: the full cache's attention mass on tokens the compressed cache lacks."""
    per_layer = loss.nanmean(dim=(1, 2))
    print("attention loss (full-cache attention mass on evicted tokens), mean over sequences and steps:")
    print("  per layer: " + " ".join(f"{i}:{v:.3f}" for i, v in enumerate(per_layer.tolist())))
    per_step = loss.nanmean(dim=(0, 1))
    steps = [i for i in range(per_step.numel()) if not per_step[i].isnan()]
    marks = sorted({steps[0], steps[len(steps) // 2], steps[-1]}) if steps else []
    print("  per step (mean over layers): " + " ".join(f"{i}:{per_step[i]:.3f}" for i in marks))


def weight_bytes(model) -> int:
    """Bytes streamed per decode step: every weight but the embedding table (gathered, not streamed),
    plus the output projection when it is tied to that table; quantized weights as stored."""
    n = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "tok_embeddings" not in name)
    if model.args.quantization:  # codes and scales are buffers (quant.py), the tied output among them
        import quant
        return n + quant.stored_bytes(model)
    if model.args.tie_embeddings:
        n += model.output.weight.numel() * model.output.weight.element_size()
    return n


def report(res: Result, model, prompts, args):
    B = len(prompts)
    tok_s = res.decode_steps / res.decode_s if res.decode_s > 0 else float("nan")
    weights = weight_bytes(model)
    q = model.args.quantization  # quant.py's weight-only modes: say so beside the bytes
    wq = f" ({q['mode']} weights{', groups of %d' % q['groupsize'] if 'groupsize' in q else ''})" if q else ""
    print(f"prefill: {res.prefill_s * 1000:.1f} ms for {sum(map(len, prompts))} tokens | "
          f"compile/first step: {res.compile_s:.1f} s")
    print(f"decode: {tok_s:.1f} tok/s per sequence, {tok_s * B:.1f} tok/s total (batch {B}, {res.decode_steps} steps)")
    bits = f"{args.kv_bits}-bit KIVI codes, group {args.kv_group}, residual {args.kv_residual}" if args.kv_bits < 16 \
        else f"model dtype, {str(model.norm.weight.dtype).removeprefix('torch.')}"
    print(f"cache: {res.cache_bytes / 2**20:.2f} MiB allocated ({res.cache_bytes:,} bytes; {args.cache_strategy}, {bits}), "
          f"compression ratio {res.compression_ratio:.3f} (1 - slots used / tokens seen)")
    if res.ring_bytes:  # the model's own sliding windows: the strategy manages (and the ratio counts) the others
        a, managed = model.args, len(kv.managed_layers(model.args))
        print(f"  of which {res.ring_bytes / 2**20:.2f} MiB: {a.n_layer - managed} of {a.n_layer} layers' sliding-window "
              f"rings ({a.sliding_window} slots each, whatever the strategy); the strategy and the ratio: the other "
              f"{managed} layers")
    print(f"KV read per decode step: {res.kv_read / 2**20:.2f} MiB of the {res.kv_held / 2**20:.2f} MiB of K/V cached "
          f"({100 * res.kv_read / max(res.kv_held, 1):.0f}%; retrieval strategies read their selection and index)")
    if "cuda" in args.device:
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB; weights streamed per step: "
              f"{weights / 1e9:.3f} GB{wq}")
    else:
        print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB; "
              f"weights streamed per step: {weights / 1e9:.3f} GB{wq}")


def cli(fn, argv=None):
    """Run fn, turning bad input into one line on stderr and exit status 2, and Ctrl-C into one line
    and status 130. Under torchrun every rank fails alike and rank 0 says why."""
    try:
        fn(argv)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli(main)
