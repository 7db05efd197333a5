"""Evaluate KV-cache strategies on offline tasks, judge-free: `python eval.py --tasks gsm8k passkey`.

    python eval.py --tasks gsm8k rulerniah --cache_strategy full h2o l2 --max_cache_length 0.5 0.25
    python eval.py --tasks longbench --cache_config cache_configs/a.yaml cache_configs/b.yaml
    torchrun --nproc_per_node 2 eval.py --tasks passkey --num_samples 20      # data parallel (gloo)
    torchrun --nproc_per_node 2 eval.py --tasks passkey --tensor_parallel     # one model split by KV heads (tp.py)
    python eval.py --report results/                                         # table + Pareto plots

Sweeps: several --cache_strategy, --max_cache_length or --cache_config values run their cartesian
product. Here, unlike generate.py, several --max_cache_length values are a sweep; a per-layer budget
is one comma-separated value (`--max_cache_length 0.5,0.5,0.25,...`) or a list in a YAML config.
Strategies that ignore the budget (full, retrieval) run once.

Fair by construction: every config sees the same prompt tokens and one prompt-compression rule
(--prompt_compression; 'own' = the strategy's prefill scores if it defines them, else the shared
default, sinks + most recent), written to config.json as `prompt_rule`. Each sample's cache is sized
from its own length. Query-agnostic by default: the context is prefilled (and compressed), then the
question is fed token by token through decode steps, so it sees only what the cache kept and eviction
goes on (gen.feed, as generate.generate's `suffixes`); --query_aware prefills the question with the context.

Each task runs its first --num_samples samples (default: the task's, about 10 minutes per configuration
on 2 CPU cores, said at the start; 'all' for every one); answers end at the task's stop strings (the task
table of --help). Data are read from --data_dir, else the repository's data/ (scripts/prepare_data.py),
then ../shared/data beside the repository.

Results go to results/<model>/<task>/<config>/, <config> a readable name plus a hash of every setting
that changes results: config.json (the effective config), predictions.jsonl (one line per sample,
appended and fsynced as made, with the git commit that made it) and metrics.json (its `code`: every commit
among the rows); the run ends with a line per task and configuration
(score ± standard error, n, folder). A rerun skips finished samples (a truncated last line is dropped),
so a larger --num_samples extends a run, and refuses to mix configurations; --overwrite restarts;
Ctrl-C says what is saved. Under torchrun each rank writes its shard to predictions.rank<r>.jsonl and
rank 0 merges them; with --tensor_parallel the ranks run every sample together (the model split by KV
heads, tp.py) and rank 0 alone writes. Bad input is one line and exit status 2 (generate.UserError), never a traceback.

Paired against the full cache: when the full cache's results of the same task and settings (all but the
cache's) are there, metrics.json gains `vs_full`: the mean per-sample difference (this configuration -
full, on the sample ids both have; points of the metric, perplexity's per-document NLL, fidelity's KL) with
a paired bootstrap 95% interval (--bootstrap_samples, seeded) and, for 0/1 scores, McNemar's exact p.
--report recomputes them from predictions.jsonl, shows them per configuration and, per task and strategy
line, the lossless budget: the smallest whose interval lies within +-(--lossless_margin) of the full cache.
"""
import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

import cache as kv
import generate as gen
import metrics as M
import tasks as T

REPO = Path(__file__).resolve().parent
SWEEP = ("cache_config", "cache_strategy", "max_cache_length", "kv_bits")  # each a list: one run per combination
BOOTSTRAP, LOSSLESS_MARGIN = 10_000, 2.0  # --bootstrap_samples, --lossless_margin


def positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least 1")
    return n


def sample_count(text: str):
    if text == "all":
        return text
    try:
        return positive(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of samples (at least 1) or 'all'") from None


def build_parser():
    p = gen.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False, epilog="tasks:\n" + T.task_table(),
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["gsm8k"],
                   help=f"tasks or groups: {', '.join([*T.SIMPLE, *T.RULER_NIAH, *T.GROUPS])}, longbench_<dataset>")
    p.add_argument("--num_samples", type=sample_count, default=None,
                   help="first N samples of each task (synthetic: N generated), or 'all'; default: the task's "
                        "(table below, about 10 minutes per configuration on 2 CPU cores)")
    p.add_argument("--seed", type=int, default=0, help="few-shot exemplars, synthetic data, random strategies")
    p.add_argument("--checkpoint_path", default=gen.DEFAULT_CHECKPOINT, help="relative paths: to the current "
                   "folder, else to the repository")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bfloat16 on GPU, "
                   "float32 on CPU)")
    p.add_argument("--compile", action="store_true", help="compile the decode step")
    p.add_argument("--batch_size", type=positive, default=1, help="samples run together, left-padded, each with "
                   "its own budget and evictions (generation and fidelity: those of one question length; ppl); a "
                   "step of the default model costs about the same for 1 or 50 rows. Choice tasks run one at a time")
    p.add_argument("--tensor_parallel", action="store_true", help="under torchrun: split the model over the "
                   "processes by KV heads (tp.py; NCCL on CUDA) instead of splitting the samples")
    p.add_argument("--threads", type=positive, default=None, help="CPU threads (default: one per idle core)")
    p.add_argument("--protocol", choices=["context", "stream"], default="context",
                   help="query-agnostic protocol: context (kvpress's: the context compressed to the budget, a fraction "
                        "of the context; question and answer appended without eviction) or stream (the question fed "
                        "through the cache like any token, counted in the budget's prompt). ppl: context compresses "
                        "the prefill once, stream evicts while the rest is read")
    p.add_argument("--query_aware", action="store_true", help="prefill the question with the context")
    p.add_argument("--no_chat", action="store_true", help="never apply the chat template")
    p.add_argument("--max_new_tokens", type=positive, default=None, help="override every task's output length")
    p.add_argument("--results_dir", default="results")
    p.add_argument("--overwrite", action="store_true", help="discard earlier results of these runs")
    p.add_argument("--report", metavar="DIR", help="print the markdown table of DIR and write Pareto plots")
    p.add_argument("--report_out", default=None, help="folder for the --report plots (default: DIR)")
    p.add_argument("--bootstrap_samples", type=positive, default=BOOTSTRAP,
                   help="resamples of the paired bootstrap against the full cache (metrics.json and --report)")
    p.add_argument("--lossless_margin", type=float, default=LOSSLESS_MARGIN,
                   help="--report's lossless budget: the 95%% interval of the difference from the full cache "
                        "within +-this many points of the metric (perplexity: percent)")
    p.add_argument("--data_dir", default=None, help="evaluation data (only this folder); default: the "
                   f"repository's data/ ({T.PREPARE_DATA} fills it), then ../shared/data beside the repository")
    t = p.add_argument_group("tasks")
    t.add_argument("--context_length", type=positive, default=4096, help="synthetic, niah, ppl, longbench (tokens)")
    t.add_argument("--num_fewshot", type=int, default=5, help="gsm8k exemplars")
    t.add_argument("--longbench_dir", default=None, help="unzipped LongBench data.zip (data/*.jsonl)")
    t.add_argument("--niah_lengths", type=positive, nargs="+", default=None, help="default: L/4, L/2, L")
    t.add_argument("--niah_depths", type=int, nargs="+", default=T.NIAH_DEPTHS)
    t.add_argument("--ppl_corpus", choices=["pg19", "wikitext2"], default="pg19")
    t.add_argument("--ppl_prefill", type=positive, default=T.PPL_PREFILL,
                   help="tokens prefilled before teacher forcing")
    t.add_argument("--ppl_bin", type=positive, default=T.PPL_BIN, help="positions per point of the perplexity curve")
    t.add_argument("--fidelity_task", default="gsm8k", help="generation task whose prompts fidelity uses")
    t.add_argument("--fidelity_tokens", type=positive, default=64)
    return p, gen.add_cache_args(p)


TASK_SETTINGS = {"gsm8k": ["num_fewshot"], "gsm8k_mc": ["num_fewshot"], "niah": ["context_length", "niah_lengths",
                 "niah_depths"], "ppl": ["ppl_corpus", "context_length", "ppl_prefill", "ppl_bin"],
                 "fidelity": ["fidelity_task", "fidelity_tokens", "num_fewshot", "context_length"]}


