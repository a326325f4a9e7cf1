"""KIVI quantization of K/V blocks (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit
Quantization for KV Cache"), the PyTorch reference used by `method=kivi` and by DeltaKV's
full-layer option.

One BLOCK = `group_size` consecutive tokens of one layer, all KV heads:

* keys are quantized PER CHANNEL: for every (head, channel) one min and one scale over the block's
  `group_size` tokens (keys have outlier channels; a per-channel range keeps them from flattening
  the others - KIVI section 3);
* values are quantized PER TOKEN: for every (token, head) one min and one scale per group of
  `group_size` channels;
* asymmetric: x ~ q * scale + min with q in [0, 2**bits - 1], q = round((x - min) / scale).

min and scale are stored as float16 (as KIVI, and the DeltaKV reference engine's KIVI path:
`full_layer_kv_quant_bits`, `full_layer_kivi_group_size`), rounded BEFORE the codes are computed,
so decoding uses exactly the values the codes were made against. Codes are packed 8 / bits per
byte along the last axis (tokens for keys, channels for values).

Row layout (uint8, `block_bytes` long), one row per block:
    [ K codes H*D*G*b/8 | V codes G*H*D*b/8 | K scale, K min H*D each | V scale, V min G*H*(D/G) each ]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KIVI_BITS = (2, 4, 8)
_META = torch.float16  # min / scale storage
_META_BYTES = 2


def quantize_groups(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantization of x [..., g] over its LAST axis (one group per leading index).

    Returns (codes [..., g] uint8 in [0, 2**bits - 1], scale [...] float16, min [...] float16)."""
    qmax = (1 << bits) - 1
    x = x.float()
    mn = x.amin(dim=-1).to(_META)
    scale = ((x.amax(dim=-1) - mn.float()) / qmax).to(_META)
    s = torch.where(scale.float() > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))  # constant group
    q = torch.round((x - mn.float()[..., None]) / s[..., None]).clamp_(0, qmax).to(torch.uint8)
    return q, scale, mn


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """codes [..., g] uint8, scale / min [...] -> float32 [..., g]."""
    return q.float() * scale.float()[..., None] + mn.float()[..., None]


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., g] (each < 2**bits) -> bytes [..., g * bits / 8]: value j of a byte in bits
    [j*bits, (j+1)*bits)."""
    per = 8 // bits
    q = q.view(*q.shape[:-1], q.shape[-1] // per, per).to(torch.uint8)
    out = q[..., 0].clone()
    for j in range(1, per):
        out |= q[..., j] << (j * bits)
    return out


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_codes`: bytes [..., n] -> codes [..., n * 8 / bits] uint8."""
    per, mask = 8 // bits, (1 << bits) - 1
    parts = [(packed >> (j * bits)) & mask for j in range(per)]
    return torch.stack(parts, dim=-1).view(*packed.shape[:-1], packed.shape[-1] * per)


