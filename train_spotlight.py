"""Train Spotlight's hash functions with the LLM frozen, and measure retrieval quality.

    python train_spotlight.py                 # default model, 64-bit codes; writes <checkpoint>/spotlight.safetensors
    python train_spotlight.py --bits 128      # two int64 words per key; writes <checkpoint>/spotlight-128.safetensors
    python train_spotlight.py --eval          # recall table and the gate (see recall_table, print_gate)

Spotlight Attention (Li et al. 2025, arXiv 2508.19740). Each step draws a fresh random window of
--seq_len tokens (default 2,048, the README's evaluation length) from the training text, and one
forward pass records every layer's post-RoPE q and k (a recording cache object stands in for the KV
cache, so model.py is untouched). Per hashed layer: --queries query positions; positives are the
paper's: the top n = floor(--top * seq_len) keys (2% of the whole window, 40 at 2,048) of the query by
q.k among the keys it can attend (causal), as the authors' reference ranks the whole masked row and keeps
its first 2%; queries are drawn from positions with more than n keys so each has negatives. Up to
--max_pos positives (a random subset of the n ranks) and --max_neg negatives (uniform over the other
attendable keys) are sampled. Relaxed codes c(x) = softsign(64 h(x)); loss per layer = mean over pairs
(a positive, b negative) of -log sigmoid(c(q).c(k_a) - c(q).c(k_b)) (Bradley-Terry). The layers' losses
are summed (not averaged: each layer's gradient is its own loss's) and each layer's gradient is clipped
to norm --clip (1.0) on its own, as the paper, which trains layer by layer. AdamW lr 1e-3, betas (0.9,
0.98), wd 0.1, 1% warm-up then cosine. Every hashed layer trains in one batched pass (--layer_batch
splits it for memory). --bits 128 at head_dim 64: the hash widens x by a fixed lift [I | Q] (Q a random
orthogonal d x d, stored with the weights) and the MLP is 128-wide; two int64 words per key.
Text, from --data_dir (default: the repository's data/, else ../shared/data): training on the four
PG-19 test-split books in pg19_test_gutenberg/ (Gutenberg header and footer cut) and the wikitext-2-raw
*test* split (wikitext2_raw/wiki.test.raw, the only split there); held out: paul_graham_essays/essays.
The paper trains on 8k-token sequences with 1024 queries, positives and negatives each.
"""
import argparse
import math
import os
import re
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import cache as kv

ROOT = Path(__file__).resolve().parent
DATA_ROOTS = (ROOT / "data", ROOT.parent / "shared" / "data")
DEFAULT_CHECKPOINT = "checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"
SOURCES = ("pg19_test_gutenberg", "wikitext2_raw", "paul_graham_essays")
METHODS = ("ceiling", "spotlight", "spotlight/q-sel", "spotlight_linear", "lsh_retrieval", "simhash128",
           "orth128", "quest", "quest/max")


# ---- data ----------------------------------------------------------------------------------------
def read_source(name: str, data_dir=None) -> str:
    roots = [Path(data_dir)] if data_dir else DATA_ROOTS
    found = [r / name for r in roots if (r / name).is_dir()]
    if not found:
        raise SystemExit(f"error: no {name}/ in {' or '.join(map(str, roots))}; fetch it with: "
                         "python scripts/prepare_data.py (or point --data_dir at a copy)")
    d = found[0]
    if name == "pg19_test_gutenberg":  # raw Gutenberg files: keep the body between the START/END lines
        books = [p.read_text(encoding="utf-8-sig") for p in sorted(d.glob("*.txt"))]
        return "\n\n".join(re.split(r"\*\*\* ?END OF", re.split(r"\*\*\* ?START OF[^\n]*\n", b)[-1])[0] for b in books)
    if name == "wikitext2_raw":
        return (d / "wiki.test.raw").read_text(encoding="utf-8").replace("\r\n", "\n")
    if name == "paul_graham_essays":
        return "\n\n".join(p.read_text(encoding="utf-8") for p in sorted((d / "essays").glob("*.txt")))
    raise SystemExit(f"error: unknown text source {name!r}; known: {', '.join(SOURCES)}")


