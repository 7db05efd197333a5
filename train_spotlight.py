"""Train Spotlight's hash functions with the LLM frozen, and measure retrieval quality.

    python train_spotlight.py                 # default model on CPU (~30 CPU-minutes, 2 cores); writes <checkpoint>/spotlight.safetensors
    python train_spotlight.py --eval          # recall table: spotlight vs spotlight_linear, lsh_retrieval, quest

Spotlight Attention (Li et al. 2025, arXiv 2508.19740). One forward pass per training sequence records
every layer's post-RoPE q and k (a recording cache object stands in for the KV cache, so model.py is
untouched). Per layer and step: sample query positions; each query's true top 2% keys by q.k (causal)
are positives T, the rest negatives O (up to --max_pos / --max_neg sampled); relaxed codes
c(x) = softsign(64 h(x)); loss = mean over pairs (a in T, b in O) of -log sigmoid(c(q).c(k_a) - c(q).c(k_b))
(Bradley-Terry). AdamW lr 1e-3, betas (0.9, 0.98), wd 0.1, 1% warm-up then cosine, gradients clipped
to 1.0 per layer (the paper trains layer by layer). The paper samples up to 1024 queries/positives/
negatives over 8k-token sequences; the CPU defaults are smaller (same objective, fewer pairs).
Text: ../shared/data (pg19 books + wikitext-2 train; paul_graham_essays held out for recall).
"""
import argparse
import math
import re
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import cache as kv

ROOT = Path(__file__).resolve().parent
DATA = ROOT / ".." / "shared" / "data"
DEFAULT_CHECKPOINT = "checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"
SOURCES = ("pg19_test_gutenberg", "wikitext2_raw", "paul_graham_essays")
METHODS = ("spotlight", "spotlight/q-sel", "spotlight_linear", "lsh_retrieval", "quest", "quest/max")


# ---- data ----------------------------------------------------------------------------------------
def read_source(name: str) -> str:
    d = DATA / name
    if name == "pg19_test_gutenberg":  # raw Gutenberg files: keep the body between the START/END lines
        books = [p.read_text(encoding="utf-8-sig") for p in sorted(d.glob("*.txt"))]
        return "\n\n".join(re.split(r"\*\*\* ?END OF", re.split(r"\*\*\* ?START OF[^\n]*\n", b)[-1])[0] for b in books)
    if name == "wikitext2_raw":
        return (d / "wiki.test.raw").read_text(encoding="utf-8").replace("\r\n", "\n")
    if name == "paul_graham_essays":
        return "\n\n".join(p.read_text(encoding="utf-8") for p in sorted((d / "essays").glob("*.txt")))
    raise ValueError(f"unknown text source {name!r}; known: {', '.join(SOURCES)}")


def token_stream(tokenizer, names) -> torch.Tensor:
    return torch.tensor([t for n in names for t in tokenizer.encode(read_source(n), bos=False)])


