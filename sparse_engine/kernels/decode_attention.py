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
    def _decode_kernel(
        Q, K, V, Table, Lens, Out, scale,
        stride_qb, stride_qh, stride_tb, stride_th, stride_lb, stride_ob, stride_oh,
        GROUP: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        kh = h // GROUP
        d = tl.arange(0, D)
        q = tl.load(Q + b * stride_qb + h * stride_qh + d).to(tl.float32)
        n = tl.load(Lens + b * stride_lb + kh)
        m_i = float("-inf")
        l_i = 0.0
        acc = tl.zeros([D], dtype=tl.float32)
        for start in range(0, n, BLOCK_T):
            t = start + tl.arange(0, BLOCK_T)
            tmask = t < n
            slot = tl.load(Table + b * stride_tb + kh * stride_th + t, mask=tmask, other=0).to(tl.int64)
            k = tl.load(K + slot[:, None] * D + d[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1) * scale
            s = tl.where(tmask, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new)
            v = tl.load(V + slot[:, None] * D + d[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        acc = acc / l_i
        tl.store(Out + b * stride_ob + h * stride_oh + d, acc.to(Out.dtype.element_ty))


def decode_attention_triton(q, k_pool, v_pool, table, lens, scale, block_t: int = 64):
    if triton is None:
        raise RuntimeError("triton is not installed: pip install triton (or use decode_attention_ref)")
    B, Hq, D = q.shape
    Hkv = table.shape[1]
    if D & (D - 1):
        raise ValueError(f"decode kernel needs a power-of-two head_dim, got {D}")
    q = q.contiguous()
    table = table.to(torch.int32).contiguous()
    lens = lens.to(torch.int32).contiguous()
    out = torch.empty_like(q)
    _decode_kernel[(B, Hq)](
        q, k_pool, v_pool, table, lens, out, scale,
        q.stride(0), q.stride(1), table.stride(0), table.stride(1), lens.stride(0),
        out.stride(0), out.stride(1),
        GROUP=Hq // Hkv, D=D, BLOCK_T=block_t,
    )
    return out
