"""`pyramidkv`: SnapKV selection with per-layer budgets that fall linearly from bottom to top layers.

PyramidKV (Cai et al. 2024) observes that lower layers spread attention widely and upper layers
concentrate it, so it gives lower layers more tokens. `budget` is the AVERAGE per layer: the total
equals SnapKV's at the same budget (`budgets.pyramid_budgets`), only its distribution differs.
Inspect the schedule with `python -m sparse_engine.cache.budgets pyramid 512 30` or
`PyramidKVCache.describe_budgets`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models.spec import ModelSpec
from .budgets import format_budgets, kvpress_pyramid_budgets, pyramid_budgets, uniform_budgets
from .snapkv import SnapKVCache, SnapKVConfig


@dataclass
class PyramidKVConfig(SnapKVConfig):
    """SnapKV's knobs; `budget` is the mean per layer, `beta` sets the slope.

    Attributes:
        beta: the top layer keeps budget / beta tokens (never fewer than sink + window); the bottom
            layer keeps 2 * budget minus that (PyramidKV's default beta = 20).
        pyramid_fallback: "clamp" (ours: the top layers are raised to sink + window, the total kept)
            | "uniform" (PyramidKV's code and kvpress: when budget / beta, the smallest layer's share,
            is below window_size, every layer gets `budget`). With compression_ratio, kvpress's rule
            always applies (`budgets.kvpress_pyramid_budgets`).
    """

    beta: float = 20.0
    pyramid_fallback: str = "clamp"

    def validate(self, spec: ModelSpec) -> None:
        super().validate(spec)
        if self.budget_decay is not None or self.min_budget is not None:
            raise ValueError("pyramidkv sets per-layer budgets itself (linear); budget_decay / min_budget "
                             "belong to snapkv / streaming")
        if self.beta < 1:
            raise ValueError(f"beta must be >= 1 (top layer keeps budget / beta), got {self.beta}")
        if self.pyramid_fallback not in ("clamp", "uniform"):
            raise ValueError(f"pyramid_fallback must be 'clamp' (ours) or 'uniform' (PyramidKV / kvpress), "
                             f"got {self.pyramid_fallback!r}")

    def layer_budgets(self, num_layers: int) -> list[int]:
        if self.pyramid_fallback == "uniform" and self.budget / self.beta < self.window_size:
            return uniform_budgets(self.budget, num_layers)
        return pyramid_budgets(self.budget, num_layers, self.sink_size + self.window_size, self.beta)

    def prompt_budgets(self, prompt_len: int, num_layers: int) -> list[int]:
        return kvpress_pyramid_budgets(prompt_len, self.compression_ratio, self.window_size, self.beta, num_layers)


class PyramidKVCache(SnapKVCache):
    name = "pyramidkv"
    Config = PyramidKVConfig

    def describe_budgets(self) -> str:
        """The per-layer budgets as a small text table (also printed by the budgets module)."""
        c = self.config
        return format_budgets(self.budgets, f"pyramidkv budget={c.budget} beta={c.beta} layers={len(self.budgets)}")
