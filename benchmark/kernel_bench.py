"""Kernel checks and timings on CUDA: each Triton kernel vs its PyTorch path (correctness + speed).

    python -m benchmark.kernel_bench --batch 8 --context 32768
"""

from __future__ import annotations

import torch


def _time(fn, iters=20):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=iters * 5) / 1000.0  # seconds


def decode(batch=8, context=32768, hq=28, hkv=4, d=128, dtype=torch.bfloat16):
    from sparse_engine.kernels.decode_attention import decode_attention_torch, decode_attention_triton

    dev = torch.device("cuda")
    n = batch * hkv * context
    g = torch.Generator(device=dev).manual_seed(0)
    kp = torch.randn(n, d, device=dev, dtype=dtype, generator=g)
    vp = torch.randn(n, d, device=dev, dtype=dtype, generator=g)
    table = torch.randperm(n, device=dev, generator=g).view(batch, hkv, context).to(torch.int32)
    lens = torch.full((batch, hkv), context, device=dev, dtype=torch.int32)
    lens[0, :] = context // 3  # ragged
    q = torch.randn(batch, hq, d, device=dev, dtype=dtype, generator=g)
    ref = decode_attention_torch(q.float(), kp.float(), vp.float(), table, lens, d ** -0.5)
    out = decode_attention_triton(q, kp, vp, table, lens, d ** -0.5)
    err = (out.float() - ref).abs().max().item()
    t_tri = _time(lambda: decode_attention_triton(q, kp, vp, table, lens, d ** -0.5))
    t_ref = _time(lambda: decode_attention_torch(q, kp, vp, table, lens, d ** -0.5))
    kv_bytes = 2 * int(lens.sum()) * d * kp.element_size()
    print(f"decode_attention B={batch} T={context} Hq={hq} Hkv={hkv} D={d} {dtype}: max|err| {err:.2e}; "
          f"triton {t_tri * 1e3:.3f} ms ({kv_bytes / t_tri / 1e9:.0f} GB/s of KV), torch {t_ref * 1e3:.3f} ms, "
          f"speedup {t_ref / t_tri:.2f}x")
    return err, t_tri, t_ref


def reconstruct(tokens=8192, protos=4096, hkv=4, d=128, top_k=4, latent=512, dtype=torch.bfloat16):
    """DeltaKV's per-layer reconstruction of `tokens` selected tokens (e.g. batch 8 x 1024): gather the
    prototypes with RoPE undone, then up-projection output + father mean -> RoPE -> pool rows; Triton
    vs the PyTorch reference (`sparse_engine.kernels.deltakv_kernels`). The up-projection GEMM itself
    is timed apart (it is a cuBLAS call on both paths)."""
    from sparse_engine.kernels.deltakv_kernels import dispatch, rope_half_tables

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    n_pool = (protos + tokens) * hkv
    kp = torch.randn(n_pool, d, device=dev, dtype=dtype, generator=g)
    vp = torch.randn(n_pool, d, device=dev, dtype=dtype, generator=g)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, d, 2, device=dev).float() / d))
    pslots = torch.arange(protos * hkv, device=dev).view(hkv, protos)
    pcos, psin = rope_half_tables(inv_freq, torch.arange(protos, device=dev) * 8)
    slots = (protos * hkv + torch.arange(tokens * hkv, device=dev)).view(hkv, tokens)
    cos, sin = rope_half_tables(inv_freq, torch.randint(0, protos * 8, (tokens,), device=dev, generator=g))
    fathers = torch.randint(0, protos, (tokens, top_k), device=dev, generator=g)
    z = torch.randn(tokens, latent, device=dev, dtype=dtype, generator=g)
    up = torch.nn.Linear(latent, 2 * hkv * d, bias=False, device=dev, dtype=dtype)
    up.requires_grad_(False)
    delta = up(z).float()
    out = {}
    for name, use in (("triton", True), ("torch", False)):
        gather_inv, rec, _ = dispatch(use)

        def step(gather_inv=gather_inv, rec=rec):
            proto_kv = gather_inv(kp, vp, pslots, pcos, psin, 1.0)
            rec(delta, fathers, proto_kv, cos, sin, kp, vp, slots, 1.0)

        step()
        out[name] = (_time(step), kp[slots].float().clone())
    err = (out["triton"][1] - out["torch"][1]).abs().max().item()
    t_up = _time(lambda: up(z))
    print(f"deltakv reconstruct {tokens} tokens, {protos} prototypes, Hkv={hkv} D={d} top_k={top_k} {dtype}: "
          f"max|err| {err:.2e}; triton {out['triton'][0] * 1e3:.3f} ms, torch {out['torch'][0] * 1e3:.3f} ms "
          f"(speedup {out['torch'][0] / out['triton'][0]:.2f}x); up-projection GEMM {latent}->{2 * hkv * d}: "
          f"{t_up * 1e3:.3f} ms")
    return err, out["triton"][0], out["torch"][0]


def main(batch: int = 8, context: int = 32768):
    if not torch.cuda.is_available():
        raise SystemExit("kernel_bench needs a CUDA device (kernels are tested on CPU by pytest under TRITON_INTERPRET=1)")
    decode(batch, context)
    reconstruct(tokens=batch * 1024)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
