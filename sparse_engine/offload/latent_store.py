"""DeltaKV latent storage: a row codec (float32 / bf16 / int8 / int4 with per-token scales, or the
reference's asymmetric grouped int4 ``int4_asym``) and a
tiered store (hot: the engine's device; warm: host memory, pinned on CUDA; cold: a memory-mapped
file on disk).

One ROW holds everything DeltaKV keeps for one compressed token of one layer (all KV heads joined):

    [ latent payload | scale (bf16, int8/int4 only) | father prototype ordinals (int16 or int32) x top_k ]

``int4`` (ours) is symmetric: one bf16 scale ``max|x| / 7`` per token, codes ``round(x / scale) + 8``.
``int4_asym`` is the reference's format (CURRENTF/Sparse-vLLM ``src/sparsevllm/kernels/triton/quant.py``
``_quantize_pack_2d_int4_grouped_kernel`` / ``_dequantize_2d_int4_grouped_kernel``, group size
``kv_quant_group_size``, 32 when left 0 with ``kv_quant_bits=4``: ``configs/delta.py``): per token and
per group of ``group_size`` values a bf16 ``scale = (max - min) / 15`` and bf16 ``min``; codes
``round_half_even(clamp((x - min) / (scale + 1e-6), 0, 15))``; value ``j`` of an int32 word sits at
bits ``4j`` (so, little-endian, even index = low nibble of a byte); ``x_hat = q * scale + min``. Its
scale section is ``[scales (G) | mins (G)]`` bf16.

packed into a flat uint8 tensor, so every tier stores the same bytes and `row_bytes` is the exact
per-token, per-layer cost (what `kv_bytes` counts). Rows are addressed by stable HANDLES; a handle's
row may move between tiers (`demote` to disk after `cold_after` store steps without a read, brought
back on demand by `get`) without the sequence's bookkeeping changing.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

LATENT_DTYPES = ("float32", "bf16", "int8", "int4", "int4_asym")
INT4_ASYM_GROUP = 32  # the reference's kv_quant_group_size when left 0 with kv_quant_bits=4


@dataclass(frozen=True)
class LatentCodec:
    """Packs (latent [n, C] float, fathers [n, K] int) into uint8 rows and back."""

    latent_size: int
    latent_dtype: str = "bf16"
    num_fathers: int = 4
    father_bytes: int = 2  # 2 (int16) or 4 (int32)
    group_size: int = INT4_ASYM_GROUP  # int4_asym only: values per (scale, min) pair

    def __post_init__(self):
        if self.latent_dtype not in LATENT_DTYPES:
            raise ValueError(f"latent_dtype must be one of {LATENT_DTYPES}, got {self.latent_dtype!r}")
        if self.latent_dtype in ("int4", "int4_asym") and self.latent_size % 2:
            raise ValueError(f"int4 latents pack two values per byte: kv_compressed_size must be even, got {self.latent_size}")
        if self.latent_dtype == "int4_asym" and (self.group_size < 2 or self.latent_size % self.group_size):
            raise ValueError(f"int4_asym quantises groups of {self.group_size} values: kv_compressed_size="
                             f"{self.latent_size} must be a multiple of it (pick a latent size divisible by "
                             f"{self.group_size})")
        if self.father_bytes not in (2, 4):
            raise ValueError(f"father_bytes must be 2 or 4, got {self.father_bytes}")

    @property
    def payload_bytes(self) -> int:
        c = self.latent_size
        return {"float32": 4 * c, "bf16": 2 * c, "int8": c, "int4": c // 2, "int4_asym": c // 2}[self.latent_dtype]

    @property
    def scale_bytes(self) -> int:
        if self.latent_dtype == "int4_asym":
            return 2 * 2 * (self.latent_size // self.group_size)  # bf16 scale + bf16 min per group
        return 2 if self.latent_dtype in ("int8", "int4") else 0

    @property
    def row_bytes(self) -> int:
        return self.payload_bytes + self.scale_bytes + self.num_fathers * self.father_bytes

    @property
    def _fdtype(self):
        return torch.int16 if self.father_bytes == 2 else torch.int32

    def encode(self, latent: torch.Tensor, fathers: torch.Tensor) -> torch.Tensor:
        """latent [n, C] (any float), fathers [n, K] (int, -1 = none) -> rows [n, row_bytes] uint8."""
        n = latent.shape[0]
        x = latent.float()
        parts = []
        if self.latent_dtype == "float32":
            parts.append(x.contiguous().view(torch.uint8).view(n, -1))
        elif self.latent_dtype == "bf16":
            parts.append(x.to(torch.bfloat16).contiguous().view(torch.uint8).view(n, -1))
        elif self.latent_dtype == "int4_asym":
            g = x.view(n, -1, self.group_size)
            mn = g.amin(dim=2).to(torch.bfloat16)
            scale = ((g.amax(dim=2) - g.amin(dim=2)) / 15.0).to(torch.bfloat16)
            # quantised with the stored (bf16) scale / min, as the reference kernel stores then reloads them
            q = ((g - mn.float().unsqueeze(2)) / (scale.float().unsqueeze(2) + 1e-6)).clamp_(0, 15)
            u = torch.round(q).to(torch.uint8).view(n, -1)  # torch.round: half to even, as the kernel
            parts.append(u[:, 0::2] | (u[:, 1::2] << 4))
            parts.append(torch.cat([scale, mn], dim=1).contiguous().view(torch.uint8).view(n, -1))
        else:
            qmax = 127 if self.latent_dtype == "int8" else 7
            scale = (x.abs().amax(dim=1, keepdim=True) / qmax).to(torch.bfloat16)
            scale = torch.where(scale.float() > 0, scale, torch.ones_like(scale))  # all-zero rows
            q = torch.round(x / scale.float()).clamp_(-qmax, qmax).to(torch.int16)
            if self.latent_dtype == "int8":
                parts.append(q.to(torch.int8).contiguous().view(torch.uint8).view(n, -1))
            else:
                u = (q + 8).to(torch.uint8)  # 1..15
                parts.append(u[:, 0::2] | (u[:, 1::2] << 4))
            parts.append(scale.contiguous().view(torch.uint8).view(n, -1))
        if self.num_fathers:
            parts.append(fathers.to(self._fdtype).contiguous().view(torch.uint8).view(n, -1))
        return torch.cat(parts, dim=1)

    def decode(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows [n, row_bytes] uint8 -> (latent [n, C] float32, fathers [n, K] int64)."""
        n, c = rows.shape[0], self.latent_size
        p, s = self.payload_bytes, self.scale_bytes
        pay = rows[:, :p].contiguous()
        if self.latent_dtype == "float32":
            lat = pay.view(torch.float32).view(n, c)
        elif self.latent_dtype == "bf16":
            lat = pay.view(torch.bfloat16).view(n, c).float()
        elif self.latent_dtype == "int4_asym":
            ng = c // self.group_size
            sm = rows[:, p : p + s].contiguous().view(torch.bfloat16).view(n, 2, ng).float()
            q = torch.stack([pay & 15, pay >> 4], dim=2).view(n, ng, self.group_size).float()
            lat = (q * sm[:, 0].unsqueeze(2) + sm[:, 1].unsqueeze(2)).view(n, c)
        else:
            scale = rows[:, p : p + s].contiguous().view(torch.bfloat16).view(n, 1).float()
            if self.latent_dtype == "int8":
                q = pay.view(torch.int8).view(n, c).float()
            else:
                lo, hi = (pay & 15).to(torch.int16) - 8, (pay >> 4).to(torch.int16) - 8
                q = torch.stack([lo, hi], dim=2).view(n, c).float()
            lat = q * scale
        fathers = rows[:, p + s :].contiguous().view(self._fdtype).view(n, self.num_fathers).long()
        return lat, fathers