@dataclass(frozen=True)
class KiviCodec:
    """Packs blocks of K/V [nb, G, H, D] into uint8 rows of `block_bytes` and back."""

    num_kv_heads: int
    head_dim: int
    bits: int = 4
    group_size: int = 32

    def __post_init__(self):
        if self.bits not in KIVI_BITS:
            raise ValueError(f"KIVI bits must be one of {KIVI_BITS}, got {self.bits!r}")
        if self.group_size < 1 or (self.group_size * self.bits) % 8:
            raise ValueError(f"KIVI group_size must be a positive multiple of {8 // self.bits} at {self.bits} bits "
                             f"(codes are packed {8 // self.bits} per byte), got {self.group_size!r}")
        if self.head_dim % self.group_size:
            raise ValueError(f"KIVI group_size={self.group_size} must divide head_dim={self.head_dim} (values are "
                             "quantized per token in groups of group_size channels); pick a divisor of head_dim")

    # ------------------------------------------------------------------ sizes
    @property
    def code_bytes(self) -> int:
        """K codes (or V codes) of one block."""
        return self.num_kv_heads * self.head_dim * self.group_size * self.bits // 8

    @property
    def key_meta_bytes(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim * _META_BYTES

    @property
    def value_meta_bytes(self) -> int:
        return 2 * self.group_size * self.num_kv_heads * (self.head_dim // self.group_size) * _META_BYTES

    @property
    def block_bytes(self) -> int:
        return 2 * self.code_bytes + self.key_meta_bytes + self.value_meta_bytes

    @property
    def bytes_per_token(self) -> float:
        """Bytes per token of one layer (all KV heads) once quantized."""
        return self.block_bytes / self.group_size

    # ------------------------------------------------------------------ codec
    def encode(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """k, v [nb, G, H, D] (any float) -> rows [nb, block_bytes] uint8."""
        nb, G, H, D = k.shape
        if (G, H, D) != (self.group_size, self.num_kv_heads, self.head_dim):
            raise ValueError(f"KIVI blocks must be [nb, {self.group_size}, {self.num_kv_heads}, {self.head_dim}], "
                             f"got {tuple(k.shape)}")
        kq, ks, km = quantize_groups(k.permute(0, 2, 3, 1), self.bits)  # per channel: groups along tokens
        vq, vs, vm = quantize_groups(v.reshape(nb, G, H, D // G, G), self.bits)  # per token: groups of channels
        parts = [pack_codes(kq, self.bits), pack_codes(vq.reshape(nb, G, H, D), self.bits), ks, km, vs, vm]
        return torch.cat([p.contiguous().view(torch.uint8).reshape(nb, -1) for p in parts], dim=1)

    def decode(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows [nb, block_bytes] uint8 -> (k, v) [nb, G, H, D] float32."""
        nb, G, H, D, b = rows.shape[0], self.group_size, self.num_kv_heads, self.head_dim, self.bits
        c, km_b, o = self.code_bytes, self.key_meta_bytes // 2, 0
        kp = rows[:, o : o + c].reshape(nb, H, D, G * b // 8); o += c
        vp = rows[:, o : o + c].reshape(nb, G, H, D * b // 8); o += c

        def meta(n: int, shape) -> torch.Tensor:
            nonlocal o
            t = rows[:, o : o + n].contiguous().view(_META).reshape(shape)
            o += n
            return t

        ks, km = meta(km_b, (nb, H, D)), meta(km_b, (nb, H, D))
        vm_b = self.value_meta_bytes // 2
        vs, vm = meta(vm_b, (nb, G, H, D // G)), meta(vm_b, (nb, G, H, D // G))
        k = dequantize_groups(unpack_codes(kp, b), ks, km).permute(0, 3, 1, 2)  # [nb, G, H, D]
        v = dequantize_groups(unpack_codes(vp, b).reshape(nb, G, H, D // G, G), vs, vm).reshape(nb, G, H, D)
        return k, v


# ---------------------------------------------------------------------------------------------- pool storage
# Blocks are stored as bytes in the KV pool's K/V rows. Engines read pool rows they then mask (padding
# and stale table entries; softmax weight 0), and 0 x NaN = NaN: every 16-bit word stored must be a
# finite float whatever the pool dtype. Bit 14 of a little-endian 16-bit word is the exponent's top bit
# in bf16 and fp16 and, in a float32's high word, too; keeping it 0 keeps every element finite. So a
# word carries 15 payload bits: its low byte one payload byte, its high byte 7 bits (bits 0-5 and 7).
def finite_words(num_bytes: int) -> int:
    """16-bit words that carry `num_bytes` payload bytes: w low bytes + the other bytes as 7-bit septets
    in the w high bytes (8 septets per 7 bytes)."""
    w = -(-num_bytes * 8 // 15)
    while -(-(num_bytes - w) // 7) * 8 > w:
        w += 1
    return w


def to_finite_words(rows: torch.Tensor) -> torch.Tensor:
    """rows [n, B] uint8 -> [n, 2 * finite_words(B)] uint8 (little-endian words, bit 14 of each 0)."""
    n, b = rows.shape
    w = finite_words(b)
    lo, rest = rows[:, :w], rows[:, w:]
    lo = torch.nn.functional.pad(lo, (0, w - lo.shape[1]))
    groups = -(-rest.shape[1] // 7)
    rest = torch.nn.functional.pad(rest, (0, groups * 7 - rest.shape[1])).view(n, groups, 7).long()
    packed = (rest << (torch.arange(7, device=rows.device) * 8)).sum(-1)  # 56 bits per group
    sept = (packed[..., None] >> (torch.arange(8, device=rows.device) * 7)) & 0x7F  # [n, groups, 8]
    hi = torch.nn.functional.pad(sept.view(n, -1), (0, w - groups * 8))
    hi = (hi & 0x3F) | ((hi & 0x40) << 1)  # payload bit 6 -> word bit 15 (sign): bit 14 stays 0
    return torch.stack([lo, hi.to(torch.uint8)], dim=2).view(n, 2 * w)


def from_finite_words(words: torch.Tensor, num_bytes: int) -> torch.Tensor:
    """Inverse of `to_finite_words`: [n, >= 2 * finite_words(B)] uint8 -> rows [n, B] uint8."""
    n, w = words.shape[0], finite_words(num_bytes)
    pairs = words[:, : 2 * w].reshape(n, w, 2)
    lo, hi = pairs[..., 0], pairs[..., 1].long()
    sept = (hi & 0x3F) | ((hi >> 1) & 0x40)
    groups = -(-(num_bytes - w) // 7) if num_bytes > w else 0
    sept = sept[:, : groups * 8].view(n, groups, 8)
    packed = (sept << (torch.arange(8, device=words.device) * 7)).sum(-1)
    rest = ((packed[..., None] >> (torch.arange(7, device=words.device) * 8)) & 0xFF).to(torch.uint8).view(n, -1)
    return torch.cat([lo, rest], dim=1)[:, :num_bytes]
