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


def main(batch: int = 8, context: int = 32768):
    if not torch.cuda.is_available():
        raise SystemExit("kernel_bench needs a CUDA device (kernels are tested on CPU by pytest under TRITON_INTERPRET=1)")
    decode(batch, context)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
