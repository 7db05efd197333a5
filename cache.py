"""Static KV caches and the compression strategies that manage them.

Design (how a strategy plugs in)
--------------------------------
Every layer owns one `KVCache` (or subclass): buffers k, v [B, H_kv, S, D] and pos [B, H_kv, S]
(each slot's ORIGINAL token position, -1 = empty), allocated once at S slots. Keys are stored after
RoPE, so a slot keeps its position whatever happens to its neighbours. Shared mechanics live here
once: prompt compression by top-k, sink/recent protection, victim choice, slot writes, attention.
A strategy is one small subclass, registered by name, that overrides only its scoring rule:

    @register
    class MyPress(KVCache):
        '''Paper, year. Departures: ...'''
        name = "mine"
        def prefill_scores(self, q, k, v, pos):       # [B, H_kv, T]: higher = keep (prompt compression)
            return -k.norm(dim=-1)
        def decode_scores(self, q, k_new, input_pos):  # [B, H_kv, S + 1]: cached slots, then the new token
            ...

Kinds of strategy (class flags):
- evicting (`evicts = True`): S is the budget, so memory is really saved. Each decode step the
  lowest-scored unprotected slot (or an empty one) receives the new token. With `needs_attn = True`
  the step first attends over cache + new token, hands the group-mean probabilities to
  `decode_scores(..., probs=...)`, then evicts (H2O, TOVA, Scissorhands); otherwise it evicts first and
  attends with fused SDPA (L2, LSH, StreamingLLM, random).
- prefill-only (`prefill_only = True`, SnapKV, PyramidKV): the prompt is compressed to
  S - max_new_tokens and generated tokens fill the reserved slots.
- retrieval (`retrieves = True`): S covers the whole sequence; each step attends only to the slots
  `select_scores` ranks highest (plus sinks and the recent window).
Per-layer budgets are per-layer S; per-head budgets are the `limit` buffer [H_kv] (slots at or past a
head's limit are never used). Each sequence of a batch evicts on its own.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

REGISTRY: dict[str, type] = {}


def register(cls):
    REGISTRY[cls.name] = cls
    return cls


@dataclass
class CacheConfig:
    strategy: str = "full"
    max_cache_length: list = field(default_factory=lambda: [1.0])  # fraction (<= 1) or tokens, one or per layer
    global_tokens: int = 4      # sinks: never evicted where the strategy protects them
    recent_window: int = 10     # the newest tokens, never evicted where the strategy protects them
    prompt_compression: str = "own"  # a strategy name whose prefill rule cuts long prompts, or "own"
    params: dict = field(default_factory=dict)  # strategy hyperparameters (each class's `defaults`)
    checkpoint_dir: str = ""    # where strategies with learned parts (spotlight) find their weights


@register
class KVCache(nn.Module):
    """The `full` strategy and the base of every other one: no eviction, every token attended."""
    name = "full"
    defaults: dict = {}
    protects = True        # sinks and recent window are never evicted
    evicts = False
    needs_attn = False
    prefill_only = False
    retrieves = False

    def __init__(self, batch, n_kv, n_slots, head_dim, n_group, dtype, layer, n_layer, cfg: CacheConfig,
                 max_new_tokens: int = 0):
        super().__init__()
        self.layer, self.n_layer, self.n_group, self.cfg = layer, n_layer, n_group, cfg
        self.max_new_tokens = max_new_tokens
        self.p = {**self.defaults, **{k: v for k, v in cfg.params.items() if k in self.defaults}}
        self.register_buffer("k", torch.zeros(batch, n_kv, n_slots, head_dim, dtype=dtype))
        self.register_buffer("v", torch.zeros(batch, n_kv, n_slots, head_dim, dtype=dtype))
        self.register_buffer("pos", torch.full((batch, n_kv, n_slots), -1, dtype=torch.long))
        self.register_buffer("limit", torch.full((n_kv,), n_slots, dtype=torch.long))  # per-head budget

    @property
    def n_slots(self):
        return self.k.shape[2]

    # ---- the scoring rules a strategy overrides -------------------------------------------------
    def prefill_scores(self, q, k, v, pos):
        """Keep-scores [B, H_kv, T] for the prompt tokens; higher keeps. Default: the most recent."""
        return pos.float()[:, None, :].expand(k.shape[0], k.shape[1], -1)

    def on_prefill(self, q, k, v, pos, keep):
        """Initialise auxiliary state for the kept prompt tokens (keep [B, H_kv, S] indices into T)."""

    def decode_scores(self, q, k_new, input_pos, probs=None):
        """Keep-scores [B, H_kv, S + 1] of the cached slots and, last, the new token."""
        return torch.cat([self.pos.float(), input_pos.float()[:, None, None].expand(*self.pos.shape[:2], 1)], -1)

    def on_write(self, slot, q, k_new, v_new, input_pos):
        """Auxiliary state for the new token, now in `slot` [B, H_kv] (S = the new token was dropped)."""

    # ---- shared mechanics ----------------------------------------------------------------------
    def protected(self, pos, now):
        """Sinks and the recent window, for positions pos [B, H, N] at current positions now [B]."""
        if not self.protects:
            return torch.zeros_like(pos, dtype=torch.bool)
        recent = pos > now[:, None, None] - self.cfg.recent_window
        return (pos < self.cfg.global_tokens) | recent

    def prefill(self, q, k, v, pos):
        """Store a layer's prompt KV (q [B, H, T, D], k/v [B, H_kv, T, D], pos [B, T]), compressing
        it to the budget with this strategy's (or the configured) prompt rule when it does not fit."""
        B, H, T, _ = k.shape
        room = self.n_slots - (self.max_new_tokens if self.prefill_only else 0)
        tok_pos = pos[:, None, :].expand(B, H, T)
        if T <= room and bool((self.limit >= T).all()):
            # everything fits: slot = position (padding dropped), so a cache that never evicts keeps
            # the invariant and its decode writes go straight to slot input_pos
            pad = (pos < 0).sum(dim=1)
            keep = (torch.arange(T, device=k.device) + pad[:, None]).clamp(max=T - 1)[:, None, :].expand(B, H, T)
            beyond = (torch.arange(T, device=k.device) >= T - pad[:, None])[:, None, :]  # slots past the prompt
        else:
            scorer = self if self.cfg.prompt_compression == "own" else self.prompt_scorer()
            scores = scorer.prefill_scores(q, k, v, pos).float()
            now = pos.max(dim=1).values
            scores = scores.masked_fill(self.protected(tok_pos, now), math.inf).masked_fill(tok_pos < 0, -math.inf)
            keep = scores.topk(min(room, T), dim=-1).indices.sort(dim=-1).values
            beyond = torch.zeros_like(keep, dtype=torch.bool)
        n = keep.shape[-1]
        kept_pos = tok_pos.gather(-1, keep).masked_fill(beyond, -1)
        rank_ok = torch.arange(n, device=k.device) < self.limit[:, None]  # per-head budgets
        self.pos.fill_(-1)
        self.pos[:, :, :n] = kept_pos.masked_fill(~rank_ok, -1)
        idx = keep[..., None].expand(-1, -1, -1, k.shape[-1])
        self.k[:, :, :n] = k.gather(2, idx)
        self.v[:, :, :n] = v.gather(2, idx)
        self.on_prefill(q, k, v, pos, keep)

    def prompt_scorer(self):
        """A throw-away instance of the configured prompt-compression strategy, to score the prompt."""
        cls = REGISTRY[self.cfg.prompt_compression]
        B, H, S, D = self.k.shape
        return cls(B, H, 1, D, self.n_group, self.k.dtype, self.layer, self.n_layer, self.cfg).to(self.k.device)

    def choose_slot(self, keep, input_pos):
        """keep [B, H_kv, S + 1] -> the slot [B, H_kv] that takes the new token (S = drop the new one)."""
        B, H, S = self.pos.shape
        new_pos = input_pos[:, None, None].expand(B, H, 1)
        all_pos = torch.cat([self.pos, new_pos], dim=-1)
        usable = torch.arange(S + 1, device=keep.device) < self.limit[:, None]  # [H, S+1]
        usable = usable.clone()
        usable[:, S] = True
        keep = keep.float().masked_fill(self.protected(all_pos, input_pos), math.inf)
        keep = keep.masked_fill(all_pos < 0, -math.inf).masked_fill(~usable, math.inf)
        return keep.argmin(dim=-1)

    def write(self, slot, k_new, v_new, input_pos):
        """Put the new token in `slot` [B, H_kv]; slot == S means it was evicted on arrival."""
        S = self.n_slots
        keep_old = (slot == S)
        idx = slot.clamp(max=S - 1)[..., None]
        old_pos = self.pos.gather(-1, idx)
        self.pos.scatter_(-1, idx, torch.where(keep_old[..., None], old_pos, input_pos[:, None, None]))
        for buf, new in ((self.k, k_new), (self.v, v_new)):
            i4 = idx[..., None].expand(-1, -1, -1, buf.shape[-1])
            buf.scatter_(2, i4, torch.where(keep_old[..., None, None], buf.gather(2, i4), new))

    def attend_mask(self, q, input_pos):
        """Which slots the decode query reads: [B, H_kv, S] bool. Retrieval strategies narrow it."""
        return self.pos >= 0

    def decode(self, q, k_new, v_new, input_pos):
        """One decode step. q [B, H, 1, D], k/v_new [B, H_kv, 1, D], input_pos [B] -> [B, H, 1, D]."""
        B, H, _, D = q.shape
        qg = q.view(B, H // self.n_group, self.n_group, D)  # fold the GQA group into the query axis
        if self.needs_attn:
            out, probs = attend_with_new(qg, self.k, self.v, self.pos >= 0, k_new, v_new)
            slot = self.choose_slot(self.decode_scores(qg, k_new, input_pos, probs=probs), input_pos)
            self.write(slot, k_new, v_new, input_pos)
        else:
            if self.evicts:
                slot = self.choose_slot(self.decode_scores(qg, k_new, input_pos), input_pos)
            else:  # no eviction: slot = position (prefill set it up so; lengths are validated)
                slot = input_pos[:, None].expand(B, H // self.n_group)
            self.write(slot, k_new, v_new, input_pos)
            out = attend(qg, self.k, self.v, self.attend_mask(qg, input_pos))
        self.on_write(slot, qg, k_new, v_new, input_pos)
        return out.view(B, H, 1, D)


def attend(qg, k, v, valid):
    """Decode attention of qg [B, H_kv, G, D] over the slots where valid [B, H_kv, S] holds.
    Compiled on CUDA it is FlexAttention with a block mask built from `valid`, so empty or unselected
    128-slot blocks are never read (PERFORMANCE.md: always pass a block mask; GQA folded into the
    query axis keeps per-KV-head masks on the fast kernel). Elsewhere, SDPA with a boolean mask."""
    if not (qg.is_cuda and torch.compiler.is_compiling()):
        return F.scaled_dot_product_attention(qg, k, v, attn_mask=valid[:, :, None, :])
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    S, blk = valid.shape[-1], FLEX_BLOCK
    nb = -(-S // blk)
    blocks = F.pad(valid, (0, nb * blk - S)).view(*valid.shape[:2], nb, blk)
    full, partial = blocks.all(-1), blocks.any(-1) & ~blocks.all(-1)

    def kv_blocks(sel):  # count and indices (selected blocks first) per (B, H_kv)
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return sel.sum(-1, dtype=torch.int32)[:, :, None], order[:, :, None, :]

    (pn, pi), (fn, fi) = kv_blocks(partial), kv_blocks(full)
    mask = BlockMask.from_kv_blocks(pn, pi, fn, fi, BLOCK_SIZE=(blk, blk), seq_lengths=(qg.shape[2], S),
                                    mask_mod=lambda b, h, q_idx, kv_idx: valid[b, h, kv_idx])
    return flex_attention(qg, k, v, block_mask=mask)


FLEX_BLOCK = 128


def attend_with_new(qg, k, v, filled, k_new, v_new):
    """Attention of qg [B, H_kv, G, D] over the cached slots plus the new token, without copying the
    cache. Returns out [B, H_kv, G, D] and the group-mean probabilities [B, H_kv, S + 1] (fp32)."""
    scale = 1.0 / math.sqrt(qg.shape[-1])
    logits = torch.cat([qg.float() @ k.float().transpose(-1, -2), qg.float() @ k_new.float().transpose(-1, -2)], -1)
    logits = logits * scale
    logits[..., :-1] = logits[..., :-1].masked_fill(~filled[:, :, None, :], -math.inf)
    probs = logits.softmax(dim=-1)
    out = probs[..., :-1] @ v.float() + probs[..., -1:] * v_new.float()
    return out.to(qg.dtype), probs.mean(dim=2)


def prompt_attention(q, k, pos, rows=None, chunk_bytes=256 << 20):
    """Softmax attention of prompt queries (all, or the last `rows`) over prompt keys, summed over
    queries and averaged over each KV head's query group: [B, H_kv, T] fp32. Causal, padding masked;
    computed in query chunks so no T x T matrix is ever materialised."""
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    q = q[:, :, -rows:] if rows else q
    q_pos = pos[:, -q.shape[2]:]
    chunk = max(1, chunk_bytes // (B * H * T * 4))
    total = torch.zeros(B, H_kv, T, dtype=torch.float32, device=q.device)
    kf = k.float().repeat_interleave(H // H_kv, dim=1).transpose(-1, -2)
    for i in range(0, q.shape[2], chunk):
        qp = q_pos[:, i:i + chunk]
        logits = (q[:, :, i:i + chunk].float() @ kf) / math.sqrt(D)  # [B, H, C, T]
        ok = (pos[:, None, None, :] >= 0) & (pos[:, None, None, :] <= qp[:, None, :, None])
        probs = logits.masked_fill(~ok, -math.inf).softmax(-1).nan_to_num(0.0)
        probs = probs * (qp[:, None, :, None] >= 0)  # padding queries contribute nothing
        total += probs.sum(2).view(B, H_kv, H // H_kv, T).mean(2)
    return total


def parse_budget(values, n_layer, max_seq_length) -> list[int]:
    """--max_cache_length: fractions (<= 1, of prompt + max_new_tokens) or token counts; one value
    for every layer or one per layer. Returns slots per layer."""
    values = [float(v) for v in values]
    if len(values) == 1:
        values = values * n_layer
    if len(values) != n_layer:
        raise ValueError(f"--max_cache_length has {len(values)} values; give 1 or one per layer ({n_layer})")
    slots = []
    for v in values:
        if v <= 0:
            raise ValueError(f"--max_cache_length {v:g} must be > 0")
        n = math.ceil(v * max_seq_length) if v <= 1 else int(v)
        if n > max_seq_length:
            raise ValueError(f"--max_cache_length {v:g} = {n} tokens exceeds the sequence length {max_seq_length}")
        slots.append(n)
    return slots


def make_caches(args, cfg: CacheConfig, batch, max_seq_length, max_new_tokens, device, dtype) -> list[KVCache]:
    """One cache per layer for model args `args`, sized by the strategy's budget."""
    if cfg.strategy not in REGISTRY:
        raise ValueError(f"unknown cache strategy {cfg.strategy!r}; known: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[cfg.strategy]
    if cfg.prompt_compression != "own" and cfg.prompt_compression not in REGISTRY:
        raise ValueError(f"unknown --prompt_compression {cfg.prompt_compression!r}; "
                         f"known: own, {', '.join(sorted(REGISTRY))}")
    if cls.evicts or cls.prefill_only:
        slots = parse_budget(cfg.max_cache_length, args.n_layer, max_seq_length)
    else:
        slots = [max_seq_length] * args.n_layer
    floor = (cfg.global_tokens + cfg.recent_window + 1 if cls.protects else 1) + (
        max_new_tokens if cls.prefill_only else 0)
    if min(slots) < floor:
        raise ValueError(f"budget of {min(slots)} slots is too small for {cfg.strategy}: it needs at least "
                         f"{floor} (sinks + recent window + 1{' + max_new_tokens' if cls.prefill_only else ''})")
    G = args.n_head // args.n_local_heads
    return [cls(batch, args.n_local_heads, s, args.head_dim, G, dtype, i, args.n_layer, cfg, max_new_tokens)
            .to(device) for i, s in enumerate(slots)]


def cache_bytes(caches) -> int:
    """Bytes every cache buffer really holds: K, V, positions and each strategy's auxiliary state."""
    return sum(b.numel() * b.element_size() for c in caches for b in c.buffers())


def compression_ratio(caches, tokens_seen: torch.Tensor) -> float:
    """1 - slots used / tokens seen, measured over layers, heads and sequences (tokens_seen [B])."""
    used = sum((c.pos >= 0).sum(dim=(1, 2)).float() for c in caches)  # [B]
    H = caches[0].pos.shape[1]
    seen = tokens_seen.float() * H * len(caches)
    return float(1 - (used / seen).mean())
