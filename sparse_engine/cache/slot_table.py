"""`SlotTable`: for one (sequence, layer), the pool slots each KV head reads, in position order."""

from __future__ import annotations

import torch


class SlotTable:
    """Per-KV-head lists of slot ids, stored as a padded [num_kv_heads, capacity] tensor.

    Heads may hold different numbers of tokens (head-wise eviction); `lens[h]` says how many.
    Slot ids live on the pool's device (the decode kernel reads them there every step, so they are
    not re-sent from the host); the lengths stay on the host (the scheduler reads them).
    """

    def __init__(self, num_kv_heads: int, capacity: int = 64, device: torch.device | str = "cpu"):
        self.slots = torch.zeros(num_kv_heads, max(capacity, 1), dtype=torch.long, device=device)
        self.lens = torch.zeros(num_kv_heads, dtype=torch.long)
        self.lens_dev = torch.zeros(num_kv_heads, dtype=torch.long, device=device)  # mirror: masks without syncs

    @property
    def num_kv_heads(self) -> int:
        return self.slots.shape[0]

    def max_len(self) -> int:
        return int(self.lens.max()) if self.lens.numel() else 0

    def total(self) -> int:
        return int(self.lens.sum())

    def _grow(self, need: int) -> None:
        cap = self.slots.shape[1]
        if need <= cap:
            return
        new = torch.zeros(self.num_kv_heads, max(need, 2 * cap), dtype=torch.long, device=self.slots.device)
        new[:, :cap] = self.slots
        self.slots = new

    def append(self, slots: torch.Tensor) -> None:
        """Append [num_kv_heads, n] slot ids (same n for every head)."""
        n = slots.shape[1]
        slots = slots.to(self.slots.device)
        if bool((self.lens == self.lens[0]).all()):
            start = int(self.lens[0])
            self._grow(start + n)
            self.slots[:, start : start + n] = slots
        else:
            self._grow(self.max_len() + n)
            for h in range(self.num_kv_heads):
                s = int(self.lens[h])
                self.slots[h, s : s + n] = slots[h]
        self.lens += n
        self.lens_dev += n

    def clone(self) -> "SlotTable":
        """A copy of the table (the slots themselves are shared: callers incref them)."""
        new = SlotTable.__new__(SlotTable)
        new.slots, new.lens, new.lens_dev = self.slots.clone(), self.lens.clone(), self.lens_dev.clone()
        return new

    def head(self, h: int) -> torch.Tensor:
        return self.slots[h, : int(self.lens[h])]

    def all_slots(self) -> torch.Tensor:
        return torch.cat([self.head(h) for h in range(self.num_kv_heads)]) if self.total() else self.slots[:0, 0]

    def replace(self, per_head: list[torch.Tensor]) -> None:
        """Set each head's slot list (e.g. after eviction); callers free the dropped slots."""
        self._grow(max((len(s) for s in per_head), default=0))
        for h, s in enumerate(per_head):
            self.slots[h, : len(s)] = s.to(self.slots.device)
            self.lens[h] = len(s)
        self.lens_dev = self.lens.to(self.slots.device, copy=True)  # never alias the host lengths

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([H, T] slot ids, [H, T] valid mask) with T = longest head."""
        t = self.max_len()
        slots = self.slots[:, :t]
        valid = torch.arange(t, device=slots.device)[None, :] < self.lens_dev[:, None]
        return slots, valid