def token_stream(tokenizer, names, data_dir=None) -> torch.Tensor:
    return torch.tensor([t for n in names for t in tokenizer.encode(read_source(n, data_dir), bos=False)])


def windows(stream, length, n, seed):
    """n random windows of `length` tokens [n, length]."""
    if len(stream) < length:
        raise SystemExit(f"error: the text has {len(stream)} tokens, fewer than the {length} asked for")
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


# ---- the hashes being trained --------------------------------------------------------------------
class Hashes(nn.Module):
    """h for L layers at once, Hh heads each (n_kv: one per KV head, or n_head: the authors' per query
    head), `bits` wide: parameters [L, Hh, bits, bits]; cache.spotlight_hash is the function."""
    def __init__(self, L, heads, d, bits, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(L, heads, bits, bits, generator=g) * 1e-3)  # near zero: code ~ sign(x lift)
        self.b1 = nn.Parameter(torch.zeros(L, heads, bits))
        self.w2 = nn.Parameter(torch.randn(L, heads, bits, bits, generator=g) * 1e-3)
        self.b2 = nn.Parameter(torch.zeros(L, heads, bits))
        self.register_buffer("lift", None if bits == d else make_lift(L * heads, d, bits, g).view(L, heads, d, bits))

    def forward(self, x, layers=slice(None)):
        """x [L', Hh, N, d] for the layers `layers` (a slice) -> h(x) [L', Hh, N, bits]."""
        lift = None if self.lift is None else self.lift[layers]
        return kv.spotlight_hash(x, self.w1[layers], self.b1[layers], self.w2[layers], self.b2[layers], lift)


