"""`snapkv` (and `adakv`): evict prompt tokens once, after the last prefill chunk, by window attention.

SnapKV (Li et al. 2024), as in kvpress: the last `window_size` prompt queries vote for the prompt
tokens they attend to. Per layer: softmaxed attention of the window queries over the prompt, averaged
over those queries, smoothed along the sequence (`pooling` avg | max, `pool_kernel_size`), averaged
over the query heads of each KV group. Each KV head then keeps `budget` tokens:
`sink_size` first tokens + the top `budget - sink_size - window_size` scored tokens + the window.
Evicted slots go back to the pool for real (KV bytes drop); decode appends as vanilla.

Selection granularity (`head_wise`): each KV head keeps its own tokens (SnapKV / kvpress), or one set
per layer shared by its heads (scores averaged over KV heads). `adaptive=True` is AdaKV: the layer's
`num_kv_heads * budget` tokens are split across heads by score, with a per-head floor.

Chunked prefill: the window queries may span several chunks, so every layer buffers the last
`window_size` prompt queries (post-RoPE) as chunks arrive; scoring runs once the prompt is complete.
Per-layer budgets: uniform, or exponentially decaying (`budget_decay`); PyramidKV subclasses this.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..layers.attention_ops import attention_probs, gather_kv
from ..models.spec import ModelSpec
from .base import CacheMethod, MethodConfig
from .budgets import adakv_select, exp_decay_budgets, ratio_budget, uniform_budgets


@dataclass
class SnapKVConfig(MethodConfig):
    """Knobs of `snapkv`.

    Attributes:
        budget: tokens kept per KV head and layer after prefill, sink and window included (with
            `budget_decay`, the budget of layer 0). A prompt no longer than it is kept whole.
        window_size: observation window: the last prompt tokens whose queries score the rest (kept).
        sink_size: first tokens always kept (attention sinks).
        pool_kernel_size: odd width of the smoothing along the sequence (1 = none).
        pooling: "avg" (SnapKV, kvpress) or "max".
        head_wise: True: each KV head keeps its own tokens; False: one set per layer for all heads.
        adaptive: AdaKV: split the layer's budget across KV heads by score (needs head_wise).
        adakv_floor: AdaKV safeguard: each head keeps at least this fraction of its even share.
        budget_decay: None (uniform) or d in (0, 1]: layer l keeps max(min_budget, budget * d**l).
        min_budget: floor of the decayed budgets (default sink_size + window_size).
        compression_ratio: kvpress's convention instead of `budget`: r in [0, 1): each KV head keeps
            int(T * (1 - r)) of a T-token prompt, sink and window included (never fewer than sink +
            window: they are always kept); pyramidkv: kvpress's pyramid over that mean. None = `budget`.
        adakv_floor_with_window: kvpress's AdaKV floor: each head's safeguard is adakv_floor x its WHOLE
            budget, the (always kept) sink and window counted in it - so it secures
            max(0, floor x budget - sink - window) scored tokens; False (ours): adakv_floor x the
            scored part of the budget.
    """

    budget: int = 512
    window_size: int = 32
    sink_size: int = 4
    pool_kernel_size: int = 5
    pooling: str = "avg"
    head_wise: bool = True
    adaptive: bool = False
    adakv_floor: float = 0.2
    budget_decay: float | None = None
    min_budget: int | None = None
    compression_ratio: float | None = None
    adakv_floor_with_window: bool = False

    def validate(self, spec: ModelSpec) -> None:
        if self.compression_ratio is not None:
            r = self.compression_ratio
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r < 1.0:
                raise ValueError(f"compression_ratio must be in [0, 1) (the fraction of prompt tokens evicted, "
                                 f"kvpress's convention), got {r!r}; or None to use budget")
            if self.budget_decay is not None or self.min_budget is not None:
                raise ValueError("compression_ratio gives one budget per prompt (kvpress); budget_decay / min_budget "
                                 "decay a fixed budget: use one or the other")
        if not isinstance(self.adakv_floor_with_window, bool):
            raise ValueError(f"adakv_floor_with_window must be true or false, got {self.adakv_floor_with_window!r}")
        if not isinstance(self.budget, int) or self.budget <= 0:
            raise ValueError(f"budget must be a positive int (tokens per KV head and layer), got {self.budget!r}")
        if self.window_size <= 0:
            raise ValueError(f"window_size must be positive, got {self.window_size}")
        if self.sink_size < 0:
            raise ValueError(f"sink_size must be >= 0, got {self.sink_size}")
        if self.window_size + self.sink_size > self.budget:
            raise ValueError(f"window_size ({self.window_size}) + sink_size ({self.sink_size}) exceeds budget "
                             f"({self.budget}): raise budget or shrink the window (the window is always kept).")
        if self.pool_kernel_size <= 0 or self.pool_kernel_size % 2 == 0:
            raise ValueError(f"pool_kernel_size must be a positive odd int, got {self.pool_kernel_size}")
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"pooling must be 'avg' or 'max', got {self.pooling!r}")
        if self.adaptive and not self.head_wise:
            raise ValueError("adaptive=True (AdaKV) splits budgets across KV heads: it needs head_wise=True")
        if not 0.0 <= self.adakv_floor <= 1.0:
            raise ValueError(f"adakv_floor is a fraction in [0, 1], got {self.adakv_floor}")
        if self.budget_decay is not None and not 0.0 < self.budget_decay <= 1.0:
            raise ValueError(f"budget_decay must be in (0, 1] (or None for uniform budgets), got {self.budget_decay}")
        floor = self.sink_size + self.window_size
        if self.min_budget is not None and not floor <= self.min_budget <= self.budget:
            raise ValueError(f"min_budget must lie in [sink_size + window_size, budget] = [{floor}, {self.budget}], "
                             f"got {self.min_budget}")

    def prompt_budgets(self, prompt_len: int, num_layers: int) -> list[int]:
        """Per-layer budgets of a `prompt_len`-token prompt under `compression_ratio` (kvpress)."""
        return uniform_budgets(ratio_budget(prompt_len, self.compression_ratio), num_layers)

    def layer_budgets(self, num_layers: int) -> list[int]:
        if self.budget_decay is None:
            return uniform_budgets(self.budget, num_layers)
        floor = self.min_budget if self.min_budget is not None else self.sink_size + self.window_size
        return exp_decay_budgets(self.budget, num_layers, self.budget_decay, floor)


@dataclass
class SnapState:
    """Per sequence: the prompt's window queries buffered per layer until the prompt is complete."""

    qbuf: dict = field(default_factory=dict)  # layer -> (q [w, Hq, D], positions [w])
    compressed: bool = False


