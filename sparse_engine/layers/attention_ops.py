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
    hq, hkv, t = q.shape[1], k.shape[0], k.shape[1]
    n = q.shape[0]
    qp = q_pos.to(kpos.device)
    valid = valid.to(kpos.device)
    qh = q.transpose(0, 1).to(k.dtype)[None]  # [1, Hq, n, D]
    shared = bool(valid.all()) and (hkv == 1 or bool((kpos == kpos[:1]).all()))
    if shared and sliding_window is None and t >= n:
        # Common case (vanilla history, all heads alike): keys are positions 0..T-1 in order and the
        # queries are the last n of them -> a bottom-right causal mask, served by fused SDPA kernels
        # without materialising an [n, T] mask.
        ar = torch.arange(t, device=kpos.device)
        if bool((kpos[0] == ar).all()) and bool((qp == ar[t - n :]).all()):
            from torch.nn.attention.bias import causal_lower_right

            out = F.scaled_dot_product_attention(qh, k[None], v[None], attn_mask=causal_lower_right(n, t),
                                                 scale=scale, enable_gqa=hq != hkv)
            return out[0].transpose(0, 1).to(q.dtype)
    if shared:
        mask = kpos[:1, None, :] <= qp[None, :, None]  # [1, n, T], broadcast over heads
        if sliding_window is not None:
            mask &= kpos[:1, None, :] > (qp[None, :, None] - sliding_window)
        out = F.scaled_dot_product_attention(qh, k[None], v[None], attn_mask=mask[None], scale=scale,
                                             enable_gqa=hq != hkv)
        return out[0].transpose(0, 1).to(q.dtype)
    mask = valid[:, None, :] & (kpos[:, None, :] <= qp[None, :, None])  # [Hkv, n, T]
    if sliding_window is not None:
        mask &= kpos[:, None, :] > (qp[None, :, None] - sliding_window)
    if hq != hkv:
        g = hq // hkv
        k, v, mask = (x.repeat_interleave(g, dim=0) for x in (k, v, mask))
    out = F.scaled_dot_product_attention(qh[0], k, v, attn_mask=mask, scale=scale)  # [Hq, n, D]
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
