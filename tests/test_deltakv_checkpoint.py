"""Checkpoint format: round trip, accepted layouts, and clear errors."""

import json

import pytest
import torch

from deltakv.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, load_compressor, save_compressor
from deltakv.compressor import CompressorConfig, DeltaKVCompressor
from deltakv.reference import ReferenceSpec


def _comp(**kw):
    base = dict(model_type="llama", num_hidden_layers=4, num_kv_heads=2, head_dim=8, layers=[1, 3],
                full_attn_layers=[0, 2], kv_compressed_size=10, down="mlp_swiglu", down_hidden=24,
                linear_skip=True, reference=ReferenceSpec(num_sinks=8, cluster_ratio=0.05, metric="cosine"))
    torch.manual_seed(0)
    return DeltaKVCompressor(CompressorConfig(**{**base, **kw}))


class _HFConfig:  # the fields load_compressor reads from a HF config
    def __init__(self, layers=4, kv_heads=2, head_dim=8, model_type="llama"):
        self.model_type, self.num_hidden_layers = model_type, layers
        self.num_attention_heads, self.num_key_value_heads, self.head_dim, self.hidden_size = 4, kv_heads, head_dim, 32


def test_round_trip_directory_and_file(tmp_path):
    comp = _comp()
    save_compressor(tmp_path / "ckpt", comp, extra={"step": 7})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    meta = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    assert meta["compressor"]["reference"]["num_sinks"] == 8 and meta["compressor"]["kv_width"] == 32
    for path in [tmp_path / "ckpt", tmp_path / "ckpt" / WEIGHTS_NAME]:
        back = load_compressor(path, expected_model_config=_HFConfig())
        assert back.config == comp.config and back.reference.stride == 20
        for (k, a), (k2, b) in zip(comp.state_dict().items(), back.state_dict().items()):
            assert k == k2 and torch.equal(a, b)
    kv, ref = torch.randn(3, 32), torch.randn(3, 32)
    torch.testing.assert_close(back[3](kv, ref), comp[3](kv, ref))


def test_pt_fallback_with_trainer_prefix(tmp_path):
    comp = _comp()
    save_compressor(tmp_path, comp)
    (tmp_path / WEIGHTS_NAME).unlink()
    torch.save({f"compressor.{k}": v for k, v in comp.state_dict().items()}, tmp_path / "weights.pt")
    back = load_compressor(tmp_path)
    assert torch.equal(back[1].up.proj.weight, comp[1].up.proj.weight)


def test_missing_path_and_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_compressor(tmp_path / "nope")
    save_compressor(tmp_path, _comp())
    (tmp_path / CONFIG_NAME).unlink()
    with pytest.raises(CheckpointError, match="compressor_config.json is missing"):
        load_compressor(tmp_path)


def test_model_mismatch_is_a_clear_error(tmp_path):
    save_compressor(tmp_path, _comp())
    with pytest.raises(CheckpointError, match="does not match the model.*layers: checkpoint 4, model 6"):
        load_compressor(tmp_path, expected_model_config=_HFConfig(layers=6))
    with pytest.raises(CheckpointError, match="joined KV width: checkpoint 32.*model 64"):
        load_compressor(tmp_path, expected_model_config=_HFConfig(head_dim=16))


def test_weights_that_do_not_fit_the_config(tmp_path):
    save_compressor(tmp_path, _comp())
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    meta["compressor"]["kv_compressed_size"] = 12
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_compressor(tmp_path)
