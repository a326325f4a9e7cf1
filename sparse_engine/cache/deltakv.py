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

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..layers.attention_ops import attention_probs, gather_kv
from ..models.spec import ModelSpec
from ..offload.latent_store import LATENT_DTYPES, LatentCodec, Prefetcher, TieredLatentStore
from .base import CacheMethod, MethodConfig, SequenceKV, View
from .omnikv import _check_count, top_count

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

    def validate(self, spec: ModelSpec) -> None:
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
        if self.deltakv_cold_after is not None and (isinstance(self.deltakv_cold_after, bool)
                                                    or int(self.deltakv_cold_after) < 0):
            raise ValueError(f"deltakv_cold_after must be a number of steps >= 0 (or None), got {self.deltakv_cold_after!r}")


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
        self.next_sparse = {a: b for a, b in zip(self.sparse, self.sparse[1:])}
        self.sinks, self.stride = ref.num_sinks, ref.stride
        self.num_fathers = ref.top_k if ref.kind == "cluster_e2e" else 0
        max_ord = self._ordinal(torch.tensor([spec.max_position_embeddings])).item()
        codec = LatentCodec(self.compressor.config.kv_compressed_size, cfg.latent_dtype, self.num_fathers,
                            2 if max_ord < 2**15 - 1 else 4)
        self.store = TieredLatentStore(codec, pool.device, offload=cfg.deltakv_offload_latent,
                                       cold_after=cfg.deltakv_cold_after, cold_dir=cfg.deltakv_cold_dir)
        self.prefetcher = Prefetcher(self.store) if cfg.deltakv_offload_latent and cfg.deltakv_prefetch else None
        self.inv_freq = spec.inv_freq.to(pool.device)
        self.rope_scaling = float(spec.rope_attention_scaling)
        self.counters = {"compressed_tokens": 0, "reconstructed_tokens": 0}

    def batched(self, plan) -> bool:
        return False  # per-sequence reconstruction; batched in issue 14

    # ------------------------------------------------------------------ helpers
    @property
    def _kernels(self):
        from ..kernels.deltakv_kernels import dispatch

        return dispatch(self.decode_kernel is not None)  # the engine sets decode_kernel where Triton runs

    def _ordinal(self, pos: torch.Tensor) -> torch.Tensor:
        """Prototype ordinal of prototype positions (sinks 0..S-1, then one per stride)."""
        if self.stride == 0:
            return pos
        return torch.where(pos < self.sinks, pos, self.sinks + (pos - self.sinks) // max(self.stride, 1))

    def _is_proto(self, pos: torch.Tensor) -> torch.Tensor:
        return self.ref.is_prototype(pos)

    def _tables(self, pos: torch.Tensor):
        from ..kernels.deltakv_kernels import rope_half_tables

        return rope_half_tables(self.inv_freq, pos.to(self.inv_freq.device))

    def _pre_rope_kv(self, slots: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Joined pre-RoPE KV [n, W] of pool slots [Hkv, n] at positions [n]."""
        cos, sin = self._tables(pos)
        return self._kernels[0](self.pool.k, self.pool.v, slots, cos, sin, self.rope_scaling)

    # ------------------------------------------------------------------ lifecycle
    def new_sequence(self, seq) -> None:
        super().new_sequence(seq)
        empty = torch.zeros(0, dtype=torch.long)
        seq.kv.state["lat"] = {l: (empty, empty) for l in self.sparse}  # layer -> (handles, positions)

    def fork(self, src, dst) -> None:
        """Sessions: the fork shares the source's latent rows by reference, like its pool slots."""
        super().fork(src, dst)
        for handles, _ in dst.kv.state.get("lat", {}).values():
            self.store.incref(handles)
        dst.kv.state.pop("sel", None)  # the source's last selection is not the child's

    def release(self, seq) -> None:
        if getattr(seq, "kv", None) is not None:
            for handles, _ in seq.kv.state.get("lat", {}).values():
                self.store.free(handles)
            if self.prefetcher is not None:
                self.prefetcher.drop(seq.seq_id)
        super().release(seq)

    # ------------------------------------------------------------------ scheduling
    def _num_latent(self, seq) -> int:
        lat = seq.kv.state.get("lat", {}) if getattr(seq, "kv", None) is not None else {}
        return max((len(h) for h, _ in lat.values()), default=0)

    def slots_needed(self, seq, num_new_tokens: int) -> int:
        """New tokens in every layer + one layer's reconstructed tokens (scratch, freed after use)."""
        scratch = self._num_latent(seq) if seq is not None and getattr(seq, "kv", None) is not None else 0
        return (num_new_tokens * self.spec.num_layers + scratch) * self.spec.num_kv_heads

    # ------------------------------------------------------------------ per layer
    def view(self, seq, layer, q, q_pos) -> View:
        table = seq.kv.tables[layer]
        slots, valid = table.padded()
        if layer in self.full:
            return View(slots, valid, prefix_lens=table.lens.clone())
        handles, lpos = seq.kv.state["lat"][layer]
        sel = seq.kv.state.get("sel", {}).get(self.source[layer])
        if sel is None:
            keep = None
            need = torch.ones(len(handles), dtype=torch.bool)
        else:
            kpos = self.pool.pos[slots[0]].cpu()
            start = int(q_pos.min())
            hist = (kpos >= self.sinks) & (kpos < start - self.config.recent_size)
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
            h2, p2 = seq.kv.state["lat"][nxt]
            sel2 = seq.kv.state.get("sel", {}).get(self.source[nxt])
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
        pair = self.compressor[layer]
        delta = pair.up(latent.to(pair.up.proj.weight.dtype)).float()
        proto_kv = fathers = None
        if self.num_fathers:
            slots_full = seq.kv.tables[layer].padded()[0]
            fpos = self.pool.pos[slots_full[0]]
            pmask = self._is_proto(fpos)
            ppos = fpos[pmask]
            proto_kv = self._pre_rope_kv(slots_full[:, pmask], ppos)
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
        sel = seq.kv.state.setdefault("sel", {})
        sel[layer] = None  # default: the sparse layers read (and reconstruct) everything this step
        decode = int(q_pos[0]) >= seq.num_prompt_tokens
        budget = self.config.num_top_tokens if decode else self.config.num_top_tokens_in_prefill
        if budget is None:
            return
        k, _, kpos = gather_kv(self.pool, view.slots)
        start = int(q_pos.min())
        pos = kpos[0].cpu()
        history = (pos >= self.sinks) & (pos < start - self.config.recent_size)
        n_hist = int(history.sum())
        k_top = top_count(budget, n_hist) if n_hist else 0
        if k_top >= n_hist:
            return
        probs = attention_probs(q, q_pos, k, kpos, view.valid.to(kpos.device), self.scale)
        score = probs.amax(dim=(0, 1)).cpu().masked_fill(~history, float("-inf"))
        sel[layer] = pos[score.topk(k_top).indices].sort().values

    # ------------------------------------------------------------------ per step
    @torch.inference_mode()
    def after_step(self, seq, prefill_done: bool, num_new_tokens: int) -> None:
        """Compress every sparse layer's tokens that left the recent window; free their slots."""
        self.store.tick()
        boundary = seq.num_computed - self.config.recent_size
        if boundary <= self.sinks:
            return
        done = seq.kv.state.get("compressed_upto", 0)
        if num_new_tokens == 1 and boundary - done < self.config.decode_compress_block:
            return  # decode: wait until a block of tokens has left the recent window
        seq.kv.state["compressed_upto"] = boundary
        _, _, topk = self._kernels
        for layer in self.sparse:
            table = seq.kv.tables[layer]
            slots, _ = table.padded()
            pos = self.pool.pos[slots[0]]
            proto = self._is_proto(pos)
            comp = (pos < boundary) & ~proto
            if not bool(comp.any()):
                continue
            cpos = pos[comp]
            kv = self._pre_rope_kv(slots[:, comp], cpos)
            pair = self.compressor[layer]
            if self.num_fathers:
                pmask = proto & (pos < cpos.max())
                ppos = pos[pmask]
                proto_kv = self._pre_rope_kv(slots[:, pmask], ppos)
                fathers = topk(kv, cpos, proto_kv, ppos, self.num_fathers, self.ref.metric)
                from ..kernels.deltakv_kernels import father_mean

                ref = father_mean(fathers, proto_kv)
                ords = torch.where(fathers >= 0, self._ordinal(ppos)[fathers.clamp(min=0)], fathers)
            else:
                ref = torch.zeros_like(kv)
                ords = torch.zeros(len(cpos), 0, dtype=torch.long, device=kv.device)
            w = pair.up.proj.weight.dtype
            latent = pair.encode(kv.to(w), ref.to(w))
            handles = self.store.put(latent, ords)
            old_h, old_p = seq.kv.state["lat"][layer]
            seq.kv.state["lat"][layer] = (torch.cat([old_h, handles]), torch.cat([old_p, cpos.cpu()]))
            keep = ~comp
            self.pool.free(slots[:, comp].reshape(-1))
            table.replace([slots[h][keep] for h in range(table.num_kv_heads)])
            self.counters["compressed_tokens"] += len(cpos)

    # ------------------------------------------------------------------ accounting
    def latent_rows(self, seq) -> int:
        if getattr(seq, "kv", None) is None:
            return 0
        return sum(len(h) for h, _ in seq.kv.state.get("lat", {}).values())

    def kv_bytes(self, seq) -> int:
        """Full-precision slots x bytes_per_slot + latent rows x row_bytes (every tier)."""
        if getattr(seq, "kv", None) is None:
            return 0
        return super().kv_bytes(seq) + self.latent_rows(seq) * self.store.row_bytes

    def stats(self) -> dict:
        """Merged into `LLM.kv_stats()`: latent bytes per tier (device / host / disk) and counters."""
        tiers = self.store.bytes_per_tier()
        full = self.pool.num_used * self.pool.bytes_per_slot
        return {
            "latent_row_bytes": self.store.row_bytes,
            "latent_dtype": self.config.latent_dtype,
            "latent_bytes_device": tiers["device"],
            "latent_bytes_host": tiers["host"],
            "latent_bytes_disk": tiers["disk"],
            "full_precision_bytes_used": full,
            "kv_bytes_used_all_tiers": full + sum(tiers.values()),
            "latent_rows_promoted": self.store.num_promoted,
            "latent_rows_demoted": self.store.num_demoted,
            **self.counters,
        }
