"""Compressor shapes, the latent-space residual, and the closed-form PCA."""

import pytest
import torch

from deltakv.compressor import CompressorConfig, DeltaKVCompressor, ResidualCompressor
from deltakv.pca import CovarianceAccumulator, pca_init_


@pytest.mark.parametrize("down", ["linear", "mlp_gelu", "mlp_swiglu"])
def test_shapes_and_latent_residual(down):
    torch.manual_seed(0)
    pair = ResidualCompressor(24, 6, down=down, down_hidden=32)
    kv, ref = torch.randn(2, 5, 24), torch.randn(2, 5, 24)
    latent = pair.encode(kv, ref)
    assert latent.shape == (2, 5, 6)
    torch.testing.assert_close(latent, pair.down(kv) - pair.down(ref))
    out = pair(kv, ref)
    assert out.shape == kv.shape
    torch.testing.assert_close(out, pair.up.proj(latent) + ref)
    # a token equal to its reference has a zero latent and decodes to ref + up-bias
    torch.testing.assert_close(pair.encode(ref, ref), torch.zeros(2, 5, 6))
    torch.testing.assert_close(pair(ref, ref), ref + pair.up.proj.bias)


def test_swiglu_is_w3_silu_x1_times_x2():
    torch.manual_seed(0)
    pair = ResidualCompressor(8, 3, down="mlp_swiglu", down_hidden=5, bias=False)
    x = torch.randn(4, 8)
    w12 = pair.down.w12.weight
    x1, x2 = x @ w12[:5].T, x @ w12[5:].T
    want = (x1 * torch.sigmoid(x1) * x2) @ pair.down.w3.weight.T
    torch.testing.assert_close(pair.down(x), want)


def test_config_validation():
    base = dict(model_type="llama", num_hidden_layers=4, num_kv_heads=2, head_dim=8, layers=[1, 2, 3],
                full_attn_layers=[0], down="linear")
    assert CompressorConfig(kv_compressed_size=8, **base).kv_width == 32
    with pytest.raises(ValueError, match="joined KV width"):
        CompressorConfig(kv_compressed_size=32, **base)
    with pytest.raises(ValueError, match="both compressed and in full_attn_layers"):
        CompressorConfig(kv_compressed_size=8, **{**base, "full_attn_layers": [1]})
    with pytest.raises(ValueError, match="down"):
        CompressorConfig(kv_compressed_size=8, **{**base, "down": "conv"})
    comp = DeltaKVCompressor(CompressorConfig(kv_compressed_size=8, **base))
    assert comp.compressed_layers() == [1, 2, 3] and comp[2].latent == 8
    assert CompressorConfig.from_dict(comp.config.to_dict()) == comp.config


def test_pca_matches_svd_and_reconstructs_low_rank_data_exactly():
    torch.manual_seed(0)
    D, r = 12, 3
    basis = torch.linalg.qr(torch.randn(D, r))[0]
    mu = torch.randn(D)
    resid = mu + torch.randn(500, r) @ basis.T  # residuals live in a rank-3 affine subspace
    acc = CovarianceAccumulator(D)
    acc.add(resid[:200])
    acc.add(resid[200:])
    mean, comps, energy = acc.fit(r)
    torch.testing.assert_close(mean, resid.mean(0), atol=1e-5, rtol=1e-5)
    # same subspace as an SVD of the centred data
    U = torch.linalg.svd((resid - resid.mean(0)).double(), full_matrices=False)[2][:r].T.float()
    torch.testing.assert_close(comps @ comps.T, U @ U.T, atol=1e-4, rtol=1e-4)
    assert energy[r - 1] > 0.9999
    for down in ["linear", "mlp_swiglu"]:
        pair = ResidualCompressor(D, r, down=down, down_hidden=16, linear_skip=down != "linear")
        pca_init_(pair, mean, comps)
        ref = torch.randn(500, D)
        kv = ref + resid
        torch.testing.assert_close(pair(kv, ref), kv, atol=1e-4, rtol=1e-4)
