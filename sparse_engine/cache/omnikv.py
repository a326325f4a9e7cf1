"""`omnikv`: logical masking. Every token stays in the pool; sparse layers read a top-k subset.

OmniKV (Hao et al. 2025) observes that the tokens important to one layer stay important for the
next several layers. `full_attn_layers` (must include 0) attend over everything; the last layer of
each run of consecutive full layers is an OBSERVATION layer: its attention scores of the current
queries (max over query heads, and over the queries of a prefill chunk) pick the top
`num_top_tokens` history tokens, which the sparse layers after it read, plus the `sink_size` first
and the `recent_size` most recent tokens. Selection runs at every decode step and, when
`num_top_tokens_in_prefill` is set, for every prefill chunk that has history before it.

History of a step whose queries start at position s: positions in [sink_size, s - recent_size).
Nothing is freed: KV bytes equal vanilla's; only the read view narrows (fewer bytes read per step).

Batch path: `begin_step` decides on the host which sequences of each row group select and how many
tokens each picks and keeps; an observation layer's `observe_layer` scores the whole group from the
keys attention gathered and writes a compacted column list [G, T'] (kept columns in position order);
each sparse layer's `layer_view` gathers its own table at those columns (every layer holds the same
positions in the same order). A group where nobody selects reads exactly vanilla's view.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field

import torch

from ..layers.attention_ops import gather_kv
from ..models.spec import ModelSpec
from .base import BatchView, CacheMethod, MethodConfig, View
from .scoring import (check_prefill_select, check_score_mode, group_scores, pick_top, sequence_scores, step_budget,
                      top_tokens_of)

def _check_count(name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be an int (tokens) or a float fraction of the history, got {value!r}")
    if isinstance(value, int) and value <= 0:
        raise ValueError(f"{name} must be a positive number of tokens, got {value}")
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise ValueError(f"{name} as a fraction of the history must be in (0, 1], got {value}")


@dataclass
class OmniKVConfig(MethodConfig):
    """Knobs of `omnikv`.

    Attributes:
        full_attn_layers: layers with full attention; must include 0. The last of each consecutive
            run is an observation layer for the sparse layers after it.
        num_top_tokens: history tokens sparse layers read at decode: an int, or a float in (0, 1]
            taken as a fraction of the history length.
        num_top_tokens_in_prefill: same for prefill chunks after the first; None = full attention in
            prefill.
        sink_size: first tokens every sparse layer reads.
        recent_size: most recent tokens (before the current queries) every sparse layer reads.
        score_mode: how the observation layer scores the history (`scoring.SCORE_MODES`):
            softmax_all (ours) | raw_qk (the reference engine as the paper ran it) |
            softmax_candidates (its HF path / latest engine: softmax over the history only).
        prefill_select: when prefill chunks select (`scoring.step_budget`): budget (ours: with
            `num_top_tokens_in_prefill`) | long_prompt (the paper's engine: prompts longer than
            sinks + recent + top + chunk) | never (its latest engine).
        recent_includes_current: at decode the recent window counts the current token (the
            reference: `hist_lens = context_lens - num_recent`, context including the new token;
            CURRENTF/Sparse-vLLM@0975d3f:src/sparsevllm/engine/sparse_controller.py
            `_update_dynamic_omnikv_indices`); False (ours): `recent_size` tokens before it.
    """

    full_attn_layers: list[int] = field(default_factory=lambda: [0, 1, 2, 8, 18])
    num_top_tokens: int | float = 2048
    num_top_tokens_in_prefill: int | float | None = None
    sink_size: int = 4
    recent_size: int = 32
    score_mode: str = "softmax_all"
    prefill_select: str = "budget"
    recent_includes_current: bool = False

    def validate(self, spec: ModelSpec) -> None:
        layers = list(self.full_attn_layers)
        if 0 not in layers:
            raise ValueError(f"full_attn_layers must include layer 0 (it has no earlier layer to select for it), "
                             f"got {layers}")
        bad = [l for l in layers if not isinstance(l, int) or not 0 <= l < spec.num_layers]
        if bad:
            raise ValueError(f"full_attn_layers {bad} out of range: the model has layers 0..{spec.num_layers - 1}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"full_attn_layers has duplicates: {layers}")
        _check_count("num_top_tokens", self.num_top_tokens)
        if self.num_top_tokens is None:
            raise ValueError("num_top_tokens is required (int tokens or fraction in (0, 1])")
        _check_count("num_top_tokens_in_prefill", self.num_top_tokens_in_prefill)
        if self.sink_size < 0 or self.recent_size < 0:
            raise ValueError(f"sink_size and recent_size must be >= 0, got {self.sink_size}, {self.recent_size}")
        check_score_mode("omnikv", self.score_mode)
        check_prefill_select("omnikv", self.prefill_select)
        if not isinstance(self.recent_includes_current, bool):
            raise ValueError(f"omnikv.recent_includes_current must be true or false, got {self.recent_includes_current!r}")


top_count = top_tokens_of  # (shared with deltakv)


class _Selection(MutableMapping):
    """`seq.kv.state["cols"]`: {observation layer: kept column indices (host tensor), or None when the
    sparse layers read everything}. The batch path fills it with references into the step's device
    selection, read back (one sync) only when someone looks (tests, debugging), never on the hot path."""

    def __init__(self, data: dict | None = None):
        self._data = dict(data or {})

    def __getitem__(self, layer):
        v = self._data[layer]
        if isinstance(v, tuple):  # (group selection, row): materialise once
            sel, row = v
            cols = sel.cols.get(layer)
            v = None if cols is None else cols[row, : sel.kept_host[row]].cpu()
            self._data[layer] = v
        return v

    def __setitem__(self, layer, value):
        self._data[layer] = value

    def __delitem__(self, layer):
        del self._data[layer]

    def __iter__(self):
        return iter(self._data)

    def __len__(self):
        return len(self._data)

    def __deepcopy__(self, memo):  # fork: the step's selections are read-only, share them
        return _Selection(self._data)


@dataclass
class _GroupSelection:
    """One row group's OmniKV selection for this step (host-known sizes, device tensors).

    hist_hi [G]: history is columns [sink_size, hist_hi) (hist_hi = 0: the sequence does not select);
    k [G]: tokens picked per sequence; k_max, t_kept: host bounds; lens [G, Hkv]: kept columns per
    sequence, valid [G, Hkv, t_kept] its prefix mask (built once per step for every sparse layer);
    cols: observation layer -> kept column indices [G, t_kept] (in position order)."""

    hist_hi: torch.Tensor
    k: torch.Tensor
    k_max: int
    t_kept: int
    kept_host: list
    lens: torch.Tensor
    valid: torch.Tensor
    cols: dict = field(default_factory=dict)


class OmniKVCache(CacheMethod):
    name = "omnikv"
    Config = OmniKVConfig

    def __init__(self, config, spec, pool, sliding_window=None):
        super().__init__(config, spec, pool, sliding_window)
        full = sorted(set(self.config.full_attn_layers))
        self.full = set(full)
        # sparse layer -> the observation layer that selects for it (the closest full layer below)
        self.source = {l: max(f for f in full if f < l) for l in range(spec.num_layers) if l not in self.full}
        self.observers = set(self.source.values())

    # ------------------------------------------------------------------ batch hooks
    def batched(self, plan) -> bool:
        return True

    def begin_step(self, plan) -> None:
        """Host, once per step: which sequences select (their history exceeds the budget), how many
        tokens each picks and keeps; one small copy per row group. Groups where nobody selects read
        the full tables (the very view vanilla reads)."""
        super().begin_step(plan)
        data = {}
        for g in plan.groups:
            sel, selects = self._plan_group(plan, g)
            data[id(g)] = sel
            for row, b in enumerate(g.bidx):  # what each sequence selected, for inspection (lazy)
                plan.seqs[b].kv.state["cols"] = _Selection(
                    {o: (sel, row) if selects[row] else None for o in self.observers})
        plan.method_data = data

    def _plan_group(self, plan, group):
        cfg = self.config
        lengths = group.lens_host[:, 0, 0].tolist()  # every layer and head holds every token
        hist_hi, ks, kept, selects = [], [], [], []
        for row, b in enumerate(group.bidx):
            start, length = plan.starts[b], lengths[row]
            budget, hi = self._rule(plan.seqs[b], start)
            hi = min(hi, length)  # history: columns (= positions) [sink_size, hi)
            n_hist = max(0, hi - cfg.sink_size)
            k = top_count(budget, n_hist) if budget is not None and n_hist else 0
            on = budget is not None and k < n_hist
            selects.append(on)
            hist_hi.append(hi if on else 0)
            ks.append(k if on else 0)
            kept.append(length - n_hist + k if on else length)
        if not any(selects):
            return None, selects
        dev = self.pool.device
        hist_hi_d, k_d, kept_d = torch.tensor([hist_hi, ks, kept], dtype=torch.long).to(dev)
        lens = kept_d[:, None].expand(len(kept), self.spec.num_kv_heads).contiguous()
        valid = torch.arange(max(kept), device=dev)[None, None, :] < lens[:, :, None]
        return _GroupSelection(hist_hi_d, k_d, max(ks), max(kept), kept, lens, valid), selects

    def _rule(self, seq, start: int):
        """(top-k budget or None, history end) of a sequence's step whose first query is at `start`:
        the one rule of both paths."""
        cfg = self.config
        decode = start >= seq.num_prompt_tokens
        budget = step_budget(cfg, decode, seq.num_prompt_tokens, cfg.sink_size, getattr(self, "max_chunk", None))
        hi = start - cfg.recent_size + (1 if decode and cfg.recent_includes_current else 0)
        return budget, hi

    def layer_view(self, plan, layer, group) -> BatchView:
        sel = plan.method_data.get(id(group)) if layer not in self.full and plan.method_data else None
        cols = None if sel is None else sel.cols.get(self.source[layer])
        if cols is None:
            return super().layer_view(plan, layer, group)
        # Every layer holds the same positions in the same column order: the observer's kept
        # columns index this layer's table directly.
        tab = group.table[:, layer]  # [G, Hkv, T]
        G, H, t = tab.shape[0], tab.shape[1], cols.shape[1]
        return BatchView(tab.gather(2, cols[:, None, :].expand(G, H, t)), sel.lens, valid=sel.valid)

    def observe_layer(self, plan, layer, group, q, view, kv) -> None:
        if layer not in self.observers or not plan.method_data:
            return
        sel = plan.method_data.get(id(group))
        if sel is None:
            return
        T = view.table.shape[2]
        col = torch.arange(T, device=view.table.device)
        hist = (col >= self.config.sink_size) & (col < sel.hist_hi[:, None])  # [G, T]
        score = self._scores(group, q, view, kv, hist)  # [G, T]
        G = score.shape[0]
        picked = pick_top(score, hist, sel.k, sel.k_max)
        keep = (col < view.lens[:, :1]) & (~hist | picked)  # exactly sel.kept[g] columns per row
        dest = torch.where(keep, keep.cumsum(1) - 1, sel.t_kept).clamp_(max=sel.t_kept)
        cols = torch.zeros(G, sel.t_kept + 1, dtype=torch.long, device=score.device)
        cols.scatter_(1, dest, col.expand(G, T))  # kept columns to the front, in order; rest to a dump column
        sel.cols[layer] = cols[:, : sel.t_kept]

    def _scores(self, group, q, view, kv, cand) -> torch.Tensor:
        return group_scores(self.pool, self.scale, group, q, view, kv, self.config.score_mode, cand)

    # ------------------------------------------------------------------ per-sequence hooks (legacy path:
    # SparseX prefill steps run them)
    def view(self, seq, layer, q, q_pos) -> View:
        slots, valid = seq.kv.tables[layer].padded()
        cols = seq.kv.state.get("cols", {}).get(self.source.get(layer))
        if layer in self.full or cols is None:
            return View(slots, valid)
        return View(slots[:, cols], valid[:, cols])

    def observe(self, seq, layer, q, q_pos, view) -> None:
        if layer not in self.observers:
            return
        sel = seq.kv.state.setdefault("cols", {})
        sel[layer] = None  # default: the sparse layers read everything this step
        start = seq.num_computed  # position of this step's first query (host-side: no device sync per layer)
        budget, hi = self._rule(seq, start)
        if budget is None:
            return
        cfg = self.config
        k, _, kpos = gather_kv(self.pool, view.slots)
        pos = kpos[0].cpu()  # every head of every layer holds the same positions in the same order
        history = (pos >= cfg.sink_size) & (pos < hi)
        n_hist = int(history.sum())
        k_top = top_count(budget, n_hist) if n_hist else 0
        if k_top >= n_hist:
            return  # the budget covers the whole history: nothing to mask
        score = sequence_scores(q, q_pos, k, kpos, view.valid, self.scale, cfg.score_mode, history)
        score = score.cpu().masked_fill(~history, float("-inf"))
        keep = ~history
        keep[score.topk(k_top).indices] = True
        sel[layer] = keep.nonzero().squeeze(1)