class LatentTierFull(RuntimeError):
    """A latent tier has no room left (its byte budget is spent)."""


class _RowArena:
    """[capacity, row_bytes] uint8 rows with a free stack (one tier): growable, up to `limit` rows
    when a byte budget bounds the tier (then `fixed=True` allocates all of it at once, so growth never
    holds two copies: the device tier inside `kv_cache_bytes`).

    With `path` the rows live in a memory-mapped file (`path`.<capacity>), re-created larger on growth.
    """

    def __init__(self, row_bytes: int, device, pin: bool = False, path: str | None = None, capacity: int = 256,
                 limit: int | None = None, fixed: bool = False, name: str = "latent"):
        self.row_bytes, self.device, self.pin, self.path = row_bytes, torch.device(device), pin, path
        self.limit, self.name = limit, name
        self.peak = 0
        if limit is not None and fixed:
            capacity = limit
        elif limit is not None:
            capacity = min(capacity, limit)
        self.used = 0
        self.capacity = 0
        self.data = None
        self._mm = None
        self._file = None
        self._free: list[int] = []
        self._grow(capacity)

    @property
    def num_free(self) -> int:
        return (self.limit if self.limit is not None else 1 << 62) - self.used

    def _grow(self, need: int) -> None:
        if need <= self.capacity:
            return
        if self.limit is not None and need > self.limit:
            raise LatentTierFull(f"the {self.name} tier holds at most {self.limit} rows ({self.limit * self.row_bytes} "
                                 f"bytes) and {need} are needed: raise its budget")
        cap = max(need, 2 * self.capacity, 256)
        if self.limit is not None:
            cap = min(cap, self.limit)
        old_cap = self.capacity
        if self.path is not None:
            file = f"{self.path}.{cap}"
            mm = np.memmap(file, dtype=np.uint8, mode="w+", shape=(cap, self.row_bytes))
            if self._mm is not None:
                mm[:old_cap] = self._mm[:old_cap]
                self.close()
            self._mm, self._file = mm, file
            self.data = torch.from_numpy(mm)
        else:
            t = torch.zeros(cap, self.row_bytes, dtype=torch.uint8, device=self.device)
            if self.pin and torch.cuda.is_available():
                t = t.pin_memory()
            if self.data is not None:
                t[:old_cap] = self.data
            self.data = t
        self._free.extend(range(cap - 1, old_cap - 1, -1))
        self.capacity = cap

    def take(self, n: int) -> torch.Tensor:
        self._grow(self.used + n)
        idx = self._free[len(self._free) - n :][::-1]
        del self._free[len(self._free) - n :]
        self.used += n
        self.peak = max(self.peak, self.used)
        return torch.tensor(idx, dtype=torch.long)

    def give(self, idx: torch.Tensor) -> None:
        self._free.extend(idx.tolist())
        self.used -= len(idx)

    def close(self) -> None:
        if self._mm is not None:
            self.data = None
            self._mm = None  # the mapping goes with its last reference; the file is unlinked now
            try:
                os.remove(self._file)
            except OSError:
                pass


