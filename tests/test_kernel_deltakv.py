"""DeltaKV kernels: PyTorch references against the engine's RoPE and `deltakv.reference`, and the
Triton kernels under TRITON_INTERPRET=1 (in a subprocess) against the references."""

from __future__ import annotations

import textwrap

import pytest
import torch

from deltakv.reference import ReferenceSpec, select_references_from
from sparse_engine.kernels.deltakv_kernels import (father_mean, gather_inverse_rope_ref, reconstruct_scatter_ref,
                                                   rope_half_tables, topk_fathers_ref)
from sparse_engine.layers.rotary import apply_rope, rope_cos_sin
from tests.triton_interpreter import assert_passes_interpreted


def _case(seed=0, hkv=2, d=16, n=40, n_slots=200, n_proto=12, top_k=3):
    g = torch.Generator().manual_seed(seed)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    pos = torch.randperm(300, generator=g)[:n].sort().values
    k_pre = torch.randn(n, hkv, d, generator=g)
    v = torch.randn(n, hkv, d, generator=g)
    slots = torch.randperm(n_slots, generator=g)[: n * hkv].view(hkv, n)
    ppos = pos[torch.randperm(n, generator=g)[:n_proto]].sort().values
    proto = torch.randn(n_proto, 2 * hkv * d, generator=g)
    fathers = topk_fathers_ref(torch.randn(n, 2 * hkv * d, generator=g), pos, proto, ppos, top_k)
    return dict(inv_freq=inv_freq, pos=pos, k_pre=k_pre, v=v, slots=slots, ppos=ppos, proto=proto, fathers=fathers,
                n_slots=n_slots, hkv=hkv, d=d, n=n)


@pytest.mark.parametrize("scaling", [1.0, 1.3])
def test_gather_inverse_rope_ref_undoes_engine_rope(scaling):
    c = _case()
    cos, sin = rope_cos_sin(c["inv_freq"], c["pos"], scaling)
    k_post = apply_rope(c["k_pre"], cos, sin)
    kp, vp = torch.zeros(c["n_slots"], c["d"]), torch.zeros(c["n_slots"], c["d"])
    kp[c["slots"]] = k_post.transpose(0, 1)
    vp[c["slots"]] = c["v"].transpose(0, 1)
    ch, sh = rope_half_tables(c["inv_freq"], c["pos"])
    kv = gather_inverse_rope_ref(kp, vp, c["slots"], ch, sh, scaling)
    want = torch.cat([c["k_pre"].reshape(c["n"], -1), c["v"].reshape(c["n"], -1)], dim=1)  # cat([k_proj, v_proj])
    torch.testing.assert_close(kv, want, atol=1e-5, rtol=1e-5)


def test_reconstruct_scatter_ref_writes_roped_kv():
    c = _case()
    n, hkv, d = c["n"], c["hkv"], c["d"]
    want = torch.cat([c["k_pre"].reshape(n, -1), c["v"].reshape(n, -1)], dim=1)
    delta = want - father_mean(c["fathers"], c["proto"])
    kp, vp = torch.zeros(c["n_slots"], d), torch.zeros(c["n_slots"], d)
    ch, sh = rope_half_tables(c["inv_freq"], c["pos"])
    reconstruct_scatter_ref(delta, c["fathers"], c["proto"], ch, sh, kp, vp, c["slots"])
    cos, sin = rope_cos_sin(c["inv_freq"], c["pos"])
    torch.testing.assert_close(kp[c["slots"]], apply_rope(c["k_pre"], cos, sin).transpose(0, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vp[c["slots"]], c["v"].transpose(0, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("metric", ["l2", "dot", "cosine"])
def test_topk_fathers_mean_is_the_training_reference(metric):
    g = torch.Generator().manual_seed(3)
    spec = ReferenceSpec(num_sinks=4, cluster_ratio=0.2, metric=metric, top_k=4)
    pos = torch.arange(60)
    kv = torch.randn(60, 32, generator=g)
    proto = spec.is_prototype(pos)
    fathers = topk_fathers_ref(kv, pos, kv[proto], pos[proto], spec.top_k, metric)
    assert (fathers[:1] == -1).all() and (fathers[2] >= 0).sum() == 2  # causal: position 2 sees prototypes 0, 1
    got = father_mean(fathers, kv[proto])
    want = select_references_from(spec, kv, pos, kv[proto], pos[proto])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


triton = pytest.importorskip("triton", reason="triton not installed (pip install triton)")


def test_triton_kernels_interpreted_match_references():
    # TRITON_INTERPRET must be set before triton is imported: run in a fresh interpreter
    code = textwrap.dedent("""
        import torch
        from sparse_engine.kernels import deltakv_kernels as K
        from tests.test_kernel_deltakv import _case
        for seed, d, top_k in ((0, 16, 3), (1, 32, 4)):
            c = _case(seed, d=d, top_k=top_k)
            g = torch.Generator().manual_seed(seed)
            kp, vp = torch.randn(c["n_slots"], d, generator=g), torch.randn(c["n_slots"], d, generator=g)
            ch, sh = K.rope_half_tables(c["inv_freq"], c["pos"])
            for s in (1.0, 1.2):
                torch.testing.assert_close(K.gather_inverse_rope_triton(kp, vp, c["slots"], ch, sh, s),
                                           K.gather_inverse_rope_ref(kp, vp, c["slots"], ch, sh, s), atol=1e-5, rtol=1e-5)
            delta = torch.randn(c["n"], 4 * d, generator=g)
            a = (kp.clone(), vp.clone()); b = (kp.clone(), vp.clone())
            K.reconstruct_scatter_triton(delta, c["fathers"], c["proto"], ch, sh, *a, c["slots"], 1.1)
            K.reconstruct_scatter_ref(delta, c["fathers"], c["proto"], ch, sh, *b, c["slots"], 1.1)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            x = torch.randn(70, 4 * d, generator=g)
            xpos = torch.randint(0, 300, (70,), generator=g)
            ft = K.topk_fathers_triton(x, xpos, c["proto"], c["ppos"], top_k, block_m=16, block_p=8, block_w=16)
            fr = K.topk_fathers_ref(x, xpos, c["proto"], c["ppos"], top_k)
            assert torch.equal(ft.sort(1).values, fr.sort(1).values), (ft, fr)
        print("OK")
    """)
    assert_passes_interpreted(code)


def test_engine_deltakv_with_interpreted_kernels_equals_torch_path(tiny_model_factory):
    path = tiny_model_factory("llama")
    code = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        from sparse_engine import LLM, SamplingParams
        from tests.test_deltakv_inference import tiny_compressor
        p = [list(range(3, 50))]
        sp = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
        kw = dict(dtype="float32", method="deltakv", deltakv_path=tiny_compressor(latent=16), recent_size=8,
                  latent_dtype="int8", num_top_tokens=12, chunk_prefill_size=32, kv_cache_bytes=1 << 22)
        a = LLM({str(path)!r}, use_triton=True, **kw)
        assert a.method.decode_kernel is not None
        oa = a.generate(p, sp, use_tqdm=False)
        ob = LLM({str(path)!r}, use_triton=False, **kw).generate(p, sp, use_tqdm=False)
        assert [o["token_ids"] for o in oa] == [o["token_ids"] for o in ob], (oa, ob)
        print("OK")
    """)
    assert_passes_interpreted(code)
