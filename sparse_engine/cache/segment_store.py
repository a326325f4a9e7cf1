"""`SegmentStore`: KV of token segments (documents, turns, tool outputs) kept in the pool for reuse.

An entry is keyed by a hash of the segment's token ids. It holds, per layer, the pool slots
[Hkv, len] of the segment's K (after RoPE, at the positions it was computed at: `start + i`, also in
`pool.pos`) and V. The slots are SHARED with the sequence that computed them (one reference each,
`KVPool.incref`): storing copies nothing, and a slot is only returned to the pool once the store and
every sequence using it have dropped it. Reuse at another position re-rotates K by the position
delta (`rerotate`); reuse at the same position after the same tokens (`ctx_key` equal, `exact`) is
ordinary prefix caching: the slots are shared as they are.

Entries are evicted least-recently-used first so that the bytes they hold never exceed `budget_bytes`
(bytes = tokens x layers x KV heads x bytes per slot, counted whether or not a running sequence still
shares the slots), and on demand when the pool runs short of free slots (`make_room`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from ..layers.rotary import apply_inverse_rope, apply_rope, rope_cos_sin
from .pool import KVPool


def token_key(ids) -> str:
    """Hash of a token-id sequence (blake2b over int64 bytes)."""
    return hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=16).hexdigest()


def prefix_keys(ids: list[int], ends: list[int]) -> list[str]:
    """Hashes of ids[:e] for each segment end e (increasing), computed incrementally."""
    h, out, last = hashlib.blake2b(digest_size=16), [], 0
    for e in ends:
        h.update(np.asarray(ids[last:e], dtype=np.int64).tobytes())
        out.append(h.copy().hexdigest())
        last = e
    return out


@dataclass
class SegmentEntry:
    key: str
    length: int
    start: int  # position of the segment's first token where its KV was computed
    ctx_key: str  # hash of every token up to the segment's end in that request
    exact: bool  # its KV equals full computation over that context (nothing approximated before it)
    slots: list[torch.Tensor]  # per layer [Hkv, length] pool slot ids
    nbytes: int
    hits: int = 0

    def all_slots(self) -> torch.Tensor:
        return torch.cat([s.reshape(-1) for s in self.slots])


class SegmentStore:
    def __init__(self, pool: KVPool, budget_bytes: int, num_layers: int, num_kv_heads: int):
        self.pool = pool
        self.budget_bytes = budget_bytes
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.entries: OrderedDict[str, SegmentEntry] = OrderedDict()  # LRU order: oldest first
        self.nbytes = 0
        self.num_hits = self.num_misses = self.num_evictions = 0

    def entry_bytes(self, length: int) -> int:
        return length * self.num_layers * self.num_kv_heads * self.pool.bytes_per_slot

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def get(self, key: str) -> SegmentEntry | None:
        """The entry of `key` (marked most recently used), or None."""
        e = self.entries.get(key)
        if e is None:
            self.num_misses += 1
            return None
        self.entries.move_to_end(key)
        e.hits += 1
        self.num_hits += 1
        return e

    def put(self, key: str, start: int, ctx_key: str, exact: bool, slots: list[torch.Tensor]) -> bool:
        """Keep the segment whose per-layer slots are `slots` (one reference is taken on each).
        Returns False (nothing kept) when the segment alone exceeds the budget or is already stored."""
        if key in self.entries:
            return False
        length = slots[0].shape[1]
        nbytes = self.entry_bytes(length)
        if nbytes > self.budget_bytes:
            return False
        while self.nbytes + nbytes > self.budget_bytes:
            self.evict_lru()
        entry = SegmentEntry(key, length, start, ctx_key, exact, [s.clone() for s in slots], nbytes)
        self.pool.incref(entry.all_slots())
        self.entries[key] = entry
        self.nbytes += nbytes
        return True

    def evict_lru(self) -> None:
        _, e = self.entries.popitem(last=False)
        self.pool.free(e.all_slots())
        self.nbytes -= e.nbytes
        self.num_evictions += 1

    def make_room(self, free_slots: int) -> None:
        """Evict least-recently-used entries until the pool has `free_slots` free (or the store is empty)."""
        while self.entries and self.pool.num_free < free_slots:
            self.evict_lru()

    def clear(self) -> None:
        while self.entries:
            self.evict_lru()

    def stats(self) -> dict:
        return {"segment_store_entries": len(self.entries), "segment_store_bytes": self.nbytes,
                "segment_store_budget_bytes": self.budget_bytes, "segment_store_hits": self.num_hits,
                "segment_store_misses": self.num_misses, "segment_store_evictions": self.num_evictions}


def rerotate(k: torch.Tensor, old_pos: torch.Tensor, new_pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE re-alignment: K computed (after RoPE) at `old_pos` -> the K of the same token at `new_pos`.

    k [n, H, D]; positions [n]. Undo the rotation with the same cos/sin tables the model used at the
    old positions, then rotate with the model's tables at the new ones: up to float rounding of two
    rotations, the result equals K computed at `new_pos`. Tables are unscaled: an attention scaling
    (YaRN / LongRoPE `rope_attention_scaling`) is already inside k and passes through unchanged.
    """
    f = inv_freq.to(k.device)
    cos_o, sin_o = rope_cos_sin(f, old_pos.to(k.device), 1.0)
    cos_n, sin_n = rope_cos_sin(f, new_pos.to(k.device), 1.0)
    return apply_rope(apply_inverse_rope(k, cos_o, sin_o), cos_n, sin_n)
