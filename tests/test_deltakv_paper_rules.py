"""The reference's (CURRENTF/DeltaKV, CURRENTF/Sparse-vLLM) rules behind named knobs, each checked
against a hand-written implementation of the reference's rule on small tensors (issue 15, item 1):
l2 softmax weighting on the distance, ``int(1/ratio)`` stride, K-only clustering, the asymmetric grouped
int4 latent format, the ``mlp_gelu`` up, and prototypes allowed to pick themselves. Our behaviour
stays the default, and configs saved before these fields existed load with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from deltakv.compressor import CompressorConfig, DeltaKVCompressor, ResidualCompressor
from deltakv.reference import ReferenceSpec, prototype_positions, select_references
from sparse_engine.offload.latent_store import LatentCodec


def _reference_refs(kv, num_sinks, step, top_k, temp, soft=True, on_kv=True, inclusive=False):
    """The reference's ``_plan`` + ``_scores`` + ``_refs`` for one sequence [T, D], written out by hand
    with loops: centers = sinks + range(sinks, T, step); score = -euclidean distance (on K|V, or on
    the K half); top-k over centers at position < t (<= t with ``inclusive``); softmax(score / temp)
    weights (or the mean) of the centers' K|V."""
    T, D = kv.shape
    centers = list(range(num_sinks)) + list(range(num_sinks, T, step))
    feat = kv if on_kv else kv[:, : D // 2]
    out = torch.zeros(T, D, dtype=torch.float64)
    for t in range(T):
        cand = [c for c in centers if (c <= t if inclusive else c < t)]
        if not cand:
            continue
        dist = [float(torch.sqrt(((feat[t].double() - feat[c].double()) ** 2).sum())) for c in cand]
        order = sorted(range(len(cand)), key=lambda i: dist[i])[:top_k]
        scores = torch.tensor([-dist[i] for i in order], dtype=torch.float64)
        w = torch.softmax(scores / temp, 0) if soft else torch.full((len(order),), 1.0 / len(order), dtype=torch.float64)
        for wi, i in zip(w, order):
            out[t] += wi * kv[cand[i]].double()
    return out


@pytest.mark.parametrize("on_kv", [True, False])
def test_softmax_on_l2_distance_matches_reference(on_kv):
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(40, 12, generator=g)
    spec = ReferenceSpec(num_sinks=4, cluster_ratio=0.2, top_k=3, weighting="softmax", temperature=2.0,
                         l2_softmax_score="distance", cluster_on="kv" if on_kv else "k")
    want = _reference_refs(kv, 4, 5, 3, 2.0, on_kv=on_kv)
    got = select_references(spec, kv)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # ours (the default) weights by the squared distance: a different reference on the same tokens
    ours = select_references(ReferenceSpec(num_sinks=4, cluster_ratio=0.2, top_k=3, weighting="softmax",
                                           temperature=2.0, cluster_on="kv" if on_kv else "k"), kv)
    assert (ours.double() - want).abs().max() > 1e-2


def test_k_only_clustering_picks_by_k_and_averages_kv():
    """cluster_on='k' (the reference's cluster_on_kv=False): nearest by K, reference = mean of K|V."""
    g = torch.Generator().manual_seed(1)
    kv = torch.randn(30, 8, generator=g)
    spec = ReferenceSpec(num_sinks=2, cluster_ratio=0.25, top_k=2, cluster_on="k")
    torch.testing.assert_close(select_references(spec, kv).double(),
                               _reference_refs(kv, 2, 4, 2, 1.0, soft=False, on_kv=False), rtol=1e-5, atol=1e-6)
    full = select_references(ReferenceSpec(num_sinks=2, cluster_ratio=0.25, top_k=2), kv)
    assert not torch.allclose(full, select_references(spec, kv))


def test_inclusive_lets_a_prototype_be_its_own_reference():
    g = torch.Generator().manual_seed(2)
    kv = torch.randn(24, 6, generator=g)
    spec = ReferenceSpec(num_sinks=2, cluster_ratio=0.25, top_k=1)
    ref = select_references(spec, kv, inclusive=True)
    protos = prototype_positions(spec, 24)
    torch.testing.assert_close(ref[protos[1:]], kv[protos[1:]])  # top-1 nearest of a prototype: itself
    torch.testing.assert_close(ref.double(), _reference_refs(kv, 2, 4, 1, 1.0, soft=False, inclusive=True))
    # the gradient through -||x - p|| stays finite at distance 0 (softmax on the distance, top-2)
    x = kv.clone().requires_grad_(True)
    soft = ReferenceSpec(num_sinks=2, cluster_ratio=0.25, top_k=2, weighting="softmax", l2_softmax_score="distance")
    select_references(soft, x, inclusive=True).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("ratio", [0.15, 0.1, 0.3, 0.03125, 0.07, 0.45])
def test_stride_rounding(ratio):
    floor = ReferenceSpec(cluster_ratio=ratio, stride_rounding="floor")
    assert floor.stride == max(1, int(1 / ratio))  # the reference's int(1 / cluster_ratio)
    assert ReferenceSpec(cluster_ratio=ratio).stride == round(1 / ratio)  # ours (default)
    T, sinks = 120, 16
    want = list(range(sinks)) + list(range(sinks, T, max(1, int(1 / ratio))))  # the reference's _plan centers
    assert prototype_positions(floor, T).tolist() == want


def test_stride_of_015_differs():
    assert ReferenceSpec(cluster_ratio=0.15, stride_rounding="floor").stride == 6
    assert ReferenceSpec(cluster_ratio=0.15).stride == 7


def _reference_int4(x: np.ndarray, group: int):
    """The reference kernel's int4 format (quant.py), in numpy: per group bf16 min and scale
    (max - min) / 15, codes rint(clamp((x - min) / (scale + 1e-6), 0, 15)) (rint: half to even),
    8 codes per int32 word, code j at bits 4j."""
    n, c = x.shape
    g = x.reshape(n, c // group, group).astype(np.float32)
    bf = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(torch.bfloat16).float().numpy()  # noqa: E731
    mn = bf(g.min(axis=2))
    scale = bf((g.max(axis=2) - g.min(axis=2)) / np.float32(15.0))
    q = np.rint(np.clip((g - mn[..., None]) / (scale[..., None] + np.float32(1e-6)), 0, 15)).astype(np.int64)
    q = q.reshape(n, c)
    words = np.zeros((n, c // 8), dtype=np.int64)
    for j in range(8):
        words |= q[:, j::8] << (4 * j)
    deq = (q.reshape(n, c // group, group) * scale[..., None] + mn[..., None]).reshape(n, c)
    return words.astype(np.uint32), scale, mn, deq


def test_int4_asym_is_the_reference_format():
    g = torch.Generator().manual_seed(3)
    lat = torch.randn(5, 64, generator=g) * 3 + torch.linspace(-2, 5, 64)
    lat[2, :32] = 0.25  # a constant group: scale 0
    codec = LatentCodec(64, "int4_asym", num_fathers=2, group_size=32)
    fathers = torch.tensor([[0, 1], [2, -1], [3, 4], [5, 6], [-1, -1]])
    rows = codec.encode(lat, fathers)
    assert codec.row_bytes == 32 + 2 * 2 * 2 + 2 * 2 == rows.shape[1]
    words, scale, mn, deq = _reference_int4(lat.numpy(), 32)
    assert np.array_equal(rows[:, :32].contiguous().view(torch.int32).numpy().view(np.uint32), words)
    sm = rows[:, 32:40].contiguous().view(torch.bfloat16).float().view(5, 2, 2).numpy()
    assert np.array_equal(sm[:, 0], scale) and np.array_equal(sm[:, 1], mn)
    got, f = codec.decode(rows)
    np.testing.assert_allclose(got.numpy(), deq, rtol=0, atol=1e-6)
    assert torch.equal(f, fathers)
    # ours (int4) is symmetric with one scale per token: a different code for the same latents
    assert not torch.allclose(LatentCodec(64, "int4", 2).decode(LatentCodec(64, "int4", 2).encode(lat, fathers))[0], got)


def test_int4_asym_group_must_divide_latent():
    with pytest.raises(ValueError, match="multiple"):
        LatentCodec(48, "int4_asym", group_size=32)


def test_mlp_gelu_up_is_the_reference_sequential():
    pair = ResidualCompressor(16, 6, down="linear", up="mlp_gelu", up_hidden=11)
    seq = nn.Sequential(nn.Linear(6, 11), nn.GELU(), nn.Linear(11, 16))  # the reference's create_compressor
    with torch.no_grad():
        seq[0].weight.copy_(pair.up.fc1.weight), seq[0].bias.copy_(pair.up.fc1.bias)
        seq[2].weight.copy_(pair.up.fc2.weight), seq[2].bias.copy_(pair.up.fc2.bias)
    z = torch.randn(7, 6)
    torch.testing.assert_close(pair.up(z), seq(z))
    with pytest.raises(ValueError, match="up_hidden"):
        CompressorConfig("llama", 4, 2, 8, [1], [0], 8, down="linear", up="mlp_gelu")


def test_old_configs_load_with_todays_behaviour():
    """A compressor_config.json written before these fields existed rebuilds with our rules."""
    old = {"model_type": "llama", "num_hidden_layers": 4, "num_kv_heads": 2, "head_dim": 8, "layers": [1, 2],
           "full_attn_layers": [0], "kv_compressed_size": 8, "down": "linear", "up": "linear", "down_hidden": 0,
           "bias": True, "linear_skip": False, "method": "deltakv", "k_after_norm": False,
           "reference": {"kind": "cluster_e2e", "num_sinks": 16, "cluster_ratio": 0.15, "metric": "l2", "top_k": 4,
                         "weighting": "softmax", "temperature": 1.0}}
    cfg = CompressorConfig.from_dict(old)
    ref = cfg.reference
    assert (ref.stride_rounding, ref.l2_softmax_score, ref.cluster_on, cfg.up_hidden) == ("round", "sq_distance", "kv", 0)
    assert ref.stride == 7
    DeltaKVCompressor(cfg)


@pytest.mark.parametrize("field,value", [("stride_rounding", "ceil"), ("l2_softmax_score", "l1"), ("cluster_on", "v")])
def test_bad_knob_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"reference.{field}"):
        ReferenceSpec(**{field: value})


def test_engine_serves_the_reference_knobs(tiny_model_factory):
    """The engine takes int4_asym latents (row bytes = payload + bf16 scale/min per group + fathers),
    K-only father choice and the floor stride from the checkpoint; a lossless compressor with float32
    latents stays exactly vanilla under K-only fathers and stride int(1/0.3) = 3."""
    from deltakv.testing import tiny_compressor
    from sparse_engine import LLM, SamplingParams

    tiny = str(tiny_model_factory("llama"))
    ref = ReferenceSpec(num_sinks=4, cluster_ratio=0.3, top_k=2, stride_rounding="floor", cluster_on="k")
    common = dict(dtype="float32", chunk_prefill_size=32, kv_cache_bytes=1 << 24, recent_size=8, num_top_tokens=4096)
    sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompt = [list(range(3, 90))]
    vanilla = LLM(tiny, **{k: v for k, v in common.items() if k not in ("recent_size", "num_top_tokens")})
    want = vanilla.generate(prompt, sp, use_tqdm=False)[0]["token_ids"]
    exact = LLM(tiny, method="deltakv", deltakv_path=tiny_compressor(reference=ref), latent_dtype="float32", **common)
    assert exact.generate(prompt, sp, use_tqdm=False)[0]["token_ids"] == want
    llm = LLM(tiny, method="deltakv", deltakv_path=tiny_compressor(latent=32, reference=ref), latent_dtype="int4_asym",
              **common)
    llm.generate(prompt, sp, use_tqdm=False)
    st = llm.kv_stats()
    assert st["latent_row_bytes"] == 32 // 2 + 2 * 2 + 2 * 2 and st["compressed_tokens"] > 0
