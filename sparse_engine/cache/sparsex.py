"""`sparsex`: segment-level, non-prefix KV reuse with Sparse-Q selective recomputation.

Prefix caching only helps requests that share a prefix; RAG, multi-turn and agent prompts repeat
SEGMENTS (documents, turns, tool outputs) at other positions and after other context. SparseX keeps
the KV of each segment in a `SegmentStore` (keyed by a hash of its token ids, LRU under a byte
budget, slots shared through the pool's reference counts) and, when a request's segments hit the
store, prefills it in ONE forward in which most reused tokens are not computed at all:

- Segments come from the caller (`LLM.generate(prompts, segments=[[doc1, doc2], ...])`: pieces placed
  before each prompt) or, for requests without them, from `separator_token_id` (a segment ends after
  each separator). Tokens after the last segment (the question) are always new.
- A hit segment preceded by exactly the same tokens as where it was stored, whose KV was exact there,
  is ordinary prefix caching: its slots are shared as they are, and its rows are dropped before
  layer 0 (never computed).
- Every other hit is "reused": its K is re-aligned to the new positions by RoPE re-rotation
  (`segment_store.rerotate`) and, with V, copied into the sequence's slots. Layers below
  `full_recompute_layers` recompute all non-exact tokens (full attention) to stabilise the signal;
  at the last of them, Sparse-Q scores reused tokens by the attention the queries of the NEW tokens
  (missed segments and the tail) pay them (summed over heads and queries). The top
  `recompute_ratio` of reused tokens plus each reused segment's first `num_first_tokens` go on
  through the upper layers with the new tokens; the rest are dropped (`rows_for_layer`) and their
  upper-layer K/V come from the store. recompute_ratio=1 is full recomputation; recompute_ratio=0,
  num_first_tokens=0, full_recompute_layers=0 is naive reuse without correction.
- After the prefill, missed segments of at least `min_segment_tokens` tokens are added to the store
  (their slots are shared, nothing is copied). Decode is vanilla (every token kept).

The engine prefills a prompt with hits in one step (`whole_prefill`); a prompt longer than
`max_num_batched_tokens` is chunked and then simply recomputed (no reuse). The store lives in the
KV pool: size `kv_cache_bytes` for running sequences plus `store_bytes`; when the pool runs short,
least-recently-used entries are evicted before the scheduler would preempt (`slots_needed`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..layers.attention_ops import attention_probs, gather_kv
from ..models.spec import ModelSpec
from .base import CacheMethod, MethodConfig
from .segment_store import SegmentStore, prefix_keys, rerotate, token_key


@dataclass
class SparseXConfig(MethodConfig):
    """Knobs of `sparsex`.

    Attributes:
        recompute_ratio: fraction in [0, 1] of reused (non-prefix) tokens recomputed in the layers at
            and above `full_recompute_layers`: each reused segment's first tokens, then the tokens
            with the highest Sparse-Q scores up to the ratio.
        full_recompute_layers: the first layers, which recompute every non-prefix token (full
            attention); Sparse-Q selects from the last of them. Must be >= 1 when recompute_ratio > 0.
        num_first_tokens: first tokens of each reused segment always recomputed (they were computed
            after other context, often as a sequence start, and deviate most).
        separator_token_id: split prompts without caller-given segments after each such token
            (None: only caller-given segments).
        min_segment_tokens: shorter segments are neither stored nor looked up.
        store_bytes: byte budget of the segment store (LRU eviction beyond it).
        query_tokens: Sparse-Q uses the queries of the last `query_tokens` new tokens (None: all).
    """

    recompute_ratio: float = 0.15
    full_recompute_layers: int = 2
    num_first_tokens: int = 2
    separator_token_id: int | None = None
    min_segment_tokens: int = 8
    store_bytes: int = 256 << 20
    query_tokens: int | None = None

    def validate(self, spec: ModelSpec) -> None:
        if isinstance(self.recompute_ratio, bool) or not 0.0 <= float(self.recompute_ratio) <= 1.0:
            raise ValueError(f"recompute_ratio must be a fraction in [0, 1], got {self.recompute_ratio!r}")
        if not 0 <= self.full_recompute_layers <= spec.num_layers:
            raise ValueError(f"full_recompute_layers must be in [0, {spec.num_layers}] (the model's layers), "
                             f"got {self.full_recompute_layers}")
        if self.recompute_ratio > 0 and self.full_recompute_layers == 0:
            raise ValueError("recompute_ratio > 0 needs full_recompute_layers >= 1: Sparse-Q selects from the "
                             "attention of the last fully recomputed layer (use recompute_ratio=0 for naive reuse)")
        if self.num_first_tokens < 0:
            raise ValueError(f"num_first_tokens must be >= 0, got {self.num_first_tokens}")
        if self.min_segment_tokens < 1:
            raise ValueError(f"min_segment_tokens must be >= 1, got {self.min_segment_tokens}")
        if self.store_bytes <= 0:
            raise ValueError(f"store_bytes must be positive, got {self.store_bytes}")
        if self.separator_token_id is not None and not 0 <= self.separator_token_id < spec.vocab_size:
            raise ValueError(f"separator_token_id {self.separator_token_id} is outside the vocabulary")
        if self.query_tokens is not None and self.query_tokens < 1:
            raise ValueError(f"query_tokens must be >= 1 or None, got {self.query_tokens}")


class _Plan:
    """One request's reuse plan: which prompt tokens are shared exactly, reused, recomputed."""

    def __init__(self, P: int, device):
        self.P = P
        self.hits = []  # (start, end, entry, exact)
        self.exact = torch.zeros(P, dtype=torch.bool, device=device)
        self.reused = torch.zeros(P, dtype=torch.bool, device=device)  # reused, not exact: approximated
        self.first = torch.zeros(P, dtype=torch.bool, device=device)
        self.old_pos = torch.zeros(P, dtype=torch.long, device=device)
        self.compute = None  # bool [P]: rows going through the upper layers (set by Sparse-Q)
        self.pinned = None
        self.active = False

    def src_slots(self, layer: int, hkv: int) -> torch.Tensor:
        src = torch.zeros(hkv, self.P, dtype=torch.long, device=self.exact.device)
        for start, end, entry, _ in self.hits:
            src[:, start:end] = entry.slots[layer]
        return src


