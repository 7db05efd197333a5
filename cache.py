"""Static KV caches and the compression strategies that manage them.

Design (how a strategy plugs in)
--------------------------------
Two concerns, apart: the POLICY (this file: which token sits in which slot) and the STORAGE (kvstore.py:
what a slot's K and V are stored as, and the decode attention that reads them). Every layer owns one
`KVCache` (or subclass), the policy: pos [B, H_kv, S] (each slot's ORIGINAL token position, -1 = empty),
budgets and scores, allocated once at S slots; and one store, `self.store`, chosen by --kv_bits, not by
the strategy: DenseStore (k, v [B, H_kv, S, D] in the model dtype) or QuantStore (KIVI codes; its own
residual and flush). The policy talks to its store only through prefill / advance / write / attend /
attend_gather / attend_with_new, so every strategy runs on every store with no subclass per pair, and
`cache.k` / `cache.v` are the store's full-precision view (a dequantized copy for a quantized store:
bookkeeping and tests only). Keys are stored after RoPE, so a slot keeps its position whatever happens to
its neighbours. Shared mechanics live here once: prompt compression by top-k, sink/recent protection,
victim choice, slot writes. A strategy is one small subclass, registered by name, that overrides only its
scoring rule:

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
  then attends (L2, LSH, StreamingLLM, random). A score that needs per-slot state keeps it in a buffer
  updated as tokens arrive (L2's key norms, LSH's codes, H2O's sums), so a step never re-reads K.
- prefill-only (`prefill_only = True`, SnapKV, PyramidKV): the prompt is compressed to
  S - max_new_tokens and generated tokens fill the reserved slots.
- retrieval (`retrieves = True`): S covers the whole sequence; each step attends only to the slots
  `select(q, input_pos)` returns (static-K indices + validity; sinks and the recent window included);
  on CUDA triton_kernels.gather_attend reads just those rows.
Three slot layouts, each on either store: the one above, S slots per (sequence, KV head); HeadBudgetCache's for
per-head budgets (AdaKV, HeadKV, DiliLazyKV): one flat buffer per sequence holding each KV head's
tokens as its own run (a store with one code row per sequence), so the bytes are the sum of the heads' budgets (a head-budget strategy gives only
its budget rule, `budgets`; the tokens inside a head come from any strategy's prefill scores); and
WindowCache's ring for a model's sliding-window layers (Gemma 3's local ones): W slots, whatever the
strategy, which manages the other layers only (make_caches; budgets, patterns and ratios count those; a
ring stays in the model dtype: its window is the model's, not a budget).
Decode attention on CUDA is Triton (triton_kernels.py): dense_attend over the filled slots, attend_scores
when the probabilities are needed, gather_attend for a selection (quant_attend / quant_attend_scores read
a QuantStore's codes in place); on CPU, SDPA with a mask (a QuantStore dequantizes first). The victim choice
(choose_slot) is one Triton kernel on CUDA, evict_slot.
Quantized storage under eviction (departs from KIVI, which never evicts): a token enters the store's
full-precision residual and is flushed into codes a group of positions at a time; a slot = position
policy fills each key group whole (KIVI exactly), while an evicting or appending policy overwrites single
slots, so the flushed token's key group is re-quantized with a range that only widens (old members are
re-rounded only when it grows; tests/test_kv_quant.py bounds the drift); values are per token, unaffected.
Per-layer budgets are per-layer S, from the classmethod `layer_slots` (budget_slots: one budget shaped
by --budget_pattern, or the strategy's own rule, e.g. PyramidKV's); the `limit` buffer [B, H_kv] gives
each row its own budget within S (slots at or past it are never used): a batch of prompts of different
lengths shares one buffer sized for the longest, each sequence compressed to its own fraction. Each
sequence of a batch evicts on its own. Ties (integer scores: Hamming distances, indicator counts) evict the oldest token, in prefill and
decode alike. `attach_attention_loss` (debug) measures the attention mass evicted tokens would have had.
"""
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from kvstore import DenseStore, QuantStore

REGISTRY: dict[str, type] = {}
# Tensor parallel (tp.py): (rank, world). Rank r holds KV heads [r H_kv / world, (r + 1) H_kv / world) of every
# layer, so a cache's head h is the model's head head0 + h; tp.shard_model sets this, make_caches reads it.
SHARD = (0, 1)


def register(cls):
    REGISTRY[cls.name] = cls
    return cls


@dataclass
class CacheConfig:
    strategy: str = "full"
    max_cache_length: list = field(default_factory=lambda: [1.0])  # fraction (<= 1) or tokens, one or per layer
    global_tokens: int | None = None    # sinks never evicted; None: the strategy's own (its paper's)
    recent_window: float | None = None  # newest tokens (< 1: a fraction of the slots) protected; None: own
    prompt_compression: str = "own"  # a strategy name whose prefill rule cuts long prompts, or "own"
    params: dict = field(default_factory=dict)  # strategy hyperparameters (each class's `defaults`)
    checkpoint_dir: str = ""    # where strategies with learned parts (spotlight) find their weights
    budget_pattern: str = "uniform"  # per-layer shape of one budget: uniform, pyramid or funnel (budget_slots)
    # "stream": a question fed after the prefill goes through the cache like any token and counts in the
    # prompt the budget is a fraction of; "context" (kvpress's): the budget is a fraction of the prefilled
    # context alone, and the question and answer are appended without eviction
    protocol: str = "stream"
    # KV quantization (kvstore.QuantStore, KIVI): 16 = the model dtype (off); 2, 4 or 8 bits with key groups
    # of kv_group tokens, value groups of kv_group channels and the newest kv_residual tokens in full precision
    kv_bits: int = 16
    kv_group: int = 32
    kv_residual: int = 128


