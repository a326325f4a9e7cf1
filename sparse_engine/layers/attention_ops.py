"""Attention over pool slots: the PyTorch path (any device) and the dispatch to Triton on CUDA.

Keys are masked by the POSITION stored with each slot, not by index, so chunked prefill, eviction and
reordered/reused KV all share one rule: a query at position p sees keys at positions <= p.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..cache.pool import KVPool


def gather_kv(pool: KVPool, slots: torch.Tensor):
    """K, V [H, T, D] and positions [H, T] of the slots [H, T]."""
    idx = slots.to(pool.device)
    return pool.k[idx], pool.v[idx], pool.pos[idx]


def attend_slots(
    q: torch.Tensor,  # [n, Hq, D]
    q_pos: torch.Tensor,  # [n]
    pool: KVPool,
    slots: torch.Tensor,  # [Hkv, T]
    valid: torch.Tensor,  # [Hkv, T] bool
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of n queries over the slots of one sequence and layer. Returns [n, Hq, D]."""
    k, v, kpos = gather_kv(pool, slots)
    hq, hkv = q.shape[1], k.shape[0]
    qp = q_pos.to(kpos.device)
    mask = valid.to(kpos.device)[:, None, :] & (kpos[:, None, :] <= qp[None, :, None])  # [Hkv, n, T]
    if sliding_window is not None:
        mask &= kpos[:, None, :] > (qp[None, :, None] - sliding_window)
    if hq != hkv:
        g = hq // hkv
        k, v, mask = (t.repeat_interleave(g, dim=0) for t in (k, v, mask))
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).to(k.dtype), k, v, attn_mask=mask, scale=scale
    )  # [Hq, n, D]
    return out.transpose(0, 1).to(q.dtype)


def attention_probs(q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, kpos: torch.Tensor,
                    valid: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmaxed causal attention [Hq, n, T] in float32 (for scoring: SnapKV, OmniKV, Sparse-Q)."""
    hq, hkv = q.shape[1], k.shape[0]
    kk = k.repeat_interleave(hq // hkv, dim=0).float()
    scores = torch.einsum("nhd,htd->hnt", q.float(), kk) * scale
    mask = valid[:, None, :] & (kpos[:, None, :] <= q_pos.to(kpos.device)[None, :, None])
    mask = mask.repeat_interleave(hq // hkv, dim=0)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)