HOT, WARM, COLD = 0, 1, 2
TIER_NAMES = {HOT: "device", WARM: "host", COLD: "disk"}


class TieredLatentStore:
    """Latent rows behind stable handles, in one memory tier (device, or host with `offload`) plus
    an optional cold tier on disk.

    Args:
        codec: the row layout.
        device: where reconstruction runs (the engine's device).
        offload: keep rows in host memory (pinned on CUDA) instead of on `device` (the warm tier).
        cold_after: move rows not read for this many store steps (`tick`) to the disk tier; None = never.
        cold_dir: directory of the memory-mapped file (default: the system temp dir).
    """

    def __init__(self, codec: LatentCodec, device, offload: bool = False, cold_after: int | None = None,
                 cold_dir: str | None = None, mem_bytes: int | None = None, disk_bytes: int | None = None):
        self.codec = codec
        self.device = torch.device(device)
        self.mem_tier = WARM if offload else HOT
        mem_device = torch.device("cpu") if offload else self.device
        self.mem = _RowArena(codec.row_bytes, mem_device, pin=offload and self.device.type == "cuda",
                             limit=None if mem_bytes is None else mem_bytes // codec.row_bytes,
                             fixed=not offload, name="host" if offload else "device")
        self.cold_after = cold_after
        self.disk = None
        if cold_after is not None:
            fd, path = tempfile.mkstemp(prefix="deltakv_cold_", suffix=".u8", dir=cold_dir)
            os.close(fd)
            os.remove(path)
            self.disk = _RowArena(codec.row_bytes, "cpu", path=path, name="disk",
                                  limit=None if disk_bytes is None else disk_bytes // codec.row_bytes)
        # handle -> (tier, row index, last step read, references: session forks share rows)
        self.tier = torch.zeros(0, dtype=torch.int8)
        self.refs = torch.zeros(0, dtype=torch.int32)
        self.index = torch.zeros(0, dtype=torch.long)
        self.last = torch.zeros(0, dtype=torch.long)
        self._free_handles: list[int] = []
        self.clock = 0
        self.num_promoted = 0
        self.num_demoted = 0

    # ------------------------------------------------------------------ accounting
    @property
    def row_bytes(self) -> int:
        return self.codec.row_bytes

    def bytes_per_tier(self) -> dict[str, int]:
        out = {name: 0 for name in TIER_NAMES.values()}
        out[TIER_NAMES[self.mem_tier]] = self.mem.used * self.row_bytes
        if self.disk is not None:
            out["disk"] = self.disk.used * self.row_bytes
        return out

    # ------------------------------------------------------------------ handles
    def _new_handles(self, n: int) -> torch.Tensor:
        reuse = [self._free_handles.pop() for _ in range(min(n, len(self._free_handles)))]
        start = len(self.tier)
        fresh = list(range(start, start + n - len(reuse)))
        if fresh:
            grow = len(fresh)
            self.tier = torch.cat([self.tier, torch.zeros(grow, dtype=torch.int8)])
            self.index = torch.cat([self.index, torch.zeros(grow, dtype=torch.long)])
            self.last = torch.cat([self.last, torch.zeros(grow, dtype=torch.long)])
            self.refs = torch.cat([self.refs, torch.zeros(grow, dtype=torch.int32)])
        return torch.tensor(reuse + fresh, dtype=torch.long)

    def put(self, latent: torch.Tensor, fathers: torch.Tensor) -> torch.Tensor:
        """Store n rows; returns their handles (LongTensor [n], host)."""
        rows = self.codec.encode(latent, fathers)
        n = rows.shape[0]
        h = self._new_handles(n)
        idx = self.mem.take(n)
        self.mem.data[idx.to(self.mem.data.device)] = rows.to(self.mem.data.device)
        self.tier[h] = self.mem_tier
        self.index[h] = idx
        self.last[h] = self.clock
        self.refs[h] = 1
        return h

    def incref(self, handles: torch.Tensor) -> None:
        """One more owner of each row (a forked sequence); `free` returns a row with its last owner."""
        if handles.numel():
            with torch.inference_mode():  # the bookkeeping tensors are created under the engine's inference mode
                self.refs.index_add_(0, handles.cpu(), torch.ones(handles.numel(), dtype=torch.int32))

    def free(self, handles: torch.Tensor) -> None:
        """Drop one reference to each row; rows left without an owner go back to their arena."""
        if handles.numel() == 0:
            return
        handles = handles.cpu()
        with torch.inference_mode():
            self.refs.index_add_(0, handles, torch.full((handles.numel(),), -1, dtype=torch.int32))
        if bool((self.refs[handles] < 0).any()):
            raise RuntimeError("latent rows freed more often than they were referenced (a double free)")
        handles = handles[self.refs[handles] == 0]
        if handles.numel() == 0:
            return
        t = self.tier[handles]
        mem = handles[t != COLD]
        self.mem.give(self.index[mem])
        if self.disk is not None:
            self.disk.give(self.index[handles[t == COLD]])
        self._free_handles.extend(handles.tolist())

    def rows(self, handles: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        """The packed rows of `handles` on the engine device; cold rows come back to memory first."""
        handles = handles.cpu()
        if self.disk is not None:
            cold = handles[self.tier[handles] == COLD]
            if len(cold):
                self._promote(cold)
        self.last[handles] = self.clock
        idx = self.index[handles]
        src = self.mem.data
        out = src[idx.to(src.device)]
        return out.to(self.device, non_blocking=non_blocking)

    def get(self, handles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent [n, C] float32, fathers [n, K] int64) on the engine device."""
        return self.codec.decode(self.rows(handles))

    # ------------------------------------------------------------------ tiers
    def _promote(self, handles: torch.Tensor) -> None:
        didx = self.index[handles]
        rows = self.disk.data[didx]
        self.disk.give(didx)
        idx = self.mem.take(len(handles))
        self.mem.data[idx.to(self.mem.data.device)] = rows.to(self.mem.data.device)
        self.tier[handles] = self.mem_tier
        self.index[handles] = idx
        self.num_promoted += len(handles)

    def tick(self) -> None:
        """One store step (the engine calls it once per sequence step); demotes idle rows."""
        self.clock += 1
        if self.disk is None:
            return
        live = torch.ones(len(self.tier), dtype=torch.bool)
        if self._free_handles:
            live[torch.tensor(self._free_handles, dtype=torch.long)] = False
        idle = live & (self.tier != COLD) & (self.last < self.clock - self.cold_after)
        h = idle.nonzero().squeeze(1)[: self.disk.num_free]  # a full disk tier just stops demoting
        if len(h) == 0:
            return
        midx = self.index[h]
        rows = self.mem.data[midx.to(self.mem.data.device)].cpu()
        self.mem.give(midx)
        didx = self.disk.take(len(h))
        self.disk.data[didx] = rows
        self.tier[h] = COLD
        self.index[h] = didx
        self.num_demoted += len(h)

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class Prefetcher:
    """Start the host->device copy of the rows the NEXT layer will need while this one computes.

    On CUDA the copy runs on a side stream from pinned memory and the consumer waits on its event;
    elsewhere it is done eagerly (same bytes, so outputs never depend on prefetching).
    """

    def __init__(self, store: TieredLatentStore):
        self.store = store
        self.pending: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, object]] = {}
        self.stream = torch.cuda.Stream(store.device) if store.device.type == "cuda" else None
        self.hits = 0

    def start(self, key: tuple[int, int], handles: torch.Tensor) -> None:
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.store.device))
            with torch.cuda.stream(self.stream):
                rows = self.store.rows(handles, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.stream)
        else:
            rows, ev = self.store.rows(handles), None
        self.pending[key] = (handles, rows, ev)

    def take(self, key: tuple[int, int], handles: torch.Tensor) -> torch.Tensor | None:
        got = self.pending.pop(key, None)
        if got is None:
            return None
        h, rows, ev = got
        if len(h) != len(handles) or not torch.equal(h, handles.cpu()):
            return None
        if ev is not None:
            torch.cuda.current_stream(self.store.device).wait_event(ev)
        self.hits += 1
        return rows

    def drop(self, seq_id: int) -> None:
        for k in [k for k in self.pending if k[0] == seq_id]:
            del self.pending[k]
