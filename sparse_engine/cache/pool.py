"""`KVPool`: token-granular KV storage shared by every layer and sequence.

A slot holds the K and V of ONE token of ONE KV head of ONE layer (all layers share head_dim), so
budgets may differ per layer (PyramidKV) and per KV head (head-wise SnapKV / AdaKV) without
fragmenting memory. Slots carry a reference count (prefix / segment sharing) and the position of the
token they hold (attention masks by position, so evicted tokens simply disappear from the view).
"""

from __future__ import annotations

import torch


class KVPoolExhausted(RuntimeError):
    """Raised by `allocate` when fewer slots are free than asked for; the scheduler preempts first."""


class KVPool:
    def __init__(self, num_slots: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        if num_slots <= 0:
            raise ValueError(f"KVPool needs a positive number of slots, got {num_slots}; raise kv_cache_bytes.")
        self.num_slots = num_slots
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        # One extra TRASH row (index num_slots), never allocated: padding entries of batched writes
        # (e.g. DeltaKV's scratch block) point there, so every row of a fixed-shape write is legal.
        self.trash = num_slots
        self.k = torch.zeros(num_slots + 1, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(num_slots + 1, head_dim, dtype=dtype, device=device)
        self.pos = torch.zeros(num_slots + 1, dtype=torch.long, device=device)  # token position per slot
        self.refcount = torch.zeros(num_slots + 1, dtype=torch.int32, device=device)
        # Free stack on the pool's device, its top on the host: allocate pops from the top and free
        # pushes back, vectorised; allocating needs no host<->device sync (decode's hot path).
        self._free = torch.arange(num_slots - 1, -1, -1, dtype=torch.long, device=device)
        self._top = num_slots
        self.peak_used = 0  # high-water mark of used slots (benchmarks reset it per run)

    def resize(self, num_slots: int) -> None:
        """Re-create the pool with `num_slots` slots (only while nothing is allocated: the engine
        sizes it once, after the cache method has claimed its share of the KV budget)."""
        if self.num_used:
            raise RuntimeError("KVPool.resize with slots in use")
        dtype, device, d = self.dtype, self.device, self.head_dim
        self.k = self.v = self.pos = self.refcount = self._free = None  # free the old tensors first
        self.__init__(num_slots, d, dtype, device)

    # ------------------------------------------------------------------ accounting
    @property
    def bytes_per_slot(self) -> int:
        return 2 * self.head_dim * self.k.element_size()

    @property
    def num_free(self) -> int:
        return self._top

    @property
    def num_used(self) -> int:
        return self.num_slots - self._top

    # ------------------------------------------------------------------ allocation
    def allocate(self, n: int) -> torch.Tensor:
        """Pop `n` free slots (refcount 1). Returns a LongTensor of slot ids on the pool's device."""
        if n > self._top:
            raise KVPoolExhausted(f"asked for {n} KV slots, {self._top} free")
        slots = self._free[self._top - n : self._top].clone()
        self._top -= n
        self.peak_used = max(self.peak_used, self.num_slots - self._top)
        self.refcount[slots] = 1
        return slots

    def incref(self, slots: torch.Tensor) -> None:
        """Share `slots` with one more owner (prefix cache, SparseX segment store)."""
        slots = slots.reshape(-1).to(self.device)
        self.refcount.index_add_(0, slots, torch.ones(len(slots), dtype=torch.int32, device=self.device))

    def free(self, slots: torch.Tensor) -> None:
        """Drop one reference to each slot; slots reaching zero go back to the free stack."""
        if slots.numel() == 0:
            return
        slots = slots.reshape(-1).to(self.device)
        self.refcount.index_add_(0, slots, torch.full((len(slots),), -1, dtype=torch.int32, device=self.device))
        released = slots[self.refcount[slots] == 0].unique()
        if (self.refcount[slots] < 0).any():
            raise RuntimeError("KVPool: a slot was freed more times than it was referenced (engine bug)")
        m = len(released)
        self._free[self._top : self._top + m] = released
        self._top += m

    # ------------------------------------------------------------------ data
    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Store rows: k, v [n, head_dim] into `slots` [n], remembering each row's token position."""
        idx = slots.to(self.device)
        self.k[idx] = k.to(self.dtype)
        self.v[idx] = v.to(self.dtype)
        self.pos[idx] = positions.to(self.device)
