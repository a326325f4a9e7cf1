"""Decode attention over a token-granular slot pool: one query token per sequence.

Inputs: q [B, Hq, D]; k_pool, v_pool [N, D] (one row = one token of one KV head of one layer);
table [B, Hkv, T] slot ids; lens [B, Hkv] valid entries per head. Output [B, Hq, D].
The Triton kernel runs one program per (sequence, query head) with an online softmax over blocks of
slots; `decode_attention_ref` is the PyTorch reference it is tested against.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # triton is optional: the PyTorch reference serves everywhere
    triton = None


def decode_attention_ref(q, k_pool, v_pool, table, lens, scale):
    B, Hq, D = q.shape
    Hkv = table.shape[1]
    out = torch.empty_like(q)
    for b in range(B):
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            idx = table[b, kh, : int(lens[b, kh])].long()
            k, v = k_pool[idx].float(), v_pool[idx].float()
            p = torch.softmax((k @ q[b, h].float()) * scale, dim=0)
            out[b, h] = (p @ v).to(q.dtype)
    return out


def decode_attention_torch(q, k_pool, v_pool, table, lens, scale):
    """Vectorised PyTorch path (gather + masked SDPA): the fallback the kernel must beat."""
    B, Hq, D = q.shape
    Hkv, T = table.shape[1], table.shape[2]
    idx = table.long()
    k, v = k_pool[idx], v_pool[idx]  # [B, Hkv, T, D]
    mask = (torch.arange(T, device=q.device)[None, None, :] < lens[:, :, None])[:, :, None, :]  # [B, Hkv, 1, T]
    g = Hq // Hkv
    qg = q.view(B, Hkv, g, D).to(k.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    return out.reshape(B, Hq, D).to(q.dtype)


if triton is not None:

    @triton.jit
    def _decode_split_kernel(
        Q, K, V, Table, Lens, MidO, MidLse, scale, split_len,
        stride_qb, stride_qh, stride_tb, stride_th, stride_lb,
        stride_ob, stride_oh, stride_os, stride_lseb, stride_lseh,
        GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, IEEE: tl.constexpr,
    ):
        # One program = one (sequence, KV head, split of the history): the GROUP query heads that
        # share this KV head are processed together, so each K/V row is read once (GQA), and splits
        # of long histories run in parallel (flash-decoding); partial results are merged by LSE.
        b = tl.program_id(0)
        kh = tl.program_id(1)
        sp = tl.program_id(2)
        g = tl.arange(0, GP)
        gmask = g < GROUP
        d = tl.arange(0, D)
        heads = kh * GROUP + g
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None], other=0.0)
        n = tl.load(Lens + b * stride_lb + kh)
        lo = sp * split_len
        hi = tl.minimum(lo + split_len, n)
        m_i = tl.full([GP], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([GP], dtype=tl.float32)
        acc = tl.zeros([GP, D], dtype=tl.float32)
        for start in range(lo, hi, BLOCK_T):
            t = start + tl.arange(0, BLOCK_T)
            tmask = t < hi
            slot = tl.load(Table + b * stride_tb + kh * stride_th + t, mask=tmask, other=0).to(tl.int64)
            k = tl.load(K + slot[:, None] * D + d[None, :], mask=tmask[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * scale
            s = tl.where(tmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            v = tl.load(V + slot[:, None] * D + d[None, :], mask=tmask[:, None], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
        tl.store(MidO + b * stride_ob + heads[:, None] * stride_oh + sp * stride_os + d[None, :], out,
                 mask=gmask[:, None])
        tl.store(MidLse + b * stride_lseb + heads * stride_lseh + sp, lse, mask=gmask)


def _num_splits(batch: int, hkv: int, t: int, block_t: int, device) -> int:
    """Enough (sequence, head, split) programs to fill the GPU twice over, none shorter than a block."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = max(1, -(-2 * sms // (batch * hkv)))
    return max(1, min(want, -(-t // block_t)))


def decode_attention_triton(q, k_pool, v_pool, table, lens, scale, block_t: int = 64, num_splits: int | None = None):
    if triton is None:
        raise RuntimeError("triton is not installed: pip install triton (or use decode_attention_torch)")
    B, Hq, D = q.shape
    Hkv, T = table.shape[1], table.shape[2]
    if D & (D - 1):
        raise ValueError(f"decode kernel needs a power-of-two head_dim, got {D}")
    group = Hq // Hkv
    gp = max(16, triton.next_power_of_2(group))  # tl.dot needs >= 16 rows
    splits = num_splits or _num_splits(B, Hkv, T, block_t, q.device)
    split_len = -(-max(T, 1) // splits)
    split_len = -(-split_len // block_t) * block_t
    splits = max(1, -(-max(T, 1) // split_len))
    q = q.contiguous()
    table = table.to(torch.int32).contiguous()
    lens = lens.to(torch.int32).contiguous()
    mid_o = torch.empty(B, Hq, splits, D, device=q.device, dtype=torch.float32)
    mid_lse = torch.empty(B, Hq, splits, device=q.device, dtype=torch.float32)
    _decode_split_kernel[(B, Hkv, splits)](
        q, k_pool, v_pool, table, lens, mid_o, mid_lse, scale, split_len,
        q.stride(0), q.stride(1), table.stride(0), table.stride(1), lens.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        GROUP=group, GP=gp, D=D, BLOCK_T=block_t, IEEE=k_pool.dtype == torch.float32,
    )
    # merge the splits: softmax over their log-sum-exps weights each partial output
    w = torch.softmax(mid_lse, dim=-1).nan_to_num(0.0)
    return (w[..., None] * mid_o).sum(2).to(q.dtype)
