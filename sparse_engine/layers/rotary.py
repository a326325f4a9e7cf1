"""Rotary position embedding, computed in float32 exactly as HF transformers does."""

from __future__ import annotations

import torch


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, scaling: float = 1.0):
    """cos/sin tables [N, head_dim] for integer `positions` [N]."""
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [N, H, D]; cos/sin: [N, D]. Returns x rotated to its positions (same dtype as x)."""
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return x * cos + rotate_half(x) * sin


def rope_tables(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype):
    """Per-step tables for `apply_rope_fast`: cos and a sign-folded sin, [N, 1, 2, D/2] in `dtype`."""
    n, d = cos.shape
    h = d // 2
    signed = torch.cat((-sin[:, :h], sin[:, h:]), dim=-1)
    return cos.to(dtype).view(n, 1, 2, h), signed.to(dtype).view(n, 1, 2, h)


def apply_rope_fast(x: torch.Tensor, tables) -> torch.Tensor:
    """`apply_rope` in 4 ops, bit for bit: x*cos + rotate_half(x)*sin with rotate_half(x)*sin ==
    flip(halves of x) * (-sin1, sin2). x: [N, H, D]."""
    cos, sin = tables
    n, hh, d = x.shape
    xv = x.view(n, hh, 2, d // 2)
    return (xv * cos + xv.flip(2) * sin).view(n, hh, d)


def apply_inverse_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo `apply_rope` (rotation by -theta); used to re-align cached K to new positions."""
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return x * cos - rotate_half(x) * sin