@register
class KVCache(nn.Module):
    """The `full` strategy and the base of every other one: no eviction, every token attended."""
    name = "full"
    defaults: dict = {}
    protects = True        # sinks and recent window are never evicted
    sinks, window = 4, 10  # their sizes unless --global_tokens / --recent_window say otherwise (cold-compress's)
    source = ""            # the paper the defaults come from (generate.py --help's strategy table)
    evicts = False
    needs_attn = False
    prefill_only = False
    retrieves = False
    keeps_newest = False  # decode scores rank the new token above every unprotected slot (`drops`)

    def __init__(self, batch, n_kv, n_slots, head_dim, n_group, dtype, layer, n_layer, cfg: CacheConfig,
                 max_new_tokens: int = 0, peers=None):
        super().__init__()
        self.layer, self.n_layer, self.n_group, self.n_kv, self.cfg = layer, n_layer, n_group, n_kv, cfg
        self.peers = list(range(n_layer)) if peers is None else peers  # the layers the strategy manages
        self.rank, self.world = SHARD
        self.head0 = self.rank * n_kv  # this cache's first head in the model (tensor parallel: tp.py)
        self.max_new_tokens = max_new_tokens
        self.p = self.hparams(cfg)
        self.n_sinks, self.recent_window = self.protection(cfg)
        self.recent = recent_slots(self.recent_window, n_slots)
        self.head_dim, self.dtype = head_dim, dtype
        # the keys and values live in a store (kvstore.py): dense, or quantized by cfg.kv_bits
        self.store = make_store(cfg, batch, n_kv, n_kv, n_slots, head_dim, dtype, aligned=self.slot_is_position)
        self.register_buffer("pos", torch.full((batch, n_kv, n_slots), -1, dtype=torch.long))
        # each (sequence, KV head)'s budget: slots at or past it are never used (a batch of prompts of
        # different lengths shares one buffer, each sequence compressed to its own fraction; make_caches)
        self.register_buffer("limit", torch.full((batch, n_kv), n_slots, dtype=torch.long))
        # each row's filled slots are a prefix after prefill (it keeps them first); `offset` is their number minus
        # the first decode position, so offset + p counts the tokens a row has seen by position p. Prefill-only
        # policies append position p at that slot, StreamingLLM's ring counts from it: a function of the
        # position, with no pointer to advance (see StreamingLLM.evict_choice). Unused by the other policies
        self.register_buffer("offset", torch.zeros(batch, n_kv, dtype=torch.long))
        if self.evicts:  # triton_kernels.evict_slot's per-row ticket (choose_slot on CUDA): zero between calls
            self.register_buffer("ticket", torch.zeros(batch, n_kv, dtype=torch.int32), persistent=False)

    @property
    def n_slots(self):
        return self.pos.shape[2]

    @property
    def reserve(self) -> int:
        """Slots past the budget held for what comes after the prefill (the appended question and answer,
        never evicted): everything after it under protocol context, the generated tokens if prefill-only."""
        return self.max_new_tokens if self.prefill_only or self.cfg.protocol == "context" else 0

    @property
    def k(self):
        """Every slot's keys [B, H_kv, S, D] in full precision (a quantized store dequantizes a copy: for
        prefill bookkeeping and tests, never on the decode path)."""
        return self.store.keys()

    @property
    def v(self):
        return self.store.values()

    @classmethod
    def hparams(cls, cfg: CacheConfig) -> dict:
        return {**cls.defaults, **{k: v for k, v in cfg.params.items() if k in cls.defaults}}

    @classmethod
    def protection(cls, cfg: CacheConfig) -> tuple[int, float]:
        """(sinks, recent window): the flags' values, else the strategy's own; none if it protects nothing."""
        if not cls.protects:
            return 0, 0
        return (cls.sinks if cfg.global_tokens is None else cfg.global_tokens,
                cls.window if cfg.recent_window is None else cfg.recent_window)

    @classmethod
    def layer_slots(cls, cfg: CacheConfig, n_layer, max_seq_length, max_new_tokens, fed=0) -> list[int]:
        """Slots per layer (make_caches): the whole sequence unless the strategy evicts or compresses the
        prompt, else the budget (budget_slots). A strategy with its own per-layer rule overrides this."""
        if not (cls.evicts or cls.prefill_only):
            return [max_seq_length] * n_layer
        return budget_slots(cfg, n_layer, max_seq_length, max_new_tokens, fed, cls.protection(cfg), cls.prefill_only)

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
        """Auxiliary state for the new token, now in `slot` [B, H_kv] (S = the new token was dropped). A
        retrieval strategy may return the query's part of its index (Spotlight: the codes it hashed with the
        new key's, in one launch), which select then takes as `q_index` instead of computing it."""

    # ---- shared mechanics ----------------------------------------------------------------------
    def protected(self, pos, now):
        """Sinks and the recent window, for positions pos [B, H, N] at current positions now [B]."""
        if not self.protects:
            return torch.zeros_like(pos, dtype=torch.bool)
        recent = self.recent
        if 0 < self.recent_window < 1:  # a fraction of each row's own budget (H2O's recent ratio), the
            # slots reserved for what is appended after the prefill left out
            # at least the new token, even where a tiny budget rounds the fraction to 0 (`drops`)
            recent = ((self.limit - self.reserve) * self.recent_window).round().long().clamp(min=1)[..., None]
        return (pos < self.n_sinks) | (pos > now[:, None, None] - recent)

    def prefill(self, q, k, v, pos):
        """Store a layer's prompt KV (q [B, H, T, D], k/v [B, H_kv, T, D], pos [B, T]), compressing
        it to the budget with this strategy's (or the configured) prompt rule when it does not fit."""
        B, H, T, _ = k.shape
        room, rooms = self.n_slots - self.reserve, self.limit - self.reserve  # the buffer's, each row's [B, H]
        tok_pos = pos[:, None, :].expand(B, H, T)
        if T <= room and bool(((pos >= 0).sum(1)[:, None] <= rooms).all()):
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
            # each row's best `rooms` by score; ties keep the newer token (stable sort of the reversed
            # prompt); those past a row's own budget sort last (index >= T) and are stored empty
            order = scores.flip(-1).sort(dim=-1, descending=True, stable=True).indices[..., :min(room, T)]
            rank = torch.arange(order.shape[-1], device=k.device)
            keep = torch.where(rank < rooms[..., None], T - 1 - order, T + rank).sort(dim=-1).values
            beyond, keep = keep >= T, keep.clamp(max=T - 1)
        n = keep.shape[-1]
        self.pos.fill_(-1)
        self.pos[:, :, :n] = tok_pos.gather(-1, keep).masked_fill(beyond, -1)
        idx = keep[..., None].expand(-1, -1, -1, k.shape[-1])
        self.store.prefill(k.gather(2, idx), v.gather(2, idx), self.pos, pos.max(dim=1).values)
        self.offset.copy_((self.pos >= 0).sum(-1) - pos.max(dim=1).values[:, None] - 1)
        self.on_prefill(q, k, v, pos, keep)

    def prompt_scorer(self):
        """A throw-away instance of the configured prompt-compression strategy, to score the prompt."""
        cls = REGISTRY[self.cfg.prompt_compression]
        B, H = self.limit.shape
        return cls(B, H, 1, self.head_dim, self.n_group, self.dtype, self.layer, self.n_layer, self.cfg,
                   peers=self.peers).to(self.limit.device)

    def choose_slot(self, keep, input_pos):
        """keep [B, H_kv, S + 1] -> the slot [B, H_kv] that takes the new token (S = drop the new one). On CUDA one
        kernel (triton_kernels.evict_slot; keep None: it computes the policy's scores from `pos` itself, see
        scores_from_pos); elsewhere the torch form below, which inductor made three reductions of on CUDA
        (BENCHMARKS.md, sessions 15 and 16)."""
        if self.evict_kernel:
            from triton_kernels import evict_slot
            frac = float(self.recent_window) if 0 < self.recent_window < 1 else 0.0
            salt = self.salt if keep is None and type(self).decode_scores is Random.decode_scores else None
            return evict_slot(self.pos if keep is None else keep.float(), self.pos, input_pos, self.limit, self.ticket,
                              self.n_sinks, self.recent, frac, self.reserve, keep is not None, salt, self.head0)
        B, H, S = self.pos.shape
        new_pos = input_pos[:, None, None].expand(B, H, 1)
        all_pos = torch.cat([self.pos, new_pos], dim=-1)
        usable = torch.cat([self.usable(), torch.ones_like(new_pos, dtype=torch.bool)], -1)  # the new token: always
        keep = keep.float().masked_fill(self.protected(all_pos, input_pos), math.inf)
        keep = keep.masked_fill(all_pos < 0, -math.inf) + 0.0  # -0.0 -> 0.0
        # the lowest score; ties (integer scores: Hamming distances, indicator counts) evict the oldest,
        # empty slots first: one argmin over (score's order-preserving bits, position + 1) in an int64
        bits = keep.view(torch.int32)
        ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long()  # int32 order = the floats' order
        return row_argmin(((ordered << 32) + all_pos + 1).masked_fill(~usable, MAX64))

    def evict_choice(self, qg, k_new, input_pos):
        """The slot [B, H_kv] the new token takes in an evicting cache: choose_slot over the decode scores."""
        return self.choose_slot(None if self.scores_from_pos else self.decode_scores(qg, k_new, input_pos), input_pos)

    def usable(self):
        """[B, H_kv, S]: the slots below each row's budget (`limit`)."""
        return torch.arange(self.n_slots, device=self.limit.device) < self.limit[..., None]

    @property
    def evict_kernel(self):
        """Whether choose_slot runs triton_kernels.evict_slot (its docstring says when)."""
        return self.pos.is_cuda and EVICT_KERNEL

    @property
    def scores_from_pos(self):
        """Whether choose_slot's kernel computes this policy's decode scores from the positions itself: the base
        rule's (the positions) and Random's (their hash; three torch kernels a layer otherwise)."""
        return self.evict_kernel and type(self).decode_scores in (KVCache.decode_scores, Random.decode_scores)

    @property
    def drops(self):
        """Whether a decode step can leave the new token out (write's slot == S): an evicting cache unless it
        protects a recent window, which always holds the new token (choose_slot scores it +inf, and ties go to the
        oldest), or its scores keep the newest (`keeps_newest`); then its writes need not read the old row
        (`write`). A prefill-only cache never drops (decode's overflow rule)."""
        return self.evicts and not (self.protects and self.recent_window > 0 or self.keeps_newest)

    def write(self, slot, k_new, v_new, input_pos):
        """Put the new token in `slot` [B, H_kv]; slot == S means it was evicted on arrival.
        index_put_ (not scatter_) so that inductor updates the buffers in place: a scatter_ into a
        graph input can be functionalised into a full copy of the cache every step. A policy that never
        drops writes without reading the old row (drop=None): the read made a kernel of its own before each
        write, three more launches a layer."""
        keep_old = slot == self.n_slots if self.drops else None
        (b, h), s = grid(slot), slot.clamp(max=self.n_slots - 1)
        now = input_pos[:, None].expand(slot.shape)
        self.pos[b, h, s] = now if keep_old is None else torch.where(keep_old, self.pos[b, h, s], now)
        self.store.write(s, k_new[:, :, 0], v_new[:, :, 0], keep_old, input_pos)

    def select(self, qg, input_pos, q_index=None):
        """Retrieval strategies: the slots this decode step reads, as (idx [B, H_kv, K], ok [B, H_kv, K])
        with K static, or None to read every filled slot (dense layers). q_index: what on_write returned."""
        return None

    def index_bytes(self) -> int:
        """Bytes of auxiliary index a decode step scans besides K/V rows (retrieval: codes, page bounds)."""
        return 0

    def rows_held(self):
        """[B]: the (KV head, token) rows each sequence holds."""
        return (self.pos >= 0).sum(dim=(1, 2))

    def rows_read(self, input_pos) -> int:
        """K/V rows a decode step at input_pos [B] reads (a retrieval strategy's selection's size does not
        depend on the query's values)."""
        qg = torch.zeros(*self.limit.shape, self.n_group, self.head_dim, device=self.limit.device, dtype=self.dtype)
        return int(self.attend_mask(qg, input_pos).sum())

    def attend_mask(self, q, input_pos, q_index=None):
        """Which slots the decode query reads: [B, H_kv, S] bool. Retrieval strategies narrow it."""
        sel = self.select(q, input_pos, q_index) if self.retrieves else None
        if sel is None:
            return self.pos >= 0
        idx, ok = sel
        S = self.n_slots
        mask = torch.zeros(*idx.shape[:2], S + 1, dtype=torch.bool, device=idx.device)
        return mask.scatter(-1, idx.masked_fill(~ok, S), True)[..., :S] & (self.pos >= 0)

    @property
    def slot_is_position(self):
        """True for caches that never move a token (full, retrieval): slot s holds position s."""
        return not (self.evicts or self.prefill_only)

    def attend_all(self, qg, input_pos):
        """Decode attention of qg [B, H_kv, G, D] over every filled slot. CUDA: the store's kernel, which
        reads validity from the position buffer and, where slot = position, stops at input_pos."""
        B, H, S = self.pos.shape
        limit = input_pos + 1 if self.slot_is_position else torch.full_like(input_pos, S)
        runs = torch.stack([torch.zeros_like(limit), limit], -1)[:, None].expand(B, H, 2)
        return self.store.attend(qg, self.pos, input_pos, runs=runs)

    def attend_selected(self, qg, input_pos, q_index=None):
        """Retrieval decode attention. On CUDA a gather kernel reads only the selected rows of K and V
        (token-level selections are not block-aligned, so a block mask would save nothing)."""
        if not qg.is_cuda:
            return self.store.attend(qg, self.pos, input_pos, mask=self.attend_mask(qg, input_pos, q_index))
        sel = self.select(qg, input_pos, q_index)
        if sel is None:  # a dense layer
            return self.attend_all(qg, input_pos)
        return self.store.attend_gather(qg, self.pos, input_pos, *sel)

    def decode(self, q, k_new, v_new, input_pos):
        """One decode step. q [B, H, 1, D], k/v_new [B, H_kv, 1, D], input_pos [B] -> [B, H, 1, D]."""
        B, H, _, D = q.shape
        qg = q.view(B, H // self.n_group, self.n_group, D)  # fold the GQA group into the query axis
        self.store.advance(self.pos, input_pos)  # a quantized store flushes its residual here
        if self.needs_attn:
            out, probs = self.store.attend_with_new(qg, self.pos, input_pos, k_new, v_new)
            slot = self.choose_slot(self.decode_scores(qg, k_new, input_pos, probs=probs), input_pos)
            self.write(slot, k_new, v_new, input_pos)
        elif self.retrieves:  # every token kept: store it, index it (codes, page bounds), read a sliver
            slot = input_pos[:, None].expand(B, H // self.n_group)
            self.write(slot, k_new, v_new, input_pos)
            q_index = self.on_write(slot, qg, k_new, v_new, input_pos)
            return self.attend_selected(qg, input_pos, q_index).view(B, H, 1, D)
        else:
            if self.evicts:
                slot = self.evict_choice(qg, k_new, input_pos)
            elif self.prefill_only:  # generated tokens fill the reserved (empty) slots, first one first. Past
                # them (more tokens than the max_new_tokens reserved, which generate never decodes) each new token
                # takes the row's last slot: it still attends to itself, and the write reads nothing (a drop's
                # write kept the old row: two kernels a layer more, ~0.1 ms a step at 32k x 8, BENCHMARKS.md)
                slot = (self.offset + input_pos[:, None]).clamp(max=self.limit.clamp(max=self.n_slots) - 1)
            else:  # no eviction: slot = position (prefill set it up so; lengths are validated)
                slot = input_pos[:, None].expand(B, H // self.n_group)
            self.write(slot, k_new, v_new, input_pos)
            out = self.attend_all(qg, input_pos)
        self.on_write(slot, qg, k_new, v_new, input_pos)
        return out.view(B, H, 1, D)


class WindowCache(KVCache):
    """A sliding-window layer's cache (Gemma 3's local layers, Phi-3-mini-4k's, Mistral-v0.1's), whatever
    the strategy: a ring of W slots, position p in slot p % W, so it holds exactly the last W tokens, the
    ones the layer attends to (Attention masks the prompt's beyond them). Memory: W slots, not the
    sequence. Not registered: make_caches gives it to the model's local layers, the strategy the others."""
    name = "window"
    protects = False
    slot_is_position = False  # slots wrap: CUDA's dense_attend reads validity from `pos`, all S slots

    def prefill(self, q, k, v, pos):
        B, H, T, D = k.shape
        W = self.n_slots
        last = pos.max(dim=1, keepdim=True).values  # [B, 1]: each row's newest position (prompts are 0..n-1)
        p = last - (last - torch.arange(W, device=k.device)) % W  # [B, W]: the newest position of each slot
        idx = (p + (pos < 0).sum(1, keepdim=True)).clamp(0, T - 1)[:, None, :, None].expand(B, H, W, D)  # left pad
        self.pos.copy_(p.clamp(min=-1)[:, None].expand(B, H, W))  # negative: not yet filled
        self.store.prefill(k.gather(2, idx), v.gather(2, idx), self.pos, last[:, 0])

    def decode(self, q, k_new, v_new, input_pos):
        B, H, _, D = q.shape
        self.store.advance(self.pos, input_pos)
        self.write((input_pos % self.n_slots)[:, None].expand(B, self.n_kv), k_new, v_new, input_pos)
        return self.attend_all(q.view(B, self.n_kv, self.n_group, D), input_pos).view(B, H, 1, D)


# ---- eviction strategies ----
# S = the budget: memory is really saved. Each class only scores (higher = keep); KVCache's prefill,
# choose_slot and write do the rest, per (sequence, KV head). Ties evict the oldest token.

@register
class StreamingLLM(KVCache):
    """StreamingLLM, Xiao et al. 2023: 4 attention sinks (--global_tokens) + the most recent
    tokens; the base's default score (the position) is exactly that rule. Departure: keys are cached
    after RoPE, so kept tokens keep their original positions; the paper re-numbers positions inside
    the cache (kvpress does not either). Decode keeps the paper's rolling cache (evict_choice)."""
    # follows arXiv 2309.17453; departs: original positions instead of cache-relative ones
    name = "streamingllm"
    source = "arXiv 2309.17453"
    evicts = True
    window = 0  # the position score keeps the newest anyway: only the 4 sinks need protecting
    # the new token's position tops every slot's, and budget_slots keeps a slot beyond the sinks: never dropped
    keeps_newest = True

    def evict_choice(self, qg, k_new, input_pos):
        """The paper's rolling cache: choose_slot's argmin of the positions, without a search. Prefill leaves each
        row's tokens as a prefix of its slots in position order, the sinks first; so each new token goes to the
        next empty slot while there is one, then round the slots past the sinks, oldest first: slot p of the
        sequence offset + input_pos (KVCache.offset). A function of the position, with no pointer to advance:
        torch 2.11's CPU inductor (the GPU image's) moved a pointer's update ahead of the K/V write that re-read it,
        so K/V went one slot past the positions. A recent window (--recent_window) takes the argmin: a window as
        long as the budget past the sinks protects every slot, and the argmin then evicts a sink, which the ring
        never does."""
        if self.recent_window:
            return super().evict_choice(qg, k_new, input_pos)
        p, n = self.offset + input_pos[:, None], self.limit.clamp(max=self.n_slots)  # p: tokens seen, sinks included
        # int32 modulo: int64 division is a long software sequence on the GPU
        wrap = ((p - n).int() % (n - self.n_sinks).clamp(min=1).int()).long()
        return torch.where(p < n, p, self.n_sinks + wrap)


def hash_uniform(*keys, device=None):
    """Counter-based hash of integer keys (ints or broadcastable int64 tensors) -> int64 in [0, 2^24):
    seeded, stateless, identical on every device and under torch.compile (no Generator in the graph).
    Every product stays below 2^63, so nothing overflows."""
    x = torch.zeros((), dtype=torch.long, device=device)
    for key in keys:
        x = (x * 0x27D4EB2F + key) & 0xFFFFFFFF
        x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
        x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
        x = (x >> 16) ^ x
    return x >> 8  # 24 bits: exact in fp32


@register
class Random(KVCache):
    """Uniform random eviction, the floor: at every step each candidate gets a fresh uniform score,
    hash(random_seed, layer, sequence, KV head, current position, token position), and the lowest
    goes. Sinks and the recent window are protected. Tensor parallel: the hash takes the model's head
    index (head0 + local head), so every rank draws what one process would for its heads."""
    # the floor every method must beat (ALGORITHMS.md); no paper
    name = "random"
    source = "no paper: the floor"
    evicts = True
    defaults = {"random_seed": 0}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # a buffer, not constants: inductor folds those into overflows
        self.register_buffer("salt", torch.tensor([self.p["random_seed"], self.layer]))

    def scores(self, pos, now):  # pos [B, H_kv, N], now [B]
        b = torch.arange(pos.shape[0], device=pos.device)[:, None, None]
        h = torch.arange(pos.shape[1], device=pos.device)[None, :, None] + self.head0
        return hash_uniform(*self.salt, b, h, now[:, None, None], pos, device=pos.device).float()

    def prefill_scores(self, q, k, v, pos):
        return self.scores(pos[:, None, :].expand(*k.shape[:3]), pos.max(dim=1).values)

    def decode_scores(self, q, k_new, input_pos, probs=None):
        new = input_pos[:, None, None].expand(*self.pos.shape[:2], 1)
        return self.scores(torch.cat([self.pos, new], -1), input_pos)


@register
class L2(KVCache):
    """L2 norm, Devoto et al. 2024: keep the keys of LOWEST norm (RoPE rotates, so post-RoPE norms are
    the pre-RoPE ones). Default: cold-compress's continuous variant (the one LSH-E compares against):
    each step the highest-norm unprotected key makes room; sinks (4) and recent window (10) protected.
    `l2_one_shot`: the authors' code: compress the prompt once after prefill to the budget, no sinks or
    window, layers `l2_skip_layers` (default [0, 1]) keep everything (full-size buffers), and generated
    tokens are appended in reserved slots. Paper: lossless at 50% (LM, needle), 90% on passkey."""
    # follows arXiv 2406.11430; departs: continuous eviction by default (cold-compress), one-shot by flag
    name = "l2"
    source = "arXiv 2406.11430"
    evicts = True
    defaults = {"l2_one_shot": False, "l2_skip_layers": [0, 1]}

    def __init__(self, batch, n_kv, n_slots, *args, **kwargs):
        super().__init__(batch, n_kv, n_slots, *args, **kwargs)
        if self.p["l2_one_shot"]:
            self.evicts, self.prefill_only, self.protects = False, True, False
            del self.ticket  # it never evicts
        # each slot's key norm, kept as keys arrive: a step then reads 4 bytes a slot, not the whole K cache
        self.register_buffer("norms", torch.zeros(batch, n_kv, 0 if self.p["l2_one_shot"] else n_slots))

    @classmethod
    def layer_slots(cls, cfg, n_layer, max_seq_length, max_new_tokens, fed=0):
        p = cls.hparams(cfg)
        if not p["l2_one_shot"]:
            return super().layer_slots(cfg, n_layer, max_seq_length, max_new_tokens, fed)
        slots = budget_slots(cfg, n_layer, max_seq_length, max_new_tokens, fed, (0, 0), prefill_only=True)
        return [max_seq_length if i in p["l2_skip_layers"] else s for i, s in enumerate(slots)]

    def prefill_scores(self, q, k, v, pos):
        return -k.float().norm(dim=-1)

    def on_prefill(self, q, k, v, pos, keep):
        if not self.p["l2_one_shot"]:
            self.norms.copy_(self.k.float().norm(dim=-1))

    def decode_scores(self, q, k_new, input_pos, probs=None):
        return -torch.cat([self.norms, k_new.float().norm(dim=-1)], -1)

    def on_write(self, slot, q, k_new, v_new, input_pos):
        if not self.p["l2_one_shot"]:
            (b, h), s = grid(slot), slot.clamp(max=self.n_slots - 1)
            self.norms[b, h, s] = torch.where(slot < self.n_slots, k_new[:, :, 0].float().norm(dim=-1), self.norms[b, h, s])


@register
class LSH(KVCache):
    """LSH-E / HashEvict (arXiv 2412.16187): SimHash codes, bits of x R >= 0 with one Gaussian
    R [head_dim, lsh_dim] per layer (seed lsh_seed * 100003 + layer, shared by heads), packed lsh_dim bits to an int16/32/64
    per slot, stored when a key enters. Each step the new token's vector is hashed and the cached token
    at the LARGEST Hamming distance (most cosine-dissimilar: lowest expected attention) is replaced,
    per KV head; empty slots first; 4 sinks + 10 recent protected. Default lsh_dim 16 (ablation 4-64).
    The paper hashes the current query (here the group's mean query); `lsh_hash_key` hashes the new key
    as the authors' code does. Prompts over the budget: cut to sinks + recent (their default)."""
    # follows arXiv 2412.16187; departs: GQA group-mean query, codes bit-packed (authors: a bool per bit)
    name = "lsh"
    source = "arXiv 2412.16187"
    evicts = True
    defaults = {"lsh_dim": 16, "lsh_hash_key": False, "lsh_seed": 0}

    def __init__(self, batch, n_kv, n_slots, head_dim, *args, **kwargs):
        super().__init__(batch, n_kv, n_slots, head_dim, *args, **kwargs)
        L = self.p["lsh_dim"]
        if not 1 <= L <= 64:
            raise ValueError(f"--lsh_dim {L} must be in 1..64 (codes are packed into one integer)")
        g = torch.Generator().manual_seed(self.p["lsh_seed"] * 100003 + self.layer)
        self.register_buffer("R", torch.randn(head_dim, L, generator=g))
        self.bits = 16 if L <= 16 else 32 if L <= 32 else 64  # the container; unused high bits stay 0
        dtype = {16: torch.int16, 32: torch.int32, 64: torch.int64}[self.bits]
        self.register_buffer("codes", torch.zeros(batch, n_kv, n_slots, dtype=dtype))

    def hash(self, x):
        """x [..., head_dim] -> packed codes [...]: bit i = (x R)_i >= 0; the container's top bit
        weighs -2^(bits-1), so every value is exact in its signed type."""
        L = self.R.shape[1]
        w = [-(1 << i) if i == self.bits - 1 else 1 << i for i in range(L)]
        # a decode step's few rows as a broadcast sum that inductor fuses with the packing: two cuBLAS
        # calls a layer (~4 us each with their split-K reduce) were 6% of a batch-1 step at 32k. The sum runs
        # along x's contiguous last axis: summed along dim -2, inductor's autotuner could pick a looped reduction
        # over 16 programs, 15 us a layer at 32k x 8 (H200, BENCHMARKS.md session 19)
        bits = (x.float() @ self.R if x.dim() > 3 else (x.float()[..., None, :] * self.R.t()).sum(-1)) >= 0
        return (bits.long() * torch.tensor(w, device=x.device)).sum(-1).to(self.codes.dtype)

    def hamming(self, a, b):
        x = (a ^ b).long()
        return popcount64(x & ((1 << self.bits) - 1) if self.bits < 64 else x)

    def on_prefill(self, q, k, v, pos, keep):
        self.codes.zero_()
        self.codes[:, :, :keep.shape[-1]] = self.hash(k).gather(-1, keep)

    def decode_scores(self, q, k_new, input_pos, probs=None):
        x = k_new[:, :, 0] if self.p["lsh_hash_key"] else q.mean(dim=2)  # [B, H_kv, D]
        far = self.hamming(self.codes, self.hash(x)[..., None]).float()
        return torch.cat([-far, torch.full_like(far[..., :1], math.inf)], -1)  # the new token always enters

    def on_write(self, slot, q, k_new, v_new, input_pos):
        (b, h), s = grid(slot), slot.clamp(max=self.n_slots - 1)
        self.codes[b, h, s] = torch.where(slot < self.n_slots, self.hash(k_new[:, :, 0]), self.codes[b, h, s])


@register
class H2O(KVCache):
    """H2O, Zhang et al. 2023: S_j = sum over all queries so far of the softmax attention token j got
    (un-normalised: early tokens are favoured, that is the method), group-mean over a KV head's query
    heads (as cold-compress). Prefill: S = the prompt's column sums (in query chunks). Each step keep
    the recent window + the top-S others; the refilled slot's S restarts at the new token's own
    attention. Defaults as the paper's scripts: heavy 10% + recent 10% of the prompt, i.e. a recent
    window of half the budget (recent_window 0.5; under protocol context half the compressed context's
    budget, not of the slots reserved for the appended question and answer) and no sinks. Reported: 5x KV
    reduction at 20% budget.
    kvpress's ObservedAttentionPress differs by definition: it compresses the prompt once, keeping the keys of
    highest MEAN attention over the queries that saw them (no early-token bias), no recent window."""
    # follows arXiv 2306.14048; departs: GQA group mean (the paper is MHA)
    name = "h2o"
    source = "arXiv 2306.14048"
    evicts = True
    needs_attn = True
    sinks, window = 0, 0.5

    def __init__(self, batch, n_kv, n_slots, *args, **kwargs):
        super().__init__(batch, n_kv, n_slots, *args, **kwargs)
        # accumulated attention per slot, then the new token's own: the decode scores themselves, handed to
        # choose_slot as they are (no [S + 1] concatenation built each step)
        self.register_buffer("score", torch.zeros(batch, n_kv, n_slots + 1))
        self.prompt_sums = None

    def prefill_scores(self, q, k, v, pos):
        self.prompt_sums = prompt_attention(q, k, pos)
        return self.prompt_sums

    def on_prefill(self, q, k, v, pos, keep):
        sums = self.prompt_sums if self.prompt_sums is not None else prompt_attention(q, k, pos)
        self.prompt_sums = None
        self.score.zero_()
        self.score[:, :, :keep.shape[-1]] = sums.gather(-1, keep)

    def decode_scores(self, q, k_new, input_pos, probs=None):
        new = torch.arange(self.n_slots + 1, device=probs.device) == self.n_slots
        self.score.copy_(torch.where(new, probs, self.score + probs))  # empty slots get 0
        return self.score

    def on_write(self, slot, q, k_new, v_new, input_pos):
        (b, h), s = grid(slot), slot.clamp(max=self.n_slots - 1)
        self.score[b, h, s] = torch.where(slot < self.n_slots, self.score[..., -1], self.score[b, h, s])


@register
class TOVA(KVCache):
    """TOVA, Oren et al. 2024: once full, drop the token (the new one included) with the lowest
    attention weight from the current query. The paper found averaging over the layer's heads better
    than per-head policies, so by default every head of a layer drops the same token (layer-mean
    probabilities); `tova_per_head` selects per KV head (group mean) instead. Prefill: the last prompt
    token's attention. Nothing protected, as in the paper: the new token itself may be dropped.
    Tensor parallel: the layer mean spans every rank's heads, so each rank all-reduces its heads' sum
    (one [B, S + 1] all-reduce per layer and step) and every rank drops the same token."""
    # follows arXiv 2401.06104; departs: none at the defaults (per-KV-head selection is a flag)
    name = "tova"
    source = "arXiv 2401.06104"
    evicts = True
    needs_attn = True
    sinks, window = 0, 0
    defaults = {"tova_per_head": False}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.cfg  # the layer mean is per slot: every head must hold the same positions in the same slots
        if cfg.strategy == self.name and not self.p["tova_per_head"] and cfg.prompt_compression not in ("own", self.name):
            raise ValueError("layer-averaged tova needs its own prompt compression (heads keep the same tokens); "
                             "use --prompt_compression own or --tova_per_head true")

    def pool(self, a):  # [B, H_kv, N]
        if self.p["tova_per_head"]:
            return a
        if self.world == 1:  # a sum of head slices, a pointwise kernel: inductor's reduction over the strided
            # head axis took up to 16.7 us a layer at 32k x 8 (BENCHMARKS.md, session 16)
            return (sum(a.unbind(1)) / a.shape[1])[:, None].expand_as(a)
        from tp import all_reduce  # tensor parallel: the other ranks' heads (see the docstring)
        return (all_reduce(a.sum(dim=1, keepdim=True)) / (a.shape[1] * self.world)).expand_as(a)

    def prefill_scores(self, q, k, v, pos):
        return self.pool(prompt_attention(q, k, pos, rows=1))

    def decode_scores(self, q, k_new, input_pos, probs=None):
        return self.pool(probs)


@register
class Scissorhands(KVCache):
    """Scissorhands, Liu et al. 2023 (cold-compress's reading of Algorithm 2): each step record for
    every cached token the indicator A_tj >= 1/n_t (group-mean attention at least uniform over the
    n_t tokens attended, the new one included); keep the last `sh_history` = 400 indicators per slot
    in a bit-packed ring (ceil(w/8) bytes + 16-bit counts of records and of set bits per slot); when full, drop the `sh_drop`
    (paper: m, default 1) unprotected tokens of lowest mean indicator at once, the freed slots then
    filling without eviction; 4 sinks + 10 recent protected; a refilled slot's history restarts with
    the new token's own indicator. Prefill: the indicators of the last w prompt queries."""
    # follows arXiv 2305.17118 (Alg. 2 as cold-compress reads it); departs: GQA group mean, ties -> oldest
    name = "scissorhands"
    source = "arXiv 2305.17118"
    evicts = True
    needs_attn = True
    defaults = {"sh_history": 400, "sh_drop": 1}

    def __init__(self, batch, n_kv, n_slots, *args, **kwargs):
        super().__init__(batch, n_kv, n_slots, *args, **kwargs)
        self.w, self.m = int(self.p["sh_history"]), int(self.p["sh_drop"])
        if self.w < 1 or self.w > 32767 or self.m < 1:
            raise ValueError("--sh_history must be in 1..32767 and --sh_drop >= 1")
        self.register_buffer("hist", torch.zeros(batch, n_kv, -(-self.w // 8), n_slots, dtype=torch.uint8))
        # each slot's records held (seen, high 16 bits) and set bits of its ring (ones, low 16), kept as bits
        # enter and leave: a step reads 4 bytes a slot, not w/8; one buffer, so one write where a token enters
        self.register_buffer("tally", torch.zeros(batch, n_kv, n_slots, dtype=torch.int32))
        # `ring`'s origin: the position whose step records at ring position 0
        self.register_buffer("origin", torch.zeros((), dtype=torch.long))
        # the decode scores (m = 1): each slot's mean indicator, then +inf (the new token stays); choose_slot
        # reads this buffer as it is (no [S + 1] concatenation built each step)
        self.register_buffer("score", F.pad(torch.zeros(batch, n_kv, n_slots), (0, 1), value=math.inf))
        self.register_buffer("new_bit", torch.zeros(batch, n_kv, dtype=torch.bool))
        # filled slots per row, kept as state: summed each step, the count was fused with the history update
        # into one reduction over B x H_kv thread blocks (8 at batch 1: 11.8 us a layer, BENCHMARKS.md)
        self.register_buffer("held", torch.zeros(batch, n_kv, dtype=torch.long))
        self.prompt_hist = None

    def prefill_scores(self, q, k, v, pos):
        self.prompt_hist = hist, seen = prompt_indicators(q, k, pos, self.w)
        return popcount64(hist.long()).sum(2) / seen.clamp(min=1)

    def on_prefill(self, q, k, v, pos, keep):
        hist, seen = self.prompt_hist or prompt_indicators(q, k, pos, self.w)  # w rows: cheap beside the prefill
        self.prompt_hist = None
        n = keep.shape[-1]
        self.hist.zero_()
        self.hist[..., :n] = hist.gather(3, keep[:, :, None, :].expand(-1, -1, hist.shape[2], -1))
        kept_seen = torch.zeros_like(self.tally)
        kept_seen[..., :n] = seen.gather(-1, keep).int()
        self.tally.copy_(kept_seen << 16 | popcount64(self.hist.long()).sum(2).int())
        self.origin.copy_(pos[0].max() + 1 - min(self.w, k.shape[2]))  # the first decode step records at min(w, T)
        self.held.copy_((self.pos >= 0).sum(-1))

    def ring(self, input_pos):
        """This step's ring position: the records so far mod w (every sequence of a batch advances one position a
        step), derived from the position, with no counter to increment in every layer (a launch of its own each)."""
        return (input_pos[0] - self.origin) % self.w

    def decode_scores(self, q, k_new, input_pos, probs=None):
        filled = self.pos >= 0
        bit = probs >= 1.0 / (self.held[..., None] + 1)  # A_tj >= 1 / n_t
        r = self.ring(input_pos)
        word, mask = (r // 8).view(1), (1 << (r % 8)).to(torch.uint8)
        old = self.hist[:, :, word]  # [B, H_kv, 1, S]: the byte holding this step's bit of every slot
        new = (bit[..., :-1] & filled)[:, :, None]
        self.hist[:, :, word] = torch.where(new, old | mask, old & ~mask)
        ones = (self.tally & 0xFFFF) + (new.int() - ((old & mask) != 0).int())[:, :, 0]  # the bit entering - the one leaving
        seen = torch.where(filled, ((self.tally >> 16) + 1).clamp(max=self.w), self.tally >> 16)
        self.tally.copy_(seen << 16 | ones)
        self.new_bit.copy_(bit[..., -1])
        if self.m == 1 and self.w <= 2048:
            # one drop at a time is choose_slot's own rule: an empty slot first, else the lowest mean (ties: the
            # oldest). fp32 orders the means exactly here: distinct ones/seen differ by >= 1/w^2, over 2 ulps of
            # fp32 below 1 for w <= 2048, and equal ones are rounded alike. One argmin a layer, not two.
            self.score[..., :-1] = ones.float() / seen.float().clamp(min=1)
            return self.score
        # full: free the m lowest mean indicators at once, compared exactly (ones/seen as a 2^32 fixed
        # point, then position: ties drop the oldest); choose_slot then picks the first empty slot
        mean = (ones.long() << 32) // seen.long().clamp(min=1)
        key = ((mean << 24) | self.pos.clamp(min=0)).masked_fill(~filled | self.protected(self.pos, input_pos), MAX64)
        victim = (row_argmin(key)[..., None] if self.m == 1 else  # one reduction, not topk's sort
                  key.topk(min(self.m, self.n_slots), dim=-1, largest=False).indices)
        free = (self.held >= self.limit.clamp(max=self.n_slots))[..., None] & (key.gather(-1, victim) < MAX64)
        b, h = grid(victim)
        self.pos[b[..., None], h[..., None], victim] = self.pos.gather(-1, victim).masked_fill(free, -1)
        self.held -= free.sum(-1)
        return torch.zeros_like(probs)

    def on_write(self, slot, q, k_new, v_new, input_pos):
        (b, h), s, ok = grid(slot), slot.clamp(max=self.n_slots - 1), slot < self.n_slots
        r = self.ring(input_pos)  # the new token's history: cleared, then this step's own indicator
        fresh = (torch.arange(self.hist.shape[2], device=slot.device) == r // 8).to(torch.uint8)
        fresh = fresh * (self.new_bit.to(torch.uint8) << (r % 8).to(torch.uint8))[..., None]  # [B, H, W]
        self.hist[b, h, :, s] = torch.where(ok[..., None], fresh, self.hist[b, h, :, s])
        self.tally[b, h, s] = torch.where(ok, 1 << 16 | self.new_bit.int(), self.tally[b, h, s])  # seen 1, ones its bit
        # a written slot was empty unless the row was full (choose_slot takes an empty slot first)
        self.held.copy_(torch.minimum(self.held + ok.long(), self.limit.clamp(max=self.n_slots)))


MAX64 = torch.iinfo(torch.long).max
HASH_KERNEL = True  # Spotlight's decode codes by triton_kernels.hash_codes on CUDA (bench.py --no_hash_kernel: torch)
EVICT_KERNEL = True  # choose_slot by triton_kernels.evict_slot on CUDA (bench.py --no_evict_kernel: its torch form)
ARGMIN_CHUNK = 128  # slots per partial minimum in row_argmin


def row_argmin(key):
    """argmin over the last dim of int64 keys, in two passes: each chunk's minimum, then the least of
    those (ties: the first index, as argmin). One reduction per row ran on B x H_kv thread blocks, 8 at
    batch 1, and left most of the GPU idle (BENCHMARKS.md: 17-51 us a layer with the scoring fused in)."""
    n = key.shape[-1]
    if n <= ARGMIN_CHUNK:
        return key.argmin(-1)
    key = torch.cat([key, key.new_full((*key.shape[:-1], -n % ARGMIN_CHUNK), MAX64)], -1)
    least, at = key.unflatten(-1, (-1, ARGMIN_CHUNK)).min(-1)
    chunk = least.argmin(-1, keepdim=True)
    return (chunk * ARGMIN_CHUNK + at.gather(-1, chunk))[..., 0]


def prompt_indicators(q, k, pos, w):
    """Scissorhands' history from the prompt: for the last R = min(w, T) prompt queries, the indicators
    A_ij >= 1/n_i (n_i = keys query i sees) as ring bits [B, H_kv, ceil(w/8), T] uint8 (row r of the
    R -> bit r) and the number of records per key [B, H_kv, T] (queries that saw it)."""
    B, H, T = k.shape[:3]
    acc = torch.zeros(B, H, -(-w // 8), T, dtype=torch.int32, device=k.device)
    seen = torch.zeros(B, H, T, dtype=torch.int16, device=k.device)
    for i, probs, qp in prompt_probs(q, k, pos, rows=min(w, T)):
        vis = (pos[:, None, None, :] >= 0) & (pos[:, None, None, :] <= qp[:, None, :, None])  # [B, 1, C, T]
        bits = (probs >= 1.0 / vis.sum(-1, keepdim=True).clamp(min=1)) & vis
        rows = torch.arange(i, i + probs.shape[2], device=k.device)
        acc.index_add_(2, rows // 8, bits.int() << (rows % 8).int()[:, None])  # distinct bits: add = or
        seen += vis.sum(2).to(torch.int16)
    return acc.to(torch.uint8), seen


def grid(slot):
    """(b [B, 1], h [1, H]) index grids: buf[b, h, slot] is one slot per (sequence, KV head), and
    assigning to it is an index_put_, which inductor keeps in place (see KVCache.write)."""
    return (torch.arange(slot.shape[0], device=slot.device)[:, None],
            torch.arange(slot.shape[1], device=slot.device)[None, :])


def snap_scores(q, k, pos, p):
    """SnapKV's keep-scores [B, H_kv, T]: the last w = snap_window prompt queries' fp32 softmax
    attention (causal inside the window) over the earlier keys, summed per key and averaged over each
    KV head's query group, then pooled along the prefix (stride 1, padding kernel // 2; max or avg).
    The w window tokens score above any prefix token (a prefix sum is <= w), so top-k keeps them."""
    T = k.shape[2]
    w = min(p["snap_window"], T)
    att = prompt_attention(q, k, pos, rows=w)[..., :T - w]
    if T > w:
        pool = F.max_pool1d if p["snap_pool"] == "max" else F.avg_pool1d
        att = pool(att, p["snap_kernel"], 1, p["snap_kernel"] // 2)[..., :T - w]
    window = w + 1 + torch.arange(w, device=k.device, dtype=torch.float32)
    return torch.cat([att, window.expand(*att.shape[:2], w)], -1)


@register
class SnapKV(KVCache):
    """SnapKV, Li et al. 2024: at the end of prefill keep the top (budget - w) prompt keys per KV head
    by snap_scores plus the w observation-window tokens; generated tokens fill reserved slots.
    Defaults w = 32, kernel 7, max pooling (the original LongBench configs; its code defaults to 64,
    5, avg). GQA: the group's attention is averaged and selection is per KV head, with no KV-head
    repetition (KVCache-Factory's repeat makes the cache n_group x larger). Query-aware only when the
    question sits inside the window."""
    # follows arXiv 2404.14469; departs: GQA group mean before pooling (paper is per head, no GQA)
    name = "snapkv"
    source = "arXiv 2404.14469"
    prefill_only = True
    protects = False  # the window is its own protection; no sinks
    defaults = {"snap_window": 32, "snap_kernel": 7, "snap_pool": "max"}

    def prefill_scores(self, q, k, v, pos):
        return snap_scores(q, k, pos, self.p)


@register
class PyramidKV(KVCache):
    """PyramidKV, Cai et al. 2024: SnapKV's selection with per-layer prompt budgets shrinking with
    depth (pyramid_budgets, beta = pyramid_beta = 20, window w inside each budget), mean exactly B =
    budget - max_new_tokens. Departure: budgets computed in floats and rounded so their mean is B (the
    official code floors each term and overshoots by up to 12%). Prompts no longer than B are not
    compressed; shorter than 2(B - w), every layer keeps B (plain SnapKV), as the official code does.
    KVCache-Factory's runners use w = 8 (cache_configs/pyramid.yaml). kvpress's PyramidKVPress differs: its
    progression spans each layer's whole budget (lowest B / beta, the window inside), rounded layer by layer,
    and it is plain SnapKV whenever B / beta < w (B < 1280 tokens at its w = 64, beta = 20)."""
    # follows arXiv 2406.02069; departs: float budgets with exact mean B (official code floors)
    name = "pyramid"
    source = "arXiv 2406.02069"
    prefill_only = True
    protects = False
    defaults = {"snap_window": 32, "snap_kernel": 7, "snap_pool": "max", "pyramid_beta": 20.0}

    @classmethod
    def layer_slots(cls, cfg, n_layer, max_seq_length, max_new_tokens, fed=0):
        slots = super().layer_slots(cfg, n_layer, max_seq_length, max_new_tokens, fed)
        if cfg.budget_pattern != "uniform" or len(set(slots)) > 1:
            raise ValueError("pyramid sets its own per-layer budgets: give one --max_cache_length, no pattern")
        p, N = cls.hparams(cfg), max_new_tokens  # B: the prefilled context's room; T: its length
        B, T, w = slots[0] - N, max_seq_length - N, p["snap_window"]
        if T <= B or B <= w or T < 2 * (B - w):
            return slots
        budgets = pyramid_budgets(B, n_layer, T, w, p["pyramid_beta"])
        if min(budgets) < 1:
            raise ValueError(f"pyramid: a prompt budget of {B} leaves layer budgets below 1; raise --max_cache_length")
        return [b + N for b in budgets]

    def prefill_scores(self, q, k, v, pos):
        return snap_scores(q, k, pos, self.p)


# ---- head-level budgets ----
# Each KV head keeps its own number of tokens, decided at prefill. A layer's cache is one flat buffer per
# sequence (k/v [B, L, D], pos [B, L]); head h's tokens are the run start[b, h] .. start + count - 1, its
# capacity cap[b, h] (its budget + max_new_tokens: generated tokens are appended, as SnapKV's are). So the
# bytes are the sum of the heads' budgets, not H x the largest. A strategy gives only its budget rule;
# the tokens inside a head are SnapKV's (the window plus the best pooled window attention), or any other
# strategy's prefill scores through --prompt_compression.

class HeadBudgetCache(KVCache):
    """Storage and mechanics of per-KV-head budgets. n_slots is the AVERAGE budget per head (prompt +
    max_new_tokens, as --max_cache_length gives it); `budgets` splits a row's prompt budget over heads."""
    prefill_only = True
    protects = False
    defaults = {"snap_window": 32, "snap_kernel": 7, "snap_pool": "max"}

    def __init__(self, batch, n_kv, n_slots, head_dim, n_group, dtype, *args, **kwargs):
        super().__init__(batch, n_kv, 0, head_dim, n_group, dtype, *args, **kwargs)  # flat buffers below
        self.budget = n_slots
        self.limit.fill_(n_slots)
        L = self.flat_length(n_slots)
        self.store = make_store(self.cfg, batch, n_kv, 1, L, head_dim, dtype, aligned=False)  # one flat row
        self.pos = torch.full((batch, L), -1, dtype=torch.long)
        del self.offset  # its runs' lengths are counted instead
        for name in ("start", "cap", "count"):  # each (sequence, KV head)'s run in the flat buffer: its first slot,
            self.register_buffer(name, torch.zeros(batch, n_kv, dtype=torch.long))  # capacity and length

    @property
    def n_slots(self):
        return self.budget

    @property
    def k(self):  # [B, L, D]: the flat buffer
        return self.store.keys()[:, 0]

    @property
    def v(self):
        return self.store.values()[:, 0]

    def flat_length(self, slots) -> int:
        """Slots a sequence's flat buffer needs when the average head budget is `slots`."""
        return self.n_kv * slots

    def budgets(self, scores, rooms):
        """Tokens each head keeps from the prompt: scores [B, H_kv, T] (the scorer's), rooms [B, H_kv] the
        average prompt budget per head -> [B, H_kv] (window included)."""
        raise NotImplementedError

    def prefill_scores(self, q, k, v, pos):
        return snap_scores(q, k, pos, self.p)

    def prefill(self, q, k, v, pos):
        B, H, T, D = k.shape
        scorer = self if self.cfg.prompt_compression == "own" else self.prompt_scorer()
        tok_pos = pos[:, None, :].expand(B, H, T)
        scores = scorer.prefill_scores(q, k, v, pos).float().masked_fill(tok_pos < 0, -math.inf)
        real = (pos >= 0).sum(1, keepdim=True)  # [B, 1]
        caps = torch.minimum(self.budgets(scores, self.limit - self.max_new_tokens), real)
        kept = best_in_row(scores, caps)  # [B, H, T]
        self.cap.copy_(caps + self.max_new_tokens)
        self.start.copy_(self.cap.cumsum(-1) - self.cap)
        self.count.copy_(caps)
        b, h, t = kept.nonzero(as_tuple=True)  # in position order within each head
        dest = (self.start[..., None] + kept.cumsum(-1) - 1)[b, h, t]
        self.pos.fill_(-1)
        L = self.pos.shape[1]
        flat_k, flat_v = k.new_zeros(B, L, D), v.new_zeros(B, L, D)
        owner = torch.zeros(B, L, dtype=torch.long, device=k.device)  # each slot's KV head (a store's residual)
        self.pos[b, dest], flat_k[b, dest], flat_v[b, dest], owner[b, dest] = tok_pos[b, h, t], k[b, h, t], v[b, h, t], h
        self.store.prefill(flat_k[:, None], flat_v[:, None], self.pos[:, None], pos.max(dim=1).values, owner[:, None])

    def decode(self, q, k_new, v_new, input_pos):
        B, H, _, D = q.shape
        qg = q.view(B, self.n_kv, self.n_group, D)
        self.store.advance(self.pos[:, None], input_pos)
        room = self.count < self.cap  # always, with max_new_tokens reserved; else the new token is dropped
        slot = (self.start + self.count).clamp(max=self.pos.shape[1] - 1)
        b = torch.arange(B, device=q.device)[:, None]
        self.pos[b, slot] = torch.where(room, input_pos[:, None], self.pos[b, slot])
        self.store.write(slot, k_new[:, :, 0], v_new[:, :, 0], ~room, input_pos)
        self.count += room.long()
        return self.attend_runs(qg, input_pos).view(B, H, 1, D)

    def attend_runs(self, qg, input_pos=None):
        """Each head's query group over its own run of the flat buffer (CUDA: the store's kernel over runs)."""
        return self.store.attend(qg, self.pos[:, None], input_pos, runs=torch.stack([self.start, self.count], -1))

    def rows_held(self):
        return (self.pos >= 0).sum(-1)

    def rows_read(self, input_pos) -> int:
        return int(self.count.sum())


def best_in_row(scores, n):
    """[B, H, T] bool: each row's n [B, H] best-scored entries; ties keep the later one (as prefill does)."""
    order = scores.flip(-1).sort(dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return rank.flip(-1) < n[..., None]


@register
class AdaKV(HeadBudgetCache):
    """Ada-KV, Feng et al. 2024 (arXiv 2407.11550): a layer keeps H_kv x B prompt tokens per sequence;
    every head first keeps its best floor(alpha B) (the safeguard, alpha = `ada_alpha` 0.2, kvpress's
    default), the rest go to the best scores of all the layer's heads at once (flattened top-k), so each
    head's budget is how many of its tokens won; decided per sequence at prefill, generated tokens then
    appended to every head. Scores: SnapKV's (w 32, kernel 7, max pooling; group mean for GQA), or any
    prefill scorer by --prompt_compression. Memory: the layer's H_kv x budget, flat (HeadBudgetCache),
    unlike kvpress's AdaKVPress, which only masks. Ties: the later token, then the lower head.
    Tensor parallel: the flattened top-k spans the layer's heads, so at prefill every rank all-gathers the
    scores and budgets of every head, ranks them as one process would and keeps its own heads' budgets;
    any one rank's heads may win every slot, so each rank's flat buffer holds the layer's whole prompt
    budget (H_kv B, not H_kv B / N: AdaKV's cache is not split N ways, unlike every other strategy's)."""
    # follows arXiv 2407.11550 (AdaKV + SnapKV scorer); departs: GQA group-mean scores, per KV head
    name = "adakv"
    source = "arXiv 2407.11550"
    defaults = {**HeadBudgetCache.defaults, "ada_alpha": 0.2}

    def budgets(self, scores, rooms):
        if self.world > 1:  # tensor parallel: rank every head of the layer (the docstring says why)
            from tp import all_gather_heads
            won = self.layer_budgets(all_gather_heads(scores), all_gather_heads(rooms))
            return won[:, self.head0:self.head0 + self.n_kv]
        return self.layer_budgets(scores, rooms)

    def flat_length(self, slots) -> int:
        if self.world == 1:
            return super().flat_length(slots)
        return self.n_kv * self.world * (slots - self.max_new_tokens) + self.n_kv * self.max_new_tokens

    def layer_budgets(self, scores, rooms):
        B, H, T = scores.shape
        guarded = best_in_row(scores, (self.p["ada_alpha"] * rooms).floor().long())
        # the layer's flattened top-k, each head's safeguard first (+inf); ties to the later token, then
        # the lower head: flatten newest token first, heads in order, and sort stably
        flat = scores.masked_fill(guarded, math.inf).flip(-1).transpose(1, 2).reshape(B, T * H)
        order = flat.sort(dim=-1, descending=True, stable=True).indices
        won = torch.arange(T * H, device=scores.device) < rooms.sum(-1, keepdim=True)
        won = torch.zeros_like(won).scatter(-1, order, won).view(B, T, H).transpose(1, 2).flip(-1)
        return won.sum(-1)


class OfflineHeadBudgets(HeadBudgetCache):
    """Budgets from offline head scores (head_scores.py's <checkpoint>/head_scores/<kind>.json, keyed
    "layer-head" per query head; GQA: each KV head gets its group's mean score). With B the average
    prompt budget per head, w the window and B' = B - w, every head keeps w + a floor B' - B' // beta
    plus a share of the pool (B' // beta) N (N = the KV heads of the layers it manages) by its score, so
    the budgets of all heads sum to N B' (up to rounding) and differ across layers too. Tensor parallel:
    shares come from the whole model's table (every rank reads it), normalised over all heads, and each
    rank keeps its heads' rows: no communication."""
    kind = key = ""  # head_scores.py --score <kind> writes head_scores/<kind>.json; each entry's <key> is the score

    def shares(self):
        """This layer's [H_kv] shares of the pool, normalised over every head the strategy manages."""
        path = Path(self.p["head_scores"] or Path(self.cfg.checkpoint_dir or ".") / "head_scores" / f"{self.kind}.json")
        if not path.exists():
            raise FileNotFoundError(f"{self.name} needs head scores at {path}; make them with: python head_scores.py "
                                    f"--score {self.kind} --checkpoint_path {self.cfg.checkpoint_dir or '<checkpoint>'}")
        s = head_score_table(str(path), path.stat().st_mtime_ns, self.key, self.n_layer, self.n_kv * self.world,
                             self.n_group)
        s = s[self.peers]  # sliding-window layers' heads keep their window, not a share
        return self.transform(s / s.sum())[self.peers.index(self.layer), self.head0:self.head0 + self.n_kv]

    def transform(self, s):
        """[n_layer, H_kv] normalised scores -> the pool shares (HeadKV: s^temp, normalised)."""
        s = s ** self.p["head_temp"]
        return s / s.sum()

    def floor_and_pool(self, rooms):
        w = self.p["snap_window"]
        Bp = rooms - w
        if (Bp < 0).any():
            raise ValueError(f"{self.name}: a budget of {int(rooms.min()) + self.max_new_tokens} slots per head leaves "
                             f"nothing beyond the {w}-token window and max_new_tokens; raise --max_cache_length")
        pool = torch.div(Bp, self.p["head_beta"], rounding_mode="floor")
        return Bp - pool, pool, len(self.peers) * self.n_kv * self.world

    def budgets(self, scores, rooms):
        floor, pool, N = self.floor_and_pool(rooms)
        return torch.round(self.shares().to(rooms.device) * pool * N + floor).long() + self.p["snap_window"]

    def flat_length(self, slots) -> int:
        rooms = torch.full((1, self.n_kv), slots - self.max_new_tokens)
        return int(self.budgets(None, rooms).sum()) + self.n_kv * self.max_new_tokens


@lru_cache(maxsize=8)
def head_score_table(path: str, mtime_ns: int, key: str, n_layer: int, n_kv: int, n_group: int) -> torch.Tensor:
    """head_scores.py's JSON -> [n_layer, H_kv] scores (each KV head's query-group mean); all zero -> uniform."""
    import json
    table = json.loads(Path(path).read_text())["scores"]
    s = torch.tensor([[[float(table[f"{l}-{h * n_group + g}"][key]) for g in range(n_group)] for h in range(n_kv)]
                      for l in range(n_layer)], dtype=torch.float64).mean(-1)
    return s if s.sum() > 0 else torch.ones_like(s)


@register
class HeadKV(OfflineHeadBudgets):
    """HeadKV-R2, Fu et al. 2024 (arXiv 2410.19258; FYYFU/HeadKV): budgets from each head's
    retrieval-reasoning score (head_scores.py --score headkv), cap = round(p (B' // beta) N + B' -
    B' // beta) + w, p = s^temp normalised, beta = `head_beta` 1.01 and temp 1 (their LongBench runs);
    SnapKV's selection inside each head. Departures: per KV head (group-mean scores; their Llama-3
    code scores and stores every query head, KV repeated); a head never keeps more than the prompt."""
    # follows arXiv 2410.19258; departs: per KV head with group-mean scores
    name = kind = key = "headkv"
    source = "arXiv 2410.19258"
    defaults = {**HeadBudgetCache.defaults, "head_beta": 1.01, "head_temp": 1.0, "head_scores": ""}


@register
class DiliLazyKV(OfflineHeadBudgets):
    """DiliLazyKV (seed 002, built on HeadKV; ../shared/seeds/dililazykv.md): budgets from each head's
    InfScore (head_scores.py --score dililazy), SA = s^temp, SA' = SA + 0.01 SA / sum of the layer's SA,
    p' = SA' normalised over all heads, cap = round(p' ((B' // beta) N - N / 2) + B' - B' // beta + 1/2) + w,
    beta = `head_beta` 1.351 (the seed's example), temp 1; SnapKV's selection inside each head.
    Departures: per KV head (group-mean InfScore); scores normalised before the exponent, as HeadKV does."""
    # follows the DiliLazyKV seed; departs: per KV head with group-mean scores
    name = kind = "dililazy"
    source = "seed: shared/seeds/dililazykv.md"
    key = "infscore"
    defaults = {**HeadBudgetCache.defaults, "head_beta": 1.351, "head_temp": 1.0, "head_scores": ""}

    def transform(self, s):
        sa = s ** self.p["head_temp"]
        layer = sa.sum(-1, keepdim=True)
        sa = sa + 0.01 * sa / torch.where(layer > 0, layer, 1.0)
        return sa / sa.sum()

    def budgets(self, scores, rooms):
        floor, pool, N = self.floor_and_pool(rooms)
        p = self.shares().to(rooms.device)
        return torch.round(p * (pool * N - 0.5 * N) + floor + 0.5).long() + self.p["snap_window"]


class AttentionLossProbe(nn.Module):
    """--debug_attention_loss: a full cache beside one layer's compressed cache. Each decode step it
    records, per sequence, the attention mass that the current query (full cache, mean over query
    heads) puts on tokens the compressed cache did not attend because it had evicted them:
    loss [B, steps] (NaN for steps not run). Duck-types a cache for Attention; runs compiled or not."""

    def __init__(self, cache: KVCache, max_seq_length: int, steps: int):
        super().__init__()
        (B, H), D, dev = cache.limit.shape, cache.head_dim, cache.limit.device
        self.cache = cache
        ring = isinstance(cache, WindowCache)  # a sliding-window layer never attends further: its reference is a ring
        self.full = (WindowCache if ring else KVCache)(B, H, cache.n_slots if ring else max_seq_length, D, cache.n_group,
                                                       cache.dtype, cache.layer, cache.n_layer, CacheConfig()
                                                       ).to(dev)
        self.register_buffer("loss", torch.full((B, steps), math.nan, device=dev))
        self.register_buffer("step", torch.zeros((), dtype=torch.long, device=dev))

    def prefill(self, q, k, v, pos):
        self.cache.prefill(q, k, v, pos)
        self.full.prefill(q, k, v, pos)
        self.loss.fill_(math.nan)
        self.step.zero_()

    def decode(self, q, k_new, v_new, input_pos):
        held = self.cache.pos.clone()  # a needs_attn strategy attends before it evicts
        out = self.cache.decode(q, k_new, v_new, input_pos)
        self.full.decode(q, k_new, v_new, input_pos)
        if not self.cache.needs_attn:
            held = self.cache.pos
        B, H, L = self.full.pos.shape
        held = torch.cat([held, input_pos[:, None, None].expand(B, H, 1)], -1)
        present = torch.zeros(B, H, L + 1, dtype=torch.bool, device=q.device)
        present.scatter_(-1, held.masked_fill(held < 0, L), True)
        fpos = self.full.pos
        lost = ~present.gather(-1, fpos.masked_fill(fpos < 0, L))  # empty full-cache slots: index L, 'present'
        qg = q.view(B, H, -1, q.shape[-1]).float()
        logits = (qg @ self.full.k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        probs = logits.masked_fill(~(fpos >= 0)[:, :, None, :], -math.inf).softmax(-1)
        mass = (probs * lost[:, :, None, :]).sum(-1).mean(dim=(1, 2))
        self.loss.index_copy_(1, self.step.clamp(max=self.loss.shape[1] - 1).view(1), mass[:, None])
        self.step += 1
        return out


def attach_attention_loss(model, max_seq_length: int, steps: int) -> list[AttentionLossProbe]:
    """Wrap each layer's cache of `model` (after model.setup_caches) in an AttentionLossProbe and return
    the probes; torch.stack([p.loss for p in probes]) is the [n_layer, B, steps] table."""
    if any(isinstance(layer.attention.kv_cache, HeadBudgetCache) for layer in model.layers):
        raise ValueError("--debug_attention_loss compares slot layouts; head-budget strategies store heads flat")
    probes = [AttentionLossProbe(layer.attention.kv_cache, max_seq_length, steps) for layer in model.layers]
    model.setup_caches(probes)
    return probes


def make_store(cfg: CacheConfig, batch, n_kv, rows, slots, head_dim, dtype, aligned):
    """A layer's K/V storage (kvstore.py) for cfg.kv_bits: rows code rows (n_kv, or 1 for a flat layout) of
    `slots` slots; `aligned`: the policy writes slot = position (a quantized store then fills key groups whole)."""
    if cfg.kv_bits == 16:
        return DenseStore(batch, n_kv, rows, slots, head_dim, dtype)
    return QuantStore(batch, n_kv, rows, slots, head_dim, dtype, cfg.kv_bits, cfg.kv_group, cfg.kv_residual, aligned)


# chunks of prompt attention's [B, H, rows, T] fp32 logits. CPU: blocks this size are reused by the allocator;
# 256 MB ones were mapped and unmapped each time (two thirds of the time in the kernel: 4.8 s against 1.9 s a
# layer, 10 x 2k prompts). CUDA: at 8 x 32k one row is 32 MB, and row-at-a-time chunks took Scissorhands' 400
# prompt rows from 7.5 s to 33 s (BENCHMARKS.md)
PROMPT_CHUNK_BYTES = {"cpu": 32 << 20, "cuda": 256 << 20}


def prompt_attention(q, k, pos, rows=None, chunk_bytes=None):
    """Softmax attention of prompt queries (all, or the last `rows`) over prompt keys, summed over
    queries and averaged over each KV head's query group: [B, H_kv, T] fp32. Causal, padding masked;
    computed in query chunks so no T x T matrix is ever materialised."""
    if q.is_cuda:  # the torch loop takes a few rows per chunk at 32k tokens; Triton's two passes do not
        from triton_kernels import prompt_colsum  # Triton: imported only on CUDA
        return prompt_colsum(q, k, pos, rows or q.shape[2])
    total = torch.zeros(*k.shape[:3], dtype=torch.float32, device=q.device)
    for _, probs, _ in prompt_probs(q, k, pos, rows, chunk_bytes, causal_cut=True):
        total[..., :probs.shape[-1]] += probs.sum(2)
    return total


def prompt_probs(q, k, pos, rows=None, chunk_bytes=None, causal_cut=False):
    """The rows behind prompt_attention, chunk by chunk: yields (first row, probs [B, H_kv, C, T] fp32
    averaged over each KV head's query group, the chunk's query positions [B, C]). causal_cut: only the
    first keys a chunk can see (prompts are left-padded, so query row j sees key rows <= j), [.., C, <= T]."""
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    q = q[:, :, -rows:] if rows else q
    first = T - q.shape[2]  # the prompt row of the first query
    q_pos = pos[:, first:]
    chunk = max(1, (chunk_bytes or PROMPT_CHUNK_BYTES.get(q.device.type, PROMPT_CHUNK_BYTES["cpu"])) // (B * H * T * 4))
    kf = k.float().repeat_interleave(H // H_kv, dim=1).transpose(-1, -2)
    for i in range(0, q.shape[2], chunk):
        qp = q_pos[:, i:i + chunk]
        n = min(T, first + i + chunk) if causal_cut else T  # keys past the chunk's last row: all masked
        logits = (q[:, :, i:i + chunk].float() @ kf[..., :n]) / math.sqrt(D)  # [B, H, C, n]
        kp = pos[:, None, None, :n]
        probs = logits.masked_fill(~((kp >= 0) & (kp <= qp[:, None, :, None])), -math.inf).softmax(-1).nan_to_num(0.0)
        probs = probs * (qp[:, None, :, None] >= 0)  # padding queries contribute nothing
        yield i, probs.view(B, H_kv, H // H_kv, -1, n).mean(2), qp


def parse_budget(values, n_layer, max_seq_length, cap=None) -> list[int]:
    """--max_cache_length: fractions (<= 1, of max_seq_length: the prompt, budget_plan) or token counts
    (at most `cap`, the whole sequence); one value for every layer or one per layer. Returns slots per layer."""
    values = [budget_value(v) for v in values]
    if len(values) == 1:
        values = values * n_layer
    if len(values) != n_layer:
        raise ValueError(f"--max_cache_length has {len(values)} values; give 1 or one per layer ({n_layer}; "
                         "a model's sliding-window layers have their rings and no value)")
    slots = []
    for v in values:
        n = math.ceil(v * max_seq_length) if v <= 1 else int(v)
        slots.append(min(n, cap or max_seq_length))  # a token budget above the sequence: nothing to compress
    return slots


def budget_value(v) -> float:
    """One --max_cache_length value: a fraction in (0, 1] or a whole number of tokens."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"--max_cache_length {v!r} is not a number: give a fraction in (0, 1] or a token count") from None
    if not x > 0 or (x > 1 and x != int(x)) or math.isinf(x):
        raise ValueError(f"--max_cache_length {v}: give a fraction in (0, 1] or a whole number of tokens")
    return x


def recent_slots(recent_window, n_slots) -> int:
    """--recent_window: a token count, or (0 < r < 1) a fraction of the layer's slots (H2O's recent ratio)."""
    return round(recent_window * n_slots) if 0 < recent_window < 1 else int(recent_window)


def budget_plan(cfg: CacheConfig, max_seq_length, max_new_tokens, fed, prefill_only) -> tuple[int, int]:
    """(the tokens a fractional budget is a fraction of, the slots added on top of the budget). Of a
    sequence's max_seq_length tokens the last max_new_tokens come after the prefill: first `fed` prompt
    tokens (a query-agnostic question), then generated or teacher-forced ones. The budget never counts
    generated tokens. "stream": it is a fraction of the prompt (prefill + fed); a prefill-only strategy
    adds slots for the generated tokens, an evicting one none (they evict). "context" (kvpress's): a
    fraction of the prefilled context; everything after the prefill is added, so nothing evicts."""
    if cfg.protocol not in ("stream", "context"):
        raise ValueError(f"unknown --protocol {cfg.protocol!r}; known: context, stream")
    if cfg.protocol == "context":
        return max_seq_length - max_new_tokens, max_new_tokens
    return max_seq_length - max_new_tokens + fed, (max_new_tokens - fed if prefill_only else 0)


def budget_slots(cfg: CacheConfig, n_layer, max_seq_length, max_new_tokens, fed, protection, prefill_only) -> list[int]:
    """Slots per layer of a compressing strategy: --max_cache_length (parse_budget) of the prompt
    (budget_plan), one budget B shaped over layers by cfg.budget_pattern, each layer checked against its
    floor (sinks + recent window + 1; a prefill-only strategy's B must also hold a fed question), plus
    the slots budget_plan adds. Patterns, each with mean B:
      uniform: B in every layer;
      pyramid: PyramidKV's arithmetic progression (pyramid_budgets, beta 20) over the slots above the
               floor: most slots in layer 0, fewest in the last;
      funnel:  the same, reversed: fewest in layer 0 (more compression at lower layers, as cold-compress)."""
    base, extra = budget_plan(cfg, max_seq_length, max_new_tokens, fed, prefill_only)
    budgets = parse_budget(cfg.max_cache_length, n_layer, base, cap=max_seq_length)  # tokens: one shape per budget
    sinks, window = protection
    held = fed if prefill_only and cfg.protocol == "stream" else 0  # the fed question sits in the budget

    def floor(b):
        return (sinks + recent_slots(window, b) + 1 if sinks or window else 1) + held  # window: of the budget
    if cfg.budget_pattern not in ("uniform", "pyramid", "funnel"):
        raise ValueError(f"unknown --budget_pattern {cfg.budget_pattern!r}; known: uniform, pyramid, funnel")
    if cfg.budget_pattern != "uniform":
        if len(set(budgets)) > 1:
            raise ValueError("--budget_pattern shapes one --max_cache_length value; got one per layer")
        budgets = pyramid_budgets(budgets[0], n_layer, base, floor(budgets[0]) - 1)
        budgets = budgets if cfg.budget_pattern == "pyramid" else budgets[::-1]
    for b in budgets:
        if b < floor(b):
            raise ValueError(f"budget of {b} slots is too small for {cfg.strategy}: it needs at least {floor(b)} "
                             f"(sinks + recent window + 1{' + the fed question' if held else ''})")
    return [b + extra for b in budgets]


def pyramid_budgets(budget, n_layer, cap, reserve=0, beta=20.0) -> list[int]:
    """PyramidKV's per-layer budgets: `reserve` + an arithmetic progression from hi (layer 0) down to
    lo (last layer), lo = (budget - reserve) / beta, hi = 2 (budget - reserve) - lo; hi clipped to
    cap - reserve (lo recomputed). In floats, rounded by largest remainder so the mean is exactly
    `budget` (the official code floors each term, so its mean overshoots: 133.5 at 128, 32 layers)."""
    b = budget - reserve
    if n_layer == 1 or cap <= budget:
        return [budget] * n_layer
    lo = b / beta
    hi = 2 * b - lo
    if hi > cap - reserve:
        hi = cap - reserve
        lo = 2 * b - hi
    exact = [reserve + hi - i * (hi - lo) / (n_layer - 1) for i in range(n_layer)]
    out = [math.floor(x) for x in exact]
    for i in sorted(range(n_layer), key=lambda i: out[i] - exact[i])[:budget * n_layer - sum(out)]:
        out[i] += 1  # largest fractional parts first
    return out


ALLOC_STEP = 1024
APPEND_STEP = 256


def make_caches(args, cfg: CacheConfig, batch, max_seq_length, max_new_tokens, device, dtype,
                lengths=None, fed=0) -> list[KVCache]:
    """One cache per layer for model args `args`, sized by the strategy's budget (budget_plan: of the
    max_seq_length tokens, the last max_new_tokens come after the prefill, `fed` of them prompt).
    `lengths` (each sequence's max_seq_length) gives a compressing strategy each sequence's own budget:
    the buffers hold the longest's, `limit` each one's share of its own length. Sliding-window layers get
    a WindowCache (a ring of the window's slots) whatever the strategy; the strategy, its budgets and
    their per-layer shapes (--budget_pattern, PyramidKV, head budgets) apply to the other layers only."""
    if cfg.strategy not in REGISTRY:
        raise ValueError(f"unknown cache strategy {cfg.strategy!r}; known: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[cfg.strategy]
    if cfg.prompt_compression != "own" and cfg.prompt_compression not in REGISTRY:
        raise ValueError(f"unknown --prompt_compression {cfg.prompt_compression!r}; "
                         f"known: own, {', '.join(sorted(REGISTRY))}")
    managed = managed_layers(args)
    slots = cls.layer_slots(cfg, len(managed), max_seq_length, max_new_tokens, fed) if managed else []
    # a cache that holds the whole sequence is allocated in steps of ALLOC_STEP slots, so that prompts of
    # many lengths share a few static shapes (a compiled decode step recompiles once per shape, not per length)
    whole = min(-(-max_seq_length // ALLOC_STEP) * ALLOC_STEP, max(args.block_size, max_seq_length))
    slots = [whole if s == max_seq_length and not (cls.evicts or cls.prefill_only) else s for s in slots]
    exact, compresses = slots, cls.evicts or cls.prefill_only
    if cfg.protocol == "context" and compresses:  # the appended question and answer vary by sample: round
        # them up in APPEND_STEP slots (`limit` keeps each row to its exact budget), so a compiled step
        # meets a few shapes, not one per question length
        slots = [s - max_new_tokens + -(-max_new_tokens // APPEND_STEP) * APPEND_STEP for s in slots]
    G, H, D, L = args.n_head // args.n_local_heads, args.n_local_heads // SHARD[1], args.head_dim, args.n_layer
    caches, budgets = [], iter(zip(slots, exact))
    for i in range(L):
        if i in managed:
            s, e = next(budgets)
            c = cls(batch, H, s, D, G, dtype, i, L, cfg, max_new_tokens, peers=managed)
            c.limit.fill_(e)
        else:  # the window's slots (the whole sequence's, if shorter: ALLOC_STEP-rounded as above)
            c = WindowCache(batch, H, min(args.sliding_window, whole), D, G, dtype, i, L, cfg)
        caches.append(c.to(device))
    if lengths is not None and compresses and managed:
        for b, n in enumerate(lengths):
            for i, own in zip(managed, sequence_slots(cls, cfg, len(managed), n, max_new_tokens, fed)):
                caches[i].limit[b] = min(own, caches[i].n_slots)
    return caches


def managed_layers(args) -> list[int]:
    """The layers a strategy manages: all but the sliding-window ones (a ring each, WindowCache)."""
    local = set(args.local_layers) if args.sliding_window else set()
    return [i for i in range(args.n_layer) if i not in local]


def sequence_slots(cls, cfg: CacheConfig, n_layer, length, max_new_tokens, fed=0) -> list[int]:
    """One sequence's own slots per layer; a sequence too short for the budget's floor (sinks + recent
    window + 1) keeps every token."""
    try:
        return cls.layer_slots(cfg, n_layer, length, max_new_tokens, fed)
    except ValueError:
        return [length] * n_layer


def cache_bytes(caches) -> int:
    """Bytes every cache buffer really holds: K, V, positions and each strategy's auxiliary state."""
    return sum(b.numel() * b.element_size() for c in caches for b in c.buffers())


@torch.no_grad()
def read_bytes(caches, input_pos) -> tuple[int, int]:
    """(bytes one decode step at input_pos [B] reads from the caches, bytes of K/V they hold): the K/V
    rows attended (a retrieval strategy's selection, whose size does not depend on the query's values)
    plus the index scanned, against every filled slot's K/V."""
    read = held = 0
    for c in caches:
        row = c.store.row_bytes()  # K and V of one (KV head, token): codes and scales if quantized
        read += round(c.rows_read(input_pos) * row) + c.index_bytes() + c.store.residual_bytes()
        held += round(int(c.rows_held().sum()) * row)
    return read, held


def compression_ratio(caches, tokens_seen: torch.Tensor, per_row=False):
    """1 - slots used / tokens seen, measured over the strategy's layers, heads and sequences (tokens_seen
    [B]; per_row: a list, one per sequence). A sliding-window layer's ring is the model's own attention
    span, not the strategy's doing: cache_bytes and read_bytes count it, this ratio does not (0 when every
    layer is a ring)."""
    caches = [c for c in caches if not isinstance(c, WindowCache)]
    if not caches:
        return [0.0] * len(tokens_seen) if per_row else 0.0
    used = sum(c.rows_held().float() for c in caches)  # [B]
    if SHARD[1] > 1:  # tensor parallel: every rank's heads
        from tp import all_reduce
        used = all_reduce(used)
    seen = tokens_seen.float() * caches[0].n_kv * SHARD[1] * len(caches)
    return (1 - used / seen).tolist() if per_row else float(1 - (used / seen).mean())


# ---- retrieval strategies ----
# Every token stays cached (S = the whole sequence, slot = position); each decode step reads only the
# slots `select` returns: (idx [B, H_kv, K], ok [B, H_kv, K]) with K static, so the step compiles once.
# CPU: a masked SDPA over the cache. CUDA: triton_kernels.gather_attend reads only those K rows of K and V.
# Selection is per KV head (the group's query scores are combined): one index list per KV head is what
# a gather kernel reads, and measured recall says it costs little (README, "Retrieval quality").

def popcount64(x):
    """Set bits of each int64, exactly, with static-shape ops (torch has no popcount). SWAR on the low
    63 bits (kept non-negative so no step overflows or depends on arithmetic shifts) + the sign bit."""
    y = x & 0x7FFFFFFFFFFFFFFF
    y = y - ((y >> 1) & 0x5555555555555555)
    y = (y & 0x3333333333333333) + ((y >> 2) & 0x3333333333333333)
    y = (y + (y >> 4)) & 0x0F0F0F0F0F0F0F0F
    y = y + (y >> 8)
    y = y + (y >> 16)
    y = y + (y >> 32)
    return (y & 0x7F) + (x < 0).long()


BIT_WEIGHTS = [1 << i for i in range(63)] + [-(1 << 63)]  # bit 63 is the int64 sign bit


def pack_bits(bits):
    """bits [..., d] bool -> [..., ceil(d / 64)] int64, bit i of word w = bits[64 w + i]."""
    d = bits.shape[-1]
    W = -(-d // 64)
    bits = F.pad(bits.long(), (0, W * 64 - d)).view(*bits.shape[:-1], W, 64)
    return (bits * torch.tensor(BIT_WEIGHTS, device=bits.device)).sum(-1)  # no partial sum overflows


def hamming_sim(q_codes, k_codes, d):
    """Code similarity d - 2 * Hamming = code(q) . code(k) in ±1 form. q_codes [..., G, W] and k_codes
    [..., Gh, S, W] (Gh = 1: one code per key, or G: one per query head) -> [..., G, S]."""
    ham = popcount64(q_codes[..., :, None, :] ^ k_codes).sum(-1)
    return d - 2 * ham


def spotlight_hash(x, w1, b1, w2, b2, lift=None):
    """Spotlight's hash before the sign: y = x + SiLU(x W1 + b1), h = y + (y W2 + b2), per head.
    x [..., Hh, N, d]; w [..., Hh, n, n], b [..., Hh, n] (leading dims: train_spotlight.py's layers).
    n = d bits, or more: lift [..., Hh, d, n] = [I | orthonormal blocks] widens x first (128 bits at
    d = 64: the untrained code is then a 128-bit orthogonal SimHash, not sign(x) twice)."""
    if lift is not None:
        x = x @ lift
    y = x + F.silu(x @ w1 + b1[..., None, :])
    return y + (y @ w2 + b2[..., None, :])


def topk_select(scores, forced, filled, k, K):
    """Read the `forced` slots plus the k [B] best-scored others, as K static indices per (B, H_kv):
    (idx [B, H, K], ok [B, H, K]). Forced slots rank first (+inf); empty ones never count."""
    scores = scores.float().masked_fill(forced, math.inf).masked_fill(~filled, -math.inf)
    vals, idx = scores.topk(K, dim=-1)
    n = (forced & filled).sum(-1, keepdim=True) + k[:, None, None]
    ok = (torch.arange(K, device=idx.device) < n) & (vals > -math.inf)
    return idx, ok


def count_select(score, forced, filled, k, K, vmax):
    """topk_select for integer scores in [0, vmax] (Hamming similarities), without a sort: a histogram of
    the scores gives the n-th best value t; every slot above t is read, and of the ties at t the latest
    ones (recent keys draw more attention: held-out recall 0.400 vs 0.382 when ties go to the earliest,
    README). A scatter-add and one scan instead of torch.topk's radix select and sort."""
    B, H, S = score.shape
    key = (score.long() + 1).masked_fill(forced, vmax + 2).masked_fill(~filled, 0)  # 0: never read
    hist = torch.zeros(B, H, vmax + 3, dtype=torch.long, device=score.device)
    hist.scatter_add_(-1, key, torch.ones_like(key))
    at_least = hist.flip(-1).cumsum(-1).flip(-1)  # [v] = slots with key >= v
    n = (forced & filled).sum(-1, keepdim=True) + k[:, None, None]
    t = ((at_least >= n).sum(-1, keepdim=True) - 1).clamp(min=1)  # the n-th best key (1 if fewer filled)
    above, tie = key > t, key == t
    skip = (tie.sum(-1, keepdim=True) - (n - above.sum(-1, keepdim=True))).clamp(min=0)  # earliest ties left out
    ranks = cumsum_blocked(torch.stack([above, tie]).int())  # slots above t so far, ties at t so far
    take = above | (tie & (ranks[1] > skip))
    rank = torch.where(take, ranks[0] + (ranks[1] - skip).clamp(min=0) - 1, K)
    idx = torch.zeros(B, H, K + 1, dtype=torch.long, device=score.device)
    idx.scatter_(-1, rank.long(), torch.arange(S, device=score.device).expand(B, H, S))
    return idx[..., :K], torch.arange(K, device=score.device) < take.sum(-1, keepdim=True)


def cumsum_blocked(x, block=1024):
    """Inclusive cumsum over the last axis, as scans within blocks plus the blocks' running offsets:
    inductor turns one long scan over few rows into a split scan, which fails to compile (torch 2.11)."""
    S = x.shape[-1]
    nb = -(-S // block)
    inner = F.pad(x, (0, nb * block - S)).view(*x.shape[:-1], nb, block).cumsum(-1)
    offset = inner[..., -1].cumsum(-1) - inner[..., -1]
    return (inner + offset[..., None]).flatten(-2)[..., :S]


def hamming_select(q_codes, codes, pos, input_pos, k, K, d, sinks, recent):
    """Spotlight's selection (triton_kernels.spotlight_select on CUDA): q_codes [B, H, G, W], codes
    [B, H, Gh, S, W], pos [B, H, S]; the sinks, the recent window and the current token, plus the k [B]
    best by summed code similarity -> (idx, ok) [B, H, K]."""
    G = q_codes.shape[2]
    score = (hamming_sim(q_codes, codes, d).sum(2) + G * d) // 2  # 0..G d
    now = input_pos[:, None, None]
    forced = (pos < sinks) | (pos > now - recent) | (pos == now)
    return count_select(score, forced, pos >= 0, k, K, G * d)


@lru_cache(maxsize=4)
def load_hash_weights(path: str, mtime_ns: int) -> dict:
    from safetensors.torch import load_file
    return load_file(path)


@register
class Spotlight(KVCache):
    """Spotlight Attention, Li et al. 2025 (arXiv 2508.19740; wenhaoli-xmu/spotlight): a learned
    non-linear hash per layer and KV head, code = sign(h(x)) on post-RoPE q and k (d bits, or the
    hash's width: 128 from `train_spotlight.py --bits 128` at d = 64; packed in int64 words).
    Key codes are computed once, when a key enters the cache. Each step attends to the top
    k = max(min(N, 20), N - floor(rho N)) keys by bits - 2 Hamming (summed over the query group), plus
    `spotlight_sinks` first and `spotlight_recent` last tokens and the current one; prefill and
    `spotlight_dense_layers` are dense. Departures: one hash per KV head shared by its query heads
    (the authors hash per query head; the choice was measured, see README) and selection per KV head.
    Hashes come from `python train_spotlight.py` (<checkpoint>/spotlight.safetensors). Tensor parallel
    (tp.py): each rank loads its heads' hashes (lsh_retrieval: draws every head's R, keeps its own) and
    selects for its heads alone: no communication."""
    name = "spotlight"
    source = "arXiv 2508.19740"
    retrieves = True
    hash_kind = "mlp"  # spotlight_linear: sign(x) (untrained); lsh_retrieval: sign(xR), R ~ N(0, 1)
    defaults = {"spotlight_prune": 0.9, "spotlight_sinks": 4, "spotlight_recent": 64,
                "spotlight_dense_layers": [0, 1], "spotlight_hashes": ""}  # "" = <checkpoint>/spotlight.safetensors

    def __init__(self, batch, n_kv, n_slots, head_dim, *args, **kwargs):
        super().__init__(batch, n_kv, n_slots, head_dim, *args, **kwargs)
        self.dense = self.layer in self.p["spotlight_dense_layers"]
        self.d = head_dim  # code bits: head_dim, or a trained hash's width (128 at d = 64: two words a key)
        gh = 1
        self.register_buffer("lift", None)
        if self.hash_kind == "mlp" and not self.dense:
            w = self.trained_weights(n_kv, head_dim)
            gh = w[0].shape[0] // n_kv  # 1: per-KV-head hash; n_group: the authors' per-query-head hash
            for n, t in zip(("w1", "b1", "w2", "b2", "lift"), w):
                self.register_buffer(n, None if t is None else t.float())
            self.d = w[0].shape[-1]
        elif self.hash_kind == "simhash":
            g = torch.Generator().manual_seed(1000 + self.layer)  # every head's R drawn, this rank's kept (tp.py)
            R = torch.randn(n_kv * self.world, head_dim, head_dim, generator=g)[self.head0:self.head0 + n_kv]
            self.register_buffer("R", R.clone())
        self.gh = gh
        self.register_buffer("codes", torch.zeros(batch, n_kv, gh, 0 if self.dense else n_slots, -(-self.d // 64),
                                                  dtype=torch.long))

    def trained_weights(self, n_kv, d):
        path = Path(self.p["spotlight_hashes"] or Path(self.cfg.checkpoint_dir or ".") / "spotlight.safetensors")
        if not path.exists():
            raise FileNotFoundError(f"spotlight needs trained hashes at {path}; train them with: "
                                    f"python train_spotlight.py --checkpoint_path {self.cfg.checkpoint_dir}")
        w = load_hash_weights(str(path), path.stat().st_mtime_ns)
        names = [f"layers.{self.layer}.{n}" for n in ("w1", "b1", "w2", "b2", "lift")]
        n = w[names[0]].shape[-1] if names[0] in w else 0  # code bits
        lift_ok = w[names[4]].shape[1:] == (d, n) if names[4] in w else n == d
        if any(x not in w for x in names[:4]) or w[names[0]].shape[1:] != (n, n) or not lift_ok \
                or w[names[0]].shape[0] % (n_kv * self.world):
            raise ValueError(f"{path} has no hash of head_dim {d} for layer {self.layer}; retrain with: "
                             f"python train_spotlight.py --checkpoint_path {self.cfg.checkpoint_dir}")
        gh = w[names[0]].shape[0] // (n_kv * self.world)  # hashes per KV head; tensor parallel: this rank's heads
        return [w[x][self.head0 * gh:(self.head0 + n_kv) * gh] if x in w else None for x in names]

    def hash(self, x):
        """x [B, Hh, N, d] -> the real-valued code before the sign (fp32)."""
        x = x.float()
        if self.hash_kind == "mlp":
            return spotlight_hash(x, self.w1, self.b1, self.w2, self.b2, self.lift)
        return x @ self.R if self.hash_kind == "simhash" else x

    def codes_of(self, x, x2=None):
        """x [B, Hh, N, d] (then x2 [B, Hh, N2, d]) -> the packed sign codes of its hash [B, Hh, N (+ N2), W]. A
        decode step's few rows on CUDA: triton_kernels.hash_codes, one launch, with HASH_KERNEL (BENCHMARKS.md)."""
        rows = x.shape[2] + (0 if x2 is None else x2.shape[2])
        if x.is_cuda and HASH_KERNEL and rows <= 16:
            from triton_kernels import hash_codes, hash_codes_fit  # Triton: imported only on CUDA
            if hash_codes_fit(x.shape[-1], self.d):
                if self.hash_kind == "mlp":
                    return hash_codes(x, x2, self.lift, self.w1, self.b1, self.w2, self.b2)
                return hash_codes(x, x2, self.R if self.hash_kind == "simhash" else None, None, None, None, None)
        codes = pack_bits(self.hash(x) > 0)  # x2 hashed apart, so the torch path's sums are as they were
        return codes if x2 is None else torch.cat([codes, pack_bits(self.hash(x2) > 0)], 2)

    def key_rows(self, k):
        """k [B, H_kv, T, d] -> the rows of each hash head [B, H_kv Gh, T, d]."""
        return k.repeat_interleave(self.gh, dim=1) if self.gh > 1 else k

    def query_rows(self, qg):
        """qg [B, H_kv, G, d] -> the rows of each hash head [B, H_kv Gh, G / Gh, d]."""
        B, H, G, d = qg.shape
        return qg.reshape(B, H * self.gh, G // self.gh, d)

    def key_codes(self, k):
        """k [B, H_kv, T, d] -> [B, H_kv, Gh, T, W]."""
        B, H, T, d = k.shape
        return self.codes_of(self.key_rows(k)).view(B, H, self.gh, T, -1)

    def query_codes(self, qg):
        """qg [B, H_kv, G, d] -> [B, H_kv, G, W]."""
        B, H, G, d = qg.shape
        return self.codes_of(self.query_rows(qg)).view(B, H, G, -1)

    def on_prefill(self, q, k, v, pos, keep):
        if not self.dense:
            c = self.key_codes(k)
            idx = keep[:, :, None, :, None].expand(-1, -1, self.gh, -1, c.shape[-1])
            self.codes[:, :, :, :keep.shape[-1]] = c.gather(3, idx)

    def index_bytes(self):
        return self.codes.numel() * self.codes.element_size()  # every slot's code is scored

    def on_write(self, slot, q, k_new, v_new, input_pos):
        """The new key's codes into its slot; returns the query's, hashed with them in one launch (select's
        q_index): a hash_codes launch a layer fewer, 8.3 us each at batch 1 and at batch 8 on the H200."""
        if self.dense:
            return None
        B, H, G, _ = q.shape
        c = self.codes_of(self.query_rows(q), self.key_rows(k_new))  # [B, H_kv Gh, G / Gh + 1, W]: query, then key
        b, h = grid(slot)  # an index_put_: a scatter_ here copied the whole code buffer every step
        self.codes[b, h, :, slot] = c[:, :, -1].view(B, H, self.gh, -1)  # [B, H_kv, Gh, W]
        return c[:, :, :-1].reshape(B, H, G, -1)

    def n_select(self, n):
        """How many keys the hash picks among n cached ones (n an int or a [B] tensor)."""
        rho = self.p["spotlight_prune"]
        if isinstance(n, int):
            return max(min(n, 20), n - math.floor(rho * n))
        return torch.maximum(n.clamp(max=20), n - (n.double() * rho).floor().long())

    def select(self, qg, input_pos, q_index=None):
        if self.dense:
            return None
        S, sinks, recent = self.n_slots, self.p["spotlight_sinks"], self.p["spotlight_recent"]
        q = self.query_codes(qg) if q_index is None else q_index
        K, k = min(S, self.n_select(S) + sinks + recent + 1), self.n_select(input_pos + 1)
        if qg.is_cuda and self.gh == 1:  # the same selection in Triton (per-query-head codes: torch path)
            from triton_kernels import spotlight_select
            return spotlight_select(q, self.codes[:, :, 0], self.pos, input_pos, k, K, self.d, sinks, recent,
                                    self.slot_is_position)
        return hamming_select(q, self.codes, self.pos, input_pos, k, K, self.d, sinks, recent)


@register
class SpotlightLinear(Spotlight):
    """Spotlight's retrieval with its hash untrained (h = identity at the near-zero init): code = sign(x),
    the d post-RoPE coordinates' signs. Training-free; the baseline trained Spotlight must beat."""
    name = "spotlight_linear"
    source = "Spotlight's untrained baseline"
    hash_kind = "sign"


@register
class LSHRetrieval(Spotlight):
    """SimHash top-k, the random linear hashing Spotlight compares against: code = sign(x R),
    R ~ N(0, 1)^{d x d} per layer and KV head (seeded by layer), top-k exactly as Spotlight."""
    name = "lsh_retrieval"
    source = "SimHash, Spotlight's baseline"
    hash_kind = "simhash"


@register
class Quest(KVCache):
    """Quest, Tang et al. 2024 (arXiv 2406.10774): pages of `quest_page_size` tokens keep the
    element-wise min m and max M of their keys (updated as tokens are written); a page's score for q
    is sum_d max(q_d M_d, q_d m_d) = relu(q).M + min(q, 0).m, an upper bound of q.k on the page. Each
    step reads the best pages within `quest_budget` tokens (a fraction of those seen, or a count),
    the current page always, ties to the later page; `quest_dense_layers` dense. GQA (Quest was MHA): the
    group's scores are combined by `quest_group` (mean, or max: mean recalled as well or better, README),
    selection per KV head. CUDA: triton_kernels.quest_select (2 launches); CPU: page_scores + pick."""
    name = "quest"
    source = "arXiv 2406.10774"
    retrieves = True
    defaults = {"quest_page_size": 16, "quest_budget": 0.1, "quest_dense_layers": [0, 1], "quest_group": "mean"}

    def __init__(self, batch, n_kv, n_slots, head_dim, *args, **kwargs):
        super().__init__(batch, n_kv, n_slots, head_dim, *args, **kwargs)
        self.dense = self.layer in self.p["quest_dense_layers"]
        self.ps = int(self.p["quest_page_size"])
        P = 0 if self.dense else -(-n_slots // self.ps)
        self.register_buffer("kmax", torch.zeros(batch, n_kv, P, head_dim, dtype=self.dtype))
        self.register_buffer("kmin", torch.zeros(batch, n_kv, P, head_dim, dtype=self.dtype))

    def on_prefill(self, q, k, v, pos, keep):
        if self.dense:
            return
        B, H, S, D = self.k.shape
        P = self.kmax.shape[2]
        filled = F.pad(self.pos >= 0, (0, P * self.ps - S)).view(B, H, P, self.ps, 1)
        keys = F.pad(self.k, (0, 0, 0, P * self.ps - S)).view(B, H, P, self.ps, D)
        any_ = filled.any(3)
        self.kmax.copy_(keys.masked_fill(~filled, -math.inf).amax(3).where(any_, 0))
        self.kmin.copy_(keys.masked_fill(~filled, math.inf).amin(3).where(any_, 0))

    def index_bytes(self):
        return 2 * self.kmax.numel() * self.kmax.element_size()  # every page's bounds are scored

    def on_write(self, slot, q, k_new, v_new, input_pos):
        if self.dense:
            return
        (b, h), page, new = grid(slot), (input_pos // self.ps)[:, None], k_new[:, :, 0]  # index_put_, see grid
        first = (input_pos % self.ps == 0)[:, None, None]  # a fresh page starts from this key
        for buf, op in ((self.kmax, torch.maximum), (self.kmin, torch.minimum)):
            buf[b, h, page] = torch.where(first, new, op(buf[b, h, page], new))

    def page_scores(self, qg):
        """qg [B, H_kv, G, D] -> [B, H_kv, P]: the group's upper bounds of q.k, combined."""
        q = qg.float()
        s = q.clamp(min=0) @ self.kmax.float().transpose(-1, -2) + q.clamp(max=0) @ self.kmin.float().transpose(-1, -2)
        return s.amax(2) if self.p["quest_group"] == "max" else s.mean(2)

    def n_pages(self, n):
        """Pages read with n tokens cached (n an int or a [B] tensor), the current one included."""
        b = self.p["quest_budget"]
        if isinstance(n, int):
            return max(1, math.ceil((b * n if b <= 1 else min(n, b)) / self.ps))
        tokens = (n.double() * b).ceil() if b <= 1 else n.clamp(max=int(b)).double()
        return (tokens / self.ps).ceil().long().clamp(min=1)

    def select(self, qg, input_pos, q_index=None):
        if self.dense:
            return None
        P, ps, S = self.kmax.shape[2], self.ps, self.n_slots
        n_sel, K = self.n_pages(input_pos + 1) - 1, min(P, self.n_pages(S))
        if qg.is_cuda:
            from triton_kernels import quest_select  # Triton: imported only on CUDA
            return quest_select(qg, self.kmax, self.kmin, input_pos, n_sel, K, ps, S, self.p["quest_group"] == "max")
        return self.pick(self.page_scores(qg), input_pos, n_sel, K, ps, S)

    @staticmethod
    def pick(scores, input_pos, n_sel, K, ps, S):
        """scores [B, H, P] -> (idx, ok) [B, H, K ps]: the tokens of the current page and of the n_sel [B]
        best earlier ones, pages in page order, ok = token filled; unused entries idx 0, ok False. Ties go
        to the later page, as in triton_kernels.quest_pick, so CPU and GPU read the same pages."""
        B, H, P = scores.shape
        page = torch.arange(P, device=scores.device)
        cur = (input_pos // ps)[:, None, None]
        s = scores.float().masked_fill(page >= cur, -math.inf).flip(-1)  # reversed: of tied pages,
        order = s.sort(dim=-1, descending=True, stable=True).indices      # the stable sort ranks the later first
        rank = torch.empty_like(order).scatter_(-1, order, page.expand(B, H, P)).flip(-1)  # each page's place
        take = ((page < cur) & (rank < n_sel[:, None, None])) | (page == cur)
        pidx = torch.where(take, page, P).sort(dim=-1).values[..., :K, None]  # page order; P: unused (K <= P)
        tok = pidx * ps + torch.arange(ps, device=scores.device)
        ok = (pidx < P) & (tok <= input_pos[:, None, None, None])
        return torch.where(pidx < P, tok.clamp(max=S - 1), 0).flatten(-2), ok.flatten(-2)
