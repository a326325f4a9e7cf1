"""KIVI storage for a set of layers: quantized blocks + a full-precision tail, all in the KV pool.

Shared by `method=kivi` (every layer) and DeltaKV's full layers (`full_layer_kv_quant_bits`).

Each of the `layers` of a sequence keeps at full precision, in pool slots, the first `sinks` tokens
and the TAIL [quant_upto, end); positions [sinks, quant_upto) live as KIVI blocks of `group_size`
tokens (`kivi_quant.KiviCodec`, all KV heads of one layer per block), stored as bytes in pool slots
(`KiviBlockStore`: one budget, refcounts and preemption for free).
After a step, once the tail is `residual_length + group_size` long, the oldest whole groups beyond
the last `residual_length` tokens are quantized and their slots freed (the DeltaKV reference
engine's rule: quant_end = sinks + floor((end - sinks - residual) / G) * G).

Reading: every step, each row group gets ONE block of scratch slots [G, Hkv, w] (w = its largest
quantized count; padding points at the pool's trash row) that every quantized layer dequantizes its
blocks into before attention (dequantized copies exist only for one layer at a time, freed at
`end_step`), and one column order that puts the dequantized tokens between the sinks and the tail:
the view is in POSITION order (column j = position j), so scorers that index by column (DeltaKV's
observers) and the dense causal fast path work unchanged.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from .base import BatchView
from .kivi_quant import KiviCodec, finite_words, from_finite_words, to_finite_words


@dataclass
class KiviState:
    """Per sequence: blocks [Lq, nb, slots_per_block] pool slots of the quantized layers' blocks,
    block j holding positions [sinks + j*G, sinks + (j+1)*G); quant_upto = sinks + nb*G."""

    blocks: torch.Tensor
    quant_upto: int

    @property
    def num_blocks(self) -> int:
        return self.blocks.shape[1]


class KiviBlockStore:
    """Quantized blocks stored IN the KV pool: a block's `block_bytes` occupy `slots_per_block` pool
    slots (their K and V rows viewed as bytes, through `kivi_quant.to_finite_words` so that every pool
    element stays a finite float: 15 payload bits per 16-bit word), so blocks share the pool's one
    budget, reference counts (session forks), admission and preemption with full-precision tokens, and
    `kv_bytes` counts them as the slots they hold, exactly."""

    def __init__(self, codec: KiviCodec, pool):
        if sys.byteorder != "little":
            raise RuntimeError("KIVI pool storage assumes little-endian floats")
        self.codec, self.pool = codec, pool
        self.stored_bytes = 2 * finite_words(codec.block_bytes)
        self.slots_per_block = -(-self.stored_bytes // pool.bytes_per_slot)

    @property
    def bytes_per_block(self) -> int:
        """Pool bytes a block holds (block_bytes as finite words, rounded up to whole slots)."""
        return self.slots_per_block * self.pool.bytes_per_slot

    def _bytes(self):
        return self.pool.k.view(torch.uint8), self.pool.v.view(torch.uint8)  # [slots + 1, D * elt] each

    def put(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Quantize blocks k, v [nb, G, H, D]; returns their slots [nb, slots_per_block] (device)."""
        rows = to_finite_words(self.codec.encode(k, v))
        nb, spb = rows.shape[0], self.slots_per_block
        kb, vb = self._bytes()
        half = kb.shape[1]
        rows = torch.nn.functional.pad(rows, (0, 2 * spb * half - rows.shape[1])).view(nb * spb, 2, half)
        slots = self.pool.allocate(nb * spb)
        kb[slots] = rows[:, 0].to(kb.device)
        vb[slots] = rows[:, 1].to(vb.device)
        return slots.view(nb, spb)

    def get(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized (k, v) [n, G, H, D] float32 of blocks `slots` [..., slots_per_block]."""
        kb, vb = self._bytes()
        s = slots.reshape(-1, self.slots_per_block)
        words = torch.stack([kb[s], vb[s]], dim=2).reshape(s.shape[0], -1)
        return self.codec.decode(from_finite_words(words, self.codec.block_bytes))


@dataclass
class _GroupKivi:
    """One row group's KIVI step: scratch [G, Hkv, w] (padding -> trash), the real scratch slots,
    blocks [G, Lq, nb_max, slots_per_block] (padding -> a real block), the position-order column map `cols` [G, Hkv, T + w]
    over cat(table, scratch), lens [G, Hkv], valid [G, Hkv, T'], dense."""

    scratch: torch.Tensor
    scratch_real: torch.Tensor
    blocks: torch.Tensor
    cols: torch.Tensor
    lens: torch.Tensor
    valid: torch.Tensor
    dense: bool


class KiviLayers:
    """KIVI storage of `layers` (see the module docstring). The owner calls `compress` after each
    step, `plan_step` in `begin_step`, `layer_view` for its quantized layers, `end_step`."""

    def __init__(self, layers: list[int], codec: KiviCodec, sinks: int, residual_length: int, pool, spec):
        self.layers = list(layers)
        self.index = {l: i for i, l in enumerate(self.layers)}
        self.codec, self.sinks, self.residual, self.pool, self.spec = codec, sinks, residual_length, pool, spec
        self.G = codec.group_size
        self.store = KiviBlockStore(codec, pool)
        self.quantized_tokens = 0  # counter for kv_stats (token x layer)

    # ------------------------------------------------------------------ sizes
    def quant_end(self, num_tokens: int) -> int:
        """Positions [sinks, quant_end) are quantized once `num_tokens` are cached."""
        n = max(0, num_tokens - self.sinks - self.residual) // self.G * self.G
        return self.sinks + n

    def new_state(self) -> KiviState:
        return KiviState(torch.zeros(len(self.layers), 0, self.store.slots_per_block, dtype=torch.long,
                                     device=self.pool.device), self.sinks)

    def quantized(self, st: KiviState) -> int:
        """Tokens of each quantized layer held as blocks."""
        return st.num_blocks * self.G

    def block_slots_needed(self, st: KiviState | None, num_tokens: int) -> int:
        """Pool slots of the blocks (all quantized layers) a sequence reaching `num_tokens` adds."""
        done = st.quant_upto if st is not None else self.sinks
        return max(0, self.quant_end(num_tokens) - done) // self.G * len(self.layers) * self.store.slots_per_block

    def scratch_slots(self, st: KiviState | None) -> int:
        """Slots of one layer's dequantized tokens (a step's scratch, freed before `compress`)."""
        return 0 if st is None else self.quantized(st) * self.spec.num_kv_heads

    def max_slots(self, num_tokens: int, chunk: int) -> int:
        """Peak slots of one sequence of `num_tokens` in the quantized layers: the full-precision
        sinks + tail (+ a chunk before `compress`) and every block, plus one layer's scratch."""
        full = self.max_full_tokens(num_tokens, chunk) * self.spec.num_kv_heads * len(self.layers)
        quant = self.quant_end(num_tokens) - self.sinks
        return full + self.block_slots_needed(None, num_tokens) + quant * self.spec.num_kv_heads

    def max_full_tokens(self, num_tokens: int, chunk: int) -> int:
        """Peak full-precision tokens of one quantized layer: sinks + residual + G - 1 left after the
        last quantization, plus one step's new tokens (a prefill chunk) before `compress` runs."""
        return min(num_tokens, self.sinks + self.residual + self.G - 1 + chunk)

    # ------------------------------------------------------------------ after a step
    def compress(self, kv, st: KiviState, num_tokens: int) -> None:
        """Quantize every whole group that left the residual window; free its slots."""
        end = self.quant_end(num_tokens)
        n = end - st.quant_upto
        if n <= 0:
            return
        L, H, D, G, s = len(self.layers), self.spec.num_kv_heads, self.spec.head_dim, self.G, self.sinks
        lidx = torch.tensor(self.layers, dtype=torch.long)
        lens = kv.lens[lidx]
        if bool((lens != lens[0, 0]).any()):
            raise RuntimeError("KIVI layers must hold the same tokens in every layer and head (engine bug)")
        t = int(lens[0, 0])
        slots = kv.slots[lidx.to(kv.slots.device), :, s : s + n]  # [Lq, H, n]
        nb = n // G

        def blocks(x):  # [Lq, H, n, D] -> [Lq * nb, G, H, D]
            return x.view(L, H, nb, G, D).permute(0, 2, 3, 1, 4).reshape(L * nb, G, H, D)

        flat = slots.reshape(-1)
        rows = self.store.put(blocks(self.pool.k[flat].view(L, H, n, D)), blocks(self.pool.v[flat].view(L, H, n, D)))
        st.blocks = torch.cat([st.blocks, rows.view(L, nb, -1)], dim=1)
        st.quant_upto = end
        self.pool.free(flat)
        dev_l = lidx.to(kv.slots.device)
        kv.slots[dev_l, :, s : t - n] = kv.slots[dev_l, :, s + n : t].clone()
        kv.lens[lidx] -= n
        self.quantized_tokens += n * L

    # ------------------------------------------------------------------ per step
    def plan_step(self, plan) -> dict:
        """Per row group holding quantized tokens: scratch slots, rows and the view's column map."""
        out = {}
        if not self.layers:
            return out
        l0, dev, H = self.layers[0], self.pool.device, self.spec.num_kv_heads
        for g in plan.groups:
            states = [self._state(plan.seqs[b]) for b in g.bidx]
            nq = [self.quantized(st) for st in states]
            w = max(nq)
            if w == 0:
                continue
            Gn = len(g.bidx)
            real = self.pool.allocate(sum(nq) * H)
            scratch = torch.full((Gn, H, w), self.pool.trash, dtype=torch.long, device=dev)
            o = 0
            for row, q in enumerate(nq):
                scratch[row, :, :q] = real[o : o + q * H].view(H, q)
                self.pool.pos[scratch[row, :, :q]] = torch.arange(self.sinks, self.sinks + q, device=dev)[None, :]
                o += q * H
            nb_max = w // self.G
            # Padding repeats a real block (of the sequence holding the most): its decode is finite and goes
            # to the trash row, which other methods' masked padding also reads (0 x NaN would poison it).
            full_row = max(range(Gn), key=lambda r: nq[r])
            blocks = states[full_row].blocks[:, :1].expand(len(self.layers), nb_max, -1)[None].repeat(Gn, 1, 1, 1)
            for row, st in enumerate(states):
                blocks[row, :, : st.num_blocks] = st.blocks
            lens_t = g.lens_host[:, l0, 0]  # full-precision tokens per sequence (same in every KIVI layer/head)
            t = g.table.shape[-1]
            new_lens = [int(lt) + q for lt, q in zip(lens_t.tolist(), nq)]
            T = max(new_lens)
            cols = torch.zeros(Gn, T, dtype=torch.long)
            for row, (lt, q) in enumerate(zip(lens_t.tolist(), nq)):
                s = min(self.sinks, lt)  # sinks, then the dequantized tokens, then the tail: position order
                cols[row, : s + q + lt - s] = torch.cat([torch.arange(s), t + torch.arange(q), torch.arange(s, lt)])
            lens = torch.tensor(new_lens, dtype=torch.long)[:, None].expand(Gn, H).contiguous().to(dev)
            valid = torch.arange(T, device=dev)[None, None, :] < lens[:, :, None]
            ends = {plan.starts[b] + plan.num_new[b] for b in g.bidx}
            dense = (not g.decode and len(ends) == 1 and ends.pop() == T and all(x == T for x in new_lens)
                     and len({plan.num_new[b] for b in g.bidx}) == 1)
            out[id(g)] = _GroupKivi(scratch, real, blocks, cols.to(dev)[:, None, :].expand(Gn, H, T).contiguous(),
                                    lens, valid, dense)
        return out

    def _state(self, seq) -> KiviState:
        st = seq.kv.state
        return st if isinstance(st, KiviState) else st.kivi

    def layer_view(self, gk: _GroupKivi, layer: int, table: torch.Tensor) -> BatchView:
        """Dequantize `layer`'s blocks into the group's scratch and return the position-order view of
        cat(table [G, Hkv, t], scratch)."""
        Gn, H, w = gk.scratch.shape
        k, v = self.store.get(gk.blocks[:, self.index[layer]])  # [Gn * nb_max, G, H, D]
        d = k.shape[-1]
        k = k.reshape(Gn, w, H, d).transpose(1, 2).reshape(-1, d)
        v = v.reshape(Gn, w, H, d).transpose(1, 2).reshape(-1, d)
        flat, dt = gk.scratch.reshape(-1), self.pool.dtype
        self.pool.k.index_copy_(0, flat, k.to(dt))
        self.pool.v.index_copy_(0, flat, v.to(dt))
        full = torch.cat([table, gk.scratch], dim=2)
        return BatchView(full.gather(2, gk.cols), gk.lens, valid=gk.valid, dense=gk.dense)

    def end_step(self, data: dict) -> None:
        for gk in data.values():
            self.pool.free(gk.scratch_real)

    # ------------------------------------------------------------------ accounting
    def slots_held(self, st: KiviState) -> int:
        """Pool slots of the sequence's blocks (its full-precision slots are in its tables)."""
        return st.blocks.numel()


# ---------------------------------------------------------------------------------------------- DeltaKV
FULL_LAYER_BITS = (0, 2, 4, 8)


def check_full_layer_kivi(cfg, spec) -> None:
    """Validate DeltaKV's full_layer_kv_quant_bits / full_layer_kivi_group_size /
    full_layer_kivi_residual_length (clear errors naming the field and the fix)."""
    bits = cfg.full_layer_kv_quant_bits
    if isinstance(bits, bool) or bits not in FULL_LAYER_BITS:
        raise ValueError(f"full_layer_kv_quant_bits must be one of {FULL_LAYER_BITS} (0 = full layers at full "
                         f"precision), got {bits!r}")
    if not bits:
        return
    g, r = cfg.full_layer_kivi_group_size, cfg.full_layer_kivi_residual_length
    if isinstance(g, bool) or not isinstance(g, int) or g < 1 or spec.head_dim % g:
        raise ValueError(f"full_layer_kivi_group_size must be a positive divisor of head_dim={spec.head_dim}, got {g!r}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"full_layer_kivi_residual_length must be an int >= 0, got {r!r}")
    if cfg.deltakv_offload_latent or cfg.deltakv_cold_after is not None:
        raise ValueError("full_layer_kv_quant_bits runs on the batch path only: it cannot be combined with "
                         "deltakv_offload_latent / deltakv_cold_after (set full_layer_kv_quant_bits=0)")
    KiviCodec(spec.num_kv_heads, spec.head_dim, bits, g)  # packing rules


def full_layer_kivi(method) -> "KiviLayers | None":
    """The KIVI storage of a DeltaKV method's full layers (its sinks stay exact, as the reference
    engine's `full_layer_kv_quant_bits`), or None when full_layer_kv_quant_bits is 0."""
    cfg, spec = method.config, method.spec
    if not cfg.full_layer_kv_quant_bits:
        return None
    codec = KiviCodec(spec.num_kv_heads, spec.head_dim, cfg.full_layer_kv_quant_bits, cfg.full_layer_kivi_group_size)
    return KiviLayers(sorted(method.full), codec, method.sinks, cfg.full_layer_kivi_residual_length, method.pool, spec)
