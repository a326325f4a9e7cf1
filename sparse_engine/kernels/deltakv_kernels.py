"""DeltaKV kernels, each a Triton kernel beside its PyTorch reference (the path that runs on CPU).

* `gather_inverse_rope`: pool slots [Hkv, n] -> the tokens' joined PRE-RoPE KV [n, 2*Hkv*D]
  (`cat([k_h0 .. k_hH, v_h0 .. v_hH])`, the layout the compressor was trained on): gathers K and V
  rows and undoes RoPE on K at each token's position.
* `reconstruct_scatter`: kv_hat = father mean + up-projected delta; RoPE on its K half at the
  token's position; K / V rows scattered into pool slots [Hkv, n] (the reconstruction path).
* `topk_fathers`: blockwise L2 top-k of causal prototypes per token (-1 where fewer are eligible):
  the reference selection of `deltakv.reference` (`cluster_e2e`, metric l2) returning indices.

RoPE tables: `cos`, `sin` [n, D/2] WITHOUT attention scaling; `scaling` is passed apart (the
engine's RoPE multiplies cos and sin by it, i.e. scales K by it, so its inverse divides by scaling).
`dispatch(use_triton)` picks the implementation; tests compare both under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # triton is optional: the PyTorch references serve everywhere
    triton = None


def rope_half_tables(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin [n, D/2] float32 (the first half of the engine's `rope_cos_sin`, unscaled)."""
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
    return freqs.cos().contiguous(), freqs.sin().contiguous()


# ---------------------------------------------------------------------------------------------
# PyTorch references
# ---------------------------------------------------------------------------------------------
def gather_inverse_rope_ref(k_pool, v_pool, slots, cos, sin, scaling: float = 1.0) -> torch.Tensor:
    """slots [Hkv, n] -> joined pre-RoPE KV [n, 2*Hkv*D] float32."""
    hkv, n = slots.shape
    idx = slots.reshape(-1).long()  # index_select: ~2.5x faster on CPU than advanced indexing
    k = k_pool.index_select(0, idx).view(hkv, n, -1).float()  # [Hkv, n, D]
    v = v_pool.index_select(0, idx).view(hkv, n, -1).float()
    h = k.shape[-1] // 2
    c, s = cos[None], sin[None]
    lo, hi = k[..., :h], k[..., h:]
    k = torch.cat([lo * c + hi * s, hi * c - lo * s], dim=-1) / scaling
    return torch.cat([k.transpose(0, 1).reshape(n, -1), v.transpose(0, 1).reshape(n, -1)], dim=1)


def father_mean(fathers: torch.Tensor, proto_kv: torch.Tensor) -> torch.Tensor:
    """Mean of the valid (>= 0) father rows of `proto_kv` [P, W] per token: [n, W] (zeros if none)."""
    # embedding_bag's mean skips padding_idx entries (and gives 0 for an empty bag): -1 -> a pad row.
    # ~16x faster on CPU than gathering [n, K, W] and masking (1024 tokens x 4 fathers x 384).
    p, w = proto_kv.shape
    table = torch.cat([proto_kv.float(), proto_kv.new_zeros(1, w, dtype=torch.float32)])
    return torch.nn.functional.embedding_bag(torch.where(fathers >= 0, fathers, p), table, mode="mean", padding_idx=p)


