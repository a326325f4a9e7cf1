"""`kivi`: KIVI KV-cache quantization (Liu et al. 2024) as a method of its own - the baseline that
keeps every token, at `bits` per element plus float16 min / scale per group.

Every layer keeps the first `sink_size` tokens (KIVI itself: 0) and the most recent
`residual_length` .. `residual_length + group_size - 1` tokens at full precision in the pool; older
tokens are quantized in blocks of `group_size` tokens (keys per channel, values per token in groups
of `group_size` channels: `kivi_quant`) into an arena outside the pool, and dequantized into scratch
slots for attention, one layer at a time (`kivi_layers.KiviLayers`, shared with DeltaKV's full
layers). Quantized blocks claim `latent_share` of `kv_cache_bytes` (one KV budget; the knob has
DeltaKV's name: both are "rows outside the pool"), the pool's slots the rest.

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
        latent_share: fraction of kv_cache_bytes for the quantized blocks (the rest: pool slots for
            sinks, residual tails, one layer's dequantized scratch per running sequence); None = from
            the geometry (a long sequence's share of quantized bytes).
    """

    bits: int = 4
    group_size: int = 32
    residual_length: int = 32
    sink_size: int = 0
    latent_share: float | None = None

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
        if self.latent_share is not None and (isinstance(self.latent_share, bool)
                                              or not 0.0 < float(self.latent_share) < 1.0):
            raise ValueError(f"latent_share is the fraction of kv_cache_bytes for quantized blocks, in (0, 1); got "
                             f"{self.latent_share!r} (None = from the geometry)")
        KiviCodec(spec.num_kv_heads, spec.head_dim, self.bits, self.group_size)  # packing rules


class KiviCache(CacheMethod):
    name = "kivi"
    Config = KiviConfig

    def __init__(self, config, spec, pool, sliding_window=None):
        super().__init__(config, spec, pool, sliding_window)
        c = self.config
        self.codec = KiviCodec(spec.num_kv_heads, spec.head_dim, c.bits, c.group_size)
        self.kivi = KiviLayers(list(range(spec.num_layers)), self.codec, c.sink_size, c.residual_length, pool, spec)
        self.arena_bytes = 0

    @property
    def store(self):
        return self.kivi.store

    # ------------------------------------------------------------------ lifecycle
    def new_sequence(self, seq) -> None:
        super().new_sequence(seq)
        seq.kv.state = self.kivi.new_state()

    def fork(self, src, dst) -> None:
        super().fork(src, dst)  # deep-copies the state: the blocks are shared, with one more reference
        self.store.incref(dst.kv.state.blocks)

    def release(self, seq) -> None:
        if getattr(seq, "kv", None) is not None:
            self.store.free(seq.kv.state.blocks)
        super().release(seq)

    # ------------------------------------------------------------------ one KV budget
    def auto_latent_share(self) -> float:
        """Quantized bytes / (quantized + one layer of dequantized scratch) per token of a long sequence."""
        q = self.spec.num_layers * self.codec.bytes_per_token
        scratch = self.spec.num_kv_heads * self.pool.bytes_per_slot
        return q / (q + scratch)

    def claim_budget(self, total_bytes: int) -> int:
        share = self.config.latent_share if self.config.latent_share is not None else self.auto_latent_share()
        rb = self.codec.block_bytes
        self.arena_bytes = round(total_bytes * share) // rb * rb  # round: a share given as bytes / total is exact
        self.kivi.set_limit(self.arena_bytes)
        return total_bytes - self.arena_bytes

    def rows_needed(self, seq, num_new_tokens: int) -> int:
        st = seq.kv.state if getattr(seq, "kv", None) is not None else None
        return self.kivi.blocks_needed(st, seq.num_computed + num_new_tokens)

    def rows_free(self) -> int:
        return self.store.arena.num_free

    def max_rows(self, num_tokens: int) -> int:
        return self.kivi.blocks_needed(None, num_tokens)

    def rows_capacity(self) -> int:
        lim = self.store.arena.limit
        return lim if lim is not None else 1 << 62

    # ------------------------------------------------------------------ scheduling
    def _quantized(self, seq) -> int:
        kv = getattr(seq, "kv", None) if seq is not None else None
        return self.kivi.quantized(kv.state) if kv is not None else 0

    def slots_needed(self, seq, num_new_tokens: int) -> int:
        """New tokens in every layer + one layer's dequantized scratch (freed after the step)."""
        return (num_new_tokens * self.spec.num_layers + self._quantized(seq)) * self.spec.num_kv_heads

    def max_slots(self, num_tokens: int) -> int:
        chunk = min(num_tokens, getattr(self, "max_chunk", None) or num_tokens)
        full = self.kivi.max_full_tokens(num_tokens, chunk)
        scratch = max(0, self.kivi.quant_end(num_tokens) - self.kivi.sinks)
        return (self.spec.num_layers * full + scratch) * self.spec.num_kv_heads

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
        """Full-precision slots x bytes_per_slot + quantized blocks x block_bytes."""
        if getattr(seq, "kv", None) is None:
            return 0
        return super().kv_bytes(seq) + self.kivi.bytes_held(seq.kv.state)

    def stats(self) -> dict:
        return {
            "kivi_bits": self.config.bits,
            "kivi_block_bytes": self.codec.block_bytes,
            "kivi_bytes_per_token_layer": self.codec.bytes_per_token,
            "latent_row_bytes": self.codec.block_bytes,
            "latent_rows_capacity": self.store.arena.limit,
            "latent_rows_used": self.store.used,
            "latent_rows_peak": self.store.arena.peak,
            "latent_arena_bytes": self.arena_bytes,
            "quantized_bytes_used": self.store.used * self.codec.block_bytes,
            "quantized_tokens": self.kivi.quantized_tokens,
        }
