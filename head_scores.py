"""Offline head scoring on needle-in-a-haystack tests: `python head_scores.py --score dililazy headkv`.

Stage 1 of the head-level budgets (ALGORITHMS.md "Head-level budgets"): which (layer, query head)
looks at the needle while the model answers. Two scores, from the same tests and the same decode steps:
- dililazy (DiliLazyKV, built on HeadKV): at each step, for each head's softmax attention row over
  the whole cache, the top-k (--top_k_infscore) positions and the needle span [s, e):
  WTP = top-k mass inside the needle, WFP = top-k mass outside, WFN = needle mass outside the top-k;
  DiliScore = WTP/(WTP+WFP) (weighted precision), LazyScore = WTP/(WTP+WFN) (weighted recall),
  InfScore = their harmonic mean (0 where both are 0, e.g. no needle mass); and the 2x2 counts:
  diligent (top-k in the needle), subconscious (not top-k, in the needle), distracted (top-k outside),
  diffuse (neither). Aggregation: every value is the mean over a test's steps, then the mean over the
  accepted tests (each test weighs the same, however long its answer); InfScore is averaged per step,
  not recomputed from the mean precision and recall.
- headkv (Fu et al. 2024, "Not All Heads Matter: A Head-Level KV Cache Compression Method with
  Integrated Retrieval and Reasoning", arXiv 2410.19258; FYYFU/HeadKV retrieval_head_detection_r2.py):
  top-k = the needle's length n; a step adds the attention of the top-k positions that lie in the
  needle, divided by n; a test's score is the sum over its steps; a head's score the mean over the
  accepted tests.

Tests: each --needles needle (the seed's three question/needle/answer triples, numbered 1-3 as in
its table) x each of --context_intervals prompt lengths evenly spaced in [--min_len, --max_len]
(tokens of the whole prompt) x each --depths percent. The haystack is the 49 Paul Graham essays
concatenated in sorted name order; the needle goes at the sentence end at or before the depth (the
gkamradt test's rule) and its tokens are located in the prompt ids. The question is asked before and
after the text: with HeadKV's layout (the text, then the question) SmolLM2-135M answered none of 18
probes of 400-2,000 tokens correctly. All but the last prompt token are prefilled; the last one and
every generated token go through decode steps with the full cache (as in HeadKV), so each recorded
step is the query that picks one answer token. Greedy, up to --max_new_tokens, stopping at a stop
token or at a newline after some text (HeadKV stops at a newline too; it also stops at the reference
answer's token count, which would cut a chat model's sentence before the answer, so we do not).

Attention rows come from AttentionRecorder, which wraps each layer's cache as cache.AttentionLossProbe
does: no change to model.py or cache.py.

The gate: a test counts when the answer's token F1 against the reference (metrics.qa_f1, SQuAD
normalisation) is >= --min_f1 (0.5) and the answer has every number of the reference. DiliLazyKV
gates with all-MiniLM-L6-v2 cosine >= 0.2, which needs sentence-transformers and a model download at
run time; HeadKV gates with token F1 > 0.5 (qa_f1_score). Token F1 needs neither and suits answers
that are short facts; but needle 3's reference restates the question, so F1 alone passed "The year
2010 was the year when Tom started high school." (0.53), hence the numbers. >= rather than > so that
--min_f1 0 accepts every test.

Output, per checkpoint: <checkpoint>/head_scores/<score>.json (--out for another folder) as
{"meta": {...}, "scores": {"<layer>-<query head>": {...}}} and <score>.png, a layers x heads heatmap
of the main score (InfScore, HeadKV score). Query heads, not KV heads: for GQA the budget side
reduces each group.

Timing: the defaults (3 needles x prompt lengths 500, 1000, 1500, 2000 x depths 10, 30, 50, 70, 90 =
60 tests) on SmolLM2-135M-Instruct, 1 CPU thread of a busy 2-core machine: 5 min 48 s (5.7 s a test,
most of it the fp32 prefill), --score dililazy headkv from the one pass; 5 of the 60 tests passed the
gate (needles 1 and 2 at 1,500-2,000 tokens; the 135M model never found needle 3's year).
"""
import json
import math
import re
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

import cache as kv
import generate as gen
from metrics import qa_f1