def task_settings(task, args) -> dict:
    keys = TASK_SETTINGS.get(task.name, ["context_length"] if isinstance(task, (T.Synthetic, T.LongBench)) else [])
    keys = keys + (["longbench_dir"] if isinstance(task, T.LongBench) else [])
    return {k: getattr(args, k) for k in keys}


# ---------------------------------------------------------------- configurations and sweeps
def parse_configs(argv) -> dict:
    """{config name: (CacheConfig, args)}, one per point of the sweep, duplicates dropped."""
    pre = gen.ArgumentParser(add_help=False, allow_abbrev=False)
    for k in SWEEP:
        pre.add_argument(f"--{k}", nargs="+")
    sweep, rest = pre.parse_known_args(argv)
    if sweep.cache_config:
        sweep.cache_config = [str(cache_config_file(c)) for c in sweep.cache_config]
    configs = {}
    for point in itertools.product(*[getattr(sweep, k) or [None] for k in SWEEP]):
        sub = rest + [x for k, v in zip(SWEEP, point) if v is not None for x in (f"--{k}", v)]
        parser, keys = build_parser()  # fresh: parse_with_config writes a YAML's values into the defaults
        args = gen.parse_with_config(parser, sub)
        if args.max_cache_length is not None:  # None: generate's default (0.5 for strategies that compress)
            args.max_cache_length = [v.strip() for x in args.max_cache_length for v in str(x).split(",") if v.strip()]
        args.checkpoint_path = checkpoint_path(args.checkpoint_path)
        cfg = gen.cache_config_from_args(args, keys, args.checkpoint_path)
        cls = kv.REGISTRY[cfg.strategy]
        if not (cls.evicts or cls.prefill_only):
            cfg.max_cache_length = ["1.0"]  # unused: the cache holds every token
        configs.setdefault(config_name(cfg, args), (cfg, args))
    return configs


def checkpoint_path(path: str) -> str:
    """A relative checkpoint path from the current folder if it is there, else from the repository."""
    return str(REPO / path) if not Path(path).exists() and (REPO / path).exists() else path


def cache_config_file(name: str) -> Path:
    """--cache_config: a YAML file (from the current folder, else from the repository) or a name in the
    repository's cache_configs/ (generate.parse_with_config reads and checks it)."""
    path = next((p for p in (Path(name), REPO / name, REPO / "cache_configs" / f"{name}.yaml") if p.is_file()), None)
    if path is None:
        known = ", ".join(sorted(p.stem for p in (REPO / "cache_configs").glob("*.yaml")))
        raise gen.UserError(f"--cache_config {name}: no such file, nor a name in cache_configs/ ({known})")
    return path.resolve()


def config_settings(cfg: kv.CacheConfig, args) -> dict:
    """Every setting of a configuration that changes its results, as config.json records it (the task's
    own settings are in the task folder's name, and the run's sample count may grow on a rerun)."""
    cls = kv.REGISTRY[cfg.strategy]
    cache = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "checkpoint_dir"}
    cache["params"] = {**cls.defaults, **{k: v for k, v in cfg.params.items() if k in cls.defaults}}
    cache["protection"] = dict(zip(("sinks", "recent_window"), cls.protection(cfg)))  # the flags', else the paper's
    return json.loads(json.dumps({"cache": cache, "prompt_rule": prompt_rule(cfg), "query_aware": args.query_aware,
                                  "chat": not args.no_chat, "seed": args.seed, "dtype": dtype_name(args),
                                  "max_new_tokens": args.max_new_tokens}))


def dtype_name(args) -> str:
    return args.dtype or ("bfloat16" if "cuda" in args.device else "float32")


def settings_hash(settings: dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:6]


def config_name(cfg: kv.CacheConfig, args) -> str:
    """strategy[-budget][-non-default settings][-qa]-hash, e.g. h2o-0.25-1c9e0a, snapkv-0.1-snapkv_window=8-qa-
    77b2f3: readable, and the hash of config_settings (seed, dtype, chat, max_new_tokens and every cache
    setting) keeps two configurations from sharing a name."""
    return f"{readable_name(cfg, args)}-{settings_hash(config_settings(cfg, args))}"


def readable_name(cfg: kv.CacheConfig, args, budget=True) -> str:
    """strategy[-budget][-non-default settings][-qa]; without the budget, the line a plot draws it on."""
    cls = kv.REGISTRY[cfg.strategy]
    short = lambda v: "_".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    parts = [cfg.strategy]
    if (cls.evicts or cls.prefill_only) and budget:
        b = cfg.max_cache_length
        parts.append(b[0] if len(set(b)) == 1 else "layers" + hashlib.sha1(short(b).encode()).hexdigest()[:6])
    extra = {k: v for k, v in cfg.params.items() if k in cls.defaults and v != cls.defaults[k]}
    default = kv.CacheConfig()  # and every other CacheConfig field off its default (sinks, window, ...)
    extra |= {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
              if f.name not in ("strategy", "max_cache_length", "params", "checkpoint_dir", "protocol")
              and getattr(cfg, f.name) != getattr(default, f.name)}
    extra |= {k: v for k, v in (("seed", args.seed), ("max_new_tokens", args.max_new_tokens)) if v}
    extra |= {"no_chat": 1} if args.no_chat else {}
    tail = "-".join(f"{k}={short(v)}" for k, v in sorted(extra.items()))
    if len(tail) > 60:
        tail = "h" + hashlib.sha1(tail.encode()).hexdigest()[:8]
    mode = ["qa"] if args.query_aware else ["stream"] if cfg.protocol == "stream" else []  # context: the default
    return "-".join(parts + ([tail] if tail else []) + mode)


def prompt_rule(cfg: kv.CacheConfig) -> str:
    if cfg.prompt_compression != "own":
        return f"{cfg.prompt_compression} prefill scores (--prompt_compression)"
    cls = kv.REGISTRY[cfg.strategy]
    if not (cls.evicts or cls.prefill_only):
        return "none (every token kept)"
    own = cls.prefill_scores is not kv.KVCache.prefill_scores
    return f"{cfg.strategy}'s own prefill scores" if own else "sinks + most recent (shared default)"


def effective_config(ctx, task, name, cfg, args, n) -> dict:
    meta = {"model": Path(args.checkpoint_path).name, "task": task.tag, "config": name,
            "series": readable_name(cfg, args, budget=False), **config_settings(cfg, args),
            "task_settings": task_settings(task, args),
            "run": {"num_samples": n, "device": str(ctx.device), "compile": args.compile,
                    "world_size": ctx.world, "batch_size": args.batch_size,
                    "tensor_parallel": ctx.shards == 1 and ctx.world > 1,
                    "torch": torch.__version__}}  # "run" may change on resume
    return json.loads(json.dumps(meta))


# ---------------------------------------------------------------- running one sample
@dataclasses.dataclass
class Ctx:
    model: torch.nn.Module
    tok: object
    args: argparse.Namespace
    device: str
    dtype: torch.dtype
    step: object = None  # compiled decode step, or None for eager
    rank: int = 0
    world: int = 1
    shards: int = 1  # ranks that split the samples: world, or 1 with --tensor_parallel (rank 0 writes)
    code: str = "unknown"  # code_version(), written into every row
    full_runs: dict = dataclasses.field(default_factory=dict)  # fidelity's full-cache reference, per sample
    alone_memo: dict = dataclasses.field(default_factory=dict)  # alone_bytes, by config and lengths

    @property
    def shard(self) -> int:
        return self.rank if self.shards > 1 else 0

    @property
    def writes(self) -> bool:  # this rank appends predictions (a tensor-parallel rank > 0 only computes)
        return self.shards > 1 or self.rank == 0


def split_prompt(ctx, s):
    ids, n = T.build_ids(ctx.tok, s, not ctx.args.no_chat)
    return (ids, []) if ctx.args.query_aware else (ids[:n], ids[n:])


def new_tokens(ctx, task, s):
    return ctx.args.max_new_tokens or s.max_new_tokens or task.max_new_tokens