class SparseXCache(CacheMethod):
    name = "sparsex"
    Config = SparseXConfig

    def __init__(self, config, spec, pool, sliding_window=None):
        super().__init__(config, spec, pool, sliding_window)
        self.store = SegmentStore(pool, config.store_bytes, spec.num_layers, spec.num_kv_heads)
        self.totals = {"sparsex_reused_tokens": 0, "sparsex_recomputed_tokens": 0, "sparsex_prefix_tokens": 0,
                       "sparsex_new_tokens": 0}

    # ------------------------------------------------------------------ segments
    def segments(self, seq) -> list[tuple[int, int, str, str]]:
        """(start, end, key, ctx_key) of the prompt's segments (cached on the sequence)."""
        segs = getattr(seq, "sparsex_segments", None)
        if segs is not None:
            return segs
        ids = seq.prompt_token_ids
        bounds, start = [], 0
        if getattr(seq, "segments", None):
            for n in seq.segments:
                bounds.append((start, start + n))
                start += n
        elif self.config.separator_token_id is not None:
            for i, t in enumerate(ids):
                if t == self.config.separator_token_id:
                    bounds.append((start, i + 1))
                    start = i + 1
        bounds = [(s, e) for s, e in bounds if e - s > 0]
        ctx = prefix_keys(ids, [e for _, e in bounds])
        segs = [(s, e, token_key(ids[s:e]), c) for (s, e), c in zip(bounds, ctx)
                if e - s >= self.config.min_segment_tokens]
        seq.sparsex_segments = segs
        return segs

    def whole_prefill(self, seq) -> bool:
        return any(key in self.store for _, _, key, _ in self.segments(seq))

    # ------------------------------------------------------------------ lifecycle
    def new_sequence(self, seq) -> None:
        super().new_sequence(seq)
        seq.kv.extra["sx_stored"] = False
        if seq.num_computed != 0:
            return
        P = seq.num_prompt_tokens
        plan = _Plan(P, self.pool.device)
        for start, end, key, ctx_key in self.segments(seq):
            entry = self.store.get(key)
            if entry is None:
                continue
            exact = entry.exact and entry.ctx_key == ctx_key and entry.start == start
            plan.hits.append((start, end, entry, exact))
            if exact:
                plan.exact[start:end] = True
            else:
                plan.reused[start:end] = True
                plan.first[start : start + self.config.num_first_tokens] = True
                plan.old_pos[start:end] = torch.arange(entry.start, entry.start + end - start, device=self.pool.device)
        plan.exact[P - 1] = plan.reused[P - 1] = False  # the prompt's last token is always computed (logits)
        if plan.hits:
            plan.pinned = torch.cat([e.all_slots() for _, _, e, _ in plan.hits])
            self.pool.incref(plan.pinned)  # eviction while this request waits must not free them
            seq.kv.extra["sx"] = plan

    def _unpin(self, seq) -> None:
        plan = seq.kv.extra.pop("sx", None) if getattr(seq, "kv", None) is not None else None
        if plan is not None and plan.pinned is not None:
            self.pool.free(plan.pinned)
            plan.pinned = None

    def release(self, seq) -> None:
        self._unpin(seq)
        super().release(seq)

    def slots_needed(self, seq, num_new_tokens: int) -> int:
        need = super().slots_needed(seq, num_new_tokens)
        if seq is not None and self.pool.num_free < need:
            self.store.make_room(need)  # the store gives way before the scheduler preempts anyone
        return need

    # ------------------------------------------------------------------ forward
    def _mask(self, plan: _Plan, layer: int) -> torch.Tensor:
        """Rows that layer `layer` computes."""
        if layer < self.config.full_recompute_layers or plan.compute is None:
            if layer >= self.config.full_recompute_layers:  # no Sparse-Q signal (F = 0): static choice
                plan.compute = ~plan.exact & (~plan.reused | plan.first)
                return plan.compute
            return ~plan.exact
        return plan.compute

    def rows_for_layer(self, ctx, layer: int):
        F = self.config.full_recompute_layers
        if (layer != 0 and layer != F) or not any("sx" in s.seq.kv.extra for s in ctx.slices):
            return None  # decode steps and requests without hits: nothing to drop
        parts, changed = [], False
        for s in ctx.slices:
            plan = s.seq.kv.extra.get("sx")
            if plan is not None and layer == 0:
                plan.active = s.seq.num_computed == 0 and s.n == plan.P
                if not plan.active:  # chunked prefill: no reuse for this request
                    self._unpin(s.seq)
                    plan = None
            if plan is None or not plan.active:
                parts.append(torch.arange(s.start, s.end, device=ctx.positions.device))
                continue
            rows = self._mask(plan, layer)[ctx.positions[s.start : s.end]].nonzero().squeeze(1)
            changed |= len(rows) != s.n
            parts.append(rows + s.start)
        return torch.cat(parts) if changed else None

    def batched(self, plan) -> bool:
        return plan.all_decode and super().batched(plan)  # decode is the base method's; prefill reuse is per sequence

    def _plan(self, seq):
        plan = seq.kv.extra.get("sx")
        return plan if plan is not None and plan.active else None

    def write(self, seq, layer, k, v, positions, k_pre=None) -> None:
        plan = self._plan(seq)
        if plan is None:
            return super().write(seq, layer, k, v, positions, k_pre)
        pool, (_, hkv, d), P = self.pool, k.shape, plan.P
        src = plan.src_slots(layer, hkv)
        cols = torch.empty(hkv, P, dtype=torch.long, device=pool.device)
        exact_idx = plan.exact.nonzero().squeeze(1)
        if len(exact_idx):  # prefix caching: share the stored slots as they are
            cols[:, exact_idx] = src[:, exact_idx]
            pool.incref(src[:, exact_idx])
        rest = (~plan.exact).nonzero().squeeze(1)
        cols[:, rest] = pool.allocate(hkv * len(rest)).view(hkv, -1)
        pos = positions.to(pool.device)
        pool.write(cols[:, pos].reshape(-1), k.transpose(0, 1).reshape(-1, d), v.transpose(0, 1).reshape(-1, d),
                   pos.repeat(hkv))
        cached = plan.reused.clone()
        cached[pos] = False
        cidx = cached.nonzero().squeeze(1)
        if len(cidx):  # reused, not recomputed here: stored K re-rotated to the new positions, stored V
            s = src[:, cidx]
            kk = rerotate(pool.k[s].transpose(0, 1).float(), plan.old_pos[cidx], cidx, self.spec.inv_freq)
            pool.write(cols[:, cidx].reshape(-1), kk.transpose(0, 1).reshape(-1, d), pool.v[s].reshape(-1, d),
                       cidx.repeat(hkv))
        seq.kv.tables[layer].append(cols)

    def observe(self, seq, layer, q, q_pos, view) -> None:
        super().observe(seq, layer, q, q_pos, view)  # a composed method's own scoring (sparsex_over)
        plan = self._plan(seq)
        if plan is None or layer != self.config.full_recompute_layers - 1 or plan.compute is not None:
            return
        plan.compute = ~plan.exact & (~plan.reused | plan.first)
        cand = plan.reused & ~plan.first
        n_cand = int(cand.sum())
        n_reused = int(plan.reused.sum())  # the ratio counts the segments' first tokens too
        k_top = min(n_cand, math.ceil(self.config.recompute_ratio * n_reused - 1e-9) - (n_reused - n_cand))
        if k_top <= 0:
            return
        if k_top >= n_cand:
            plan.compute |= cand
            return
        qp = q_pos.to(plan.exact.device)
        is_new = ~(plan.reused | plan.exact)[qp]
        qi = is_new.nonzero().squeeze(1)
        if self.config.query_tokens is not None:
            qi = qi[-self.config.query_tokens:]
        k, _, kpos = gather_kv(self.pool, view.slots)
        valid = view.valid.to(kpos.device)
        score = torch.zeros(k.shape[1], dtype=torch.float32, device=k.device)
        for b in range(0, len(qi), 256):  # bounded memory: [Hq, 256, T] at a time
            rows = qi[b : b + 256].to(q.device)
            score += attention_probs(q[rows], q_pos[rows], k, kpos, valid, self.scale).sum(dim=(0, 1))
        tok = torch.full((plan.P,), float("-inf"), device=k.device)
        tok[kpos[0]] = score  # columns -> token positions (every head holds the same positions)
        tok = tok.to(cand.device).masked_fill(~cand, float("-inf"))
        plan.compute[tok.topk(k_top).indices] = True

    # ------------------------------------------------------------------ per step
    def after_step(self, seq, prefill_done: bool, num_new_tokens: int) -> None:
        state = seq.kv.extra  # SparseX wraps other methods: its data stays out of their typed state
        if prefill_done and not state.get("sx_stored"):
            state["sx_stored"] = True
            plan = self._plan(seq)
            self._store_segments(seq, plan)
            if plan is not None:
                t, comp = self.totals, plan.compute if plan.compute is not None else ~plan.exact
                t["sparsex_reused_tokens"] += int(plan.reused.sum())
                t["sparsex_recomputed_tokens"] += int((plan.reused & comp).sum())
                t["sparsex_prefix_tokens"] += int(plan.exact.sum())
                t["sparsex_new_tokens"] += int((~plan.reused & ~plan.exact).sum())
            self._unpin(seq)
        super().after_step(seq, prefill_done, num_new_tokens)

    def _store_segments(self, seq, plan) -> None:
        P = seq.num_prompt_tokens
        tables = seq.kv.tables
        if any(t.max_len() < P or not bool((t.lens == t.lens[0]).all()) for t in tables):
            return  # some layer already dropped tokens: its columns are no longer positions
        approx = None
        if plan is not None:
            comp = plan.compute if plan.compute is not None else ~plan.exact
            approx = (plan.reused & ~comp).cpu()
        hit = {e.key for _, _, e, _ in plan.hits} if plan is not None else set()
        for start, end, key, ctx_key in self.segments(seq):
            if key in hit or key in self.store:
                continue
            exact = approx is None or not bool(approx[:start].any())
            self.store.put(key, start, ctx_key, exact, [t.slots[:, start:end] for t in tables])

    def stats(self) -> dict:
        return {**super().stats(), **self.store.stats(), **self.totals}


def sparsex_over(base: type[CacheMethod]) -> type[CacheMethod]:
    """SparseX prefill reuse composed with another method's decode: `base`'s view / observe /
    eviction run as usual (SparseX's hooks call super()), knobs of both in one config.

    Works with methods that read queries by position (`omnikv`, `streaming`, `vanilla`); methods
    that index a prefill chunk's queries by row offset (`snapkv` / `adakv` / `pyramidkv` buffer
    the prompt's last queries that way) would score the wrong rows when SparseX drops rows.
    Register as `METHODS["sparsex+omnikv"] = sparsex_over(OmniKVCache)` to use it by name.
    """

    @dataclass
    class Config(SparseXConfig, base.Config):
        def validate(self, spec: ModelSpec) -> None:
            SparseXConfig.validate(self, spec)
            base.Config.validate(self, spec)

    Config.__name__ = f"SparseX{base.Config.__name__}"
    return type(f"SparseX{base.__name__}", (SparseXCache, base), {"name": f"sparsex+{base.name}", "Config": Config})
