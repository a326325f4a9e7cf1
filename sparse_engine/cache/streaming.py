"""`streaming`: attention sinks + a ring buffer of recent tokens per layer (StreamingLLM / DoubleSparse++).

Layer l keeps `budget_l` tokens per KV head: the first `sink_size` tokens and a ring of the
`budget_l - sink_size` most recent ones. A query at position p reads exactly
`{sink} U (p - ring, p]`; tokens keep their original positions (RoPE is baked into cached keys).

Memory is independent of length and updates are O(1) per token: once a layer's ring is full, a new
token overwrites the ring's oldest slot IN PLACE (same slot id; pool k/v/pos rewritten), so
`slots_needed` is 0 for a decode step of a full sequence. A prefill chunk of n tokens is attended with
the sink + window mask over (cache U chunk) before it is folded into the ring, so chunked and
unchunked prefill give the same result; only the last `ring` tokens of a chunk are ever written.
Budgets may decay exponentially with depth: `budget_l = max(min_budget, budget * budget_decay**l)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..layers.attention_ops import gather_kv
from ..models.spec import ModelSpec
from .base import CacheMethod, MethodConfig
from .budgets import exp_decay_budgets, uniform_budgets


@dataclass
class StreamingConfig(MethodConfig):
    """Knobs of `streaming`.

    Attributes:
        budget: tokens per KV head of layer 0 (sink + ring); every layer when budget_decay is None.
        sink_size: first tokens always kept.
        budget_decay: None (uniform) or d in (0, 1]: budget_l = max(min_budget, floor(budget * d**l)).
        min_budget: floor of decayed budgets (default sink_size + 1: a ring of at least one token).
    """

    budget: int = 512
    sink_size: int = 4
    budget_decay: float | None = None
    min_budget: int | None = None

    def validate(self, spec: ModelSpec) -> None:
        if not isinstance(self.budget, int) or self.budget <= 0:
            raise ValueError(f"budget must be a positive int (tokens per KV head and layer), got {self.budget!r}")
        if self.sink_size < 0:
            raise ValueError(f"sink_size must be >= 0, got {self.sink_size}")
        if self.sink_size >= self.budget:
            raise ValueError(f"sink_size ({self.sink_size}) must be smaller than budget ({self.budget}): "
                             "the recent-token ring needs at least one slot")
        if self.budget_decay is not None and not 0.0 < self.budget_decay <= 1.0:
            raise ValueError(f"budget_decay must be in (0, 1] (or None for uniform budgets), got {self.budget_decay}")
        if self.min_budget is not None and not self.sink_size < self.min_budget <= self.budget:
            raise ValueError(f"min_budget must lie in (sink_size, budget] = ({self.sink_size}, {self.budget}], "
                             f"got {self.min_budget}")

    def layer_budgets(self, num_layers: int) -> list[int]:
        if self.budget_decay is None:
            return uniform_budgets(self.budget, num_layers)
        floor = self.min_budget if self.min_budget is not None else self.sink_size + 1
        return exp_decay_budgets(self.budget, num_layers, self.budget_decay, floor)


class StreamingCache(CacheMethod):
    name = "streaming"
    Config = StreamingConfig

    def __init__(self, config, spec, pool, sliding_window=None):
        super().__init__(config, spec, pool, sliding_window)
        self.budgets = self.config.layer_budgets(spec.num_layers)

    def batched(self, plan) -> bool:
        return False

    def new_sequence(self, seq) -> None:
        super().new_sequence(seq)
        seq.kv.state["ptr"] = [0] * self.spec.num_layers  # ring index of the oldest recent token
        seq.kv.state["pending"] = {}

    # ------------------------------------------------------------------ scheduling
    def _held(self, seq, layer: int) -> int:
        kv = getattr(seq, "kv", None) if seq is not None else None
        return int(kv.tables[layer].lens[0]) if kv is not None else 0

    def slots_needed(self, seq, num_new_tokens: int) -> int:
        grow = sum(max(0, min(self._held(seq, l) + num_new_tokens, b) - self._held(seq, l))
                   for l, b in enumerate(self.budgets))
        kv = getattr(seq, "kv", None) if seq is not None else None
        cow = kv.state.get("cow") if kv is not None else None
        if cow:  # after a fork, ring overwrites may copy shared slots first (upper bound)
            grow += sum(min(num_new_tokens, c) for c in cow)
        return grow * self.spec.num_kv_heads

    def fork(self, src, dst) -> None:
        """Share the ring with a fork; both sides then copy a shared slot before overwriting it."""
        super().fork(src, dst)
        for s in (src, dst):
            s.kv.state["cow"] = [b - self.config.sink_size for b in self.budgets]

    def max_slots(self, num_tokens: int) -> int:
        return sum(min(num_tokens, b) for b in self.budgets) * self.spec.num_kv_heads

    def expected_kv_tokens(self, num_tokens: int) -> int:
        return self.max_slots(num_tokens)

    # ------------------------------------------------------------------ per layer
    def write(self, seq, layer, k, v, positions, k_pre=None) -> None:
        if self._held(seq, layer) + k.shape[0] <= self.budgets[layer] or k.shape[0] == 1:
            # Everything stays visible (fits), or one decode token: the slot it overwrites holds
            # position p - ring, which the new query may not see anyway -> store before attention.
            self._store(seq, layer, k, v, positions)
        else:
            seq.kv.state["pending"][layer] = (k, v, positions)

    def attend(self, seq, layer, q, q_pos):
        pending = seq.kv.state["pending"].pop(layer, None)
        if pending is None:
            return super().attend(seq, layer, q, q_pos)
        k_new, v_new, pos_new = pending
        slots, valid = seq.kv.tables[layer].padded()
        k, v, kpos = gather_kv(self.pool, slots)  # [H, T, D], all heads hold the same positions
        k = torch.cat([k, k_new.transpose(0, 1).to(k.dtype)], dim=1)
        v = torch.cat([v, v_new.transpose(0, 1).to(v.dtype)], dim=1)
        kpos = torch.cat([kpos[0], pos_new.to(kpos.device)])
        out = self._attend_window(q, q_pos, k, v, kpos, self.budgets[layer])
        self._store(seq, layer, k_new, v_new, pos_new)  # fold the chunk into the ring
        return out

    def _attend_window(self, q, q_pos, k, v, kpos, budget):
        """Causal attention where query p sees keys {pos < sink} U (p - ring, p]."""
        sink, ring = self.config.sink_size, budget - self.config.sink_size
        qp = q_pos.to(kpos.device)[:, None]
        mask = (kpos[None, :] <= qp) & ((kpos[None, :] < sink) | (kpos[None, :] > qp - ring))
        if self.sliding_window is not None:
            mask &= kpos[None, :] > qp - self.sliding_window
        g = q.shape[1] // k.shape[0]
        k, v = k.repeat_interleave(g, dim=0), v.repeat_interleave(g, dim=0)
        out = F.scaled_dot_product_attention(q.transpose(0, 1).to(k.dtype), k, v, attn_mask=mask[None], scale=self.scale)
        return out.transpose(0, 1).to(q.dtype)

    # ------------------------------------------------------------------ ring buffer
    def _store(self, seq, layer: int, k, v, positions) -> None:
        """Write n tokens as if one at a time: fill free capacity, then overwrite the ring in place."""
        table, budget = seq.kv.tables[layer], self.budgets[layer]
        n, hkv, d = k.shape
        sink, ring = self.config.sink_size, budget - self.config.sink_size
        a = min(n, max(0, budget - int(table.lens[0])))
        if a:
            slots = self.pool.allocate(a * hkv).view(hkv, a)
            self.pool.write(slots.reshape(-1), k[:a].transpose(0, 1).reshape(-1, d),
                            v[:a].transpose(0, 1).reshape(-1, d), positions[:a].repeat(hkv))
            table.append(slots)
        r = n - a
        if r == 0:
            return
        # Only the last m of the r overflow tokens survive; token j of them lands at ring offset
        # (ptr + r - m + j) % ring, exactly where sequential one-token overwrites would put it.
        ptr = seq.kv.state["ptr"][layer]
        m = min(r, ring)
        cols = sink + (ptr + r - m + torch.arange(m)) % ring
        targets = table.slots[:, cols]  # [H, m]
        shared = self.pool.refcount[targets.reshape(-1)] > 1
        if bool(shared.any()):  # copy-on-write: never overwrite a slot another owner still reads
            fresh = self.pool.allocate(int(shared.sum()))
            self.pool.free(targets.reshape(-1)[shared])
            targets = targets.reshape(-1).clone()
            targets[shared] = fresh
            targets = targets.view(hkv, m)
            table.slots[:, cols] = targets
        self.pool.write(targets.reshape(-1), k[n - m :].transpose(0, 1).reshape(-1, d),
                        v[n - m :].transpose(0, 1).reshape(-1, d), positions[n - m :].repeat(hkv))
        seq.kv.state["ptr"][layer] = (ptr + r) % ring
        cow = seq.kv.state.get("cow")
        if cow:  # once every ring slot was rewritten since the fork, none is shared any more
            cow[layer] = max(0, cow[layer] - r)