def reconstruct_scatter_ref(delta, fathers, proto_kv, cos, sin, k_pool, v_pool, slots, scaling: float = 1.0) -> None:
    """kv_hat = delta [n, W] + father_mean; RoPE(K) at the tokens' positions; write pool rows slots [Hkv, n]."""
    hkv, n = slots.shape
    kv = father_mean(fathers, proto_kv).add_(delta.float())
    d = kv.shape[1] // (2 * hkv)
    h = d // 2
    k = kv[:, : hkv * d].view(n, hkv, 2, h).transpose(0, 1)  # [Hkv, n, (lo, hi), D/2]
    v = kv[:, hkv * d :].view(n, hkv, d).transpose(0, 1)
    c, s = (cos * scaling)[None], (sin * scaling)[None]
    lo, hi = k[..., 0, :], k[..., 1, :]
    k_rot = torch.empty(hkv, n, d, dtype=kv.dtype, device=kv.device)
    torch.addcmul(lo * c, hi, s, value=-1, out=k_rot[..., :h])  # lo*cos - hi*sin
    torch.addcmul(hi * c, lo, s, out=k_rot[..., h:])  # hi*cos + lo*sin
    idx = slots.reshape(-1).long()
    k_pool.index_copy_(0, idx, k_rot.reshape(-1, d).to(k_pool.dtype))
    v_pool.index_copy_(0, idx, v.reshape(-1, d).to(v_pool.dtype))