def windows(stream, length, n, seed):
    """n random windows of `length` tokens [n, length]."""
    if len(stream) < length:
        raise ValueError(f"text has {len(stream)} tokens, fewer than --seq_len {length}")
    starts = torch.randint(0, len(stream) - length + 1, (n,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([stream[s:s + length] for s in starts.tolist()])


# ---- recording post-RoPE q and k ----------------------------------------------------------------
class Recorder(nn.Module):
    """Stands in for a layer's KV cache during prefill and keeps its post-RoPE q [H, T, d], k [H_kv, T, d]."""
    def prefill(self, q, k, v, pos):
        self.q, self.k = q[0].float(), k[0].float()


@torch.no_grad()
def capture(model, tokens, device):
    recs = [Recorder() for _ in model.layers]
    model.setup_caches(recs)
    T = tokens.shape[-1]
    model.prefill(tokens[None].to(device), torch.arange(T, device=device)[None])
    return [(r.q, r.k) for r in recs]


# ---- the hash being trained ----------------------------------------------------------------------
class Hash(nn.Module):
    """h for one layer: Hh heads (n_kv: one per KV head, or n_head: the authors' per query head)."""
    def __init__(self, heads, d):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(heads, d, d) * 1e-3)  # near zero: untrained code ~ sign(x)
        self.b1 = nn.Parameter(torch.zeros(heads, d))
        self.w2 = nn.Parameter(torch.randn(heads, d, d) * 1e-3)
        self.b2 = nn.Parameter(torch.zeros(heads, d))

    def forward(self, x):
        return kv.spotlight_hash(x, self.w1, self.b1, self.w2, self.b2)


def relaxed_codes(h, q, k):
    """softsign(64 h(x)) for queries q [H, N, d] and keys k [H_kv, T, d] -> [H, N, d], [H, T, d]."""
    H, Hh, Hk = q.shape[0], h.w1.shape[0], k.shape[0]
    cq = F.softsign(64 * h(q.reshape(Hh, -1, q.shape[-1]))).reshape(q.shape)
    ck = F.softsign(64 * h(k.repeat_interleave(Hh // Hk, 0)))
    return cq, ck.repeat_interleave(H // Hh, 0)


def pair_loss(h, q, k, args, gen):
    """Bradley-Terry loss and rank error for one layer of one sequence (q [H, T, d], k [H_kv, T, d])."""
    H, T, d = q.shape
    dev = q.device
    qi = torch.randint(min(64, T - 1), T, (args.queries,), generator=gen).to(dev)
    with torch.no_grad():
        logits = q[:, qi] @ k.repeat_interleave(H // k.shape[0], 0).transpose(-1, -2)  # [H, Q, T]
        logits = logits.masked_fill(torch.arange(T, device=dev) > qi[:, None], -math.inf)  # causal
        n_top = (args.top * (qi + 1)).ceil().long().clamp(min=1)  # the true top 2% are the positives
        best, best_idx = logits.topk(int(n_top.max()), dim=-1)
        thr = best.gather(-1, (n_top - 1)[None, :, None].expand(H, -1, 1))
        prio = torch.rand(best.shape, generator=gen).to(dev).masked_fill(
            torch.arange(best.shape[-1], device=dev) >= n_top[:, None], -1.0)
        pv, pi = prio.topk(min(args.max_pos, best.shape[-1]), dim=-1)  # up to max_pos of them, at random
        ia, va = best_idx.gather(-1, pi), pv >= 0
        ib = (torch.rand(H, len(qi), args.max_neg, generator=gen).to(dev) * (qi + 1)[:, None]).long()
        vb = logits.gather(-1, ib) < thr  # negatives: uniform over earlier keys, positives rejected
    cq, ck = relaxed_codes(h, q[:, qi], k)
    s = cq @ ck.transpose(-1, -2)  # [H, Q, T]
    diff = s.gather(-1, ia)[..., :, None] - s.gather(-1, ib)[..., None, :]
    w = (va[..., :, None] & vb[..., None, :]).float()
    return (F.softplus(-diff) * w).sum() / w.sum(), ((diff < 0).float() * w).sum() / w.sum()


def lr_at(step, total, peak):
    warm = max(1, round(0.01 * total))
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def save(hashes, path, meta):
    from safetensors.torch import save_file
    state = {f"layers.{i}.{n}": p.detach().float().cpu().contiguous()
             for i, h in hashes.items() for n, p in h.named_parameters()}
    save_file(state, str(path), metadata={k: str(v) for k, v in meta.items()})


# ---- retrieval quality ---------------------------------------------------------------------------
def true_topk(logits, k):
    """logits [Q, H, T] (causal, -inf masked); k [Q] -> membership [Q, H, T] of each row's top k."""
    rank = logits.argsort(-1, descending=True).argsort(-1)
    return rank < k[:, None, None]


def picked(scores, k):
    """The k [Q] best of scores [Q, H, T], ties to the later key as the caches break them
    (cache.count_select) -> bool [Q, H, T]."""
    T = scores.shape[-1]
    idx = T - 1 - scores.float().flip(-1).sort(dim=-1, descending=True, stable=True).indices[..., :int(k.max())]
    ok = torch.arange(idx.shape[-1], device=idx.device) < k[:, None, None]
    out = torch.zeros(*scores.shape[:-1], T + 1, dtype=torch.bool, device=scores.device)
    return out.scatter(-1, idx.masked_fill(~ok, T), True)[..., :T]


def method_selection(name, layer, q, k, qi, k_sel, cfg_for):
    """The set each method reads for queries q [Q, H_kv, G, d] at positions qi over keys k [1, H_kv, T, d]:
    bool [Q, H, T] (per query head; per-KV-head methods repeat their set over the group)."""
    Q, H_kv, G, d = q.shape
    T = k.shape[2]
    causal = (torch.arange(T, device=q.device) <= qi[:, None])[:, None, :]  # [Q, 1, T]
    base, _, variant = name.partition("/")
    cache = kv.REGISTRY[base](1, H_kv, T, d, G, torch.float32, layer, 10 ** 6, cfg_for(base, variant)).to(q.device)
    if base == "quest":
        cache.k[:] = k
        cache.pos[:] = torch.arange(T, device=q.device)
        cache.on_prefill(None, None, None, None, None)
        ps = cache.ps
        pages = cache.page_scores(q)  # [Q, H_kv, P]; the current page is forced, so its future keys never count
        page = torch.arange(pages.shape[-1], device=q.device)
        pages = pages.masked_fill(page * ps > qi[:, None, None], -math.inf)
        pages = pages.masked_fill(page == (qi // ps)[:, None, None], math.inf)
        sel_pages = picked(pages, (k_sel / ps).ceil().long().clamp(min=1))
        sel = sel_pages.repeat_interleave(ps, -1)[..., :T]
    else:
        sim = kv.hamming_sim(cache.query_codes(q), cache.key_codes(k), d).float()  # [Q, H_kv, G, T]
        sim = sim.masked_fill(~causal[:, :, None], -math.inf)
        if variant == "q-sel":  # each query head its own top k (the authors' reference)
            return picked(sim.flatten(1, 2), k_sel) & causal
        sel = picked(sim.sum(2), k_sel)
    return sel.repeat_interleave(G, 1) & causal


@torch.no_grad()
def recall_table(caps, n_group, args, hashes, methods=METHODS, prunes=(0.98, 0.9)):
    """Recall of each method's selected set vs the true top-k keys (per query head, k from the prune
    rate) and the softmax attention mass it covers, per layer, over held-out captures.
    Returns {prune: {method: [L] recall}}, {prune: {method: [L] mass}}."""
    def cfg_for(base, variant):
        params = {"quest_group": variant or "mean", "quest_page_size": args.page_size,
                  "spotlight_dense_layers": args.dense_layers, "quest_dense_layers": args.dense_layers,
                  "spotlight_hashes": str(hashes)}
        return kv.CacheConfig(strategy=base, params=params)

    L = len(caps[0])
    layers = [i for i in range(L) if i not in args.dense_layers]
    rec = {p: {m: [0.0] * L for m in methods} for p in prunes}
    mass = {p: {m: [0.0] * L for m in methods} for p in prunes}
    gen = torch.Generator().manual_seed(1)
    for cap in caps:
        for i in layers:
            q, k = cap[i]
            H, T, d = q.shape
            qi = torch.randint(T // 2, T, (args.eval_queries,), generator=gen).to(q.device)
            qq = q[:, qi].transpose(0, 1)  # [Q, H, d]
            logits = torch.einsum("qhd,htd->qht", qq, k.repeat_interleave(n_group, 0))
            logits = logits.masked_fill(torch.arange(T, device=q.device) > qi[:, None, None], -math.inf)
            probs = (logits / math.sqrt(d)).softmax(-1)
            qg = qq.view(len(qi), H // n_group, n_group, d)
            for p in prunes:
                n = qi + 1
                k_sel = torch.maximum(n.clamp(max=20), n - (n.double() * p).floor().long())
                truth = true_topk(logits, k_sel)
                for m in methods:
                    sel = method_selection(m, i, qg, k[None], qi, k_sel, cfg_for)
                    rec[p][m][i] += float(((sel & truth).sum((1, 2)) / (k_sel * H)).mean()) / len(caps)
                    mass[p][m][i] += float((probs * sel).sum(-1).mean()) / len(caps)
    return rec, mass


def print_table(rec, mass, dense):
    for p in rec:
        methods = list(rec[p])
        layers = [i for i in range(len(rec[p][methods[0]])) if i not in dense]
        print(f"\nrecall of the true top-k (attention mass covered), {p:.0%} pruned; layers {dense} dense:")
        print("| layer | " + " | ".join(methods) + " |")
        print("|---" * (len(methods) + 1) + "|")
        for i in layers:
            print(f"| {i} | " + " | ".join(f"{rec[p][m][i]:.3f} ({mass[p][m][i]:.2f})" for m in methods) + " |")
        mean = lambda xs: sum(xs[i] for i in layers) / len(layers)
        print("| mean | " + " | ".join(f"**{mean(rec[p][m]):.3f}** ({mean(mass[p][m]):.2f})" for m in methods) + " |")


def quick_recall(caps, n_group, args, hashes):
    """Mean recall over hashed layers at 98% pruned: {method: recall}, trained vs untrained."""
    rec, _ = recall_table(caps, n_group, args, hashes, methods=("spotlight", "spotlight_linear"), prunes=(0.98,))
    layers = [i for i in range(len(caps[0])) if i not in args.dense_layers]
    return {m: sum(r[i] for i in layers) / len(layers) for m, r in rec[0.98].items()}


# ---- main ----------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint_path", default=DEFAULT_CHECKPOINT)
    p.add_argument("--out", default=None, help="default: <checkpoint_path>/spotlight.safetensors")
    p.add_argument("--eval", action="store_true", help="only print the recall table for the saved hashes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="model dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seq_len", type=int, default=1024, help="tokens per training sequence (paper: 8k)")
    p.add_argument("--steps_per_seq", type=int, default=5, help="optimizer steps per recorded sequence")
    p.add_argument("--queries", type=int, default=64, help="query positions sampled per step (paper: 1024)")
    p.add_argument("--max_pos", type=int, default=32, help="positives sampled per query (paper: 1024)")
    p.add_argument("--max_neg", type=int, default=128, help="negatives sampled per query (paper: 1024)")
    p.add_argument("--top", type=float, default=0.02, help="fraction of keys that are positives")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hash_heads", choices=("kv", "query"), default="kv",
                   help="one hash per KV head (shared by its query heads; default) or per query head (the authors')")
    p.add_argument("--dense_layers", type=int, nargs="*", default=[0, 1], help="layers left dense (no hash)")
    p.add_argument("--layer_batch", type=int, default=0, help="layers per backward pass (0 = all; 8B: 1-4)")
    p.add_argument("--train_sources", nargs="+", default=["pg19_test_gutenberg", "wikitext2_raw"])
    p.add_argument("--holdout", default="paul_graham_essays")
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--eval_seqs", type=int, default=2, help="held-out sequences for the final table")
    p.add_argument("--eval_len", type=int, default=2048)
    p.add_argument("--eval_queries", type=int, default=64)
    p.add_argument("--page_size", type=int, default=16, help="Quest's page size in the table")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load(args):
    from model import load_model
    from tokenizer import load_tokenizer
    path = Path(args.checkpoint_path)
    if not (path / "model.safetensors").exists():
        raise SystemExit(f"error: no checkpoint at {path}; prepare it with: bash scripts/prepare_default.sh")
    dtype = getattr(torch, args.dtype or ("bfloat16" if "cuda" in args.device else "float32"))
    return load_model(path, device=args.device, dtype=dtype), load_tokenizer(path)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model, tokenizer = load(args)
    margs = model.args
    G = margs.n_head // margs.n_local_heads
    out = Path(args.out or Path(args.checkpoint_path) / "spotlight.safetensors")
    held = windows(token_stream(tokenizer, [args.holdout]), args.eval_len, args.eval_seqs, seed=12345)
    if args.eval:
        if not out.exists():
            raise SystemExit(f"error: no hashes at {out}; train them with: python train_spotlight.py "
                             f"--checkpoint_path {args.checkpoint_path}")
        caps = [capture(model, t, args.device) for t in held]
        print_table(*recall_table(caps, G, args, out), args.dense_layers)
        return
    t0 = time.time()
    train(model, tokenizer, args, out, held[0][: min(1024, args.eval_len)], G)
    caps = [capture(model, t, args.device) for t in held]
    print_table(*recall_table(caps, G, args, out), args.dense_layers)
    print(f"\ntrained and evaluated in {time.time() - t0:.0f} s; hashes in {out}")


def train(model, tokenizer, args, out, held_tokens, G):
    """Train every hashed layer at once; saves to `out` at each eval. Returns {"loss": [per step],
    "recall": [(step, {method: held-out recall at 98% pruned})]}."""
    margs = model.args
    heads = margs.n_local_heads * (G if args.hash_heads == "query" else 1)
    hashes = {i: Hash(heads, margs.head_dim).to(args.device) for i in range(margs.n_layer) if i not in args.dense_layers}
    opt = torch.optim.AdamW([p for h in hashes.values() for p in h.parameters()], lr=args.lr,
                            betas=(0.9, 0.98), weight_decay=0.1)
    stream = token_stream(tokenizer, args.train_sources)
    n_seq = -(-args.steps // args.steps_per_seq)
    seqs = windows(stream, args.seq_len, n_seq, seed=args.seed)
    print(f"training {len(hashes)} layers x {heads} hashes (d={margs.head_dim}) on {len(stream)} tokens of "
          f"{'+'.join(args.train_sources)}; {args.steps} steps, {n_seq} sequences of {args.seq_len}; "
          f"held out: {args.holdout}", flush=True)
    meta = dict(hash_heads=args.hash_heads, steps=args.steps, seq_len=args.seq_len, top=args.top,
                train_sources="+".join(args.train_sources), dense_layers=args.dense_layers)
    quick = [capture(model, held_tokens, args.device)]
    save(hashes, out, meta)
    log = {"loss": [], "recall": [(0, quick_recall(quick, G, args, out))]}
    fmt = lambda r: ", ".join(f"{m} {v:.3f}" for m, v in r.items())
    print(f"step 0: held-out recall@2% {fmt(log['recall'][-1][1])}", flush=True)
    gen, t0, hist, caps = torch.Generator().manual_seed(args.seed), time.time(), [], None
    layers = list(hashes)
    chunk = args.layer_batch or len(layers)
    for step in range(args.steps):
        if step % args.steps_per_seq == 0:
            caps = capture(model, seqs[step // args.steps_per_seq], args.device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        tot = err = 0.0
        for j in range(0, len(layers), chunk):
            parts = [pair_loss(hashes[i], *caps[i], args, gen) for i in layers[j:j + chunk]]
            loss = sum(p[0] for p in parts) / len(layers)
            loss.backward()
            tot, err = tot + loss.item(), err + sum(p[1].item() for p in parts) / len(layers)
        for h in hashes.values():
            torch.nn.utils.clip_grad_norm_(h.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        hist.append((tot, err))
        log["loss"].append(tot)
        if (step + 1) % 20 == 0 or step == 0:
            n = len(hist)
            print(f"step {step + 1}/{args.steps}: loss {sum(h[0] for h in hist) / n:.4f} "
                  f"rank error {sum(h[1] for h in hist) / n:.4f} lr {lr_at(step, args.steps, args.lr):.2e} "
                  f"({time.time() - t0:.0f} s)", flush=True)
            hist = []
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            save(hashes, out, meta)
            log["recall"].append((step + 1, quick_recall(quick, G, args, out)))
            print(f"step {step + 1}: held-out recall@2% {fmt(log['recall'][-1][1])} (saved {out})", flush=True)
    return log


if __name__ == "__main__":
    main()