@dataclass
class _WindowRows:
    """This step's window-query rows (flat batch rows), their positions, owners (seq, lo, hi)."""

    rows: torch.Tensor
    pos: torch.Tensor
    owners: list
    q: dict  # layer -> q[rows]


def snap_scores(probs: torch.Tensor, num_kv_heads: int, kernel: int, pooling: str, c: int) -> torch.Tensor:
    """probs [Hq, w, T] of the window queries -> scores [Hkv, c] of the first `c` (pre-window) tokens."""
    hq = probs.shape[0]
    s = probs[:, :, :c].mean(dim=1)  # [Hq, c]
    if kernel > 1:
        pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d
        s = pool(s[:, None, :], kernel_size=kernel, stride=1, padding=kernel // 2).squeeze(1)
    return s.view(num_kv_heads, hq // num_kv_heads, -1).mean(dim=1)


class SnapKVCache(CacheMethod):
    name = "snapkv"
    Config = SnapKVConfig

    def __init__(self, config, spec, pool, sliding_window=None):
        super().__init__(config, spec, pool, sliding_window)
        self.budgets = self.config.layer_budgets(spec.num_layers)

    def new_sequence(self, seq) -> None:
        super().new_sequence(seq)
        seq.kv.state = SnapState()

    # ------------------------------------------------------------------ scoring input
    def begin_step(self, plan) -> None:
        """Find (on the host, once per step) the rows of this step that are window queries of a
        prompt: the prompt's last `window_size` tokens, possibly spread over several chunks."""
        super().begin_step(plan)
        rows, owners = [], []
        for b, seq in enumerate(plan.seqs):
            p, start, n = seq.num_prompt_tokens, plan.starts[b], plan.num_new[b]
            lo, hi = max(start, p - self.config.window_size), min(start + n, p)
            if lo < hi and not seq.kv.state.compressed:
                owners.append((seq, len(rows), len(rows) + hi - lo))
                rows.extend(range(plan.cu[b] + lo - start, plan.cu[b] + hi - start))
        self._window = None
        if rows:
            idx = torch.tensor(rows, dtype=torch.long, device=plan.positions.device)
            self._window = _WindowRows(idx, plan.positions[idx], owners, {})

    def forward_layer(self, plan, layer, q, k, v, k_pre):
        out = super().forward_layer(plan, layer, q, k, v, k_pre)
        if self._window is not None:  # one gather per layer for the whole batch
            self._window.q[layer] = q[self._window.rows]
        return out

    def after_step(self, seq, prefill_done: bool, num_new_tokens: int) -> None:
        state: SnapState = seq.kv.state
        w = getattr(self, "_window", None)
        for s, a, b in (w.owners if w is not None else ()):
            if s is seq:  # this sequence's window queries of this step, every layer
                for layer, q in w.q.items():
                    old_q, old_pos = state.qbuf.get(layer, (q[:0], w.pos[:0]))
                    state.qbuf[layer] = (torch.cat([old_q, q[a:b]]), torch.cat([old_pos, w.pos[a:b]]))
        if not prefill_done or state.compressed:
            return
        state.compressed = True
        qbuf, state.qbuf = state.qbuf, {}
        for layer in range(self.spec.num_layers):
            if layer in qbuf:
                self.compress_layer(seq, layer, *qbuf[layer])

    # ------------------------------------------------------------------ eviction
    def budgets_for(self, seq) -> list[int]:
        """Per-layer budgets of this sequence: fixed, or from its prompt length (compression_ratio)."""
        if self.config.compression_ratio is None:
            return self.budgets
        return self.config.prompt_budgets(seq.num_prompt_tokens, self.spec.num_layers)

    def select(self, scores: torch.Tensor, n_mid: int, budget: int | None = None) -> list[torch.Tensor]:
        """Pick `n_mid` candidates per KV head from scores [Hkv, C]; returns sorted indices per head."""
        cfg, hkv = self.config, scores.shape[0]
        if cfg.adaptive:
            n_safe = None
            if cfg.adakv_floor_with_window and budget is not None:  # kvpress: the floor spans the whole budget
                n_safe = int(budget * cfg.adakv_floor) - (budget - n_mid)
            return adakv_select(scores, n_mid, cfg.adakv_floor, n_safe)
        if not cfg.head_wise:
            idx = scores.mean(dim=0).topk(n_mid).indices.sort().values
            return [idx] * hkv
        idx = scores.topk(n_mid, dim=1).indices.sort(dim=1).values
        return list(idx)

    def compress_layer(self, seq, layer: int, q: torch.Tensor, q_pos: torch.Tensor) -> None:
        cfg, table = self.config, seq.kv.tables[layer]
        slots, valid = table.padded()
        budget = max(self.budgets_for(seq)[layer], min(slots.shape[1], cfg.sink_size + cfg.window_size))
        t = slots.shape[1]
        if t <= budget:
            return  # the prompt fits: keep everything (identical to vanilla)
        if not bool(valid.all()):
            raise RuntimeError("snapkv expects uncompressed, equal-length heads at the end of prefill")
        k, _, kpos = gather_kv(self.pool, slots)
        probs = attention_probs(q, q_pos, k, kpos, valid.to(kpos.device), self.scale)  # [Hq, w, T]
        # Tables are in position order; `c` = tokens before the window. Tokens after the prompt (only
        # after a preemption recomputed generated tokens as prefill) are kept like the window.
        w, s = len(q_pos), cfg.sink_size
        c = int((kpos[0] < q_pos.min().to(kpos.device)).sum())
        scores = snap_scores(probs.cpu(), table.num_kv_heads, cfg.pool_kernel_size, cfg.pooling, c)
        picks = self.select(scores[:, s:], budget - s - w, budget)
        sink, window = torch.arange(s), torch.arange(c, t)
        keep = [torch.cat([sink, p + s, window]) for p in picks]
        dropped = []
        for h in range(table.num_kv_heads):
            mask = torch.ones(t, dtype=torch.bool)
            mask[keep[h]] = False
            dropped.append(slots[h][mask])
        kept = [slots[h][keep[h]] for h in range(table.num_kv_heads)]  # copies: `slots` is a view of the table
        # Free, then remove: an interrupt inside `free` leaves the dropped slots in the table, where the
        # sequence's release finds them (removed first, they would be owned by nothing: leaked).
        self.pool.free(torch.cat(dropped))  # real eviction: the slots go back to the pool
        table.replace(kept)

    # ------------------------------------------------------------------ accounting
    def expected_kv_tokens(self, prompt_len: int) -> int:
        """Slots (token x KV head x layer) a sequence holds right after prefill: the budget formula."""
        budgets = (self.budgets if self.config.compression_ratio is None
                   else self.config.prompt_budgets(prompt_len, self.spec.num_layers))
        floor = self.config.sink_size + self.config.window_size
        return sum(min(prompt_len, max(b, floor)) for b in budgets) * self.spec.num_kv_heads


class AdaKVCache(SnapKVCache):
    """`adakv`: SnapKV scoring with AdaKV's adaptive per-head budgets (same knobs, adaptive=True)."""

    name = "adakv"

    @dataclass
    class Config(SnapKVConfig):
        adaptive: bool = True