def topk_fathers_ref(kv, pos, proto_kv, proto_pos, top_k: int, metric: str = "l2") -> torch.Tensor:
    """Indices [..., n, top_k] into the prototypes of the `top_k` most similar ones at strictly earlier
    positions (the `deltakv.reference` scores), -1 where fewer are eligible. kv [..., n, W], proto_kv
    [..., P, W] (leading dims: e.g. the layers of one compression, same positions)."""
    from deltakv.reference import ReferenceSpec, prototype_scores

    n = kv.shape[-2]
    if proto_kv.shape[-2] == 0 or n == 0:
        return torch.full((*kv.shape[:-1], top_k), -1, dtype=torch.long, device=kv.device)
    scores = prototype_scores(ReferenceSpec(metric=metric), kv.float(), proto_kv.float())
    scores = scores.masked_fill(~(proto_pos.view(1, -1) < pos.view(-1, 1)), float("-inf"))
    k = min(top_k, proto_kv.shape[-2])
    top, idx = scores.topk(k, dim=-1)
    idx = idx.masked_fill(~torch.isfinite(top), -1)
    if k < top_k:
        idx = torch.cat([idx, idx.new_full((*idx.shape[:-1], top_k - k), -1)], dim=-1)
    return idx


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _gather_inv_rope_kernel(K, V, Slots, Cos, Sin, Out, n, inv_s, stride_sh, stride_on,
                                HKV: tl.constexpr, HALF: tl.constexpr):
        i = tl.program_id(0)
        h = tl.program_id(1)
        d = tl.arange(0, HALF)
        slot = tl.load(Slots + h * stride_sh + i).to(tl.int64)
        c = tl.load(Cos + i * HALF + d)
        s = tl.load(Sin + i * HALF + d)
        lo = tl.load(K + slot * 2 * HALF + d).to(tl.float32)
        hi = tl.load(K + slot * 2 * HALF + HALF + d).to(tl.float32)
        base = Out + i * stride_on + h * 2 * HALF
        tl.store(base + d, (lo * c + hi * s) * inv_s)
        tl.store(base + HALF + d, (hi * c - lo * s) * inv_s)
        vbase = Out + i * stride_on + HKV * 2 * HALF + h * 2 * HALF
        tl.store(vbase + d, tl.load(V + slot * 2 * HALF + d).to(tl.float32))
        tl.store(vbase + HALF + d, tl.load(V + slot * 2 * HALF + HALF + d).to(tl.float32))

    @triton.jit
    def _reconstruct_kernel(Delta, Fathers, Proto, Cos, Sin, K, V, Slots, scaling, stride_dn, stride_fn,
                            stride_pn, stride_sh, HKV: tl.constexpr, HALF: tl.constexpr, NF: tl.constexpr,
                            NFP: tl.constexpr):
        i = tl.program_id(0)
        h = tl.program_id(1)
        d = tl.arange(0, HALF)
        j = tl.arange(0, NFP)
        f = tl.load(Fathers + i * stride_fn + j, mask=j < NF, other=-1)
        ok = f >= 0
        cnt = tl.maximum(tl.sum(ok.to(tl.float32), axis=0), 1.0)
        fr = tl.where(ok, f, 0).to(tl.int64)
        D2 = 2 * HALF
        kcol = h * D2
        vcol = HKV * D2 + h * D2
        m2 = ok[:, None]
        ref_klo = tl.sum(tl.load(Proto + fr[:, None] * stride_pn + kcol + d[None, :], mask=m2, other=0.0), axis=0) / cnt
        ref_khi = tl.sum(tl.load(Proto + fr[:, None] * stride_pn + kcol + HALF + d[None, :], mask=m2, other=0.0), axis=0) / cnt
        ref_vlo = tl.sum(tl.load(Proto + fr[:, None] * stride_pn + vcol + d[None, :], mask=m2, other=0.0), axis=0) / cnt
        ref_vhi = tl.sum(tl.load(Proto + fr[:, None] * stride_pn + vcol + HALF + d[None, :], mask=m2, other=0.0), axis=0) / cnt
        klo = tl.load(Delta + i * stride_dn + kcol + d) + ref_klo
        khi = tl.load(Delta + i * stride_dn + kcol + HALF + d) + ref_khi
        vlo = tl.load(Delta + i * stride_dn + vcol + d) + ref_vlo
        vhi = tl.load(Delta + i * stride_dn + vcol + HALF + d) + ref_vhi
        c = tl.load(Cos + i * HALF + d) * scaling
        s = tl.load(Sin + i * HALF + d) * scaling
        slot = tl.load(Slots + h * stride_sh + i).to(tl.int64)
        tl.store(K + slot * D2 + d, (klo * c - khi * s).to(K.dtype.element_ty))
        tl.store(K + slot * D2 + HALF + d, (khi * c + klo * s).to(K.dtype.element_ty))
        tl.store(V + slot * D2 + d, vlo.to(V.dtype.element_ty))
        tl.store(V + slot * D2 + HALF + d, vhi.to(V.dtype.element_ty))

    @triton.jit
    def _topk_l2_kernel(X, Pos, P, PPos, Out, n, p_count, W, stride_xn, stride_pn, stride_on,
                        TOPK: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr, BW: tl.constexpr):
        # One program = BM tokens. TOPK passes over the prototypes, each finding the best (score,
        # lowest index) strictly after the previous pick in (score desc, index asc) order.
        pid = tl.program_id(0)
        rows = pid * BM + tl.arange(0, BM)
        rmask = rows < n
        qpos = tl.load(Pos + rows, mask=rmask, other=0)
        prev_s = tl.full([BM], float("inf"), dtype=tl.float32)
        prev_i = tl.full([BM], -1, dtype=tl.int32)
        for t in range(TOPK):
            best_s = tl.full([BM], float("-inf"), dtype=tl.float32)
            best_i = tl.full([BM], -1, dtype=tl.int32)
            for p0 in range(0, p_count, BP):
                cols = p0 + tl.arange(0, BP)
                cmask = cols < p_count
                dot = tl.zeros([BM, BP], dtype=tl.float32)
                pn = tl.zeros([BP], dtype=tl.float32)
                for w0 in range(0, W, BW):
                    w = w0 + tl.arange(0, BW)
                    wm = w < W
                    x = tl.load(X + rows[:, None] * stride_xn + w[None, :], mask=rmask[:, None] & wm[None, :], other=0.0)
                    p = tl.load(P + cols[:, None] * stride_pn + w[None, :], mask=cmask[:, None] & wm[None, :], other=0.0)
                    dot += tl.dot(x, tl.trans(p), input_precision="ieee")
                    pn += tl.sum(p * p, axis=1)
                s = 2.0 * dot - pn[None, :]
                ppos = tl.load(PPos + cols, mask=cmask, other=0)
                ok = cmask[None, :] & (ppos[None, :] < qpos[:, None])
                ci = cols[None, :].to(tl.int32) + tl.zeros([BM, BP], dtype=tl.int32)
                after = (s < prev_s[:, None]) | ((s == prev_s[:, None]) & (ci > prev_i[:, None]))
                s = tl.where(ok & after, s, float("-inf"))
                bs = tl.max(s, axis=1)
                bi = tl.min(tl.where((s == bs[:, None]) & (s > float("-inf")), ci, 2147483647), axis=1)
                better = (bs > best_s) | ((bs == best_s) & (bs > float("-inf")) & (bi < best_i))
                best_s = tl.where(better, bs, best_s)
                best_i = tl.where(better, bi, best_i)
            found = best_s > float("-inf")
            tl.store(Out + rows * stride_on + t, tl.where(found, best_i, -1), mask=rmask)
            prev_s = tl.where(found, best_s, float("-inf"))
            prev_i = tl.where(found, best_i, 2147483647)