def stats(cache_bytes, ratio, prefill_s, steps, decode_s, prefix, suffix):
    if kv.SHARD[1] > 1:  # tensor parallel: every rank's heads, so results compare with one process's
        import tp
        cache_bytes = tp.sum_over_ranks(cache_bytes)
    return {"cache_bytes": cache_bytes, "compression_ratio": ratio, "prefill_ms": 1000 * prefill_s,
            "decode_tok_s": steps / decode_s if decode_s > 0 and steps else None,
            "n_prompt": len(prefix) + len(suffix), "n_context": len(prefix)}


def run_generate_batch(ctx, task, batch, cfg):
    """Samples of one question length and answer cap as one left-padded batch (gen.generate: each row has
    its own budget, caches and evictions, so its answer is the one it gets alone, as tested)."""
    splits = [split_prompt(ctx, s) for s in batch]
    n, suffixes, held = new_tokens(ctx, task, batch[0]), [x for _, x in splits], []
    res = gen.generate(ctx.model, [p for p, _ in splits], n, cfg, stop_ids=ctx.tok.stop_ids, decode_step=ctx.step,
                       device=ctx.device, suffixes=suffixes if suffixes[0] else None, on_caches=held.append)
    rows = []
    for s, toks, stat in zip(batch, res.uncut, row_stats(ctx, cfg, splits, n, res, held[0])):
        # where decode() alone would have stopped: at the first look (every STOP_EVERY tokens) past a stop
        n_out = next((k for k in range(STOP_EVERY, n, STOP_EVERY) if stopped(ctx, toks[:k], task.cut)[2]), n)
        ids, text, _ = stopped(ctx, toks[:n_out], task.cut)
        rows.append({"prediction": text, "reference": s.reference, "score": task.score(text, s), "n_new": len(ids),
                     **stat})
    return rows


def run_generate(ctx, task, s, cfg):
    """Greedy answer, ended by the tokenizer's stop ids or the task's stop strings (decode)."""
    prefix, suffix = split_prompt(ctx, s)
    n = new_tokens(ctx, task, s)
    _, last, ip, prefill_s, caches = start(ctx, cfg, prefix, suffix, n)
    ids, text, n_out, steps, decode_s = decode(ctx, last, ip, n, task.cut)
    seen = torch.tensor([len(prefix) + len(suffix) + n_out - 1], device=ctx.device)  # the last token is not fed
    return {"prediction": text, "reference": s.reference, "score": task.score(text, s), "n_new": len(ids),
            **stats(kv.cache_bytes(caches), kv.compression_ratio(caches, seen), prefill_s, steps, decode_s,
                    prefix, suffix)}


STOP_EVERY = 4  # decode steps between looks at the text for a stop (a host sync on GPU; at most 3 extra tokens)


@torch.no_grad()
def decode(ctx, logits, ip, n, cut):
    """Greedy decoding from `logits` [1, vocab] at position ip, at most n tokens, the same steps as
    generate.generate, ended early by a tokenizer stop id or, seen every STOP_EVERY steps, a stop of the
    task's cut(text) -> (text cut at its stop, stop seen) (a stop string, for instance).
    Returns (tokens up to a stop id, their text cut before a stop string, tokens generated, timed decode
    steps, seconds); the first step, which may compile, is not timed (as in generate.generate)."""
    step, out = ctx.step or ctx.model.forward, [gen.sample(logits)]
    t0, steps = time.perf_counter(), 0
    while len(out) < n and (len(out) % STOP_EVERY or not stopped(ctx, torch.cat(out, 1)[0].tolist(), cut)[2]):
        out.append(gen.sample(step(out[-1], ip)[:, -1].clone()))  # clone: a CUDA graph reuses its output
        ip, steps = ip + 1, steps + 1
        if len(out) == 2:
            gen.sync(ctx.device)
            t0, steps = time.perf_counter(), 0
    gen.sync(ctx.device)
    decode_s = time.perf_counter() - t0
    ids, text, _ = stopped(ctx, torch.cat(out, 1)[0].tolist(), cut)
    return ids, text, len(out), steps, decode_s


def stopped(ctx, ids, cut) -> tuple[list[int], str, bool]:
    """(tokens up to a stop id, their text cut by the task, whether either stop was met)."""
    kept = gen.cut_at_stop(ids, ctx.tok.stop_ids)
    text, hit = cut(ctx.tok.decode(kept))
    return kept, text, hit or len(kept) < len(ids)


@torch.no_grad()
def start(ctx, cfg, prefix, suffix, n_more, all_logits=False, fed=None):
    """Caches sized for this sample (prefix + suffix + n_more tokens; the budget per cfg.protocol, the
    suffix, or `fed` tokens, being prompt), prefix prefilled, suffix fed by decode steps. Returns
    (prefill logits, logits predicting the next token, next position, seconds, caches). A batch: lists
    of prefixes (left-padded, each with its own budget, as gen.generate) and of suffixes of one length."""
    m, dev = ctx.model, ctx.device
    batched = bool(prefix) and isinstance(prefix[0], list)
    rows, tails = (prefix, suffix or [[]] * len(prefix)) if batched else ([prefix], [suffix])
    n_new = len(tails[0]) + n_more
    longest = max(map(len, rows))
    if longest + n_new > m.args.block_size:
        raise gen.UserError(f"{longest + n_new} tokens exceed the model's context of {m.args.block_size}")
    if max(float(v) for v in cfg.max_cache_length) > m.args.block_size:  # a typo, not a budget (as in generate)
        raise gen.UserError(f"--max_cache_length {' '.join(map(str, cfg.max_cache_length))} exceeds the model's "
                            f"context of {m.args.block_size} tokens")
    try:
        caches = kv.make_caches(m.args, cfg, len(rows), longest + n_new, n_new, dev, ctx.dtype,
                                lengths=[len(p) + n_new for p in rows], fed=len(tails[0]) if fed is None else fed)
    except (ValueError, FileNotFoundError) as e:
        raise gen.UserError(str(e)) from None
    m.setup_caches(caches)
    tokens, pos = gen.pad_batch(rows, dev)
    gen.sync(dev)
    t0 = time.perf_counter()
    logits = m.prefill(tokens, pos, all_logits=all_logits)
    last, ip, first = (logits[:, -1] if all_logits else logits), pos[:, -1] + 1, 0.0
    if tails[0]:  # `first`: a compiled step compiles on its first call; not prefill time (as in generate)
        last, ip, first = gen.feed(m, ctx.step, torch.tensor(tails, device=dev), ip, dev)
    gen.sync(dev)
    return logits, last, ip, time.perf_counter() - t0 - first, caches


FORCE_CHUNK = 256  # tokens per Transformer.feed call: bounds the [chunk, vocab] logits


