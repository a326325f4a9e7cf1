"""experiments/kv_bytes (issue 15.4): the per-part count against hand arithmetic for the qwen7b_c512
recipe, and against the bytes the engine holds (`kv_bytes`) on the shipped model for the same config."""

from __future__ import annotations

import pytest
import torch

from experiments.kv_bytes import Geometry, compose, count, geometry, main
from sparse_engine import LLM, SamplingParams


def test_qwen7b_c512_hand_count():
    """Qwen2.5-7B: 28 layers, 4 KV heads x 128, full layers 0,1,2,4,7,14 (22 sparse), latent 512 int4
    (row 256 + 2 scale + 4 fathers x 4 B: ordinals pass int16 at 1M positions), 16 sinks, stride 10,
    recent 32, KIVI int4 groups of 32 / residual 32, bf16 slots of 512 B, T = 131072."""
    cfg = compose(["+experiment=qwen7b_c512"])
    g = geometry(cfg)
    assert (g.num_layers, g.num_kv_heads, g.head_dim, g.full_layers) == (28, 4, 128, [0, 1, 2, 4, 7, 14])
    assert (g.latent_size, g.sinks, g.stride, g.top_k, g.kivi_bits) == (512, 16, 10, 4, 4)
    T = 131072
    c = count(g, T, 512)
    protos = 13103  # positions 16, 26, ..., < 131040 = T - 32: ceil(131024 / 10)
    comp = 131024 - protos
    assert c["parts"]["latents"] == 22 * comp * 256
    assert c["parts"]["index"] == 22 * comp * 16
    assert c["parts"]["prototypes"] == 22 * protos * 4 * 512
    blocks = (T - 16 - 32) // 32  # 4094 whole groups
    # per block and head: K, V codes 32 x 128 / 2 B each; K min+scale 128 x 2 x 2 B; V 32 x 4 groups x 2 x 2 B
    assert c["parts"]["full layers"] == 6 * blocks * 4 * 2 * 2048
    assert c["parts"]["scales"] == 22 * comp * 2 + 6 * blocks * 4 * (512 + 512)
    assert c["parts"]["window"] == 22 * (T - comp - protos) * 2048 + 6 * (T - blocks * 32) * 2048
    assert c["vanilla"] == 28 * T * 2048
    assert c["ratio"] == pytest.approx(sum(c["parts"].values()) / c["vanilla"])
    assert c["ratio"] <= 0.30
    off = count(Geometry(**{**g.__dict__, "kivi_bits": 0}), T, 512)
    assert 0.38 < off["ratio"] < 0.40  # the "about 40%" without the full-layer quantization


def test_cli_prints_the_ratio(capsys):
    main(["+experiment=qwen7b_c512", "context=32768"])
    out = capsys.readouterr().out
    ratio = float(out.split("ratio vs bf16 KV: ")[1].split()[0])
    assert ratio <= 0.30 and "| latents |" in out and "| index |" in out
    main(["+experiment=qwen7b_c512", "method.full_layer_kv_quant_bits=0", "method.latent_dtype=bf16"])
    assert float(capsys.readouterr().out.split("ratio vs bf16 KV: ")[1].split()[0]) > 0.6


@pytest.fixture(scope="module")
def shipped_compressor():
    """A random linear compressor with the smoke compressor's geometry on the shipped SmolLM2 (30 layers,
    3 KV heads x 64): full layers 0,1,2,8,18, latent 128, 16 sinks, stride 32, 4 fathers."""
    from deltakv.reference import ReferenceSpec
    from deltakv.testing import tiny_compressor

    full = [0, 1, 2, 8, 18]
    return tiny_compressor(latent=128, layers=[l for l in range(30) if l not in full], full=full, num_layers=30,
                           num_kv_heads=3, head_dim=64,
                           reference=ReferenceSpec(num_sinks=16, cluster_ratio=1 / 32, top_k=4))


def _engine_bytes_after_prefill(llm, T):
    prompt = torch.randint(3, 250, (T,), generator=torch.Generator().manual_seed(0)).tolist()
    seq = llm.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    while seq.num_computed < T:
        llm.step()
    got = llm.method.kv_bytes(seq)
    llm.abort_all()
    return got


@pytest.mark.parametrize("kivi_bits,latent,T", [(4, "int4", 301), (2, "int8", 77), (0, "bf16", 301)])
def test_count_equals_engine_kv_bytes_tiny(tiny_model_factory, kivi_bits, latent, T):
    """The tiny llama (4 layers, 2 KV heads x 16) with a tiny compressor (full layer 0, 4 sinks, stride 4,
    2 fathers, latent 16), KIVI groups of 8 / residual 8, float32 slots."""
    from deltakv.testing import tiny_compressor

    llm = LLM(str(tiny_model_factory("llama")), method="deltakv", deltakv_path=tiny_compressor(latent=16),
              latent_dtype=latent, recent_size=8, num_top_tokens=16, full_layer_kv_quant_bits=kivi_bits,
              full_layer_kivi_group_size=8, full_layer_kivi_residual_length=8, dtype="float32",
              chunk_prefill_size=64, kv_cache_bytes=1 << 24)
    spec = llm.spec
    g = Geometry(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.max_position_embeddings, [0], 16, 4, 4, 2,
                 latent, 8, kivi_bits, 8, 8)
    c = count(g, T, llm.pool.bytes_per_slot)
    assert _engine_bytes_after_prefill(llm, T) == c["engine_total"]
    assert c["compressed"] > 0 and (c["storage"] > 0) == bool(kivi_bits)


@pytest.mark.slow
@pytest.mark.parametrize("kivi_bits,latent", [(4, "int4"), (0, "int8")])
def test_count_equals_engine_kv_bytes(shipped_model_path, shipped_compressor, kivi_bits, latent):
    T = 333
    llm = LLM(shipped_model_path, method="deltakv", deltakv_path=shipped_compressor, latent_dtype=latent,
              recent_size=32, num_top_tokens=64, full_layer_kv_quant_bits=kivi_bits, dtype="float32",
              chunk_prefill_size=128, kv_cache_bytes=1 << 28)
    spec = llm.spec
    g = Geometry(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.max_position_embeddings, [0, 1, 2, 8, 18],
                 128, 16, 32, 4, latent, 32, kivi_bits, 32, 32)
    c = count(g, T, llm.pool.bytes_per_slot)
    assert _engine_bytes_after_prefill(llm, T) == c["engine_total"]
    assert c["compressed"] > 0 and (c["storage"] > 0) == bool(kivi_bits)