def _need_triton():
    if triton is None:
        raise RuntimeError("triton is not installed: pip install triton (or use the *_ref PyTorch path)")


def gather_inverse_rope_triton(k_pool, v_pool, slots, cos, sin, scaling: float = 1.0) -> torch.Tensor:
    _need_triton()
    hkv, n = slots.shape
    d = k_pool.shape[1]
    out = torch.empty(n, 2 * hkv * d, dtype=torch.float32, device=k_pool.device)
    if n == 0:
        return out
    slots = slots.contiguous()
    _gather_inv_rope_kernel[(n, hkv)](k_pool, v_pool, slots, cos.contiguous(), sin.contiguous(), out, n,
                                      1.0 / scaling, slots.stride(0), out.stride(0), HKV=hkv, HALF=d // 2)
    return out


def reconstruct_scatter_triton(delta, fathers, proto_kv, cos, sin, k_pool, v_pool, slots, scaling: float = 1.0) -> None:
    _need_triton()
    hkv, n = slots.shape
    if n == 0:
        return
    d = k_pool.shape[1]
    delta = delta.float().contiguous()
    fathers = fathers.to(torch.int32).contiguous()
    proto = proto_kv.float().contiguous()
    if proto.shape[0] == 0:
        proto = torch.zeros(1, delta.shape[1], device=delta.device)
    nf = fathers.shape[1]
    slots = slots.contiguous()
    _reconstruct_kernel[(n, hkv)](delta, fathers, proto, cos.contiguous(), sin.contiguous(), k_pool, v_pool, slots,
                                  float(scaling), delta.stride(0), fathers.stride(0), proto.stride(0), slots.stride(0),
                                  HKV=hkv, HALF=d // 2, NF=nf, NFP=max(2, triton.next_power_of_2(max(nf, 1))))


def topk_fathers_triton(kv, pos, proto_kv, proto_pos, top_k: int, metric: str = "l2", block_m: int = 16,
                        block_p: int = 32, block_w: int = 64) -> torch.Tensor:
    if metric != "l2":
        return topk_fathers_ref(kv, pos, proto_kv, proto_pos, top_k, metric)
    if kv.dim() == 3:  # several layers at the same positions: one launch each
        return torch.stack([topk_fathers_triton(x, pos, p, proto_pos, top_k, metric, block_m, block_p, block_w)
                            for x, p in zip(kv, proto_kv)])
    _need_triton()
    n = kv.shape[0]
    out = torch.full((n, top_k), -1, dtype=torch.int32, device=kv.device)
    if n == 0 or proto_kv.shape[0] == 0:
        return out.long()
    x, p = kv.float().contiguous(), proto_kv.float().contiguous()
    _topk_l2_kernel[(triton.cdiv(n, block_m),)](
        x, pos.contiguous(), p, proto_pos.contiguous(), out, n, p.shape[0], x.shape[1], x.stride(0), p.stride(0),
        out.stride(0), TOPK=top_k, BM=block_m, BP=block_p, BW=block_w)
    return out.long()


def dispatch(use_triton: bool):
    """(gather_inverse_rope, reconstruct_scatter, topk_fathers) for the chosen implementation."""
    if use_triton:
        return gather_inverse_rope_triton, reconstruct_scatter_triton, topk_fathers_triton
    return gather_inverse_rope_ref, reconstruct_scatter_ref, topk_fathers_ref