ROOT = Path(__file__).resolve().parent
HAYSTACK = "paul_graham_essays/essays"
PREPARE_DATA = "python scripts/prepare_data.py"
# the seed's table (seeds/dililazykv.md): question, needle, reference answer
NEEDLES = [
    ("What are good ways to spend time in campus?",
     "The good ways to spend time in campus include relax and do nothing.", "Relax and do nothing."),
    ("What habits are beneficial for health during Ph.D. career?",
     "The beneficial habits during Ph.D. career contain exercise and healthy diet.", "Exercise and healthy diet."),
    ("Which year did Tom start high school?",
     "Tom was born in 2005. Tom started high school fifteen years after he was born.",
     "Tom started high school in 2020."),
]
TEMPLATE = ("Read the text and answer the question.\nQuestion: {question}\n\nText: {context}\n\n"
            "Question: {question}\nAnswer briefly, using the text.")
STATS = ("infscore", "diliscore", "lazyscore", "diligent", "subconscious", "distracted", "diffuse", "headkv")
MAIN = {"dililazy": "infscore", "headkv": "headkv"}
FIELDS = {"dililazy": STATS[:7], "headkv": ("headkv",)}


# ---------------------------------------------------------------- the metrics, per attention row
def ratio(a, b):
    return torch.where(b > 0, a / b, torch.zeros_like(a))


def top_mask(rows, k):
    """[..., n] bool: the k largest of each row (all of it when k >= n)."""
    idx = rows.topk(min(k, rows.shape[-1]), dim=-1).indices
    return torch.zeros_like(rows, dtype=torch.bool).scatter_(-1, idx, True)


def needle_mask(n, s, e, device=None):
    return (torch.arange(n, device=device) >= s) & (torch.arange(n, device=device) < e)


def dililazy_scores(rows, s, e, k) -> dict:
    """DiliLazyKV's per-step values of attention rows [..., n] for the needle [s, e) and top-k."""
    top, needle = top_mask(rows, k), needle_mask(rows.shape[-1], s, e, rows.device)
    wtp = (rows * (top & needle)).sum(-1)
    wfp = (rows * (top & ~needle)).sum(-1)
    wfn = (rows * (~top & needle)).sum(-1)
    dili, lazy = ratio(wtp, wtp + wfp), ratio(wtp, wtp + wfn)
    count = lambda m: m.sum(-1).float()  # noqa: E731
    return dict(infscore=ratio(2 * dili * lazy, dili + lazy), diliscore=dili, lazyscore=lazy,
                diligent=count(top & needle), subconscious=count(~top & needle),
                distracted=count(top & ~needle), diffuse=count(~top & ~needle))


def headkv_score(rows, s, e):
    """HeadKV's per-step retrieval-reasoning score: top-k = needle length n, the top-k attention that
    lies in the needle, / n."""
    top, needle = top_mask(rows, e - s), needle_mask(rows.shape[-1], s, e, rows.device)
    return (rows * (top & needle)).sum(-1) / (e - s)


def step_stats(rows, s, e, k):
    """rows [H, n] -> [H, len(STATS)]."""
    return torch.stack([*dililazy_scores(rows, s, e, k).values(), headkv_score(rows, s, e)], dim=-1)


def gate(answer: str, reference: str, min_f1: float) -> tuple[float, bool]:
    """(token F1, accepted): F1 >= min_f1 and every number of the reference in the answer (F1 alone let
    "The year 2010 was the year when Tom started high school." pass for "... in 2020.")."""
    f1 = qa_f1(answer, reference)
    return f1, f1 >= min_f1 and set(re.findall(r"\d+", reference)) <= set(re.findall(r"\d+", answer))


