"""The cache-method interface: the engine's one extension point.

A method decides, per sequence and layer, where new K/V go (`write`), which slots attention reads
(`view`), what it learns from a step's queries (`observe`), what to evict or compress after a step
(`after_step`), and how many slots a step will need (`slots_needed`, used by the scheduler). The base
class is "vanilla": keep everything. A new method is one file overriding a few of these plus one line
in `registry.py`.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch

from ..layers.attention_ops import attend_slots
from ..models.spec import ModelSpec
from .pool import KVPool
from .slot_table import SlotTable


@dataclass
class MethodConfig:
    """Knobs shared by every method (subclass to add a method's own; validate in `validate`)."""

    def validate(self, spec: ModelSpec) -> None:  # noqa: D401 - hook
        """Raise ValueError naming the fix for a bad knob."""


@dataclass
class View:
    """What one layer of one sequence attends over: slots [Hkv, T] with a validity mask.

    `scratch` slots (e.g. reconstructed DeltaKV tokens) are freed once attention has used them.
    `prefix_lens` (host tensor [Hkv]) says the valid entries of each head are its first
    `prefix_lens[h]`: the decode kernel then reads `slots` as they are, with no device sync.
    """

    slots: torch.Tensor
    valid: torch.Tensor
    scratch: torch.Tensor | None = None
    prefix_lens: torch.Tensor | None = None


class SequenceKV:
    """A sequence's KV bookkeeping: one SlotTable per layer plus method-private state."""

    def __init__(self, num_layers: int, num_kv_heads: int, capacity: int, device="cpu"):
        self.tables = [SlotTable(num_kv_heads, capacity, device) for _ in range(num_layers)]
        self.state: dict = {}


class CacheMethod:
    name = "vanilla"
    Config = MethodConfig

    def __init__(self, config: MethodConfig, spec: ModelSpec, pool: KVPool, sliding_window: int | None = None):
        config.validate(spec)
        self.config = config
        self.spec = spec
        self.pool = pool
        self.scale = spec.head_dim ** -0.5
        self.sliding_window = sliding_window
        self.decode_kernel = None  # set by the engine on CUDA (Triton), see attend_decode_batch

    @classmethod
    def make_config(cls, **knobs) -> MethodConfig:
        names = {f.name for f in dataclasses.fields(cls.Config)}
        bad = set(knobs) - names
        if bad:
            raise TypeError(f"method '{cls.name}' has no knob(s) {sorted(bad)}; its knobs are {sorted(names)}")
        return cls.Config(**knobs)

    # ------------------------------------------------------------------ lifecycle
    def new_sequence(self, seq) -> None:
        seq.kv = SequenceKV(self.spec.num_layers, self.spec.num_kv_heads, capacity=max(16, seq.num_tokens),
                            device=self.pool.device)

    def fork(self, src, dst) -> None:
        """Give `dst` the KV of `src` (sessions, prefix reuse): tables are copied, slots shared with
        a reference each, method state deep-copied. A method that writes slots in place must copy
        a slot whose refcount is > 1 before writing it (copy-on-write)."""
        dst.kv = SequenceKV.__new__(SequenceKV)
        dst.kv.tables = [t.clone() for t in src.kv.tables]
        dst.kv.state = copy.deepcopy(src.kv.state)
        for t in src.kv.tables:
            self.pool.incref(t.all_slots())

    def release(self, seq) -> None:
        """Return every slot the sequence holds to the pool (finish or preemption)."""
        if getattr(seq, "kv", None) is None:
            return
        for table in seq.kv.tables:
            self.pool.free(table.all_slots())
        seq.kv = None

    # ------------------------------------------------------------------ scheduling
    def slots_needed(self, seq, num_new_tokens: int) -> int:
        """Pool slots a step that adds `num_new_tokens` to `seq` allocates (before any eviction)."""
        return num_new_tokens * self.spec.num_layers * self.spec.num_kv_heads

    def whole_prefill(self, seq) -> bool:
        """True asks the scheduler to prefill this not-yet-started prompt in ONE step (no chunking) when
        it fits `max_num_batched_tokens` (SparseX needs every token of a prompt in one forward)."""
        return False

    def max_slots(self, num_tokens: int) -> int:
        """Peak slots one sequence of `num_tokens` can hold (admission check against the pool)."""
        return self.slots_needed(None, num_tokens)

    # ------------------------------------------------------------------ per layer
    def rows_for_layer(self, ctx, layer: int) -> torch.Tensor | None:
        """Before layer `layer`: sorted indices of the batch rows that go on through this and later
        layers (rows dropped here are not computed any further; their K/V for the remaining layers
        come from the method's `write`), or None to keep every row. Default: None."""
        return None

    def write(self, seq, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
              k_pre: torch.Tensor | None = None) -> None:
        """Store the new tokens' K (after RoPE) and V, each [n, Hkv, D]."""
        n, hkv, d = k.shape
        slots = self.pool.allocate(n * hkv).view(hkv, n)
        self.pool.write(slots.reshape(-1), k.transpose(0, 1).reshape(-1, d), v.transpose(0, 1).reshape(-1, d),
                        positions.repeat(hkv))
        seq.kv.tables[layer].append(slots)

    def view(self, seq, layer: int, q: torch.Tensor, q_pos: torch.Tensor) -> View:
        table = seq.kv.tables[layer]
        slots, valid = table.padded()
        return View(slots, valid, prefix_lens=table.lens.clone())

    def observe(self, seq, layer: int, q: torch.Tensor, q_pos: torch.Tensor, view: View) -> None:
        """Called after attention with this step's queries (scoring hook for sparse methods)."""

    def attend(self, seq, layer: int, q: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
        view = self.view(seq, layer, q, q_pos)
        out = attend_slots(q, q_pos, self.pool, view.slots, view.valid, self.scale, self.sliding_window)
        self.observe(seq, layer, q, q_pos, view)
        if view.scratch is not None:
            self.pool.free(view.scratch)
        return out

    def attend_decode_batch(self, seqs, layer: int, q: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
        """One query token per sequence: q [B, Hq, D]. Uses the Triton kernel when the engine set one."""
        if self.decode_kernel is None or self.sliding_window is not None:
            return torch.cat([self.attend(s, layer, q[i : i + 1], q_pos[i : i + 1]) for i, s in enumerate(seqs)])
        views = [self.view(s, layer, q[i : i + 1], q_pos[i : i + 1]) for i, s in enumerate(seqs)]
        t = max(v.slots.shape[1] for v in views)
        table = torch.zeros(len(seqs), self.spec.num_kv_heads, t, dtype=torch.int32, device=q.device)
        lens = torch.zeros(len(seqs), self.spec.num_kv_heads, dtype=torch.int32)
        for i, v in enumerate(views):
            if v.prefix_lens is not None:
                table[i, :, : v.slots.shape[1]] = v.slots
                lens[i] = v.prefix_lens
            else:  # the kernel reads a prefix of each row: compact valid entries to the front
                for h in range(v.slots.shape[0]):
                    row = v.slots[h][v.valid[h]]
                    table[i, h, : len(row)] = row
                    lens[i, h] = len(row)
        lens = (lens.pin_memory() if q.device.type == "cuda" else lens).to(q.device, non_blocking=True)
        out = self.decode_kernel(q, self.pool.k, self.pool.v, table, lens, self.scale)
        for i, (s, v) in enumerate(zip(seqs, views)):
            self.observe(s, layer, q[i : i + 1], q_pos[i : i + 1], v)
            if v.scratch is not None:
                self.pool.free(v.scratch)
        return out

    # ------------------------------------------------------------------ per step
    def after_step(self, seq, prefill_done: bool, num_new_tokens: int) -> None:
        """After every layer has run this step: evict / compress here (frees slots for real)."""

    def stats(self) -> dict:
        """Method-wide counters merged into `LLM.kv_stats()` (e.g. a segment store's bytes)."""
        return {}

    def kv_bytes(self, seq) -> int:
        """Bytes of KV this sequence holds in the pool."""
        if getattr(seq, "kv", None) is None:
            return 0
        return sum(t.total() for t in seq.kv.tables) * self.pool.bytes_per_slot
