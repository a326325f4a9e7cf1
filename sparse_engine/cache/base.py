"""The cache-method interface: the engine's one extension point.

A method works on the WHOLE BATCH of a step (`engine.step_plan.StepPlan`):

* `begin_step(plan)` (host, once per step): allocate the slots every new token is written to in every
  layer (`plan.write_slots`) and build each row group's read tables (`RowGroup.table / lens`);
* per layer, `forward_layer` runs one K/V write for the batch (`write_layer`) and one attention call
  per row group (decode rows, prefill chunks) over `layer_view(plan, layer, group)` - a method may
  narrow the table or add reconstructed slots there, as tensors - then `observe_layer` (scoring);
* `after_step(seq, ...)` (host, once per step and sequence): evict / compress, free slots for real.

The base class is "vanilla": keep everything. A new method is one file overriding a few of these plus
one line in `registry.py`. Methods not yet ported to the batch hooks keep the per-sequence hooks
(`write` / `view` / `observe` / `attend`) and return False from `batched(plan)`: the engine then runs
those steps sequence by sequence (slower, same results).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch

from ..layers.attention_ops import attend_group, attend_slots
from ..models.spec import ModelSpec
from .pool import KVPool
from .slot_table import SequenceKV


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


@dataclass
class BatchView:
    """What one layer of one row group attends over: table [G, Hkv, T] slot ids, lens [G, Hkv]
    (device) valid entries per head (a prefix of each row). `scratch` slots (e.g. reconstructed
    DeltaKV tokens) are freed once attention has used them."""

    table: torch.Tensor
    lens: torch.Tensor
    scratch: torch.Tensor | None = None
    valid: torch.Tensor | None = None  # [G, Hkv, T] = arange(T) < lens (computed from lens when None)
    dense: bool = False  # table column j holds position j for every sequence and head (causal fast path)


class CacheMethod:
    name = "vanilla"
    Config = MethodConfig
    # Prefill chunks of a step attend as one padded group (True) or one group each (default: on CPU
    # each chunk then takes the causal fast path with no padding).
    prefill_together = False

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
        dst.kv = src.kv.clone()
        dst.kv.state = copy.deepcopy(src.kv.state)
        dst.kv.extra = copy.deepcopy(src.kv.extra)
        self.pool.incref(src.kv.all_slots())

    def release(self, seq) -> None:
        """Return every slot the sequence holds to the pool (finish or preemption)."""
        if getattr(seq, "kv", None) is None:
            return
        self.pool.free(seq.kv.all_slots())
        seq.kv = None

    # ------------------------------------------------------------------ scheduling
    def slots_needed(self, seq, num_new_tokens: int) -> int:
        """Pool slots a step that adds `num_new_tokens` to `seq` allocates (before any eviction)."""
        return num_new_tokens * self.spec.num_layers * self.spec.num_kv_heads

    def whole_prefill(self, seq) -> bool:
        """True asks the scheduler to prefill this not-yet-started prompt in ONE step (no chunking) when
        it fits `max_num_batched_tokens` (SparseX needs every token of a prompt in one forward)."""
        return False

    # A method may keep KV outside the pool's slots (DeltaKV's latent rows). It then claims part of
    # the run's one KV budget and reports rows like slots, so admission and preemption see them.
    def claim_budget(self, total_bytes: int) -> int:
        """Split the run's KV memory budget (`kv_cache_bytes`): return the bytes left for the pool's
        slots; the method keeps the rest. Default: everything is slots."""
        return total_bytes

    def rows_needed(self, seq, num_new_tokens: int) -> int:
        """Rows (outside the pool) a step adding `num_new_tokens` to `seq` may take. Default 0."""
        return 0

    def rows_free(self) -> int:
        return 1 << 62

    def max_rows(self, num_tokens: int) -> int:
        """Peak rows one sequence of `num_tokens` can hold (admission check)."""
        return 0

    def rows_capacity(self) -> int:
        return 1 << 62

    def max_slots(self, num_tokens: int) -> int:
        """Peak slots one sequence of `num_tokens` can hold (admission check against the pool)."""
        return self.slots_needed(None, num_tokens)

    def admission_slots(self, num_tokens: int) -> int:
        """Pool slots to find free before a request of `num_tokens` prompt tokens starts beside
        running ones (`admission='prompt'`): what it holds once its prompt is in. Default:
        `max_slots`; a method may add room it wants for speed (DeltaKV's reconstruction cache)."""
        return self.max_slots(num_tokens)

    # A method may hold pool slots it can give back at any time (DeltaKV's reconstruction caches: a
    # speed-up, not state). The scheduler reclaims them before it preempts a sequence or turns one away.
    def reclaimable(self) -> int:
        """Pool slots `reclaim` could free now. Default 0."""
        return 0

    def reclaim(self, num_slots: int) -> int:
        """Free at least `num_slots` evictable slots if that many are held (between steps); returns
        the slots freed."""
        return 0

    # ------------------------------------------------------------------ batch hooks (the hot path)
    def batched(self, plan) -> bool:
        """True: this step runs on the batch hooks below. Methods still on the per-sequence hooks
        return False (the engine then loops over sequences in each layer)."""
        return True

    def begin_step(self, plan) -> None:
        """Once per step, on the host: allocate every layer's slots for the step's new tokens (one
        pool call), append them to each sequence's tables, build each group's read tables."""
        self.allocate_step(plan)
        self.build_tables(plan)

    def allocate_step(self, plan) -> None:
        L, H, N = self.spec.num_layers, self.spec.num_kv_heads, plan.num_rows
        slots = self.pool.allocate(L * N * H).view(L, N, H)
        self.pool.pos.index_copy_(0, slots.reshape(-1), plan.positions[None, :, None].expand(L, N, H).reshape(-1))
        plan.write_slots = slots.reshape(L, N * H)
        cu = plan.cu
        for b, seq in enumerate(plan.seqs):
            seq.kv.append_all(slots[:, cu[b] : cu[b + 1], :].transpose(1, 2))

    def build_tables(self, plan) -> None:
        """Each group's read table [G, L, Hkv, T] (T = longest table of the group) and lengths."""
        for g in plan.groups:
            kvs = [plan.seqs[b].kv for b in g.bidx]
            t = max(kv.max_len() for kv in kvs)
            for kv in kvs:
                kv.grow(t)
            g.table = torch.stack([kv.slots[:, :, :t] for kv in kvs]) if len(kvs) > 1 else kvs[0].slots[None, :, :, :t]
            g.lens_host = torch.stack([kv.lens for kv in kvs])
            g.lens = g.lens_host.to(self.pool.device)
            if not g.decode:  # host-side check: nothing evicted or reordered -> a plain causal prefill
                ends = {plan.starts[b] + plan.num_new[b] for b in g.bidx}
                if len(ends) == 1 and len({plan.num_new[b] for b in g.bidx}) == 1 and t == ends.pop():
                    # per layer: a method that narrows some layers (DeltaKV's compressed ones) keeps
                    # the fast path on the layers it leaves whole
                    g.dense_layers = (g.lens_host == t).all(2).all(0).tolist()
            g.kv_valid = torch.arange(t, device=g.lens.device) < g.lens[..., None]
            # per-layer views made once per step (a layer then indexes a Python list: no op)
            g.per_layer = list(zip(g.table.unbind(1), g.lens.unbind(1), g.kv_valid.unbind(1)))

    def end_step(self, plan) -> None:
        """After the step's forward (host): release per-step resources (e.g. scratch slots)."""

    def write_layer(self, plan, layer: int, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor | None) -> None:
        """One scatter per layer: the batch's new K (after RoPE) and V [N, Hkv, D] into their slots."""
        if plan.write_slots_l is None:
            plan.write_slots_l = plan.write_slots.unbind(0)
        idx, d, dt = plan.write_slots_l[layer], self.spec.head_dim, self.pool.dtype
        k, v = k.reshape(-1, d), v.reshape(-1, d)
        self.pool.k.index_copy_(0, idx, k if k.dtype == dt else k.to(dt))
        self.pool.v.index_copy_(0, idx, v if v.dtype == dt else v.to(dt))

    def layer_view(self, plan, layer: int, group) -> BatchView:
        """The read table of `layer` for `group` (default: everything the sequences hold)."""
        table, lens, valid = group.per_layer[layer]
        return BatchView(table, lens, valid=valid, dense=group.dense_layers is not None and group.dense_layers[layer])

    def observe_layer(self, plan, layer: int, group, q: torch.Tensor, view: BatchView, kv) -> None:
        """After a group's attention: q [N, Hq, D] (the step's flat queries), `kv` = (k [G, Hkv, T, D],
        kpos, valid) as gathered for attention (None when a kernel read the pool directly)."""

    def forward_layer(self, plan, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      k_pre: torch.Tensor | None) -> torch.Tensor:
        """One layer's KV write and attention for the whole step. q [N, Hq, D] -> [N, Hq, D]."""
        self.write_layer(plan, layer, k, v, k_pre)
        if len(plan.groups) == 1 and plan.groups[0].flat_rows is None:
            return self._attend(plan, layer, plan.groups[0], q)
        out = torch.empty_like(q)
        for group in plan.groups:  # at most two: the decode rows and the prefill chunks
            out.index_copy_(0, group.flat_rows, self._attend(plan, layer, group, q))
        return out

    def _attend(self, plan, layer, group, q):
        view = self.layer_view(plan, layer, group)
        out, kv = attend_group(q, group, view.table, view.lens, self.pool, self.scale, self.sliding_window,
                               self.decode_kernel, valid=view.valid, dense=view.dense)
        self.observe_layer(plan, layer, group, q, view, kv)
        if view.scratch is not None:
            self.pool.free(view.scratch)
        return out

    # ------------------------------------------------------------------ per-sequence hooks (legacy path)
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
        return seq.kv.total() * self.pool.bytes_per_slot