# ---------------------------------------------------------------- the recorder
class AttentionRecorder(nn.Module):
    """Duck-types a full KV cache for Attention (as cache.AttentionLossProbe does): stores K/V in the
    wrapped cache and, at each decode step, hands the one sequence's softmax attention rows [H, n]
    (query heads; n = every position so far, the new token included) to `measure`, keeping what it
    returns in `out`."""

    def __init__(self, cache: kv.KVCache, measure):
        super().__init__()
        self.cache, self.measure, self.out = cache, measure, []

    def prefill(self, q, k, v, pos):
        self.cache.prefill(q, k, v, pos)

    def decode(self, q, k_new, v_new, input_pos):
        y = self.cache.decode(q, k_new, v_new, input_pos)
        n = int(input_pos[0]) + 1  # positions 0..n-1 are the sequence so far
        H_kv, D = self.cache.k.shape[1], q.shape[-1]
        qg = q[0, :, 0].float().view(H_kv, -1, D)  # query head h = KV head h // G, as Attention groups them
        logits = qg @ self.cache.k[0].float().transpose(-1, -2) / math.sqrt(D)  # [H_kv, G, slots]
        # each slot's logit at its position (a full cache holds p in slot p; a sliding-window layer's ring,
        # cache.WindowCache, only the window's, so the rest of its row is 0); empty slots to column n, dropped
        pos = self.cache.pos[0]
        rows = torch.full((*logits.shape[:2], n + 1), -math.inf, device=q.device)
        rows.scatter_(-1, pos.masked_fill(pos < 0, n)[:, None].expand_as(logits), logits)
        self.out.append(self.measure(rows[..., :n].softmax(-1).reshape(-1, n)))
        return y


@torch.no_grad()
def answer(model, tok, ids, measure, max_new_tokens, device):
    """Greedy answer to prompt ids with the full cache, recording every step. -> (text, [steps, layers, H, M])."""
    dtype = model.norm.weight.dtype  # not the embedding table: int8 in a quantized model
    caches = kv.make_caches(model.args, kv.CacheConfig(), 1, len(ids) + max_new_tokens, max_new_tokens, device, dtype)
    recorders = [AttentionRecorder(c, measure) for c in caches]
    model.setup_caches(recorders)
    tokens = torch.tensor([ids], device=device)
    pos = torch.arange(len(ids), device=device)[None]
    # all but the last prompt token are prefilled; the last goes through a decode step so that its
    # query, the one that picks the first answer token, is recorded
    model.prefill(tokens[:, :-1], pos[:, :-1])
    nxt, p, out = tokens[:, -1:], pos[:, -1], []
    for _ in range(max_new_tokens):
        nxt = model(nxt, p)[:, -1].argmax(-1, keepdim=True)
        p = p + 1
        out.append(int(nxt))
        if out[-1] in tok.stop_ids or ("\n" in tok.decode(out[-1:]) and tok.decode(out[:-1]).strip()):
            break
    text = tok.decode([t for t in out if t not in tok.stop_ids]).strip().split("\n")[0]
    return text, torch.stack([torch.stack(r.out) for r in recorders], dim=1)


# ---------------------------------------------------------------- the tests
def haystack_dir(arg) -> Path:
    """--haystack_dir, else the repository's data/, else ../shared/data (from the repository)."""
    found = [Path(arg)] if arg else [ROOT / "data" / HAYSTACK, ROOT.parent / "shared/data" / HAYSTACK]
    for d in found:
        if d.is_dir() and any(d.glob("*.txt")):
            return d
    raise gen.UserError(f"no essays (*.txt) in {' or '.join(map(str, found))}; fetch them with: {PREPARE_DATA}")


def insertion_point(tok, ids, depth) -> int:
    """The token index of the sentence end at or before depth% of ids (0 if none)."""
    i = int(len(ids) * depth / 100)
    while i > 0 and not tok.decode(ids[i - 1:i]).rstrip().endswith("."):
        i -= 1
    return i


def find_span(ids, needle_ids) -> tuple[int, int]:
    """The needle's tokens in the prompt: the exact match, else (a tokenizer that merges across the
    boundary) the window sharing the most tokens with them, as HeadKV's find_needle_idx does."""
    n = len(needle_ids)
    for i in range(len(ids) - n + 1):
        if ids[i:i + n] == needle_ids:
            return i, i + n
    want = Counter(needle_ids)
    best = max(range(len(ids) - n + 1), key=lambda i: sum((Counter(ids[i:i + n]) & want).values()))
    return best, best + n