def make_lift(n, d, bits, g):
    """n lifts [n, d, bits] = [I | Q_1 | ...], each Q a random orthogonal d x d (QR of a Gaussian)."""
    if bits % d:
        raise SystemExit(f"error: --bits {bits} is not a multiple of head_dim {d}")
    blocks = [torch.eye(d).expand(n, d, d)] + [torch.linalg.qr(torch.randn(n, d, d, generator=g))[0]
                                               for _ in range(bits // d - 1)]
    return torch.cat(blocks, -1).contiguous()


def relaxed_codes(hashes, q, k, layers=slice(None)):
    """softsign(64 h(x)) for queries q [L', H, N, d] and keys k [L', H_kv, T, d] -> [L', H, N, n], [L', H, T, n]."""
    L, H, N, d = q.shape
    Hh, Hk = hashes.w1.shape[1], k.shape[1]
    cq = F.softsign(64 * hashes(q.reshape(L, Hh, -1, d), layers)).reshape(L, H, N, -1)
    ck = F.softsign(64 * hashes(k.repeat_interleave(Hh // Hk, 1), layers))
    return cq, ck.repeat_interleave(H // Hh, 1)


def n_positives(T, top):
    """The paper's positives per query: the top floor(top T) keys of a T-token window (at least one)."""
    return max(1, int(top * T))


def causal_logits(q, k, qi):
    """q.k for the queries at positions qi [Q]: q [..., H, T, d], k [..., H_kv, T, d] -> [..., H, Q, T],
    keys after the query -inf."""
    T = q.shape[-2]
    logits = q[..., qi, :] @ k.repeat_interleave(q.shape[-3] // k.shape[-3], -3).transpose(-1, -2)
    return logits.masked_fill(torch.arange(T, device=q.device) > qi[:, None], -math.inf)


@torch.no_grad()
def sample_pairs(q, k, args, gen):
    """Training pairs for layers q [L', H, T, d], k [L', H_kv, T, d]: query positions qi [Q]; positives
    ia [L', H, Q, P] (key indices among each query's top n, n_positives of the window); negatives
    ib [L', H, Q, N] (uniform over the query's keys) with vb, False where ib is a positive."""
    T, dev = q.shape[-2], q.device
    n = n_positives(T, args.top)
    if n >= T:
        raise SystemExit(f"error: --top {args.top} of --seq_len {T} leaves no negatives")
    qi = torch.randint(n, T, (args.queries,), generator=gen, device=dev)  # > n keys: some are negatives
    logits = causal_logits(q, k, qi)
    best, best_idx = logits.topk(n, dim=-1)
    ia = best_idx[..., torch.randperm(n, generator=gen, device=dev)[:args.max_pos]]
    ib = (torch.rand(*best.shape[:-1], args.max_neg, generator=gen, device=dev) * (qi + 1)[:, None]).long()
    return qi, ia, ib, logits.gather(-1, ib) < best[..., -1:]  # below the n-th best: not a positive


def pair_loss(hashes, q, k, pairs, layers=slice(None)):
    """Bradley-Terry loss [L'] and rank error [L'] per layer for the pairs of sample_pairs."""
    qi, ia, ib, vb = pairs
    cq, ck = relaxed_codes(hashes, q[..., qi, :], k, layers)
    s = cq @ ck.transpose(-1, -2)  # [L', H, Q, T]
    diff = s.gather(-1, ia)[..., :, None] - s.gather(-1, ib)[..., None, :]  # [L', H, Q, P, N]
    w = vb[..., None, :].float()  # broadcast, not expanded: diff is the step's largest tensor
    n = (w.sum((1, 2, 3, 4)) * ia.shape[-1]).clamp(min=1)
    return (F.softplus(-diff) * w).sum((1, 2, 3, 4)) / n, ((diff < 0) * w).sum((1, 2, 3, 4)) / n


def clip_per_layer(params, max_norm):
    """clip_grad_norm_ for each layer (leading index) of the stacked parameters on its own -> norms [L]."""
    norms = torch.stack([p.grad.flatten(1).pow(2).sum(1) for p in params]).sum(0).sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(scale.view(-1, *[1] * (p.dim() - 1)))
    return norms


def train_step(hashes, q, k, args, gen):
    """One step's gradients (clipped per layer) for all layers q [L, H, T, d], k [L, H_kv, T, d], in chunks
    of --layer_batch layers -> (loss [L], rank error [L]) detached."""
    L = q.shape[0]
    chunk = args.layer_batch or L
    losses, errs = [], []
    for j in range(0, L, chunk):
        part = slice(j, min(L, j + chunk))
        pairs = sample_pairs(q[part], k[part], args, gen)
        loss, err = pair_loss(hashes, q[part], k[part], pairs, part)
        loss.sum().backward()  # summed: layer i's gradient is its own loss's, clipped below on its own
        losses.append(loss.detach())
        errs.append(err.detach())
    clip_per_layer(list(hashes.parameters()), args.clip)
    return torch.cat(losses), torch.cat(errs)


def lr_at(step, total, peak):
    warm = max(1, round(0.01 * total))
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def save(hashes, layers, path, meta):
    """layers.{i}.w1 ... (and .lift for a widened hash), one entry per trained layer i."""
    from safetensors.torch import save_file
    state = {f"layers.{i}.{n}": t[j].detach().float().cpu().contiguous()
             for j, i in enumerate(layers) for n, t in [*hashes.named_parameters(), *hashes.named_buffers()]}
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
    if base == "ceiling":
        sel = ceiling_selection(q, k[0], qi, k_sel)
    elif base in ("simhash128", "orth128"):
        sel = projection_selection(q, k[0], layer, base == "orth128", causal, k_sel)
    elif base == "quest":
        cache = kv.REGISTRY[base](1, H_kv, T, d, G, torch.float32, layer, 10 ** 6, cfg_for(base, variant)).to(q.device)
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
        cache = kv.REGISTRY[base](1, H_kv, T, d, G, torch.float32, layer, 10 ** 6, cfg_for(base, variant)).to(q.device)
        sim = kv.hamming_sim(cache.query_codes(q), cache.key_codes(k), cache.d).float()  # [Q, H_kv, G, T]
        sim = sim.masked_fill(~causal[:, :, None], -math.inf)
        if variant == "q-sel":  # each query head its own top k (the authors' reference)
            return picked(sim.flatten(1, 2), k_sel) & causal
        sel = picked(sim.sum(2), k_sel)
    return sel.repeat_interleave(G, 1) & causal


def ceiling_selection(q, k, qi, k_sel):
    """The per-KV-head ceiling: exact q.k, one set of k_sel keys per KV head for its G query heads. Recall
    sums, over the set, how many of the group's true top-k lists hold each key, so the keys held by the
    most lists are the best any per-KV-head set can do (ties: the group's attention mass) -> [Q, H_kv, T]."""
    Q, H_kv, G, d = q.shape
    T = k.shape[1]
    logits = torch.einsum("qhgd,htd->qhgt", q, k)
    logits = logits.masked_fill(torch.arange(T, device=q.device) > qi[:, None, None, None], -math.inf)
    votes = true_topk(logits.flatten(1, 2), k_sel).view(Q, H_kv, G, T).sum(2).float()
    mass = (logits / math.sqrt(d)).softmax(-1).sum(2)  # < G + 1: breaks ties only
    return picked((votes + mass / (G + 1)).masked_fill(logits[:, :, 0] == -math.inf, -math.inf), k_sel)


def random_projection(n, d, bits, orthogonal, g):
    """R [n, d, bits]: Gaussian, or orthonormal columns (blocks of QR of Gaussian d x d, as many as fit)."""
    if not orthogonal:
        return torch.randn(n, d, bits, generator=g)
    blocks = [torch.linalg.qr(torch.randn(n, d, d, generator=g))[0] for _ in range(-(-bits // d))]
    return torch.cat(blocks, -1)[..., :bits]


def projection_selection(q, k, layer, orthogonal, causal, k_sel, bits=128):
    """SimHash with `bits` bits, code = sign(x R) per KV head (R seeded by layer), scored and selected
    as the caches do (summed over the group, per KV head) -> [Q, H_kv, T]."""
    Q, H_kv, G, d = q.shape
    R = random_projection(H_kv, d, bits, orthogonal, torch.Generator().manual_seed(2000 + layer)).to(q.device)
    cq = torch.sign(torch.einsum("qhgd,hdb->qhgb", q, R))
    ck = torch.sign(torch.einsum("htd,hdb->htb", k, R))
    sim = torch.einsum("qhb,htb->qht", cq.sum(2), ck)  # = sum over the group of bits - 2 Hamming
    return picked(sim.masked_fill(~causal, -math.inf), k_sel)


@torch.no_grad()
def recall_table(caps, n_group, args, hashes, methods=METHODS, prunes=(0.98, 0.9), hashes128=None):
    """Recall of each method's selected set vs the true top-k keys (per query head, k from the prune
    rate) and the softmax attention mass it covers, per layer, over held-out captures. `hashes`: the
    trained file for "spotlight"; `hashes128` the one for "spotlight/128".
    Returns {prune: {method: [L] recall}}, {prune: {method: [L] mass}}."""
    def cfg_for(base, variant):
        params = {"quest_group": variant or "mean", "quest_page_size": args.page_size,
                  "spotlight_dense_layers": args.dense_layers, "quest_dense_layers": args.dense_layers,
                  "spotlight_hashes": str(hashes128 if variant == "128" else hashes)}
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


def print_gate(rec, dense, prune=0.98, floor=0.5):
    """The gate: trained Spotlight beats 128-bit SimHash at 98% pruned in every layer, mean recall >= 0.5.
    Returns {trained column: passed}."""
    r = rec[prune]
    layers = [i for i in range(len(r["simhash128"])) if i not in dense]
    out = {}
    for m in [m for m in r if m in ("spotlight", "spotlight/128")]:
        lost = [i for i in layers if r[m][i] <= r["simhash128"][i]]
        mean = sum(r[m][i] for i in layers) / len(layers)
        out[m] = not lost and mean >= floor
        worst = min(layers, key=lambda i: r[m][i] - r["simhash128"][i])
        print(f"gate ({prune:.0%} pruned): {m} beats simhash128 in {len(layers) - len(lost)}/{len(layers)} layers "
              f"(worst: layer {worst}, {r[m][worst]:.3f} vs {r['simhash128'][worst]:.3f}); mean recall {mean:.3f} "
              f"{'>=' if mean >= floor else '<'} {floor} -> {'PASS' if out[m] else 'FAIL'}")
    return out


def quick_recall(caps, n_group, args, hashes):
    """Mean recall over hashed layers at 98% pruned: {method: recall}, trained vs untrained and SimHash."""
    rec, _ = recall_table(caps, n_group, args, hashes, methods=("spotlight", "spotlight_linear", "simhash128"),
                          prunes=(0.98,))
    layers = [i for i in range(len(caps[0])) if i not in args.dense_layers]
    return {m: sum(r[i] for i in layers) / len(layers) for m, r in rec[0.98].items()}


# ---- main ----------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint_path", default=DEFAULT_CHECKPOINT)
    p.add_argument("--out", default=None, help="the hashes' file (default: <checkpoint_path>/spotlight.safetensors, "
                   "or spotlight-<bits>.safetensors when --bits is not head_dim)")
    p.add_argument("--eval", action="store_true", help="only print the recall table for the saved hashes "
                   "(--out, and <checkpoint_path>/spotlight-128.safetensors as spotlight/128 when it exists)")
    p.add_argument("--hashes128", default=None, help="--eval: the 128-bit hashes (default as above)")
    p.add_argument("--data_dir", default=None, help="folder holding pg19_test_gutenberg/, wikitext2_raw/ and "
                   "paul_graham_essays/ (default: the repository's data/, else ../shared/data)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="model dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--bits", type=int, default=None, help="code bits per key (default head_dim; 128 at head_dim 64: "
                   "two int64 words)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seq_len", type=int, default=2048, help="tokens per training window, one fresh window a "
                   "step (>= the 2k evaluation; paper: 8k)")
    p.add_argument("--queries", type=int, default=64, help="query positions sampled per step (paper: 1024)")
    p.add_argument("--max_pos", type=int, default=32, help="positives sampled per query (paper: 1024)")
    p.add_argument("--max_neg", type=int, default=128, help="negatives sampled per query (paper: 1024)")
    p.add_argument("--top", type=float, default=0.02, help="positives: this fraction of the window's length")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm limit, per layer")
    p.add_argument("--hash_heads", choices=("kv", "query"), default="kv",
                   help="one hash per KV head (shared by its query heads; default) or per query head (the authors')")
    p.add_argument("--dense_layers", type=int, nargs="*", default=[0, 1], help="layers left dense (no hash)")
    p.add_argument("--layer_batch", type=int, default=0, help="layers per backward pass (0 = all; 8B: 1-4)")
    p.add_argument("--train_sources", nargs="+", default=["pg19_test_gutenberg", "wikitext2_raw"], choices=SOURCES)
    p.add_argument("--holdout", default="paul_graham_essays", choices=SOURCES)
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--no_table", action="store_true", help="training: skip the final table (run --eval for it)")
    p.add_argument("--eval_seqs", type=int, default=2, help="held-out sequences for the final table")
    p.add_argument("--eval_len", type=int, default=2048)
    p.add_argument("--eval_queries", type=int, default=64)
    p.add_argument("--page_size", type=int, default=16, help="Quest's page size in the table")
    p.add_argument("--seed", type=int, default=0, help="windows, pairs and initial weights (always seeded)")
    p.add_argument("--deterministic", action="store_true", help="also bitwise-reproducible CUDA sums (the "
                   "gathers' backward adds atomically otherwise); slower")
    args = p.parse_args(argv)
    for name in ("steps", "seq_len", "queries", "max_pos", "max_neg", "eval_every", "eval_seqs", "eval_len",
                 "eval_queries"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if not 0 < args.top < 1 or args.clip <= 0 or (args.bits is not None and args.bits < 1):
        p.error("--top must be in (0, 1), --clip and --bits positive")
    if args.holdout in args.train_sources:
        p.error(f"--holdout {args.holdout} is also a training source")
    return args


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
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
        torch.use_deterministic_algorithms(True, warn_only=True)
    model, tokenizer = load(args)
    margs = model.args
    G = margs.n_head // margs.n_local_heads
    bits = args.bits or margs.head_dim
    ckpt = Path(args.checkpoint_path)
    name = "spotlight.safetensors" if bits == margs.head_dim or args.eval else f"spotlight-{bits}.safetensors"
    out = Path(args.out or ckpt / name)
    h128 = Path(args.hashes128 or ckpt / "spotlight-128.safetensors")
    held = windows(token_stream(tokenizer, [args.holdout], args.data_dir), args.eval_len, args.eval_seqs, seed=12345)
    t0 = time.time()
    if args.eval:
        if not out.exists():
            raise SystemExit(f"error: no hashes at {out}; train them with: python train_spotlight.py "
                             f"--checkpoint_path {args.checkpoint_path}")
    else:
        train(model, tokenizer, args, out, held[0], G)
    if args.no_table and not args.eval:
        print(f"\ntrained in {time.time() - t0:.0f} s; hashes in {out}")
        return
    methods = METHODS + (("spotlight/128",) if h128.exists() and h128 != out else ())
    caps = [capture(model, t, args.device) for t in held]
    rec, mass = recall_table(caps, G, args, out, methods, hashes128=h128)
    print_table(rec, mass, args.dense_layers)
    print()
    print_gate(rec, args.dense_layers)
    print(f"\n{'evaluated' if args.eval else 'trained and evaluated'} in {time.time() - t0:.0f} s; hashes in {out}")


def train(model, tokenizer, args, out, held_tokens, G):
    """Train every hashed layer at once, one fresh --seq_len window a step; saves to `out` at each eval.
    Returns {"loss": [per step, summed over layers], "recall": [(step, {method: held-out recall at 98%})]}."""
    margs = model.args
    heads = margs.n_local_heads * (G if args.hash_heads == "query" else 1)
    layers = [i for i in range(margs.n_layer) if i not in args.dense_layers]
    bits = args.bits or margs.head_dim
    hashes = Hashes(len(layers), heads, margs.head_dim, bits, args.seed).to(args.device)
    opt = torch.optim.AdamW(hashes.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.1)
    stream = token_stream(tokenizer, args.train_sources, args.data_dir)
    if len(stream) < args.seq_len:
        raise SystemExit(f"error: the training text has {len(stream)} tokens, fewer than --seq_len {args.seq_len}")
    print(f"training {len(layers)} layers x {heads} hashes (d={margs.head_dim}, {bits} bits) on {len(stream)} tokens "
          f"of {'+'.join(args.train_sources)}; {args.steps} steps, a fresh {args.seq_len}-token window each, "
          f"{n_positives(args.seq_len, args.top)} positives a query; held out: {args.holdout}", flush=True)
    meta = dict(hash_heads=args.hash_heads, steps=args.steps, seq_len=args.seq_len, top=args.top, bits=bits,
                train_sources="+".join(args.train_sources), dense_layers=args.dense_layers)
    quick = [capture(model, held_tokens, args.device)]
    save(hashes, layers, out, meta)
    log = {"loss": [], "recall": [(0, quick_recall(quick, G, args, out))]}
    fmt = lambda r: ", ".join(f"{m} {v:.3f}" for m, v in r.items())  # noqa: E731
    print(f"step 0: held-out recall@2% {fmt(log['recall'][-1][1])}", flush=True)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)  # pairs, on the device: no host copies
    starts = torch.randint(0, len(stream) - args.seq_len + 1, (args.steps,),
                           generator=torch.Generator().manual_seed(args.seed)).tolist()
    t0, hist = time.time(), []
    for step in range(args.steps):
        caps = capture(model, stream[starts[step]:starts[step] + args.seq_len], args.device)
        q = torch.stack([caps[i][0] for i in layers])
        k = torch.stack([caps[i][1] for i in layers])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        loss, err = train_step(hashes, q, k, args, gen)
        opt.step()
        opt.zero_grad(set_to_none=True)
        hist.append(torch.stack([loss.sum(), err.mean()]))
        if (step + 1) % 20 == 0 or step == 0 or step + 1 == args.steps:
            h = torch.stack(hist).tolist()  # the one host sync, every 20 steps
            log["loss"] += [x[0] for x in h]
            print(f"step {step + 1}/{args.steps}: loss {sum(x[0] for x in h) / len(h):.4f} "
                  f"rank error {sum(x[1] for x in h) / len(h):.4f} lr {lr_at(step, args.steps, args.lr):.2e} "
                  f"({time.time() - t0:.0f} s)", flush=True)
            hist = []
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            save(hashes, layers, out, meta)
            log["recall"].append((step + 1, quick_recall(quick, G, args, out)))
            print(f"step {step + 1}: held-out recall@2% {fmt(log['recall'][-1][1])} (saved {out})", flush=True)
    return log


if __name__ == "__main__":
    main()
