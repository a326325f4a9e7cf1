"""`kivi`: KIVI KV-cache quantization (Liu et al. 2024) as a method of its own - the baseline that
keeps every token, at `bits` per element plus float16 min / scale per group.

Every layer keeps the first `sink_size` tokens (KIVI itself: 0) and the most recent
`residual_length` .. `residual_length + group_size - 1` tokens at full precision in the pool; older
tokens are quantized in blocks of `group_size` tokens (keys per channel, values per token in groups
of `group_size` channels: `kivi_quant`) stored as bytes in pool slots (one KV budget: a block holds
ceil(block_bytes / bytes_per_slot) slots), and dequantized into scratch slots for attention, one
layer at a time (`kivi_layers.KiviLayers`, shared with DeltaKV's full layers). kv_bytes counts
exactly the slots held.

Conventions of the reference implementations (read, not copied): KIVI's `residual_length` / `group_size`
(jy-yuan/KIVI, `models/llama_kivi.py`); the DeltaKV reference engine's `full_layer_kv_quant_bits`,
`full_layer_kivi_group_size=32`, `full_layer_kivi_residual_length=32` (CURRENTF/Sparse-vLLM,
`engine/cache_manager/deltakv_less_memory.py`: post-RoPE keys, sinks kept, whole groups only).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models.spec import ModelSpec
from .base import CacheMethod, MethodConfig
from .kivi_layers import KiviLayers
from .kivi_quant import KIVI_BITS, KiviCodec


@dataclass
class KiviConfig(MethodConfig):
    """Knobs of `kivi`.

    Attributes:
        bits: 2 | 4 | 8 bits per quantized element.
        group_size: tokens per key group (per-channel quantization) and channels per value group
            (per-token quantization); must divide head_dim. KIVI / the reference: 32.
        residual_length: most recent tokens always kept at full precision (KIVI's R; tokens leave
            it in whole groups, so up to residual_length + group_size - 1 are full precision).
        sink_size: first tokens kept at full precision (KIVI: 0; the DeltaKV reference keeps its sinks).
    """

    bits: int = 4
    group_size: int = 32
    residual_length: int = 32
    sink_size: int = 0

    def validate(self, spec: ModelSpec) -> None:
        if isinstance(self.bits, bool) or self.bits not in KIVI_BITS:
            raise ValueError(f"bits must be one of {KIVI_BITS}, got {self.bits!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive int (tokens per key group), got {self.group_size!r}")
        if spec.head_dim % self.group_size:
            raise ValueError(f"group_size={self.group_size} must divide the model's head_dim={spec.head_dim} (values "
                             "are quantized per token in groups of group_size channels)")
        for name in ("residual_length", "sink_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        KiviCodec(spec.num_kv_heads, spec.head_dim, self.bits, self.group_size)  # packing rules


class KiviCache(CacheMethod):
    name = "kivi"
    Config = KiviConfig

    def __init__(self, config, spec, pool, sliding_window=None):
        super().__init__(config, spec, pool, sliding_window)
        c = self.config
        self.codec = KiviCodec(spec.num_kv_heads, spec.head_dim, c.bits, c.group_size)
        self.kivi = KiviLayers(list(range(spec.num_layers)), self.codec, c.sink_size, c.residual_length, pool, spec)

    @property
    def store(self):
        return self.kivi.store

    # ------------------------------------------------------------------ lifecycle
    def new_sequence(self, seq) -> None:
        super().new_sequence(seq)
        seq.kv.state = self.kivi.new_state()

    def fork(self, src, dst) -> None:
        super().fork(src, dst)  # deep-copies the state: the blocks' slots are shared, one more reference each
        self.pool.incref(dst.kv.state.blocks)

    def release(self, seq) -> None:
        if getattr(seq, "kv", None) is not None:
            self.pool.free(seq.kv.state.blocks)
        super().release(seq)

    # ------------------------------------------------------------------ scheduling
    def _state(self, seq):
        kv = getattr(seq, "kv", None) if seq is not None else None
        return kv.state if kv is not None else None

    def slots_needed(self, seq, num_new_tokens: int) -> int:
        """New tokens in every layer + one layer's dequantized scratch (freed before `after_step`) +
        the slots of the blocks `after_step` quantizes (allocated before the tail is freed)."""
        st = self._state(seq)
        done = seq.num_computed if seq is not None else 0
        return (num_new_tokens * self.spec.num_layers * self.spec.num_kv_heads + self.kivi.scratch_slots(st)
                + self.kivi.block_slots_needed(st, done + num_new_tokens))

    def max_slots(self, num_tokens: int) -> int:
        chunk = min(num_tokens, getattr(self, "max_chunk", None) or num_tokens)
        return self.kivi.max_slots(num_tokens, chunk)

    # ------------------------------------------------------------------ batch hooks
    def begin_step(self, plan) -> None:
        super().begin_step(plan)
        plan.method_data = self.kivi.plan_step(plan)

    def layer_view(self, plan, layer, group):
        gk = plan.method_data.get(id(group)) if plan.method_data else None
        if gk is None:
            return super().layer_view(plan, layer, group)
        return self.kivi.layer_view(gk, layer, group.per_layer[layer][0])

    def end_step(self, plan) -> None:
        if plan.method_data:
            self.kivi.end_step(plan.method_data)
            plan.method_data = None

    def after_step(self, seq, prefill_done: bool, num_new_tokens: int) -> None:
        self.kivi.compress(seq.kv, seq.kv.state, seq.num_computed)

    # ------------------------------------------------------------------ per-sequence hooks: not served
    def batched(self, plan) -> bool:
        return True

    def view(self, seq, layer, q, q_pos):
        raise NotImplementedError("kivi runs on the batch hooks only")

    # ------------------------------------------------------------------ accounting
    def kv_bytes(self, seq) -> int:
        """(Full-precision slots + the slots its blocks occupy) x bytes_per_slot."""
        if getattr(seq, "kv", None) is None:
            return 0
        return super().kv_bytes(seq) + self.kivi.slots_held(seq.kv.state) * self.pool.bytes_per_slot

    def stats(self) -> dict:
        return {
            "kivi_bits": self.config.bits,
            "kivi_block_bytes": self.codec.block_bytes,
            "kivi_bytes_per_token_layer": self.codec.bytes_per_token,
            "kivi_slots_per_block": self.store.slots_per_block,
            "quantized_tokens": self.kivi.quantized_tokens,
        }