def build_prompt(tok, hay_ids, needle, question, length, depth, chat):
    """Prompt ids of about `length` tokens with the needle at `depth`%, and the needle's span."""
    bare = len(tok.encode_prompt(TEMPLATE.format(question=question, context=needle), chat=chat))
    n = length - bare
    if n < 1:
        raise gen.UserError(f"a {length}-token prompt has no room for a haystack (the needle and question take "
                            f"{bare} tokens); raise --min_len")
    if n > len(hay_ids):
        raise gen.UserError(f"the haystack has {len(hay_ids)} tokens, fewer than --max_len needs ({n}); lower it")
    hay = hay_ids[:n]
    i = insertion_point(tok, hay, depth)
    before, after = tok.decode(hay[:i]), tok.decode(hay[i:])
    context = (f"{before} {needle}" if before else needle) + ("" if after[:1].isspace() else " ") + after
    ids = tok.encode_prompt(TEMPLATE.format(question=question, context=context), chat=chat)
    return ids, find_span(ids, tok.encode(" " + needle, bos=False))


def grid(args) -> list[tuple[int, int, int]]:
    """(needle index, length, depth) of every test."""
    n, lo, hi = args.context_intervals, args.min_len, args.max_len
    lengths = sorted({round(lo + i * (hi - lo) / max(n - 1, 1)) for i in range(n)})
    return [(j, L, d) for j in args.needles for L in lengths for d in args.depths]


def run_tests(model, tok, hay_ids, args, device):
    """Every test; -> (per-test records, [layers, H, M] mean over accepted tests or None)."""
    from tqdm import tqdm
    records, accepted = [], []
    bar = tqdm(grid(args), desc="head scores", unit="test", dynamic_ncols=True, file=sys.stderr)
    for j, L, depth in bar:
        question, needle, reference = NEEDLES[j]
        ids, (s, e) = build_prompt(tok, hay_ids, needle, question, L, depth, not args.no_chat)
        text, stats = answer(model, tok, ids, partial(step_stats, s=s, e=e, k=args.top_k_infscore),
                             args.max_new_tokens, device)
        f1, ok = gate(text, reference, args.min_f1)
        if ok:  # dililazy values: mean over the steps; headkv: the sum (HeadKV accumulates)
            accepted.append(torch.cat([stats[..., :-1].mean(0), stats[..., -1:].sum(0)], dim=-1))
        records.append(dict(needle=j + 1, length=L, prompt_tokens=len(ids), depth=depth, needle_span=[s, e],
                            steps=stats.shape[0], answer=text, f1=round(f1, 4), accepted=ok))
        bar.set_postfix(accepted=len(accepted))
    return records, (torch.stack(accepted).mean(0) if accepted else None)


