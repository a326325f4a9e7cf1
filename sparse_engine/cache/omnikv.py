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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..layers.attention_ops import attention_probs, gather_kv
from ..models.spec import ModelSpec
from .base import CacheMethod, MethodConfig, View


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
    """

    full_attn_layers: list[int] = field(default_factory=lambda: [0, 1, 2, 8, 18])
    num_top_tokens: int | float = 2048
    num_top_tokens_in_prefill: int | float | None = None
    sink_size: int = 4
    recent_size: int = 32

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


def top_count(value: int | float, history: int) -> int:
    """Tokens to keep out of `history`: an int as is, a fraction rounded up (at least one)."""
    k = value if isinstance(value, int) else max(1, math.ceil(value * history))
    return min(k, history)


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

    def batched(self, plan) -> bool:
        return False

    def _budget(self, seq, q_pos):
        """The top-k knob for this step: decode, or a prefill chunk (None: full attention)."""
        decode = seq.num_computed >= seq.num_prompt_tokens  # host-side: no device sync per layer
        return self.config.num_top_tokens if decode else self.config.num_top_tokens_in_prefill

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
        budget = self._budget(seq, q_pos)
        if budget is None:
            return
        cfg = self.config
        k, _, kpos = gather_kv(self.pool, view.slots)
        start = seq.num_computed  # position of this step's first query
        pos = kpos[0].cpu()  # every head of every layer holds the same positions in the same order
        history = (pos >= cfg.sink_size) & (pos < start - cfg.recent_size)
        n_hist = int(history.sum())
        k_top = top_count(budget, n_hist) if n_hist else 0
        if k_top >= n_hist:
            return  # the budget covers the whole history: nothing to mask
        probs = attention_probs(q, q_pos, k, kpos, view.valid.to(kpos.device), self.scale)  # [Hq, n, T]
        score = probs.amax(dim=(0, 1)).cpu().masked_fill(~history, float("-inf"))
        keep = ~history
        keep[score.topk(k_top).indices] = True
        sel[layer] = keep.nonzero().squeeze(1)
