"""Slot tables: which pool slots each (sequence, layer, KV head) reads, in position order.

`SequenceKV` keeps ONE device tensor `slots [L, Hkv, cap]` and one host tensor `lens [L, Hkv]` per
sequence, so a step touches a sequence's tables with one op for all its layers (append the step's
slots, slice the read table), never one op per layer. `SlotTable` is a per-layer view of it with the
small API methods use off the hot path (eviction and compression after prefill).
"""

from __future__ import annotations

import torch


class SequenceKV:
    """A sequence's KV bookkeeping: the slot tables of all layers plus method-private state.

    `state` belongs to the method (a typed dataclass); `extra` holds the data of a wrapper method
    composed over it (SparseX over OmniKV / streaming), so the two never share one object.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, capacity: int, device="cpu"):
        self.slots = torch.zeros(num_layers, num_kv_heads, max(int(capacity), 1), dtype=torch.long, device=device)
        self.lens = torch.zeros(num_layers, num_kv_heads, dtype=torch.long)  # host: the scheduler reads it
        self.state = {}
        self.extra: dict = {}
        self._tables = None

    @property
    def num_layers(self) -> int:
        return self.slots.shape[0]

    @property
    def capacity(self) -> int:
        return self.slots.shape[2]

    @property
    def tables(self) -> list["SlotTable"]:
        if self._tables is None:
            self._tables = [SlotTable(self, l) for l in range(self.num_layers)]
        return self._tables

    def max_len(self) -> int:
        return int(self.lens.max()) if self.lens.numel() else 0

    def total(self) -> int:
        return int(self.lens.sum())

    def grow(self, need: int) -> None:
        cap = self.capacity
        if need <= cap:
            return
        new = torch.zeros(self.slots.shape[0], self.slots.shape[1], max(need, 2 * cap), dtype=torch.long,
                          device=self.slots.device)
        new[:, :, :cap] = self.slots
        self.slots = new

    def append_all(self, slots: torch.Tensor) -> None:
        """Append [L, Hkv, n] slot ids: n new tokens in every layer and head (one op for all layers)."""
        n = slots.shape[2]
        lo, hi = int(self.lens.min()), int(self.lens.max())
        self.grow(hi + n)
        if lo == hi:  # every table has the same length (vanilla, and any method before eviction)
            self.slots[:, :, lo : lo + n] = slots
        else:  # per-layer / per-head lengths differ (after eviction): one scatter
            cols = (self.lens[:, :, None] + torch.arange(n)[None, None, :]).to(self.slots.device)
            self.slots.scatter_(2, cols, slots)
        self.lens += n

    def clone(self) -> "SequenceKV":
        """A copy of the tables (the slots themselves are shared: callers incref them)."""
        new = SequenceKV.__new__(SequenceKV)
        new.slots, new.lens, new.state, new.extra, new._tables = self.slots.clone(), self.lens.clone(), {}, {}, None
        return new

    def all_slots(self) -> torch.Tensor:
        """Every slot held, all layers and heads (for release / incref)."""
        cap = self.capacity
        mask = torch.arange(cap)[None, None, :] < self.lens[:, :, None]
        return self.slots[mask.to(self.slots.device)]


class SlotTable:
    """Layer `layer` of a `SequenceKV`: per-KV-head lists of slot ids (`lens[h]` valid entries each)."""

    def __init__(self, owner: SequenceKV, layer: int):
        self.owner = owner
        self.layer = layer

    @property
    def slots(self) -> torch.Tensor:
        return self.owner.slots[self.layer]

    @property
    def lens(self) -> torch.Tensor:
        return self.owner.lens[self.layer]  # a view: in-place updates reach the owner

    @property
    def lens_dev(self) -> torch.Tensor:
        return self.lens.to(self.owner.slots.device, copy=True)

    @property
    def num_kv_heads(self) -> int:
        return self.owner.slots.shape[1]

    def max_len(self) -> int:
        return int(self.lens.max()) if self.lens.numel() else 0

    def total(self) -> int:
        return int(self.lens.sum())

    def append(self, slots: torch.Tensor) -> None:
        """Append [num_kv_heads, n] slot ids to this layer (same n for every head)."""
        n = slots.shape[1]
        slots = slots.to(self.owner.slots.device)
        self.owner.grow(self.max_len() + n)
        lens = self.lens
        if bool((lens == lens[0]).all()):
            start = int(lens[0])
            self.slots[:, start : start + n] = slots
        else:
            cols = (lens[:, None] + torch.arange(n)[None, :]).to(slots.device)
            self.slots.scatter_(1, cols, slots)
        lens += n

    def head(self, h: int) -> torch.Tensor:
        return self.slots[h, : int(self.lens[h])]

    def all_slots(self) -> torch.Tensor:
        return torch.cat([self.head(h) for h in range(self.num_kv_heads)]) if self.total() else self.slots[:0, 0]

    def replace(self, per_head: list[torch.Tensor]) -> None:
        """Set each head's slot list (e.g. after eviction); callers free the dropped slots."""
        self.owner.grow(max((len(s) for s in per_head), default=0))
        slots, lens = self.slots, self.lens
        for h, s in enumerate(per_head):
            slots[h, : len(s)] = s.to(slots.device)
            lens[h] = len(s)

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([H, T] slot ids, [H, T] valid mask) with T = longest head."""
        t = self.max_len()
        slots = self.slots[:, :t]
        valid = torch.arange(t, device=slots.device)[None, :] < self.lens_dev[:, None]
        return slots, valid