# ---------------------------------------------------------------- output
def write_scores(out_dir: Path, kind, table, meta):
    """<kind>.json (keyed "layer-head") and <kind>.png beside it; -> the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cols = [STATS.index(f) for f in FIELDS[kind]]
    scores = {f"{layer}-{h}": {f: round(float(table[layer, h, c]), 6) for f, c in zip(FIELDS[kind], cols)}
              for layer in range(table.shape[0]) for h in range(table.shape[1])}
    path = out_dir / f"{kind}.json"
    path.write_text(json.dumps({"meta": {**meta, "score": kind}, "scores": scores}, indent=1) + "\n")
    heatmap(table[..., STATS.index(MAIN[kind])], path.with_suffix(".png"),
            f"{meta['checkpoint']}: {MAIN[kind]} ({meta['tests_accepted']}/{meta['tests_run']} tests)")
    return path


def heatmap(values, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    L, H = values.shape
    fig, ax = plt.subplots(figsize=(2.5 + 0.45 * H, 1.5 + 0.22 * L))
    im = ax.imshow(values.numpy(), cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(H))
    ax.set_yticks(range(0, L, max(1, L // 15)))
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def top_heads(table, kind, n=10):
    v = table[..., STATS.index(MAIN[kind])]
    idx = v.flatten().argsort(descending=True)[:n].tolist()
    return [(f"{i // v.shape[1]}-{i % v.shape[1]}", round(float(v.flatten()[i]), 4)) for i in idx]


# ---------------------------------------------------------------- command line
def int_list(text, flag, lo, hi):
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise gen.UserError(f"{flag} {text}: give comma-separated integers") from None
    if not values or any(not lo <= v <= hi for v in values):
        raise gen.UserError(f"{flag} {text}: give values in {lo}..{hi}")
    return sorted(set(values))


def parse_args(argv):
    p = gen.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--checkpoint_path", default=gen.DEFAULT_CHECKPOINT)
    p.add_argument("--score", nargs="+", choices=list(FIELDS), default=["dililazy"], help="which scores to write")
    p.add_argument("--haystack_dir", help=f"folder of .txt essays (default data/{HAYSTACK}, else ../shared/data/...)")
    p.add_argument("--needles", default="1,2,3", help="the seed's needles by number (1-3), comma-separated")
    p.add_argument("--min_len", type=int, default=500, help="shortest prompt (tokens)")
    p.add_argument("--max_len", type=int, default=2000, help="longest prompt (tokens)")
    p.add_argument("--context_intervals", type=int, default=4, help="prompt lengths, evenly spaced")
    p.add_argument("--depths", default="10,30,50,70,90", help="needle depths (percent), comma-separated")
    p.add_argument("--top_k_infscore", "--top_k", type=int, default=10, help="top-k of DiliLazyKV's scores")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--min_f1", type=float, default=0.5,
                   help="a test counts when its answer's token F1 is at least this (and has the reference's numbers)")
    p.add_argument("--no_chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--out", help="output folder (default <checkpoint>/head_scores)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    args = p.parse_args(argv)
    args.needles = [j - 1 for j in int_list(args.needles, "--needles", 1, len(NEEDLES))]
    args.depths = int_list(args.depths, "--depths", 0, 100)
    for flag, low in (("min_len", 2), ("context_intervals", 1), ("top_k_infscore", 1), ("max_new_tokens", 1)):
        if getattr(args, flag) < low:
            raise gen.UserError(f"--{flag} {getattr(args, flag)}: give at least {low}")
    if args.min_len > args.max_len:
        raise gen.UserError(f"--min_len {args.min_len} > --max_len {args.max_len}")
    if not 0 <= args.min_f1 <= 1:
        raise gen.UserError(f"--min_f1 {args.min_f1:g}: give a value in 0..1")
    return args


def main(argv=None, loaded=None):
    """`loaded` = (model, tokenizer) to score instead of loading --checkpoint_path (tests)."""
    args = parse_args(argv)
    dtype = gen.check_device(args.device, args.dtype)
    gen.set_threads(args.threads)
    hay_dir = haystack_dir(args.haystack_dir)
    model, tok = loaded or gen.load(args.checkpoint_path, args.device, dtype)
    if args.max_len + args.max_new_tokens > model.args.block_size:
        raise gen.UserError(f"--max_len {args.max_len} + --max_new_tokens {args.max_new_tokens} exceeds the "
                            f"model's maximum context of {model.args.block_size}")
    t0 = time.perf_counter()
    files = sorted(hay_dir.glob("*.txt"))
    hay_ids = tok.encode("".join(f.read_text(encoding="utf-8") for f in files), bos=False)
    records, table = run_tests(model, tok, hay_ids, args, args.device)
    n_ok = sum(r["accepted"] for r in records)
    print(f"{n_ok} of {len(records)} tests passed the gate (token F1 >= {args.min_f1:g}, the reference's numbers) in "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if table is None:
        raise gen.UserError(f"no test passed the gate (token F1 >= {args.min_f1:g} and the reference's numbers; "
                            f"{len(records)} run); no scores written (other --needles, lengths or a lower --min_f1)")
    out_dir = Path(args.out) if args.out else Path(args.checkpoint_path) / "head_scores"
    meta = dict(checkpoint=getattr(model.args, "name", "?"), checkpoint_path=str(args.checkpoint_path),
                flags={**vars(args), "needles": [j + 1 for j in args.needles]}, haystack=str(hay_dir),
                tests_run=len(records), tests_accepted=n_ok, seconds=round(time.perf_counter() - t0, 1),
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"), tests=records)
    for kind in args.score:
        path = write_scores(out_dir, kind, table, meta)
        print(f"{kind}: {path} and {path.with_suffix('.png').name}; top heads: "
              + " ".join(f"{h}:{v:g}" for h, v in top_heads(table, kind)))


if __name__ == "__main__":
    gen.cli(main)
