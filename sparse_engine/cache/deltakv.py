"""`deltakv`: serve a trained DeltaKV compressor (latent residuals + on-demand reconstruction).

Storage per sequence and layer:

* layers in `full_attn_layers` keep every token at full precision in the KV pool (as vanilla);
* every other layer (it must have a compressor pair) keeps at full precision only the SINKS, the
  PROTOTYPES ("centers": every `stride`-th token, the ONE definition of `deltakv.reference`, read from
  the checkpoint so training and serving cannot drift apart) and the RECENT window; after each
  prefill chunk, and during decode once `decode_compress_block` of them are pending, tokens that
  left the recent window are compressed:
  `kv = cat(k_pre, v)` (pre-RoPE, joined over KV heads; K is recovered from the pool by inverse
  RoPE), fathers = the `top_k` nearest causal prototypes (blockwise L2 top-k), reference = their
  mean, `latent = down(kv) - down(ref)`; the latent (float32 / bf16 / int8 / int4 with a per-token
  bf16 scale) and the father ordinals go to a latent ROW, and the token's pool slots are freed.

Reading (OmniKV-style): the observation layers (the last of each run of consecutive full layers)
score the history with their attention (max over heads and queries) and name the `num_top_tokens`
history positions every sparse layer after them reads, plus sinks and the recent window (history =
positions in [num_sinks, start - recent_size)). Selected tokens that are compressed are
reconstructed as `up(latent) + mean(fathers)`, RoPE'd at their positions into SCRATCH pool slots
that the engine frees after attention. With the selection covering the whole history (or no
`num_top_tokens_in_prefill` during prefill) every compressed token is reconstructed.

Tiers (`sparse_engine.offload`): latent rows live on the engine's device, or in host memory with
`deltakv_offload_latent=True` (pinned on CUDA, the next sparse layer's rows prefetched on a side
stream); with `deltakv_cold_after=N` rows not read for N steps move to a memory-mapped file and come
back when selected. Bytes per tier: `LLM.kv_stats()` (via `stats()`). `kv_bytes(seq)` = full-precision slots x
bytes_per_slot + latent rows x row_bytes (latent + scale + father ordinals), exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..layers.attention_ops import attention_probs, gather_kv
from ..models.spec import ModelSpec
from ..offload.latent_store import LATENT_DTYPES, LatentCodec, Prefetcher, TieredLatentStore
from . import deltakv_recon_cache as recon_cache
from .base import BatchView, CacheMethod, MethodConfig, View
from .kivi_layers import check_full_layer_kivi, full_layer_kivi
from .deltakv_recon_cache import GroupCache, ReconState
from .omnikv import _check_count, top_count
from .scoring import (check_prefill_select, check_score_mode, group_scores, pick_top, sequence_scores, step_budget)

_DTYPE_ALIASES = {"bfloat16": "bf16", "fp32": "float32", "float": "float32"}


@dataclass
class DeltaKVConfig(MethodConfig):
    """Knobs of `deltakv`.

    Attributes:
        deltakv_path: compressor checkpoint (a directory: `*.safetensors` first, then `*.bin` / `*.pt`;
            or a weights file beside its `compressor_config.json`), or an in-memory
            `deltakv.compressor.DeltaKVCompressor` (tests).
        full_attn_layers: layers kept whole at full precision (must include 0); None = the
            checkpoint's `full_attn_layers`. Every other layer needs a compressor pair.
        num_top_tokens: history tokens sparse layers read at decode (int, or a fraction in (0, 1]).
        num_top_tokens_in_prefill: same for prefill chunks after the first; None = all.
        sink_size: None = the checkpoint's `reference.num_sinks` (any other value is an error: the
            sinks are part of the reference definition the compressor was trained with).
        recent_size: most recent tokens kept at full precision and always read.
        decode_compress_block: during decode, tokens that left the recent window are compressed once
            this many are pending (one batched compression instead of one per step per layer: the
            per-call overhead dominated CPU decode); up to block-1 extra tokens stay full precision.
            Prefill chunks compress everything at once. 1 = compress every step.
        latent_dtype: float32 | bf16 | int8 | int4 (int8 / int4 with a per-token bf16 scale).
        deltakv_offload_latent: latent rows in host memory (pinned on CUDA) with prefetch.
        deltakv_prefetch: prefetch the next sparse layer's rows (with offload).
        deltakv_cold_after: rows not read for this many steps move to a memory-mapped file; None = off.
        deltakv_cold_dir: directory of that file (default: the system temp dir).
        latent_share: fraction of `kv_cache_bytes` given to the device tier's latent rows (the rest
            are pool slots: full layers, sinks, prototypes, recent window, scratch); None = from the
            geometry: the long-context share of latent bytes per token (full layers + prototypes vs
            compressed tokens at `row_bytes`). Ignored with `deltakv_offload_latent` (rows on the host).
        deltakv_host_bytes: budget of the host tier (with offload); None = unbounded.
        deltakv_disk_bytes: budget of the disk tier (with `deltakv_cold_after`); None = unbounded.
        full_layer_kv_quant_bits: 0 (full layers at full precision) | 2 | 4 | 8: the full layers keep
            KIVI blocks (`kivi_layers`: keys per channel, values per token, fp16 min / scale per
            group) except their sinks and a residual window (the reference engine's option).
        full_layer_kivi_group_size: tokens per key group / channels per value group (32).
        full_layer_kivi_residual_length: most recent tokens the full layers keep exact (32).

    The reference's rules, each a named option (defaults: ours; `sparse_engine.presets.PAPER` flips
    them; reference = CURRENTF/Sparse-vLLM@0975d3f, the engine as the paper ran it):
        score_mode: how observation layers score the history (`scoring.SCORE_MODES`): softmax_all
            (ours) | raw_qk (the paper's engine) | softmax_candidates (its HF path / latest engine).
        prefill_select: when prefill chunks select (`scoring.step_budget`): budget (ours and the
            paper's engine: with `num_top_tokens_in_prefill`) | long_prompt | never (latest engine).
        select_candidates: which history tokens a selection picks from: window (ours: every token
            in [sinks, start - recent_size), compressed or not yet) | compressed (the reference: the
            compressed region [sinks, compressed_upto), whatever is still exact is always read;
            `sparse_controller.py` `_update_dynamic_omnikv_indices`: `rel_hist_lens = get_compressed_lens`).
        proto_grid: where prototypes fall: global (ours: `deltakv.reference`'s one grid, sinks + every
            stride-th position) | per_block (the reference: the every-stride-th grid restarts at each
            compressed block, `cache_manager.py` `_deltakv_evict_one_seq`: `arange(0, evict_len,
            cluster_step)`); they agree when the stride divides the block sizes. per_block stores
            father POSITIONS in the latent rows (no closed-form ordinal), 4-byte ids past 32K positions.
        exact_window: which tokens stay exact: fixed (ours: exactly `recent_size`, plus a pending
            decode block) | blocks (the reference: compress in multiples of `recent_size` from the
            compressed boundary, keeping between recent_size and 2*recent_size-1 exact; `cache_manager.py`
            `evict_len = ((buffer_len - recent) // recent) * recent`; `decode_compress_block` unused).
        prefill_compress: incremental (the reference and the default: after every prefill chunk) |
            at_end (an ablation: the prompt stays exact, within the slot budget, until its last chunk,
            then is compressed at once).
        reuse_reconstructed: keep decoded tokens' reconstructed K/V in pool slots across decode steps
            and rebuild only newly selected ones (`deltakv_recon_cache`). Exact (a reconstruction
            never changes) and faster on CPU (4K, batch 1: ~0.6x -> ~0.95x vanilla's decode step,
            `experiments/results/engine_cpu.md`). The caches (`reconstructed_cache_factor x
            num_top_tokens` slots per sparse layer and sequence, counted in `kv_bytes`) are
            EVICTABLE: they use only pool slots nothing else needs and are dropped before a sequence
            waits or is preempted, so under a tight budget they cost nothing. Off = the reference's
            behaviour (rebuild every step).
        reconstructed_cache_factor: that cache's size in selections (>= 1): tokens at the margin of
            the top-k leave the selection and come back, and a larger cache keeps them (LRU).
        up_matmul_dtype: float32 (the reference) | bf16: the up-projection of reconstruction runs in
            bfloat16 (weights, dequantized latents and the product rounded to bf16, the bias added in
            float32; linear ups only).
            ~4x faster matmuls on CPUs with AVX512-BF16 / AMX and on GPUs; the roundings (<= 2^-8
            relative each) are small next to int4 / int8 latent quantization (ablation:
            `experiments/up_matmul_dtype.py`, results in `experiments/results/up_matmul_dtype/`).
    """

    deltakv_path: object = None
    full_attn_layers: list[int] | None = None
    num_top_tokens: int | float = 2048
    num_top_tokens_in_prefill: int | float | None = None
    sink_size: int | None = None
    recent_size: int = 32
    decode_compress_block: int = 16
    latent_dtype: str = "bf16"
    deltakv_offload_latent: bool = False
    deltakv_prefetch: bool = True
    deltakv_cold_after: int | None = None
    deltakv_cold_dir: str | None = None
    latent_share: float | None = None
    deltakv_host_bytes: int | None = None
    deltakv_disk_bytes: int | None = None
    full_layer_kv_quant_bits: int = 0
    full_layer_kivi_group_size: int = 32
    full_layer_kivi_residual_length: int = 32
    score_mode: str = "softmax_all"
    prefill_select: str = "budget"
    select_candidates: str = "window"
    proto_grid: str = "global"
    exact_window: str = "fixed"
    prefill_compress: str = "incremental"
    reuse_reconstructed: bool = False
    reconstructed_cache_factor: float = 1.5
    up_matmul_dtype: str = "float32"

    def validate(self, spec: ModelSpec) -> None:
        check_full_layer_kivi(self, spec)
        if not isinstance(self.reuse_reconstructed, bool):
            raise ValueError(f"reuse_reconstructed must be true or false, got {self.reuse_reconstructed!r}")
        f = self.reconstructed_cache_factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not f >= 1.0:
            raise ValueError(f"reconstructed_cache_factor must be a number >= 1 (cache size in selections), got {f!r}")
        if self.up_matmul_dtype not in ("float32", "bf16"):
            raise ValueError(f"deltakv.up_matmul_dtype must be 'float32' (the reference) or 'bf16', got {self.up_matmul_dtype!r}")
        check_score_mode("deltakv", self.score_mode)
        check_prefill_select("deltakv", self.prefill_select)
        for name, allowed in (("select_candidates", ("window", "compressed")), ("proto_grid", ("global", "per_block")),
                              ("exact_window", ("fixed", "blocks")), ("prefill_compress", ("incremental", "at_end"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"deltakv.{name} must be one of {allowed}, got {getattr(self, name)!r} (the first is "
                                 "ours; see DeltaKVConfig's docstring for the reference's)")
        if self.exact_window == "blocks" and self.recent_size < 1:
            raise ValueError("deltakv.exact_window='blocks' compresses in multiples of recent_size: recent_size must be "
                             f">= 1, got {self.recent_size}")
        self.latent_dtype = _DTYPE_ALIASES.get(self.latent_dtype, self.latent_dtype)
        if self.latent_dtype not in LATENT_DTYPES:
            raise ValueError(f"latent_dtype must be one of {LATENT_DTYPES}, got {self.latent_dtype!r}")
        if self.full_attn_layers is not None:
            layers = list(self.full_attn_layers)
            if 0 not in layers:
                raise ValueError(f"full_attn_layers must include layer 0 (it selects for the sparse layers), got {layers}")
            bad = [l for l in layers if not isinstance(l, int) or not 0 <= l < spec.num_layers]
            if bad:
                raise ValueError(f"full_attn_layers {bad} out of range: the model has layers 0..{spec.num_layers - 1}")
        _check_count("num_top_tokens", self.num_top_tokens)
        if self.num_top_tokens is None:
            raise ValueError("num_top_tokens is required (int tokens or fraction in (0, 1])")
        _check_count("num_top_tokens_in_prefill", self.num_top_tokens_in_prefill)
        if self.recent_size < 0:
            raise ValueError(f"recent_size must be >= 0, got {self.recent_size}")
        if isinstance(self.decode_compress_block, bool) or int(self.decode_compress_block) < 1:
            raise ValueError(f"decode_compress_block must be a number of tokens >= 1, got {self.decode_compress_block!r}")
        if self.latent_share is not None and (isinstance(self.latent_share, bool)
                                              or not 0.0 < float(self.latent_share) < 1.0):
            raise ValueError(f"latent_share is the fraction of kv_cache_bytes for latent rows, in (0, 1); got "
                             f"{self.latent_share!r} (None = derived from the compressor's geometry)")
        for name in ("deltakv_host_bytes", "deltakv_disk_bytes"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise ValueError(f"{name} must be a positive number of bytes (or None = unbounded), got {v!r}")
        if self.deltakv_cold_after is not None and (isinstance(self.deltakv_cold_after, bool)
                                                    or int(self.deltakv_cold_after) < 0):
            raise ValueError(f"deltakv_cold_after must be a number of steps >= 0 (or None), got {self.deltakv_cold_after!r}")


@dataclass
class DeltaState:
    """Per sequence. Every sparse layer holds the same positions (same appends, same compression
    rule), so the latent tokens' positions are shared and only their row handles differ per layer.

    lat_pos [n] (host): positions of the compressed tokens, in order; lat_handles [Ls, n] (host):
    their latent row per sparse layer; lat_rows [Ls, n] (device): the rows' arena indices (device
    tier) for the batched reconstruction; compressed_upto: tokens before it left the recent window
    and were compressed; sel: the last per-sequence selection (per-sequence path only)."""

    lat_pos: torch.Tensor
    lat_handles: torch.Tensor
    lat_rows: torch.Tensor | None = None
    compressed_upto: int = 0
    sel: dict = field(default_factory=dict)
    kivi: object = None  # full_layer_kv_quant_bits: the full layers' KiviState
    recon: ReconState | None = None  # reuse_reconstructed: the decode cache of reconstructed tokens

    def handles(self, i: int) -> torch.Tensor:
        return self.lat_handles[i]

    @property
    def num_latent(self) -> int:
        return self.lat_pos.numel()


@dataclass
class _GroupPlan:
    """One row group's DeltaKV step (host-known sizes, device tensors), shared by its sparse layers.

    hist_hi [G] (history = positions [sinks, hist_hi); 0 = the sequence does not select), k [G];
    t_s: width of the sparse tables; kpos_s [G, t_s] their positions (pad: p_max); colmap [G, p_max+1]
    position -> column; lat_pos [G, nl] (pad -1), lat_rows [G, Ls, nl]; w: reconstructed tokens per
    sequence (scratch [G, Hkv, w] slots, reused by every sparse layer); per observer: the view."""

    selects: bool
    hist_hi: torch.Tensor
    k: torch.Tensor
    k_max: int
    t_s: int
    lens_s: torch.Tensor
    kpos_s: torch.Tensor
    colmap: torch.Tensor
    rope_s: tuple
    lat_pos: torch.Tensor | None
    lat_rows: torch.Tensor | None
    nl: int
    w: int
    scratch: torch.Tensor | None
    scratch_real: torch.Tensor | None  # the allocated scratch slots (freed at the end of the step)
    views: dict = field(default_factory=dict)  # observer -> (li, lvalid, rope_r, cols, lens, valid)
    cache: GroupCache | None = None  # reuse_reconstructed (decode groups): the rows' stacked caches
    # prefill chunk reading every token (no top-k this step): the sparse view sorted by position holds
    # positions 0..end-1 -> the causal fast path of `attend_group` (no [n, T] mask; ~1.4x at 4K on CPU)
    dense: bool = False


def free_all(free, chunks: list) -> None:
    """`free(c)` for every chunk, even when one raises (issue 17); the first error is raised after."""
    error = None
    for c in chunks:
        try:
            free(c)
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the other frees
            error = error or e
    if error is not None:
        raise error


def load_for_engine(path_or_compressor, spec: ModelSpec, device):
    """The compressor of `deltakv_path` checked against the engine's model (clear errors)."""
    from deltakv.checkpoint import CheckpointError, load_compressor
    from deltakv.compressor import DeltaKVCompressor

    if path_or_compressor is None:
        raise ValueError("method 'deltakv' needs deltakv_path=<compressor checkpoint dir> (written by "
                         "`deltakv-train` to <output_dir>/compressor)")
    if isinstance(path_or_compressor, DeltaKVCompressor):
        comp = path_or_compressor
    else:
        path = Path(str(path_or_compressor)).expanduser()
        comp = load_compressor(path)
    c = comp.config
    problems = []
    if c.num_hidden_layers != spec.num_layers:
        problems.append(f"layers: checkpoint {c.num_hidden_layers}, model {spec.num_layers}")
    if c.kv_width != spec.kv_width:
        problems.append(f"joined KV width: checkpoint {c.kv_width} (2*{c.num_kv_heads}*{c.head_dim}), model "
                        f"{spec.kv_width} (2*{spec.num_kv_heads}*{spec.head_dim})")
    if problems:
        raise CheckpointError(f"Compressor {path_or_compressor if not isinstance(path_or_compressor, DeltaKVCompressor) else '(in memory)'} "
                              f"does not match the model ({'; '.join(problems)}). Use a compressor trained for this model "
                              "(deltakv-train model.path=<this model>).")
    return comp.to(device).float().eval()


class DeltaKVCache(CacheMethod):
    name = "deltakv"
    Config = DeltaKVConfig

    def __init__(self, config, spec, pool, sliding_window=None):
        super().__init__(config, spec, pool, sliding_window)
        cfg = self.config
        self.compressor = load_for_engine(cfg.deltakv_path, spec, pool.device)
        if spec.qk_norm and not self.compressor.config.k_after_norm:
            raise ValueError("this compressor was trained on K before the model's k_norm (a deltakv-train older than "
                             "qk-norm support), but the engine caches K after it: retrain it with this version")
        if cfg.up_matmul_dtype != "float32" and self.compressor.config.up != "linear":
            raise ValueError(f"up_matmul_dtype={cfg.up_matmul_dtype!r} serves linear up-projections; this compressor's up is "
                             f"{self.compressor.config.up!r}: use up_matmul_dtype='float32'")
        ref = self.ref = self.compressor.reference
        if ref.kind not in ("cluster_e2e", "none"):
            raise ValueError(f"deltakv serves reference.kind cluster_e2e or none; this checkpoint uses {ref.kind!r} "
                             "(its references are earlier compressed tokens, which are not kept exact)")
        if ref.kind == "cluster_e2e" and ref.weighting != "mean":
            raise ValueError("deltakv serves reference.weighting='mean' (softmax weights would have to be stored)")
        if cfg.sink_size is not None and cfg.sink_size != ref.num_sinks:
            raise ValueError(f"sink_size={cfg.sink_size} differs from the checkpoint's reference.num_sinks="
                             f"{ref.num_sinks}; leave sink_size=None (sinks are part of the trained reference)")
        full = sorted(set(cfg.full_attn_layers if cfg.full_attn_layers is not None
                          else self.compressor.config.full_attn_layers) | {0})
        if cfg.full_attn_layers is None and 0 not in self.compressor.config.full_attn_layers:
            pass  # layer 0 always selects; with a checkpoint that compresses it, it is kept full here
        missing = [l for l in range(spec.num_layers) if l not in full and l not in self.compressor.config.layers]
        if missing:
            raise ValueError(f"layers {missing} are neither in full_attn_layers nor compressed by the checkpoint "
                             f"(it compresses {self.compressor.config.layers}); add them to full_attn_layers")
        self.full = set(full)
        self.sparse = [l for l in range(spec.num_layers) if l not in self.full]
        self.source = {l: max(f for f in full if f < l) for l in self.sparse}
        self.observers = set(self.source.values())
        self.observer_list = sorted(self.observers)
        self.next_sparse = {a: b for a, b in zip(self.sparse, self.sparse[1:])}
        self.sparse_index = {l: i for i, l in enumerate(self.sparse)}
        # each observer's sparse layers, and the sparse indices of those groups and of every one layer
        # (device tensors made once: reconstruction indexes the latent rows and caches with them)
        self.observer_layers = {o: tuple(l for l in self.sparse if self.source[l] == o) for o in self.observer_list}
        self._sparse_idx = {ls: torch.tensor([self.sparse_index[l] for l in ls], device=pool.device)
                            for ls in [*self.observer_layers.values(), *((l,) for l in self.sparse)]}
        self._sparse_layers = torch.tensor(self.sparse, dtype=torch.long, device=pool.device)  # layer ids
        self.sinks, self.stride = ref.num_sinks, ref.stride
        self.num_fathers = ref.top_k if ref.kind == "cluster_e2e" else 0
        max_ord = self._ordinal(torch.tensor([spec.max_position_embeddings])).item()
        codec = LatentCodec(self.compressor.config.kv_compressed_size, cfg.latent_dtype, self.num_fathers,
                            2 if max_ord < 2**15 - 1 else 4)
        self.codec = codec
        self.store = self._make_store(None)
        self.prefetcher = Prefetcher(self.store) if cfg.deltakv_offload_latent and cfg.deltakv_prefetch else None
        self.inv_freq = spec.inv_freq.to(pool.device)
        self.rope_scaling = float(spec.rope_attention_scaling)
        self.counters = {"compressed_tokens": 0, "reconstructed_tokens": 0, "reconstruct_caches_dropped": 0}
        self._reconstructed = torch.zeros((), dtype=torch.long, device=pool.device)  # batched path: summed lazily
        self.full_kivi = full_layer_kivi(self)  # None unless full_layer_kv_quant_bits
        self._kivi_step = {}  # this step's KIVI plan per row group (full layers)
        self._cache_hits = torch.zeros((), dtype=torch.long, device=pool.device)  # reuse_reconstructed
        self._recon_slots = 0  # reuse_reconstructed: pool slots held by the caches of live sequences
        self._cache_owners: dict[int, DeltaState] = {}  # seq_id -> state holding a cache (reclaim)
        self._step = 0  # reuse_reconstructed: step counter for the caches' LRU stamps
        self._up_stacks: dict = {}  # sparse layers -> stacked linear up weights (or the layers' modules)

    # ------------------------------------------------------------------ batch hooks
    def batched(self, plan) -> bool:
        # Host / disk tiers move rows between arenas (handles -> rows changes): per-sequence path.
        return not self.config.deltakv_offload_latent and self.config.deltakv_cold_after is None

    def _inv_ordinal(self, o: torch.Tensor) -> torch.Tensor:
        """Prototype position of prototype ordinal `o` (inverse of `_ordinal`)."""
        if self.stride == 0 or self.config.proto_grid == "per_block":
            return o
        return torch.where(o < self.sinks, o, self.sinks + (o - self.sinks) * self.stride)

    def begin_step(self, plan) -> None:
        """Host, once per step: per row group, who selects and how many tokens (the OmniKV rule over
        the history [sinks, start - recent_size)), the sparse tables' positions and a position ->
        column map, the latent tokens to choose from, and ONE block of scratch slots [G, Hkv, w] that
        every sparse layer's reconstruction reuses (freed in `end_step`)."""
        super().begin_step(plan)
        self._step += 1
        plan.method_data = {id(g): self._plan_group(plan, g) for g in plan.groups}
        self._kivi_step = self.full_kivi.plan_step(plan) if self.full_kivi is not None else {}

    def _plan_group(self, plan, group) -> _GroupPlan | None:
        cfg, dev, hkv = self.config, self.pool.device, self.spec.num_kv_heads
        states = [plan.seqs[b].kv.state for b in group.bidx]
        nls = [st.num_latent for st in states]
        hist_hi, ks, ws = [], [], []
        for row, b in enumerate(group.bidx):
            start = plan.starts[b]
            budget, hi = self._rule(plan.seqs[b], start)
            n_hist = max(0, hi - self.sinks)
            k = top_count(budget, n_hist) if budget is not None and n_hist else 0
            on = budget is not None and k < n_hist
            hist_hi.append(hi if on else 0)
            ks.append(k if on else 0)
            ws.append(min(k, nls[row]) if on else nls[row])
        selects = any(h > 0 for h in hist_hi)
        if not selects and not any(nls):
            return None  # nothing compressed, nothing narrowed: the sparse layers read what they hold
        s0 = self.sparse[0]
        lens_s_host = group.lens_host[:, s0, 0]
        t_s = int(lens_s_host.max())
        p_max = max(plan.starts[b] + plan.num_new[b] for b in group.bidx)
        G = len(group.bidx)
        lens_s = lens_s_host.to(dev)
        col = torch.arange(t_s, device=dev)
        kpos_s = self.pool.pos[group.table[:, s0, 0, :t_s]].masked_fill(col[None, :] >= lens_s[:, None], p_max)
        colmap = torch.full((G, p_max + 1), -1, dtype=torch.long, device=dev)
        colmap.scatter_(1, kpos_s, col.expand(G, t_s).contiguous())
        nl, w = max(nls), max(ws)
        lat_pos = lat_rows = scratch = scratch_real = cache = None
        use_cache = cfg.reuse_reconstructed and group.decode and all(
            plan.starts[b] >= plan.seqs[b].num_prompt_tokens for b in group.bidx)
        if w:
            lat_pos = torch.full((G, nl), -1, dtype=torch.long)
            for row, st in enumerate(states):
                lat_pos[row, : nls[row]] = st.lat_pos
            lat_pos = lat_pos.to(dev)
            lat_rows = torch.stack([torch.nn.functional.pad(st.lat_rows, (0, nl - st.lat_rows.shape[1]))
                                    for st in states])  # [G, Ls, nl]
        if w and use_cache:
            use_cache = self._plan_caches(plan, group, states, ks, nls, ws)
        if w and use_cache:
            rows = [st.recon if ws[row] else recon_cache.empty_state(len(self.sparse), hkv, len(self.observer_list), dev)
                    for row, st in enumerate(states)]
            cache = recon_cache.stack(rows, self.pool.trash, persistent=[bool(wb) for wb in ws])
        elif w:
            # Each sequence gets slots for its own tokens only (what `slots_needed` reserved); the
            # padding of the [G, Hkv, w] block points at the pool's trash row (written, never read).
            real = self.pool.allocate(sum(ws) * hkv)
            scratch = torch.full((G, hkv, w), self.pool.trash, dtype=torch.long, device=dev)
            o = 0
            for row, wb in enumerate(ws):
                scratch[row, :, :wb] = real[o : o + wb * hkv].view(hkv, wb)
                o += wb * hkv
            scratch_real = real
        hist_hi_d, k_d = torch.tensor([hist_hi, ks], dtype=torch.long).to(dev)
        ends = [plan.starts[b] + plan.num_new[b] for b in group.bidx]
        dense = (not group.decode and not selects and len(set(ends)) == 1 and len({plan.num_new[b] for b in group.bidx}) == 1
                 and all(int(lens_s_host[row]) + nls[row] == ends[row] for row in range(G)))
        return _GroupPlan(selects, hist_hi_d, k_d, max(ks), t_s, lens_s, kpos_s, colmap,
                          self._tables(kpos_s.clamp(max=p_max - 1).reshape(-1)), lat_pos, lat_rows, nl, w, scratch,
                          scratch_real, cache=cache, dense=dense)

    def _rule(self, seq, start: int):
        """(top-k budget or None, history end) of a sequence's step whose first query is at `start`
        (history = positions [sinks, end)): the one selection rule of both paths."""
        cfg = self.config
        decode = start >= seq.num_prompt_tokens
        budget = step_budget(cfg, decode, seq.num_prompt_tokens, self.sinks, getattr(self, "max_chunk", None))
        if cfg.select_candidates == "compressed":
            return budget, seq.kv.state.compressed_upto
        return budget, start - cfg.recent_size

    def end_step(self, plan) -> None:
        """Every group's scratch goes back, even when one free raises (issue 17): the list is made
        first, each free is attempted, the first error is raised after all of them."""
        if self._kivi_step:  # the full layers' dequantized scratch
            step, self._kivi_step = self._kivi_step, {}
            self.full_kivi.end_step(step)
        free_all(self.pool.free, [gp.scratch_real for gp in (plan.method_data or {}).values()
                                  if gp is not None and gp.scratch_real is not None])

    def observe_layer(self, plan, layer, group, q, view, kv) -> None:
        """At an observation layer: score the history (shared scorer), then build once for all the
        sparse layers it serves which columns of their tables stay and which latent tokens are
        reconstructed (in position order, as the per-sequence path orders them)."""
        gp = plan.method_data.get(id(group)) if plan.method_data else None
        if layer not in self.observers or gp is None:
            return
        dev, hkv = self.pool.device, self.spec.num_kv_heads
        G, t_s = gp.kpos_s.shape
        if gp.selects:
            T = view.table.shape[2]
            pcol = torch.arange(T, device=dev)
            hist = (pcol >= self.sinks) & (pcol < gp.hist_hi[:, None])
            score = group_scores(self.pool, self.scale, group, q, view, kv, self.config.score_mode, hist)  # [G, T]: column = position
            picked = pick_top(score, hist, gp.k, gp.k_max)  # [G, T] by position
            picked = torch.cat([picked, picked.new_zeros(G, gp.colmap.shape[1] - T)], dim=1) \
                if gp.colmap.shape[1] > T else picked[:, : gp.colmap.shape[1]]
            on = (gp.hist_hi > 0)[:, None]
            hist_s = on & (gp.kpos_s >= self.sinks) & (gp.kpos_s < gp.hist_hi[:, None])
            keep = ~hist_s | picked.gather(1, gp.kpos_s)
        else:
            on, picked = None, None
            keep = torch.ones(G, t_s, dtype=torch.bool, device=dev)
        keep &= torch.arange(t_s, device=dev)[None, :] < gp.lens_s[:, None]
        li = lvalid = rope_r = mcol = None
        if gp.w:
            lvalid = gp.lat_pos >= 0  # [G, nl]
            if picked is not None:
                lvalid &= ~on | picked.gather(1, gp.lat_pos.clamp(min=0))
            # selected latent tokens to the front, in position order: a stable sort of the mask
            li = torch.sort((~lvalid).to(torch.int8), dim=1, stable=True).indices[:, : gp.w]
            lvalid = lvalid.gather(1, li)
            rpos = gp.lat_pos.gather(1, li).clamp(min=0)  # [G, w]
            if gp.cache is not None:
                li, lvalid, rope_r, mcol, used = self._assign_cached(plan, group, gp, layer, li, lvalid, rpos)
                keep = torch.cat([keep, used], dim=1)
            else:
                self.pool.pos.index_copy_(0, gp.scratch.reshape(-1),
                                          rpos[:, None, :].expand(G, hkv, gp.w).reshape(-1))
                rope_r = self._tables(rpos.reshape(-1))
                keep = torch.cat([keep, lvalid], dim=1)
        if gp.dense:  # every position once (table + reconstructed tokens): sort the columns by position
            pos = torch.cat([gp.kpos_s, rpos], dim=1) if gp.w else gp.kpos_s
            end = int(gp.colmap.shape[1]) - 1  # p_max: the chunk's end
            cols = torch.sort(pos.masked_fill(~keep, end), dim=1, stable=True).indices[:, :end]
            lens = torch.full((G, hkv), end, dtype=torch.long, device=dev)
            gp.views[layer] = (li, lvalid, rope_r, cols, lens, None, mcol)
            return
        cols = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices  # kept first, in order
        n_keep = keep.sum(1)
        lens = n_keep[:, None].expand(G, hkv).contiguous()
        valid = torch.arange(cols.shape[1], device=dev)[None, None, :] < lens[:, :, None]
        gp.views[layer] = (li, lvalid, rope_r, cols, lens, valid, mcol)

    # ------------------------------------------------------------------ reuse_reconstructed: evictable caches
    def _cache_headroom(self, plan) -> int:
        """Free slots a cache may not take: twice what the step's sequences reserve for a step (this
        step's remaining scratch, and the next step, so that the next schedule does not reclaim what
        this one grew)."""
        return 2 * sum(self.slots_needed(s, 1) for s in plan.seqs)

    def _drop_cache(self, seq_id: int, st: DeltaState, counted: bool = True) -> int:
        """Free a sequence's reconstruction cache (rebuilt when it is selected again); returns its slots."""
        self._cache_owners.pop(seq_id, None)
        recon, st.recon = st.recon, None
        if recon is None:
            return 0
        self._recon_slots -= recon.num_slots
        if counted:
            self.counters["reconstruct_caches_dropped"] += 1
        recon_cache.release(recon, self.pool)
        return recon.num_slots

    def _plan_caches(self, plan, group, states, ks, nls, ws) -> bool:
        """Whether this decode group reads through the caches this step: every row that reconstructs
        anything needs a cache at least as wide as its selection. Caches grow to `factor` selections
        only from slots no reservation needs (evictable); if a row selects nothing (reads every
        compressed token) or has no room, the whole group takes the plain per-layer scratch path
        this step (its caches are kept for later steps)."""
        hkv, ls = self.spec.num_kv_heads, len(self.sparse)
        spare = self.pool.num_free - self._cache_headroom(plan)
        grows = []
        for row, st in enumerate(states):
            if not ws[row]:
                continue
            cap = self._cache_width(ks[row], nls[row])
            have = st.recon.capacity if st.recon is not None else 0
            if not cap:
                return False
            grow = max(0, cap - have) * ls * hkv
            if grow and grow <= spare:
                grows.append((row, cap, grow))
                spare -= grow
            elif have < ws[row]:
                return False
        for row, cap, grow in grows:
            st, b = states[row], group.bidx[row]
            if st.recon is None:
                st.recon = recon_cache.empty_state(ls, hkv, len(self.observer_list), self.pool.device)
            self._recon_slots += grow  # counted as evictable before the pool hands them out
            try:
                st.recon = recon_cache.ensure_capacity(st.recon, cap, self.pool)
            except BaseException:
                self._recon_slots -= grow
                raise
            self._cache_owners[plan.seqs[b].seq_id] = st
        return True

    def reclaimable(self) -> int:
        return self._recon_slots

    def reclaim(self, num_slots: int) -> int:
        """Drop whole caches, largest first, until `num_slots` are free again (between steps)."""
        freed = 0
        for sid, st in sorted(self._cache_owners.items(), key=lambda kv: -kv[1].recon.num_slots):
            if freed >= num_slots:
                break
            freed += self._drop_cache(sid, st)
        return freed

    def _cache_width(self, k: int, num_latent: int) -> int:
        """Columns of a sequence's reconstruction cache when it selects `k` tokens (0: not selecting)
        out of `num_latent` compressed ones: `factor` selections, at most every compressed token; 0
        (no cache) when the selection reads every compressed token anyway: a cache would then be a
        decompressed copy of the sequence."""
        if not 0 < k < num_latent:
            return 0
        return min(math.ceil(k * self.config.reconstructed_cache_factor), num_latent)

    def _assign_cached(self, plan, group, gp: _GroupPlan, layer: int, li, lvalid, rpos):
        """reuse_reconstructed: this observer's selection onto the rows' cache columns. Returns the
        misses (li, valid, RoPE tables), their columns, and the columns read this step [G, C]; the
        misses' positions go to the pool (every layer of this observer) and to the rows' states."""
        cache, o = gp.cache, self.observer_list.index(layer)
        cpos, stamp = cache.pos[:, o].clone(), cache.stamp[:, o].clone()
        a = recon_cache.assign(cpos, stamp, self._step, cache.caps, li, lvalid, rpos, gp.colmap.shape[1])
        cache.pos[:, o], cache.stamp[:, o] = cpos, stamp
        for row, b in enumerate(group.bidx):
            st = plan.seqs[b].kv.state.recon
            if cache.persistent[row]:
                st.pos[o], st.stamp[o] = cpos[row, : st.capacity], stamp[row, : st.capacity]
        G, m = a.col.shape
        rope_r = self._tables(a.pos.reshape(-1))
        if m:
            # every sparse layer this observer serves rebuilds the same misses: all of them now, in
            # one batched call (the fathers are prototypes of compressed tokens, already in the pool)
            layers = self.observer_layers[layer]
            sidx = self._sparse_idx[layers]
            slots = cache.slots[:, sidx].gather(3, a.col[:, None, None, :].expand(G, len(layers), cache.slots.shape[2], m))
            pos = a.pos[:, None, None, :].expand_as(slots)
            real = a.valid[:, None, None, :].expand_as(slots)
            self.pool.pos.index_copy_(0, slots[real], pos[real])
            dests = torch.where(real, slots, self.pool.trash).transpose(0, 1)  # [n, G, Hkv, m]
            self._reconstruct_layers(gp, group, layers, a.li, rope_r, dests)
            self._reconstructed += a.valid.sum() * len(layers)
        self._cache_hits += a.num_hits
        return a.li, a.valid, rope_r, a.col, a.used

    def _reconstruct_layers(self, gp: _GroupPlan, group, layers: tuple[int, ...], li: torch.Tensor, rope_r,
                            dests: torch.Tensor) -> None:
        """The group's tokens `li` [G, m] (latent indices) of the sparse `layers` -> K/V in the slots
        `dests` [n, G, Hkv, m], in one call for all the layers (a decode step's one layer; with
        reuse_reconstructed every layer an observer serves): rows -> latent + father ordinals ->
        up-projection (one batched matmul for several linear ups) -> father mean over the prototypes
        (read from each layer's table, RoPE undone) -> RoPE at the tokens' positions -> pool rows.
        Rows are ordered (layer, sequence, token)."""
        gather_inv, reconstruct, _ = self._kernels
        n, G, hkv, m = dests.shape
        t_s, sidx = gp.t_s, self._sparse_idx[layers]
        rows = gp.lat_rows[:, sidx].gather(2, li[:, None, :].expand(G, n, m))  # [G, n, m] arena rows
        latent, ords = self.store.codec.decode(self.store.mem.data[rows.transpose(0, 1).reshape(-1)])
        delta = self._up_many(layers, latent.view(n, G * m, -1)).reshape(n * G * m, -1)
        if self.num_fathers:
            tabs = group.table[:, list(layers), :, :t_s]  # [G, n, Hkv, t_s]
            table = tabs.permute(2, 1, 0, 3).reshape(hkv, n * G * t_s)
            cos_s, sin_s = gp.rope_s
            proto_kv = gather_inv(self.pool.k, self.pool.v, table, cos_s.repeat(n, 1), sin_s.repeat(n, 1),
                                  self.rope_scaling)  # [n*G*t_s, W]
            fpos = self._inv_ordinal(ords.clamp(min=0)).clamp(max=gp.colmap.shape[1] - 1).view(n, G, -1)
            fcol = gp.colmap[None].expand(n, -1, -1).gather(2, fpos).view(n * G * m, -1)
            base = (torch.arange(n * G, device=fcol.device) * t_s).repeat_interleave(m)[:, None]
            fathers = torch.where((ords >= 0) & (fcol >= 0), fcol + base, -1)
        else:
            fathers = torch.full((n * G * m, 1), -1, dtype=torch.long, device=delta.device)
            proto_kv = delta.new_zeros(1, delta.shape[1])
        cos_r, sin_r = rope_r
        slots = dests.permute(2, 0, 1, 3).reshape(hkv, n * G * m)
        reconstruct(delta, fathers, proto_kv, cos_r.repeat(n, 1), sin_r.repeat(n, 1), self.pool.k, self.pool.v,
                    slots, self.rope_scaling)

    def _up_many(self, layers: tuple[int, ...], latent: torch.Tensor) -> torch.Tensor:
        """Up-projections of sparse `layers`: latent [n, r, C] -> [n, r, W] float32 (one layer: its
        module; several linear ups: their weights stacked once, one batched matmul)."""
        stack = self._up_stacks.get(layers)
        bf16 = self.config.up_matmul_dtype == "bf16"
        if stack is None:
            pairs = [self.compressor[l] for l in layers]
            if (len(pairs) > 1 or bf16) and all(hasattr(p.up, "proj") and len(list(p.up.parameters())) <= 2 for p in pairs):  # linear ups
                dt = torch.bfloat16 if bf16 else torch.float32
                w = torch.stack([p.up.proj.weight.t() for p in pairs]).to(dt).contiguous()  # [n, C, W]
                b = (torch.stack([p.up.proj.bias for p in pairs])[:, None, :].float()
                     if pairs[0].up.proj.bias is not None else None)
                stack = (w, b)
            else:
                stack = pairs
            self._up_stacks[layers] = stack
        if isinstance(stack, tuple):
            w, b = stack
            if bf16:  # bf16 product (rounded to bf16: CPU bmm has no float32 output), float32 bias
                out = torch.bmm(latent.to(torch.bfloat16), w).float()
                return out if b is None else out.add_(b)
            return torch.bmm(latent, w) if b is None else torch.baddbmm(b, latent, w)
        return torch.stack([p.up(z.to(next(p.up.parameters()).dtype)).float() for p, z in zip(stack, latent)])

    def layer_view(self, plan, layer, group) -> BatchView:
        if layer in self.full and id(group) in self._kivi_step:  # KIVI full layer: blocks dequantized
            return self.full_kivi.layer_view(self._kivi_step[id(group)], layer, group.per_layer[layer][0])
        gp = plan.method_data.get(id(group)) if plan.method_data and layer not in self.full else None
        if gp is None:
            return super().layer_view(plan, layer, group)
        li, lvalid, rope_r, cols, lens, valid = gp.views[self.source[layer]][:6]
        G, hkv = lens.shape
        tab = group.table[:, layer, :, : gp.t_s]  # [G, Hkv, t_s]
        if gp.w and gp.cache is not None:
            # reuse_reconstructed: read the whole cache (`cols` keeps the selected columns)
            slots = gp.cache.slots[:, self.sparse_index[layer]]  # [G, Hkv, C]
            tab = torch.cat([tab, slots], dim=2)  # the misses were rebuilt at the observer
        elif gp.w:
            self._reconstruct_layers(gp, group, (layer,), li, rope_r, gp.scratch[None])
            self._reconstructed += lvalid.sum()  # device counter: no sync
            tab = torch.cat([tab, gp.scratch], dim=2)
        return BatchView(tab.gather(2, cols[:, None, :].expand(G, hkv, cols.shape[1])), lens, valid=valid, dense=gp.dense)

    # ------------------------------------------------------------------ helpers
    @property
    def _kernels(self):
        from ..kernels.deltakv_kernels import dispatch

        return dispatch(self.decode_kernel is not None)  # the engine sets decode_kernel where Triton runs

    def _ordinal(self, pos: torch.Tensor) -> torch.Tensor:
        """Prototype ordinal of prototype positions (sinks 0..S-1, then one per stride); with
        proto_grid='per_block' the position itself (no closed form)."""
        if self.stride == 0 or self.config.proto_grid == "per_block":
            return pos
        return torch.where(pos < self.sinks, pos, self.sinks + (pos - self.sinks) // max(self.stride, 1))

    def _is_proto(self, pos: torch.Tensor, done: int = 0, block_start: int | None = None) -> torch.Tensor:
        """Prototype mask of positions. global: `deltakv.reference`'s grid. per_block (the reference's):
        every token before `done` still held exact is a sink or an earlier block's prototype; in the
        block being compressed, from `block_start`, every stride-th token (block-relative)."""
        if self.config.proto_grid == "global":
            return self.ref.is_prototype(pos)
        start = max(done, self.sinks) if block_start is None else block_start
        old = pos < start
        if self.stride == 0:
            return old
        return old | ((pos - start) % self.stride == 0)

    def _boundary(self, seq, num_new_tokens: int, prefill_done: bool) -> int | None:
        """Tokens before the returned position leave the exact window now (None: nothing this step)."""
        cfg, st = self.config, seq.kv.state
        if cfg.prefill_compress == "at_end" and not prefill_done:
            return None  # the prompt stays exact until its last chunk
        base = max(st.compressed_upto, self.sinks)
        if cfg.exact_window == "blocks":  # the reference: multiples of the recent window
            buffer = seq.num_computed - base
            evict = (buffer - cfg.recent_size) // cfg.recent_size * cfg.recent_size if buffer > cfg.recent_size else 0
            return base + evict if evict > 0 else None
        boundary = seq.num_computed - cfg.recent_size
        if boundary <= self.sinks:
            return None
        if num_new_tokens == 1 and boundary - st.compressed_upto < cfg.decode_compress_block:
            return None  # decode: wait until a block of tokens has left the recent window
        return boundary

    def _tables(self, pos: torch.Tensor):
        from ..kernels.deltakv_kernels import rope_half_tables

        return rope_half_tables(self.inv_freq, pos.to(self.inv_freq.device))

    def _pre_rope_kv(self, slots: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Joined pre-RoPE KV [Ls, n, W] of pool slots [Ls, Hkv, n] (one or more layers, same positions [n])."""
        ls, hkv, n = slots.shape
        cos, sin = self._tables(pos)
        out = self._kernels[0](self.pool.k, self.pool.v, slots.transpose(0, 1).reshape(hkv, ls * n), cos.repeat(ls, 1),
                               sin.repeat(ls, 1), self.rope_scaling)
        return out.view(ls, n, -1)

    # ------------------------------------------------------------------ lifecycle
    def new_sequence(self, seq) -> None:
        super().new_sequence(seq)
        seq.kv.state = DeltaState(torch.zeros(0, dtype=torch.long), torch.zeros(len(self.sparse), 0, dtype=torch.long),
                                  torch.zeros(len(self.sparse), 0, dtype=torch.long, device=self.pool.device))
        seq.kv.state.kivi = self.full_kivi.new_state() if self.full_kivi is not None else None

    def fork(self, src, dst) -> None:
        """Sessions: the fork shares the source's latent rows by reference, like its pool slots."""
        super().fork(src, dst)
        self.store.incref(dst.kv.state.lat_handles.reshape(-1))
        dst.kv.state.sel = {}  # the source's last selection is not the child's
        if dst.kv.state.kivi is not None:  # full-layer KIVI blocks are shared like slots
            self.pool.incref(dst.kv.state.kivi.blocks)
        dst.kv.state.recon = None  # its own cache (the source's slots are the source's)

    def release(self, seq) -> None:
        if getattr(seq, "kv", None) is not None:
            if seq.kv.state.kivi is not None:
                self.pool.free(seq.kv.state.kivi.blocks)
            self._drop_cache(seq.seq_id, seq.kv.state, counted=False)
            self.store.free(seq.kv.state.lat_handles.reshape(-1))
            if self.prefetcher is not None:
                self.prefetcher.drop(seq.seq_id)
        super().release(seq)

    # ------------------------------------------------------------------ one KV budget
    def _make_store(self, mem_bytes: int | None) -> TieredLatentStore:
        cfg = self.config
        if cfg.deltakv_offload_latent:
            mem_bytes = cfg.deltakv_host_bytes
        return TieredLatentStore(self.codec, self.pool.device, offload=cfg.deltakv_offload_latent,
                                 cold_after=cfg.deltakv_cold_after, cold_dir=cfg.deltakv_cold_dir,
                                 mem_bytes=mem_bytes, disk_bytes=cfg.deltakv_disk_bytes)

    def auto_latent_share(self) -> float:
        """Latent bytes / all KV bytes per token of a long sequence: sparse layers keep a prototype
        every `stride` tokens at full precision and a latent row for the others; full layers keep
        every token."""
        proto = 1.0 / self.stride if self.stride else 0.0
        full = (len(self.full) + len(self.sparse) * proto) * self.spec.num_kv_heads * self.pool.bytes_per_slot
        lat = len(self.sparse) * (1.0 - proto) * self.store.row_bytes
        return lat / (full + lat)

    def claim_budget(self, total_bytes: int) -> int:
        """The device tier's latent rows take `latent_share` of the budget (a fixed arena: nothing
        grows past it); the pool's slots get the rest. Host / disk tiers have their own budgets."""
        if self.config.deltakv_offload_latent:
            return total_bytes  # rows live on the host, under deltakv_host_bytes (set at construction)
        share = self.config.latent_share if self.config.latent_share is not None else self.auto_latent_share()
        arena = int(total_bytes * share) // self.store.row_bytes * self.store.row_bytes
        self.store.close()
        self.store = self._make_store(arena)
        self.arena_bytes = arena
        return total_bytes - arena

    def _compressible(self, upto: int, done: int) -> int:
        """Tokens compressed once `upto` tokens are cached and `done` were (upper bound: protos counted)."""
        return max(0, upto - self.config.recent_size - max(done, self.sinks))

    def rows_needed(self, seq, num_new_tokens: int) -> int:
        kv = getattr(seq, "kv", None)
        done = kv.state.compressed_upto if kv is not None else 0
        return self._compressible(seq.num_computed + num_new_tokens, done) * len(self.sparse)

    def rows_free(self) -> int:
        return self.store.mem.num_free

    def max_rows(self, num_tokens: int) -> int:
        return self._compressible(num_tokens, 0) * len(self.sparse)

    def rows_capacity(self) -> int:
        return self.store.mem.limit if self.store.mem.limit is not None else 1 << 62

    def max_slots(self, num_tokens: int) -> int:
        """Peak slots of one sequence: full layers hold every token; sparse layers sinks, prototypes,
        the recent window, a decode block and one prefill chunk before it is compressed; plus one
        layer's scratch (every compressed token, in a prefill step that reconstructs them all). The
        reconstruction caches are evictable: not counted."""
        chunk = min(num_tokens, getattr(self, "max_chunk", None) or num_tokens)
        protos = (num_tokens // self.stride + 1) if self.stride else 0
        cfg = self.config
        window = 2 * cfg.recent_size if cfg.exact_window == "blocks" else cfg.recent_size + cfg.decode_compress_block
        per_sparse = (num_tokens if cfg.prefill_compress == "at_end"  # the whole prompt exact until its end
                      else min(num_tokens, self.sinks + protos + window + chunk))
        return self._full_layer_slots(num_tokens, chunk) + (len(self.sparse) * per_sparse + num_tokens) * self.spec.num_kv_heads

    def admission_slots(self, num_tokens: int) -> int:
        """With `reuse_reconstructed`, room for the sequence's reconstruction cache too (admission
        ='prompt'): a request then starts only while the running ones keep room for their caches,
        which are what makes their decode fast (without it each new request would take that room
        and the caches would be dropped: 0 cache hits in the 1.5-vanilla budget runs)."""
        slots, cfg = self.max_slots(num_tokens), self.config
        if cfg.reuse_reconstructed and cfg.num_top_tokens is not None:
            n_hist = max(0, num_tokens - self.sinks - cfg.recent_size)
            k = top_count(cfg.num_top_tokens, n_hist) if n_hist else 0
            slots += self._cache_width(k, self._compressible(num_tokens, 0)) * len(self.sparse) * self.spec.num_kv_heads
        return slots

    # ------------------------------------------------------------------ scheduling
    def _num_latent(self, seq) -> int:
        return seq.kv.state.num_latent if getattr(seq, "kv", None) is not None else 0

    # ------------------------------------------------------------------ full-layer KIVI (full_layer_kv_quant_bits)
    def _full_kivi_slots(self, seq, num_new_tokens: int) -> int:
        """A step's extra slots with KIVI full layers: their dequantized scratch + the blocks `after_step` makes."""
        if self.full_kivi is None:
            return 0
        st = seq.kv.state.kivi if seq is not None and getattr(seq, "kv", None) is not None else None
        done = seq.num_computed if seq is not None else 0
        return self.full_kivi.scratch_slots(st) + self.full_kivi.block_slots_needed(st, done + num_new_tokens)

    def _full_layer_slots(self, num_tokens: int, chunk: int) -> int:
        """Peak slots of the full layers of one sequence: every token, or (KIVI) sinks + tail + blocks + scratch."""
        if self.full_kivi is None:
            return len(self.full) * num_tokens * self.spec.num_kv_heads
        return self.full_kivi.max_slots(num_tokens, chunk)

    def _full_kivi_bytes(self, seq) -> int:
        st = seq.kv.state.kivi
        return 0 if st is None else self.full_kivi.slots_held(st) * self.pool.bytes_per_slot

    def slots_needed(self, seq, num_new_tokens: int) -> int:
        """New tokens in every layer + one layer's reconstructed tokens (scratch, freed after use).
        `reuse_reconstructed`'s caches are not counted: they grow only from slots no reservation
        needs and are reclaimed (`reclaim`) before anything waits or is preempted."""
        scratch = self._num_latent(seq) if seq is not None and getattr(seq, "kv", None) is not None else 0
        return (num_new_tokens * self.spec.num_layers + scratch) * self.spec.num_kv_heads + \
            self._full_kivi_slots(seq, num_new_tokens)

    # ------------------------------------------------------------------ per layer
    def view(self, seq, layer, q, q_pos) -> View:
        table = seq.kv.tables[layer]
        slots, valid = table.padded()
        if layer in self.full:
            return View(slots, valid, prefix_lens=table.lens.clone())
        st = seq.kv.state
        handles, lpos = st.handles(self.sparse_index[layer]), st.lat_pos
        sel = st.sel.get(self.source[layer])
        if sel is None:
            keep = None
            need = torch.ones(len(handles), dtype=torch.bool)
        else:
            kpos = self.pool.pos[slots[0]].cpu()
            hist = (kpos >= self.sinks) & (kpos < self._rule(seq, int(q_pos.min()))[1])
            keep = ~hist | torch.isin(kpos, sel)
            need = torch.isin(lpos, sel)
        if keep is not None and not bool(keep.all()):
            slots = slots[:, keep.to(slots.device)]
        scratch = None
        if bool(need.any()):
            scratch = self._reconstruct(seq, layer, handles[need], lpos[need])
            slots = torch.cat([slots, scratch], dim=1)
        if self.prefetcher is not None and layer in self.next_sparse:
            nxt = self.next_sparse[layer]
            h2, p2 = st.handles(self.sparse_index[nxt]), st.lat_pos
            sel2 = st.sel.get(self.source[nxt])
            h2 = h2 if sel2 is None else h2[torch.isin(p2, sel2)]
            if len(h2):
                self.prefetcher.start((seq.seq_id, nxt), h2)
        t = slots.shape[1]
        return View(slots, torch.ones(slots.shape, dtype=torch.bool, device=slots.device),
                    scratch=None if scratch is None else scratch.reshape(-1),
                    prefix_lens=torch.full((self.spec.num_kv_heads,), t, dtype=torch.long))

    def _reconstruct(self, seq, layer: int, handles: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Rebuild the K/V of compressed tokens into fresh scratch slots [Hkv, n] (RoPE applied)."""
        _, reconstruct, _ = self._kernels
        rows = self.prefetcher.take((seq.seq_id, layer), handles) if self.prefetcher is not None else None
        if rows is None:
            rows = self.store.rows(handles)
        else:
            self.store.last[handles.cpu()] = self.store.clock
        latent, ords = self.store.codec.decode(rows)
        delta = self._up_many((layer,), latent.float()[None])[0]
        proto_kv = fathers = None
        if self.num_fathers:
            slots_full = seq.kv.tables[layer].padded()[0]
            fpos = self.pool.pos[slots_full[0]]
            pmask = (self._is_proto(fpos) if self.config.proto_grid == "global"
                     else fpos < max(seq.kv.state.compressed_upto, self.sinks))  # per_block: every exact token there
            ppos = fpos[pmask]
            proto_kv = self._pre_rope_kv(slots_full[None, :, pmask], ppos)[0]
            lookup = torch.full((int(self._ordinal(ppos).max()) + 2 if len(ppos) else 1,), -1, dtype=torch.long,
                                device=ppos.device)
            lookup[self._ordinal(ppos)] = torch.arange(len(ppos), device=ppos.device)
            o = ords.to(ppos.device)
            fathers = torch.where(o >= 0, lookup[o.clamp(min=0, max=len(lookup) - 1)], o)
        else:
            fathers = torch.full((len(handles), 1), -1, dtype=torch.long, device=delta.device)
            proto_kv = delta.new_zeros(1, delta.shape[1])
        n = len(handles)
        scratch = self.pool.allocate(n * self.spec.num_kv_heads).view(self.spec.num_kv_heads, n)
        pos_dev = pos.to(self.pool.device)
        cos, sin = self._tables(pos_dev)
        reconstruct(delta, fathers, proto_kv, cos, sin, self.pool.k, self.pool.v, scratch, self.rope_scaling)
        self.pool.pos[scratch] = pos_dev[None, :].expand_as(scratch)
        self.counters["reconstructed_tokens"] += n
        return scratch

    def observe(self, seq, layer, q, q_pos, view) -> None:
        if layer not in self.observers:
            return
        sel = seq.kv.state.sel
        sel[layer] = None  # default: the sparse layers read (and reconstruct) everything this step
        budget, hi = self._rule(seq, int(q_pos.min()))
        if budget is None:
            return
        k, _, kpos = gather_kv(self.pool, view.slots)
        pos = kpos[0].cpu()
        history = (pos >= self.sinks) & (pos < hi)
        n_hist = int(history.sum())
        k_top = top_count(budget, n_hist) if n_hist else 0
        if k_top >= n_hist:
            return
        score = sequence_scores(q, q_pos, k, kpos, view.valid, self.scale, self.config.score_mode,
                                history).cpu().masked_fill(~history, float("-inf"))
        sel[layer] = pos[score.topk(k_top).indices].sort().values

    # ------------------------------------------------------------------ per step
    @torch.inference_mode()
    def after_step(self, seq, prefill_done: bool, num_new_tokens: int) -> None:
        """Compress every sparse layer's tokens that left the exact window (`_boundary`); free their
        slots. Two phases (issue 17): every layer's latents are computed and stored first (nothing
        else changes: on an exception the new rows are freed and the sequence is as it was), then the
        rows are recorded and every layer's slots are freed and dropped from its table (each free
        attempted even if one raises)."""
        if self.full_kivi is not None:  # full layers: whole groups that left the KIVI residual window
            self.full_kivi.compress(seq.kv, seq.kv.state.kivi, seq.num_computed)
        self._pending = []
        try:
            self._compress(seq, prefill_done, num_new_tokens)
        except BaseException:
            if self._pending:  # stored, not yet owned by the sequence
                self.store.free(torch.cat(self._pending))
            raise
        finally:
            self._pending = []

    def _compress(self, seq, prefill_done: bool, num_new_tokens: int) -> None:
        """All sparse layers at once: they hold the same positions in the same order (same appends,
        same rule), so one mask, one gather, one top-k and one store call serve them all (a loop over
        layers was ~40 ms per 16-token decode block at 4K on CPU: Python, not arithmetic)."""
        self.store.tick()
        boundary = self._boundary(seq, num_new_tokens, prefill_done)
        if boundary is None or not self.sparse:
            return
        st: DeltaState = seq.kv.state
        kv_all = seq.kv
        done = st.compressed_upto
        block_start = max(done, self.sinks)
        topk = self._kernels[2]
        lens = kv_all.lens[self.sparse]  # [Ls, Hkv] host
        t = int(lens[0, 0])
        if not bool((lens == t).all()):
            raise RuntimeError("deltakv: sparse layers hold different token counts (they must hold the same positions)")
        sidx = self._sparse_layers
        slots = kv_all.slots[sidx, :, :t]  # [Ls, Hkv, T]
        pos = self.pool.pos[slots[0, 0]]
        proto = self._is_proto(pos, done, block_start)
        comp = (pos < boundary) & ~proto
        n = int(comp.sum())
        if n == 0:
            st.compressed_upto = boundary
            return
        ls = slots.shape[0]
        cpos = pos[comp]
        kv = self._pre_rope_kv(slots[:, :, comp], cpos)  # [Ls, n, W]
        if self.num_fathers:
            pmask = proto & (pos < cpos.max())
            ppos = pos[pmask]
            proto_kv = self._pre_rope_kv(slots[:, :, pmask], ppos)  # [Ls, P, W]
            w = kv.shape[2] // 2 if self.ref.cluster_on == "k" else kv.shape[2]  # K half: cluster_on_kv=False
            fathers = topk(kv[..., :w].contiguous(), cpos, proto_kv[..., :w].contiguous(), ppos, self.num_fathers,
                           self.ref.metric)  # [Ls, n, K] per layer's prototypes
            from ..kernels.deltakv_kernels import father_mean

            p = proto_kv.shape[1]
            layer_base = (torch.arange(ls, device=fathers.device) * p)[:, None, None]
            ref = father_mean(torch.where(fathers >= 0, fathers + layer_base, -1).view(ls * n, -1),
                              proto_kv.reshape(ls * p, -1)).view(ls, n, -1)
            ords = torch.where(fathers >= 0, self._ordinal(ppos)[fathers.clamp(min=0)], fathers) if p else fathers
        else:
            ref = torch.zeros_like(kv)
            ords = torch.zeros(ls, n, 0, dtype=torch.long, device=kv.device)
        latents = []
        for i, layer in enumerate(self.sparse):  # each layer's down (any kind; exact as the module computes it)
            pair = self.compressor[layer]
            dt = next(pair.up.parameters()).dtype
            latents.append(pair.encode(kv[i].to(dt), ref[i].to(dt)))
        h = self.store.put(torch.cat(latents), ords.reshape(ls * n, -1)).view(ls, n)
        self._pending.append(h.reshape(-1))
        st.lat_pos = torch.cat([st.lat_pos, cpos.cpu()])
        st.lat_handles = torch.cat([st.lat_handles, h], dim=1)
        if st.lat_rows is not None and self.store.disk is None and not self.config.deltakv_offload_latent:
            st.lat_rows = torch.cat([st.lat_rows, self.store.index[h].to(self.pool.device)], dim=1)
        self._pending = []  # the rows are the sequence's now (released with it)
        st.compressed_upto = boundary
        try:
            self.pool.free(slots[:, :, comp].reshape(-1))
        finally:  # the tables drop the compressed tokens whatever the free did (issue 17: no double free later)
            kept = slots[:, :, ~comp]
            kv_all.slots[sidx, :, : kept.shape[2]] = kept
            kv_all.lens[self.sparse] = kept.shape[2]
            self.counters["compressed_tokens"] += n * ls

    # ------------------------------------------------------------------ accounting
    def latent_rows(self, seq) -> int:
        if getattr(seq, "kv", None) is None:
            return 0
        return seq.kv.state.lat_handles.numel()

    def kv_bytes(self, seq) -> int:
        """Full-precision slots x bytes_per_slot + latent rows x row_bytes (every tier)."""
        if getattr(seq, "kv", None) is None:
            return 0
        recon = seq.kv.state.recon
        cached = recon.num_slots * self.pool.bytes_per_slot if recon is not None else 0
        return super().kv_bytes(seq) + self._full_kivi_bytes(seq) + self.latent_rows(seq) * self.store.row_bytes + cached

    def stats(self) -> dict:
        """Merged into `LLM.kv_stats()`: latent bytes per tier (device / host / disk) and counters."""
        tiers = self.store.bytes_per_tier()
        full = self.pool.num_used * self.pool.bytes_per_slot
        return {
            "latent_row_bytes": self.store.row_bytes,
            "latent_rows_capacity": self.store.mem.limit,
            "latent_rows_used": self.store.mem.used,
            "latent_rows_peak": self.store.mem.peak,
            "latent_arena_bytes": getattr(self, "arena_bytes", 0),
            "latent_dtype": self.config.latent_dtype,
            "latent_bytes_device": tiers["device"],
            "latent_bytes_host": tiers["host"],
            "latent_bytes_disk": tiers["disk"],
            "full_precision_bytes_used": full,
            "kv_bytes_used_all_tiers": full + sum(tiers.values()),
            "latent_rows_promoted": self.store.num_promoted,
            "latent_rows_demoted": self.store.num_demoted,
            **self.counters,
            "reconstructed_tokens": self.counters["reconstructed_tokens"] + int(self._reconstructed),
            "reconstruct_cache_hits": int(self._cache_hits),
            "reconstruct_cache_slots": self._recon_slots,
        }
