"""The Triton decode kernel under TRITON_INTERPRET=1 on CPU against its PyTorch reference."""

from __future__ import annotations

import textwrap

import pytest
import torch

from sparse_engine.kernels.decode_attention import decode_attention_ref
from tests.triton_interpreter import assert_passes_interpreted

triton = pytest.importorskip("triton", reason="triton not installed (pip install triton)")


def _case(seed=0, B=3, Hq=6, Hkv=2, D=64, N=500, T=150):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, D, generator=g)
    k, v = torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)
    table = torch.randint(0, N, (B, Hkv, T), generator=g, dtype=torch.int32)
    lens = torch.randint(1, T + 1, (B, Hkv), generator=g, dtype=torch.int32)
    return q, k, v, table, lens


def test_reference_matches_dense_sdpa():
    q, k, v, table, lens = _case()
    out = decode_attention_ref(q, k, v, table, lens, 0.125)
    b, h = 1, 4
    idx = table[b, h // 3, : lens[b, h // 3]].long()
    ref = torch.nn.functional.scaled_dot_product_attention(q[b, h][None, None, None], k[idx][None, None], v[idx][None, None], scale=0.125)
    torch.testing.assert_close(out[b, h], ref.reshape(-1), atol=1e-5, rtol=1e-5)


def test_triton_kernel_interpreted_matches_reference():
    # TRITON_INTERPRET must be set before triton is imported: run in a fresh interpreter
    code = textwrap.dedent("""
        import torch
        from sparse_engine.kernels.decode_attention import decode_attention_ref, decode_attention_triton
        from tests.test_kernel_decode_attention import _case
        for seed, D in ((0, 64), (1, 32)):
            q, k, v, table, lens = _case(seed, D=D)
            ref = decode_attention_ref(q, k, v, table, lens, D ** -0.5)
            out = decode_attention_triton(q, k, v, table, lens, D ** -0.5, block_t=32)
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        print("OK")
    """)
    assert_passes_interpreted(code)


def test_engine_with_interpreted_kernel_equals_torch_path(tiny_model_factory):
    path = tiny_model_factory("qwen2")
    code = textwrap.dedent(f"""
        from sparse_engine import LLM, SamplingParams
        p = [list(range(3, 60)), list(range(10, 30))]
        sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        a = LLM({str(path)!r}, dtype="float32", use_triton=True).generate(p, sp, use_tqdm=False)
        b = LLM({str(path)!r}, dtype="float32", use_triton=False).generate(p, sp, use_tqdm=False)
        assert [o["token_ids"] for o in a] == [o["token_ids"] for o in b], (a, b)
        print("OK")
    """)
    assert_passes_interpreted(code)