@torch.no_grad()
def force(ctx, logits, tokens, ip, full=False):
    """Log-probabilities of `tokens` (n, or [B][n] for a batch) fed one per decode step (gen.feed, chunks
    of FORCE_CHUNK rows), `logits` [B, vocab] predicting the first: [B, n], or every row of the
    distribution [B, n, vocab] with full=True. The last token is not fed."""
    tokens = torch.tensor(tokens if tokens and isinstance(tokens[0], list) else [tokens], device=ctx.device)

    def score(rows, targets):  # rows [B, c, vocab] predict targets [B, c]
        lp = rows.float().log_softmax(-1)
        return lp if full else lp.gather(-1, targets[..., None])[..., 0]
    out, n, step = [score(logits[:, None], tokens[:, :1])], tokens.shape[1] - 1, max(1, FORCE_CHUNK // len(tokens))
    for i in range(0, n, step):
        chunk = tokens[:, i:min(i + step, n)]
        rows, _, _ = gen.feed(ctx.model, ctx.step, chunk, ip + i, ctx.device, all_logits=True)
        out.append(score(rows, tokens[:, i + 1:i + 1 + chunk.shape[1]]))
    return torch.cat(out, 1)


def run_choice(ctx, task, s, cfg):
    """Log-likelihood of each option after the (compressed) prompt. The cache state after the prompt is
    saved once and restored before each option (strategies keep all their state in buffers)."""
    prefix, suffix = split_prompt(ctx, s)
    opts = [ctx.tok.encode(o, bos=False) for o in s.options]
    _, last, ip, prefill_s, caches = start(ctx, cfg, prefix, suffix, max(map(len, opts)))
    bufs = [b for c in caches for b in c.buffers()]
    saved = [b.clone() for b in bufs]
    t0, steps, lls = time.perf_counter(), 0, []
    for o in opts:
        for b, v in zip(bufs, saved):
            b.copy_(v)
        lls.append(float(force(ctx, last, o, ip).sum()))
        steps += len(o) - 1
    gen.sync(ctx.device)
    pick = max(range(len(lls)), key=lls.__getitem__)
    pick_norm = max(range(len(lls)), key=lambda i: lls[i] / len(s.options[i]))  # lm-eval acc_norm: by characters
    seen = torch.tensor([len(prefix) + len(suffix) + len(opts[-1]) - 1], device=ctx.device)
    return {"prediction": pick, "reference": s.reference, "score": task.score(pick, s),
            "score_norm": task.score(pick_norm, s), "option_loglik": lls,
            **stats(kv.cache_bytes(caches), kv.compression_ratio(caches, seen), prefill_s, steps,
                    time.perf_counter() - t0, prefix, suffix)}


def run_ppl(ctx, task, s, cfg):
    return run_ppl_batch(ctx, task, [s], cfg)[0]


def run_ppl_batch(ctx, task, batch, cfg):
    """Perplexity rows of windows of one length, run as one batch (--batch_size; each row's caches and
    eviction are its own, so a row's NLL is the one it gets alone, up to float rounding)."""
    windows, bin_ = [s.reference for s in batch], ctx.args.ppl_bin
    L = len(windows[0])
    P = min(ctx.args.ppl_prefill, L - 1)
    # stream: the text after the prefill is read through the cache, all of it prompt (evicted as it comes);
    # context: the prefill compressed to the budget once, the rest appended (any strategy, prefill-only too)
    fed = L - P if cfg.protocol == "stream" else 0
    logits, last, ip, prefill_s, caches = start(ctx, cfg, [w[:P] for w in windows], [], L - P, all_logits=True,
                                                fed=fed)
    t0 = time.perf_counter()
    tail = -force(ctx, last, [w[P:] for w in windows], ip)
    decode_s = time.perf_counter() - t0
    seen = torch.full((len(batch),), L - 1, device=ctx.device)
    nbytes = alone_bytes(ctx, cfg, L, L - P, fed) if len(batch) > 1 else kv.cache_bytes(caches)
    common = stats(nbytes, kv.compression_ratio(caches, seen), prefill_s,
                   (L - P - 1) * len(batch), decode_s, windows[0][:P], [])  # tokens/s: the batch's
    pos, rows = torch.arange(1, L), []
    for b, w in enumerate(windows):
        target = torch.tensor(w[1:P], device=ctx.device)
        head = -logits[b, :-1].float().log_softmax(-1).gather(-1, target[:, None])[:, 0]
        nll = torch.cat([head, tail[b]]).cpu()  # NLL of tokens 1 .. L-1
        bins = [[k * bin_, float(nll[pos // bin_ == k].mean())] for k in range(int(pos[-1]) // bin_ + 1)]
        rows.append({"prediction": math.exp(float(nll.mean())), "reference": None, "score": float(nll.mean()),
                     "nll_bins": bins, **common})
    return rows


def run_fidelity(ctx, task, s, cfg):
    return run_fidelity_batch(ctx, task, [s], cfg)[0]


def run_fidelity_batch(ctx, task, batch, cfg):
    """KL(full || compressed) over the full cache's own greedy answer, teacher-forced through both caches,
    and the compressed cache's agreement with that answer. Samples of one question length run as one
    left-padded batch (--batch_size), each row with its own caches, as it runs alone."""
    import metrics
    splits = [split_prompt(ctx, s) for s in batch]
    prefixes, suffixes = [p for p, _ in splits], [x for _, x in splits]
    n = ctx.args.max_new_tokens or task.max_new_tokens
    full = dataclasses.replace(cfg, strategy="full", params={}, prompt_compression="own", kv_bits=16,
                               max_cache_length=[1.0])  # every token in the model's dtype: the reference
    kw = dict(stop_ids=ctx.tok.stop_ids, decode_step=ctx.step, device=ctx.device,
              suffixes=suffixes if suffixes[0] else None)
    keys = [(repr(full), tuple(p), tuple(x), n) for p, x in splits]  # every configuration shares one full-cache run
    if any(k not in ctx.full_runs for k in keys):
        refs = gen.generate(ctx.model, prefixes, n, full, **kw).tokens
        for k, ref, dist in zip(keys, refs, teacher_force(ctx, full, prefixes, suffixes, refs)):
            ctx.full_runs[k] = ref, dist  # the full cache's output teacher-forced through the full cache
    refs, ref_dists = zip(*(ctx.full_runs[k] for k in keys))
    held = []
    res = gen.generate(ctx.model, prefixes, n, cfg, on_caches=held.append, **kw)
    dists = teacher_force(ctx, cfg, prefixes, suffixes, list(refs))  # ... and through the compressed one
    rows = []
    for b, (ref, out, stat) in enumerate(zip(refs, res.tokens, row_stats(ctx, cfg, splits, n, res, held[0]))):
        kl = float((ref_dists[b].exp() * (ref_dists[b] - dists[b])).sum(-1).mean()) if ref else 0.0
        same = [a == c for a, c in zip(ref, out)]
        text, ref_text = ctx.tok.decode(out), ctx.tok.decode(ref)
        rows.append({"prediction": text, "reference": ref_text,
                     "score": sum(same) / len(ref) if ref else float(not out), "kl": kl,
                     "rouge_l": metrics.rouge_l(text, ref_text) if ref_text.strip() else float(not text.strip()),
                     "prefix_match": same.index(False) if False in same else len(same), **stat})
    return rows


def teacher_force(ctx, cfg, prefixes, suffixes, refs) -> list:
    """Each row's tokens `refs` fed through cfg's caches after its prompt: log-probabilities [len(ref),
    vocab] (None for an empty ref). Rows are padded to the longest ref: a row's later tokens never reach
    its earlier positions."""
    most = max(map(len, refs))
    if not most:
        return [None] * len(refs)
    _, last, ip, _, _ = start(ctx, cfg, prefixes, suffixes, most)
    dist = force(ctx, last, [r + [0] * (most - len(r)) for r in refs], ip, full=True)
    return [dist[b, :len(r)] if r else None for b, r in enumerate(refs)]


def row_stats(ctx, cfg, splits, n, res, caches) -> list[dict]:
    """Each row's stats of a gen.generate batch: the bytes its caches hold alone, its compression ratio
    over the tokens it saw in the batch (which decodes until every row stops), the batch's times."""
    fed = len(res.uncut[0]) - 1  # the last token is not fed
    seen = torch.tensor([len(p) + len(x) + fed for p, x in splits], device=ctx.device)
    ratios = kv.compression_ratio(caches, seen, per_row=True)
    out = []
    for (prefix, suffix), ratio in zip(splits, ratios):
        nbytes = alone_bytes(ctx, cfg, len(prefix) + len(suffix) + n, len(suffix) + n, len(suffix)) \
            if len(splits) > 1 else res.cache_bytes
        out.append(stats(nbytes, ratio, res.prefill_s, res.decode_steps * len(splits), res.decode_s,
                         prefix, suffix))  # tokens/s: the batch's
    return out


def alone_bytes(ctx, cfg, length, n_new, fed) -> int:
    """The bytes one sequence's caches hold (a batch row's own: some buffers do not grow with the batch),
    allocated once per configuration and lengths, not once per row."""
    key = (repr(cfg), length, n_new, fed)
    if key not in ctx.alone_memo:
        ctx.alone_memo[key] = kv.cache_bytes(kv.make_caches(ctx.model.args, cfg, 1, length, n_new, ctx.device,
                                                             ctx.dtype, fed=fed))
    return ctx.alone_memo[key]


RUNNERS = {"generate": run_generate, "choice": run_choice, "ppl": run_ppl, "fidelity": run_fidelity}
BATCHED = {"generate": run_generate_batch, "ppl": run_ppl_batch, "fidelity": run_fidelity_batch}  # --batch_size > 1


# ---------------------------------------------------------------- results files
def read_rows(path: Path) -> list[dict]:
    """Complete JSON lines of a predictions file; a truncated or corrupt line is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_bytes().split(b"\n"):
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return [r for r in rows if isinstance(r, dict) and "id" in r]


def repair(path: Path):
    """Cut a last line left unfinished by a killed run, so the next append starts a fresh line."""
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)


def append_line(fd: int, row: dict):
    """One whole line per write(2) on an O_APPEND descriptor, then fsync: a kill loses at most this line."""
    data = (json.dumps(row, ensure_ascii=False) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]
    os.fsync(fd)


def write_atomic(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def shard_files(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("predictions.rank*.jsonl"))


def finished_ids(out_dir: Path) -> set:
    return {r["id"] for p in [out_dir / "predictions.jsonl", *shard_files(out_dir)] for r in read_rows(p)}


def merge(out_dir: Path, samples) -> list[dict]:
    """predictions.jsonl := every finished row once (first seen wins), in sample order; shards removed.
    Returns the rows of `samples`."""
    rows = {}
    for p in [out_dir / "predictions.jsonl", *shard_files(out_dir)]:
        for r in read_rows(p):
            rows.setdefault(r["id"], r)
    order = {s.id: i for i, s in enumerate(samples)}
    merged = sorted(rows.values(), key=lambda r: order.get(r["id"], len(order)))
    write_atomic(out_dir / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in merged))
    for p in shard_files(out_dir):
        p.unlink()
    return [r for r in merged if r["id"] in order]


def read_json(path: Path, fix: str) -> dict:
    """A JSON object from a results file; anything else is one line saying `fix`."""
    try:
        out = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise gen.UserError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(out, dict):
        raise gen.UserError(f"{path} holds a {type(out).__name__}, not a JSON object; {fix}")
    return out


def differences(a: dict, b: dict) -> list[str]:
    """Keys of two config.json whose values differ, "run" (how it ran, not what) aside."""
    return sorted(k for k in set(a) | set(b) if k != "run" and a.get(k) != b.get(k))


def check_config(out_dir: Path, meta: dict):
    path = out_dir / "config.json"
    if path.exists():
        diff = differences(read_json(path, "pass --overwrite to start this run again"), meta)
        if diff:
            raise gen.UserError(f"{out_dir} holds results of another configuration (differs in {', '.join(diff)}); "
                                f"pass --overwrite or another --results_dir")


def summarize(task, rows, meta) -> dict:
    mean = lambda k: (lambda v: sum(v) / len(v) if v else None)([r[k] for r in rows if r.get(k) is not None])
    out = {"task": meta["task"], "config": meta["config"], "series": meta["series"], "model": meta["model"],
           "strategy": meta["cache"]["strategy"], "max_cache_length": meta["cache"]["max_cache_length"],
           "query_aware": meta["query_aware"], "kv_bits": meta["cache"].get("kv_bits", 16),
           "prompt_rule": meta["prompt_rule"], "metric": task.metric, "higher_is_better": task.higher_is_better,
           "n": len(rows), **task.aggregate(rows)}
    if rows and "score_norm" in rows[0]:  # choice tasks: also the gold option's log-likelihood, which moves
        out["acc_norm"] = 100 * mean("score_norm")  # long before the argmax does
        out["gold_loglik"] = sum(r["option_loglik"][r["reference"]] for r in rows) / len(rows)
    for k in ("compression_ratio", "cache_bytes", "prefill_ms", "decode_tok_s", "n_prompt", "n_new"):
        out[k] = mean(k)
    out["code"] = sorted({r.get("code", "unknown") for r in rows})  # more than one: rows of different commits
    return out


# ---------------------------------------------------------------- one task x config
def barrier(ctx):
    if ctx.world > 1:
        torch.distributed.barrier()


def run_config(ctx, task, samples, name, cfg, args) -> tuple[bool, str]:
    """Evaluates the samples its folder lacks. Returns (complete without error, the line to print at the end)."""
    out_dir = Path(args.results_dir) / Path(args.checkpoint_path).name / task.tag / name
    meta = effective_config(ctx, task, name, cfg, args, len(samples))
    if not args.overwrite:
        check_config(out_dir, meta)  # every rank raises alike, before anyone writes
    barrier(ctx)
    if ctx.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if args.overwrite:
            for p in [*out_dir.glob("predictions*.jsonl"), *out_dir.glob("*.png"), out_dir / "metrics.json"]:
                p.unlink(missing_ok=True)
        write_atomic(out_dir / "config.json", json.dumps(meta, indent=1) + "\n")
    barrier(ctx)
    done = finished_ids(out_dir)
    barrier(ctx)  # everyone has the same view before anyone appends
    index = {s.id: i for i, s in enumerate(samples)}
    todo = [s for s in samples if s.id not in done]
    target = out_dir / ("predictions.jsonl" if ctx.shards == 1 else f"predictions.rank{ctx.rank}.jsonl")
    if ctx.writes:
        repair(target)
    try:
        error = run_samples(ctx, task, todo, cfg, target, index, f"{task.tag}/{name}")
    except KeyboardInterrupt:  # Ctrl-C: one line; nothing is lost (each sample was appended and fsynced)
        saved = len(finished_ids(out_dir) & set(index))
        say(ctx, f"\ninterrupted: {saved} of {len(samples)} samples of {task.tag}/{name} are saved in {out_dir}; "
                 f"run the same command again to resume")
        sys.exit(130)
    barrier(ctx)
    complete, line = finish(task, samples, meta, out_dir) if ctx.rank == 0 else (True, "")
    barrier(ctx)
    return complete and not error, line


def finish(task, samples, meta, out_dir) -> tuple[bool, str]:
    """Rank 0: merge the predictions; when every sample is there, metrics.json and the task's plots.
    Returns (complete, the line to print at the end of the run)."""
    rows = merge(out_dir, samples)
    if len(rows) < len(samples):
        return False, f"{task.tag} {meta['config']}: {len(rows)} of {len(samples)} samples done, no score -> {out_dir}"
    m = summarize(task, rows, meta)
    vs = compare_with_full(out_dir, m, rows, task.args.bootstrap_samples)
    if vs and "missing" not in vs:  # no reference yet: --report looks again (a full run may come later)
        m["vs_full"] = vs
    write_atomic(out_dir / "metrics.json", json.dumps(m, indent=1) + "\n")
    task.plot(rows, out_dir)
    return True, score_line(m, out_dir)


def score_line(m: dict, out_dir) -> str:
    """task config: metric score ± standard error (n=...) -> results folder."""
    se = f" ± {m['score_stderr']:.2f}" if m.get("score_stderr") is not None else ""
    lower = "" if m["higher_is_better"] else " (lower is better)"
    return f"{m['task']} {m['config']}: {m['metric']} {m['score']:.2f}{se}{lower} (n={m['n']}) -> {out_dir}"


def batches(ctx, task, samples, size) -> list[list]:
    """Runs of at most `size` samples that one batch holds exactly: one window length (ppl), or one
    question length (fed token by token after the prefill) and answer cap (generation); order kept."""
    groups = {}
    for s in samples:
        key = len(s.reference) if task.kind == "ppl" else (len(split_prompt(ctx, s)[1]), new_tokens(ctx, task, s))
        groups.setdefault(key, []).append(s)
    return [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]


def run_samples(ctx, task, todo, cfg, target, index, desc) -> bool:
    """Runs this rank's share of `todo`, appending a line per sample; True after a sample's error. The bar
    counts samples already saved as done; under torchrun rank 0's advances by the number of ranks."""
    from tqdm import tqdm
    mine = todo[ctx.shard::ctx.shards]
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if ctx.writes else None
    bar = tqdm(total=len(index), initial=len(index) - len(todo), desc=desc, disable=ctx.rank != 0 or not mine,
               dynamic_ncols=True, file=sys.stderr)
    runner = BATCHED.get(task.kind) if ctx.args.batch_size > 1 else None
    try:
        for batch in batches(ctx, task, mine, ctx.args.batch_size) if runner else [[s] for s in mine]:
            # random strategies: same in any shard (a batch draws from its first sample's seed)
            torch.manual_seed(ctx.args.seed * 1_000_003 + index[batch[0].id])
            try:
                rows = runner(ctx, task, batch, cfg) if runner else [RUNNERS[task.kind](ctx, task, batch[0], cfg)]
            except gen.UserError as e:
                hint = ("; prefill-only strategies keep the fed question in reserved slots: try --query_aware"
                        if kv.REGISTRY[cfg.strategy].prefill_only and not ctx.args.query_aware else "")
                tqdm.write(f"error: {desc}: sample {batch[0].id}: {e}{hint}", file=sys.stderr)
                return True
            for s, row in zip(batch, rows):
                if fd is not None:
                    append_line(fd, {"id": s.id, **row, "code": ctx.code, **({"meta": s.meta} if s.meta else {})})
                bar.update(min(ctx.shards, bar.total - bar.n))
    finally:
        bar.close()
        if fd is not None:
            os.close(fd)
    return False


# ---------------------------------------------------------------- main
def setup_dist(args):
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1 and args.tensor_parallel:  # the model's all-reduces: NCCL on CUDA, gloo on CPU (tp.py)
        import tp
        args.device = tp.init(args.device)
    elif world > 1:  # gloo carries only barriers, on CPU and GPU alike; slow ranks may wait for hours
        torch.distributed.init_process_group("gloo", timeout=timedelta(days=1))
    return rank, world


def make_tasks(args) -> list:
    """Every task of --tasks, before the model loads: a misspelt name or a bad task setting is an error
    even beside valid tasks; absent data is found later (T.Unavailable) and only skips its task."""
    try:
        return [T.make_task(name, args) for name in T.expand(args.tasks)]
    except ValueError as e:
        raise gen.UserError(f"--tasks: {e}" if str(e).startswith("unknown task") else str(e)) from None


def make_ctx(args, configs, loaded, rank, world) -> Ctx:
    device = args.device
    if world > 1 and device.startswith("cuda"):  # one GPU per rank (ranks share GPUs if there are fewer)
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    dtype = gen.check_device(device, args.dtype)  # one line for a device or dtype this machine lacks
    gen.set_threads(args.threads)  # None: one per idle core
    tp = None
    if world > 1 and args.tensor_parallel:
        import tp
    model, tok = loaded or gen.load(args.checkpoint_path, device, dtype, tp)
    if loaded and tp:  # tests hand in a whole model
        tp.shard_model(model, device)
    budgeted = [n for n, (c, _) in configs.items() if (kv.REGISTRY[c.strategy].evicts or kv.REGISTRY[c.strategy].prefill_only)
                and any(float(v) <= 1 for v in c.max_cache_length)]
    quantized = [n for n, (c, _) in configs.items() if n in budgeted and c.kv_bits < 16]
    if args.compile and quantized and rank == 0:  # buffers sized from each sample's length: one shape each
        print(f"note: with --compile, a fractional budget over a quantized cache recompiles the decode step for every "
              f"prompt length ({', '.join(quantized)}); a budget in tokens (--max_cache_length 256) compiles once",
              file=sys.stderr)
    # a fractional budget sizes each sample's caches from its length: slot counts symbolic, one graph for all
    step = gen.compile_decode(model, device, symbolic_slots=bool(budgeted)) if args.compile else None
    return Ctx(model, tok, args, device, dtype, step, rank, world, 1 if tp else world, code_version())


def code_version() -> str:
    """This checkout's commit ("+dirty" with uncommitted changes to tracked files), or "unknown" outside git.
    Every result row records it: a config's hash names what it ran, not which code ran it (a resumed folder
    can hold rows of two commits, and a fix to a strategy leaves its hash unchanged)."""
    def git(*a):
        return subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), *a], capture_output=True, text=True,
                              timeout=30)
    try:
        rev = git("rev-parse", "--short=12", "HEAD")
        if rev.returncode:
            return "unknown"
        return rev.stdout.strip() + ("+dirty" if git("status", "--porcelain", "--untracked-files=no").stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def say(ctx, line: str):
    if ctx.rank == 0:
        print(line, file=sys.stderr)


def plan_line(task, samples) -> str:
    """What a task will run, said before it starts: how many samples of how many, how to run them all."""
    n, size = len(samples), task.size
    said = [json.dumps(s) for s in task.stop] + ([task.stop_also] if task.stop_also else [])
    stops = f"; stops at {' or '.join(said)}" if task.kind == "generate" and said else ""
    if size is None:
        return f"{task.tag}: {n} generated samples (--num_samples N sets how many){stops}"
    if n == size:
        return f"{task.tag}: all {n} samples{stops}"
    how = "the default" if task.args.num_samples is None else f"--num_samples {n}"
    return f"{task.tag}: {n} of {size} samples ({how}; --num_samples all runs all {size}){stops}"


def main(argv=None, loaded=None):
    """`loaded` = (model, tokenizer) to evaluate instead of loading --checkpoint_path (tests)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--report" or a.startswith("--report=") for a in argv):
        args = build_parser()[0].parse_args(argv)
        return print(report(Path(args.report), Path(args.report_out or args.report), args.lossless_margin,
                            args.bootstrap_samples))
    configs = parse_configs(argv)
    args = next(iter(configs.values()))[1]  # task and run flags are the same in every config
    tasks = make_tasks(args)
    rank, world = setup_dist(args)
    ctx = make_ctx(args, configs, loaded, rank, world)
    lines, skipped, ok = [], [], True
    for task in tasks:
        try:
            samples = task.samples(ctx.tok)
        except T.Unavailable as e:  # absent data: one line, and the other tasks still run
            skipped.append(f"skip {task.name}: {e}")
            say(ctx, skipped[-1])
            continue
        say(ctx, plan_line(task, samples))
        for cname, (cfg, cargs) in configs.items():
            done, line = run_config(ctx, task, samples, cname, cfg, cargs)
            ok, lines = ok and done, lines + [line]
    if world > 1:
        torch.distributed.destroy_process_group()
    if rank == 0 and lines:
        print("\n".join([*lines, *skipped]))
    if len(skipped) == len(tasks):
        raise gen.UserError("no task could run")
    if not ok:
        sys.exit(1)


# ---------------------------------------------------------------- paired statistics against the full cache
BOOT_SEED = 0  # one seed: metrics.json and --report give the same interval for the same rows
CACHE_KEYS = {"cache", "prompt_rule", "config", "series", "run"}  # config.json keys a full-cache reference may skip
PAIRED = {  # kind: (row key, factor to the reported scale, the per-sample quantity, its unit in metrics.json)
    "points": ("score", 100, "per-sample score x 100 (the task's metric on its 0-100 scale)", "points"),
    "ppl": ("score", 1, "per-document mean NLL in nats; exp(mean difference) is the ratio of the perplexities",
            "nats"),
    "kl": ("kl", 1, "per-sample KL(full || compressed) in nats; the full cache's own is 0 by construction, so "
                    "the reference is built into each row", "nats"),
}


def paired_kind(m: dict) -> str:
    return "ppl" if m["metric"] == "perplexity" else "kl" if "kl" in m else "points"


def shown(kind: str, x: float) -> float:
    """A difference on the reported scale: perplexity as a percent change (exp of the NLL difference)."""
    return 100 * math.expm1(x) if kind == "ppl" else x


def finished_rows(out_dir: Path) -> list[dict]:
    """Every finished row of a folder, shards included, one per id (first seen wins, as merge)."""
    rows = {}
    for p in [out_dir / "predictions.jsonl", *shard_files(out_dir)]:
        for r in read_rows(p):
            rows.setdefault(r["id"], r)
    return list(rows.values())


def paired_values(rows, ref, key) -> list[tuple[float, float]]:
    """(this run's value, the full cache's) of `key` for each sample both have, matched by id, in this
    run's order; ref None: the full cache's value is 0 (fidelity's KL)."""
    theirs = None if ref is None else {}
    for r in ref or ():
        theirs.setdefault(r["id"], r.get(key))
    out, seen = [], set()
    for r in rows:
        other = 0.0 if theirs is None else theirs.get(r["id"])
        if r["id"] not in seen and r.get(key) is not None and other is not None:
            out.append((r[key], other))
            seen.add(r["id"])
    return out


def full_reference(conf_dir: Path) -> tuple[Path | None, str]:
    """The full-cache folder beside conf_dir (same model and task folder) whose config.json matches
    conf_dir's in every setting but the cache's (query mode, chat, seed, dtype, output length, task
    settings); of several (the full cache ignores every cache setting, but its folder name carries them),
    the one whose other cache settings (sinks, window, ...) match too, else the one of the same protocol.
    (None, why) when there is none or several: never a guess."""
    if not (conf_dir / "config.json").exists():
        return None, f"no config.json in {conf_dir}"
    mine = read_json(conf_dir / "config.json", "rerun that eval")
    found = []
    for p in sorted(conf_dir.parent.glob("*/config.json")):
        c = read_json(p, "rerun that eval")
        if c.get("cache", {}).get("strategy") == "full" and c["cache"].get("kv_bits", 16) == 16 \
                and set(differences(mine, c)) <= CACHE_KEYS:  # the reference keeps the model dtype
            found.append((p.parent, c))
    skip = ("strategy", "max_cache_length", "params")
    other = lambda c: {k: v for k, v in c.get("cache", {}).items() if k not in skip}
    protocol = lambda c: c.get("cache", {}).get("protocol")  # noqa: E731
    if len(found) > 1:
        found = ([f for f in found if other(f[1]) == other(mine)]
                 or [f for f in found if protocol(f[1]) == protocol(mine)] or found)
    if len(found) == 1:
        return found[0][0], ""
    if not found:
        same = ", ".join(sorted(set(mine) - CACHE_KEYS))
        return None, f"no full-cache run of {conf_dir.parent.name} with the same settings ({same})"
    return None, f"several full-cache runs match: {', '.join(f[0].name for f in found)}"


def vs_full(m: dict, rows, ref, ref_name: str, resamples: int) -> dict:
    """metrics.json's `vs_full`: this run minus the full cache's (`ref` rows; None: built in) on the samples
    both have: the mean difference, its paired bootstrap 95% interval and, for 0/1 scores, McNemar's p."""
    kind = paired_kind(m)
    key, scale, quantity, unit = PAIRED[kind]
    pairs = paired_values(rows, ref, key)
    out = {"reference": ref_name, "quantity": quantity, "difference": "this configuration - full cache",
           "lower_is_better": kind != "points" or not m["higher_is_better"], "unit": unit,
           "n": len(pairs), "unpaired": len(rows) - len(pairs)}
    if not pairs:
        return out | {"missing": f"no sample in common with {ref_name}"}
    mean, lo, hi = M.paired_bootstrap([scale * (a - b) for a, b in pairs], resamples, BOOT_SEED)
    out |= {"mean": mean, "ci95": [lo, hi], "bootstrap": {"resamples": resamples, "seed": BOOT_SEED,
                                                          "interval": "percentile"}}
    if kind == "ppl":
        out["perplexity_change_pct"] = {"mean": shown(kind, mean), "ci95": [shown(kind, lo), shown(kind, hi)]}
    if kind == "points" and all(v in (0, 1) for pair in pairs for v in pair):  # 0/1 accuracy
        b, c = sum(a < f for a, f in pairs), sum(a > f for a, f in pairs)  # full right only, this run right only
        out["mcnemar"] = {"full_only": b, "this_only": c, "p": M.mcnemar_exact(b, c)}
    return out


def compare_with_full(conf_dir: Path, m: dict, rows, resamples: int) -> dict | None:
    """vs_full against the full-cache folder beside conf_dir, or {"missing": why}; None for the full cache."""
    if m["strategy"] == "full" and m.get("kv_bits", 16) == 16:
        return None
    if paired_kind(m) == "kl":
        return vs_full(m, rows, None, "built in (fidelity runs the full cache on each sample)", resamples)
    ref, why = full_reference(conf_dir)
    return {"missing": why} if ref is None else vs_full(m, rows, finished_rows(ref), ref.name, resamples)


# ---------------------------------------------------------------- report
def config_order(m):
    b = m["max_cache_length"]
    return (m["strategy"] != "full", m["strategy"], -float(b[0]) if len(b) == 1 else 0, m["config"])


NEEDED = ("model", "task", "config", "strategy", "max_cache_length", "metric", "higher_is_better", "score", "n",
          "compression_ratio")


def load_metrics(root: Path) -> list[dict]:
    """Every metrics.json under root (with `dir`, its folder), one per model, task and configuration name.
    Two folders with one name: refused when their config.json differ, else the one with more samples is
    shown and a warning names both."""
    found = {}
    for path in sorted(root.rglob("metrics.json")):
        m = read_json(path, "delete it and rerun that eval to rewrite it")
        missing = [k for k in NEEDED if k not in m]
        if missing:
            raise gen.UserError(f"{path} lacks {', '.join(missing)}; delete it and rerun that eval to rewrite it")
        m["dir"] = str(path.parent)
        key = (m["model"], m["task"], m["config"])
        found[key] = same_config(found[key], m) if key in found else m
    if not found:
        raise gen.UserError(f"--report {root}: no metrics.json there")
    return list(found.values())


def same_config(a: dict, b: dict) -> dict:
    conf = lambda m: Path(m["dir"]) / "config.json"
    diff = differences(*(read_json(conf(m), "rerun that eval") if conf(m).exists() else {} for m in (a, b)))
    if diff:
        raise gen.UserError(f"--report: {a['dir']} and {b['dir']} both hold {a['task']} {a['config']} with different "
                            f"settings ({', '.join(diff)}); report each folder on its own")
    keep = max(a, b, key=lambda m: m["n"])
    print(f"warning: {a['dir']} and {b['dir']} hold the same configuration; the report shows {keep['dir']} "
          f"(n={keep['n']})", file=sys.stderr)
    return keep


def cell_text(m: dict) -> str:
    se = f" ± {m['score_stderr']:.2f}" if m.get("score_stderr") is not None else ""
    return f"{m['score']:.2f}{se} (n={m['n']})"


def report(root: Path, out: Path, margin: float = LOSSLESS_MARGIN, resamples: int = BOOTSTRAP) -> str:
    """Markdown tables per model (task x config: the task's metric ± standard error and n; the compression
    ratio; the difference from the full cache with its paired 95% interval; the lossless budget of each
    strategy line), and one Pareto plot per model and task (metric vs compression ratio, a line per
    strategy and settings, error bars) written to `out`. The paired statistics are computed afresh from
    predictions.jsonl, whatever metrics.json holds."""
    found, lines = load_metrics(root), []
    for model in sorted({m["model"] for m in found}):
        ms = [m for m in found if m["model"] == model]
        configs = [m["config"] for m in sorted({m["config"]: m for m in ms}.values(), key=config_order)]
        cell = {(m["task"], m["config"]): m for m in ms}
        for title, fmt in (("", cell_text), (" (compression ratio)", lambda m: f"{m['compression_ratio']:.3f}")):
            lines += [f"### {model}{title}", "", "| task | metric | " + " | ".join(configs) + " |",
                      "|---|---|" + "---:|" * len(configs)]
            for task in sorted({m["task"] for m in ms}):
                metric = next(m["metric"] for m in ms if m["task"] == task)
                row = [fmt(cell[task, c]) if (task, c) in cell else "" for c in configs]
                lines.append(f"| {task} | {metric} | " + " | ".join(row) + " |")
            lines.append("")
        lines += paired_tables(model, ms, configs, margin, resamples)
        for task in sorted({m["task"] for m in ms}):
            pareto_plot([m for m in ms if m["task"] == task], out / f"pareto-{model}-{task}.png")
            if any("curve" in m for m in ms if m["task"] == task):
                curve_plot([m for m in ms if m["task"] == task and "curve" in m], out / f"curve-{model}-{task}.png")
    return "\n".join(lines)


def paired_tables(model: str, ms: list[dict], configs: list[str], margin: float, resamples: int) -> list[str]:
    """'Δ vs full [95% CI]' (a column per configuration but the full cache's; a line per task whose
    reference is missing) and the lossless budget (a column per strategy line)."""
    vs = {(m["task"], m["config"]): compare_with_full(Path(m["dir"]), m, finished_rows(Path(m["dir"])), resamples)
          for m in ms if m["strategy"] != "full" or m.get("kv_bits", 16) != 16}  # a quantized full cache is compared
    cols, tasks = [c for c in configs if any(k[1] == c for k in vs)], sorted({m["task"] for m in ms})
    if not cols:
        return []
    cell = {(m["task"], m["config"]): m for m in ms}
    lines = [f"### {model} (Δ vs full cache on the same samples: mean [paired bootstrap 95% CI], McNemar p for "
             "0/1 scores)", "", "| task | Δ of | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols)]
    notes = {}
    for task in tasks:
        kind = paired_kind(next(m for m in ms if m["task"] == task))
        for c in cols:
            if "missing" in (vs.get((task, c)) or {}):
                notes.setdefault((task, vs[task, c]["missing"]), []).append(c)
        row = [delta_text(vs[task, c], cell[task, c], kind) if (task, c) in vs else "" for c in cols]
        unit = {"points": f"{cell_metric(ms, task)} (points)", "ppl": "perplexity (%)", "kl": "KL (nats)"}[kind]
        lines.append(f"| {task} | {unit} | " + " | ".join(row) + " |")
    lines += [""] + [f"- {task} ({', '.join(cs)}): {why}" for (task, why), cs in notes.items()] + [""] * bool(notes)
    series = sorted({m.get("series", m["strategy"]) for m in ms if m["strategy"] != "full" and budgeted(m)})
    if not series:
        return lines
    lines += [f"### {model} (lossless budget: the smallest budget, by measured compression ratio, of each strategy "
              f"line whose 95% CI of Δ lies within ±margin of the full cache)", "",
              "| task | margin | " + " | ".join(series) + " |", "|---|---|" + "---:|" * len(series)]
    for task in tasks:
        kind, metric = paired_kind(next(m for m in ms if m["task"] == task)), cell_metric(ms, task)
        said = {"points": f"±{margin:g} points ({metric})", "ppl": f"±{margin:g}% (perplexity)",
                "kl": "not defined (KL)"}
        row = [lossless_text([m for m in ms if m["task"] == task and m.get("series", m["strategy"]) == s
                              and budgeted(m)], vs, margin, kind) for s in series]
        lines.append(f"| {task} | {said[kind]} | " + " | ".join(row) + " |")
    return lines + [""]


def cell_metric(ms, task) -> str:
    return next(m["metric"] for m in ms if m["task"] == task)


def budgeted(m: dict) -> bool:
    cls = kv.REGISTRY.get(m["strategy"])
    return cls is None or cls.evicts or cls.prefill_only  # the others keep every token: no budget to choose


def delta_text(v: dict, m: dict, kind: str) -> str:
    """+1.00 [-2.00, +4.00] p=0.62; perplexity in percent; (n=...) when the pairs are not the reported n."""
    if "missing" in v:
        return "n/a"
    mean, (lo, hi) = shown(kind, v["mean"]), (shown(kind, x) for x in v["ci95"])
    f = (lambda x: f"{x:.4f}") if kind == "kl" else (lambda x: f"{x:+.2f}" + ("%" if kind == "ppl" else ""))
    p = f" p={v['mcnemar']['p']:.2g}" if "mcnemar" in v else ""
    n = f" (n={v['n']})" if v["n"] != m["n"] else ""
    return f"{f(mean)} [{f(lo)}, {f(hi)}]{p}{n}"


def lossless_text(ms: list[dict], vs: dict, margin: float, kind: str) -> str:
    """The budget of the most compressed configuration whose interval lies within ±margin, 'none', or
    'n/a' (no reference, or a quantity without a margin)."""
    have = [m for m in ms if "mean" in (vs.get((m["task"], m["config"])) or {})]
    if kind == "kl" or not have:
        return "n/a" if ms else ""
    within = lambda v: -margin <= shown(kind, v["ci95"][0]) and shown(kind, v["ci95"][1]) <= margin
    ok = [m for m in have if within(vs[m["task"], m["config"]])]
    if not ok:
        return "none"
    b = lambda m: m["max_cache_length"]
    best = max(ok, key=lambda m: (m["compression_ratio"] or 0.0, -float(b(m)[0]) if len(set(b(m))) == 1 else 0.0))
    size = b(best)[0] if len(set(b(best))) == 1 else f"per-layer {best['config']}"
    return size + (f" (ratio {best['compression_ratio']:.3f})" if best["compression_ratio"] is not None else "")


MARKERS = "os^vD<>pXh"
LINES = ("-", "--", ":", "-.")


def curve_plot(ms, path: Path):
    """Perplexity over position, one line per configuration (from metrics.json's `curve`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    strategies = sorted({m["strategy"] for m in ms} - {"full"})
    seen = {}  # colour = strategy, line style and marker = its budgets from large to small
    for m in sorted(ms, key=config_order):
        full = m["strategy"] == "full"
        k = seen[m["strategy"]] = seen.get(m["strategy"], -1) + 1
        ax.plot([p[0] for p in m["curve"]], [p[1] for p in m["curve"]], label=m["config"], linewidth=2.5 if full else 1.2,
                color="black" if full else plt.cm.tab10(strategies.index(m["strategy"]) % 10),
                linestyle=LINES[k % 4], marker=MARKERS[k % len(MARKERS)], markersize=4,
                markevery=max(1, len(m["curve"]) // 8))
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"{ms[0]['model']}: {ms[0]['task']}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


SHIFT = 0.006  # x offset between neighbouring lines of a Pareto plot: equal points stay visible side by side


def kib_per_token(m: dict) -> float:
    """Allocated KV-cache KiB per prompt token (means over the samples): budget and bits in one number."""
    return m["cache_bytes"] / m["n_prompt"] / 1024


def pareto_series(ms, key: str, x: str = "ratio") -> list[dict]:
    """The lines of a Pareto panel: one per series (strategy and settings, every budget on it), its points
    sorted by x (compression ratio, shifted by SHIFT per line; or "bytes": kib_per_token, which a
    quantized cache lowers and the ratio does not see), error bars from score_stderr (score only), a
    marker per line (the full cache: a star)."""
    names = sorted({m.get("series", m["strategy"]) for m in ms}, key=lambda s: (not s.startswith("full"), s))
    out = []
    for i, name in enumerate(names):
        pts = sorted((m["compression_ratio"] if x == "ratio" else kib_per_token(m), m[key],
                      m.get("score_stderr") if key == "score" else None)
                     for m in ms if m.get("series", m["strategy"]) == name)
        dx = (i - (len(names) - 1) / 2) * SHIFT if x == "ratio" else 0.0
        out.append({"label": name, "x": [p[0] + dx for p in pts], "y": [p[1] for p in pts],
                    "yerr": [p[2] or 0.0 for p in pts], "marker": "*" if name == "full" else MARKERS[i % len(MARKERS)]})
    return out


def pareto_plot(ms, path: Path):
    """Metric vs measured compression ratio and vs allocated KV bytes per prompt token (the ratio hides
    the bits: a 4-bit full cache has ratio 0), a line per series; choice tasks get a panel with the gold
    option's log-likelihood, which shows a cache's damage long before the accuracy does."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    label = ms[0]["metric"] + ("" if ms[0]["higher_is_better"] else " (lower is better)")
    panels = [("score", label, "ratio")]
    if all(m.get("cache_bytes") and m.get("n_prompt") for m in ms):  # every real run records both
        panels.append(("score", label, "bytes"))
    if all("gold_loglik" in m for m in ms):
        panels.append(("gold_loglik", "log-likelihood of the gold option", "ratio"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (key, label, x) in zip(axes[0], panels):
        for i, s in enumerate(pareto_series(ms, key, x)):
            ax.errorbar(s["x"], s["y"], yerr=s["yerr"], label=s["label"], marker=s["marker"], capsize=3,
                        markersize=11 if s["marker"] == "*" else 6, linestyle=LINES[i % 4], alpha=0.85)
        ax.set_xlabel(f"compression ratio (1 - slots used / tokens seen; lines shifted by {SHIFT} each)"
                      if x == "ratio" else "allocated KV cache, KiB per prompt token (budget and bits)")
        ax.set_ylabel(label + (" ± standard error" if key == "score" else ""))
        ax.set_title(f"{ms[0]['model']}: {ms[0]['task']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    gen.cli(main)
