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


def attend_group(q: torch.Tensor, group, table: torch.Tensor, lens: torch.Tensor, pool: KVPool, scale: float,
                 sliding_window: int | None = None, decode_kernel=None, valid: torch.Tensor | None = None,
                 dense: bool = False):
    """Attention of one row group of a step over its read tables, in one call for the whole group.

    q [N, Hq, D]: the step's flat queries; group: a `RowGroup` (G sequences x n rows); table
    [G, Hkv, T] slot ids and lens [G, Hkv] (device) valid entries per head. Keys are masked by
    validity and by the POSITION stored with each slot (a query at p sees keys at <= p), so chunked
    prefill and evicted / reordered KV share one rule. Returns (out [rows, Hq, D] in the group's row
    order, padding dropped; (k, kpos, valid) of the gathered keys for observers, or None when the
    Triton decode kernel read the pool directly).
    """
    G, n = group.rows.shape
    hq, d = q.shape[1], q.shape[2]
    hkv, t = table.shape[1], table.shape[2]
    g = hq // hkv
    qg = q.view(G, hq, d) if group.flat_rows is None and n == 1 else q[group.rows]  # [G, n, Hq, D] or [G, Hq, D]
    if group.decode and decode_kernel is not None and sliding_window is None:
        return decode_kernel(qg.reshape(G, hq, d), pool.k, pool.v, table, lens, scale), None
    flat = table.reshape(-1)  # index_select copies whole rows: ~2.5x faster than advanced indexing on CPU
    k = pool.k.index_select(0, flat).view(G, hkv, t, d)  # [G, Hkv, T, D]
    v = pool.v.index_select(0, flat).view(G, hkv, t, d)
    if valid is None:
        valid = torch.arange(t, device=table.device)[None, None, :] < lens[:, :, None]  # [G, Hkv, T]
    kpos = None
    if group.decode:
        mask = valid[:, :, None, :]  # the new token sits after every cached one: lengths suffice
        if sliding_window is not None:
            kpos = pool.pos[table]
            mask = mask & (kpos > group.q_pos.view(G, 1, 1) - sliding_window)[:, :, None, :]
        qh = qg.reshape(G, hkv, g, d)
        out = F.scaled_dot_product_attention(qh if qh.dtype == k.dtype else qh.to(k.dtype), k, v, attn_mask=mask,
                                             scale=scale)  # [G, Hkv, g, D]
        out = out.reshape(G, hq, d)
        return (out if out.dtype == q.dtype else out.to(q.dtype)), (k, kpos, valid)
    if dense and sliding_window is None:
        # Columns are positions 0..T-1 and the queries the last n of them: a bottom-right causal
        # mask that fused SDPA kernels apply without materialising an [n, T] mask (2.5x at 1K).
        from torch.nn.attention.bias import causal_lower_right

        out = F.scaled_dot_product_attention(qg.transpose(1, 2).to(k.dtype), k, v, attn_mask=causal_lower_right(n, t),
                                             scale=scale, enable_gqa=hq != hkv)  # [G, Hq, n, D]
        kpos = torch.arange(t, device=table.device).expand(G, hkv, t)  # what pool.pos holds there
        return out.transpose(1, 2).reshape(G * n, hq, d).to(q.dtype), (k, kpos, valid)
    kpos = pool.pos[table]  # [G, Hkv, T]
    qp = group.q_pos[:, None, :, None]  # [G, 1, n, 1]
    mask = valid[:, :, None, :] & (kpos[:, :, None, :] <= qp)  # [G, Hkv, n, T]
    if sliding_window is not None:
        mask &= kpos[:, :, None, :] > qp - sliding_window
    qh = qg.view(G, n, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(G, hkv, g * n, d).to(k.dtype)
    mask = mask[:, :, None].expand(G, hkv, g, n, t).reshape(G, hkv, g * n, t)
    out = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale)  # [G, Hkv, g*n, D]
    out = out.view(G, hkv, g, n, d).permute(0, 3, 1, 2, 4).reshape(G, n, hq, d).to(q.dtype)
    out = out.reshape(G * n, hq, d) if group.valid is None else out[group.valid]
    return out, (k, kpos, valid)
