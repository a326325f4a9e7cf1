"""deltakv-convert: a synthetic checkpoint written in the reference's layout (modules built as
CURRENTF/Sparse-vLLM's create_compressor builds them, keys ``model.layers.{i}.self_attn.compress_*``,
an HF-style config.json) converts to our format; the converted compressor reconstructs the same K|V
as a hand-written implementation of the reference's rules; weights go back to the same keys."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from deltakv.checkpoint import CheckpointError, load_compressor
from deltakv.convert import convert, main, to_reference_state_dict
from deltakv.reference import prototype_mask, select_references

NKV, HD, LAT = 2, 8, 8  # joined width 32


class SwiGLU(nn.Module):  # the reference's _SwiGLUCompressor
    def __init__(self, i, h, o, bias):
        super().__init__()
        self.w12, self.w3 = nn.Linear(i, 2 * h, bias=bias), nn.Linear(h, o, bias=bias)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, -1)
        return self.w3(nn.functional.silu(a) * b)


def _module(kind, i, o, h, bias):
    if kind == "linear":
        return nn.Linear(i, o, bias=bias)
    if kind == "mlp_gelu":
        return nn.Sequential(nn.Linear(i, h, bias=bias), nn.GELU(), nn.Linear(h, o, bias=bias))
    return SwiGLU(i, h, o, bias)


def _write_reference(folder, down, up, bias=True, model_type="qwen2", layers=(1, 2, 3), cfg_extra=None):
    torch.manual_seed(0)
    mods, sd = {}, {}
    for i in layers:
        d, u = _module(down, 2 * NKV * HD, LAT, 20, bias), _module(up, LAT, 2 * NKV * HD, 12, bias)
        mods[i] = (d, u)
        for name, m in (("compress_down", d), ("compress_up", u)):
            for k, v in m.state_dict().items():
                sd[f"model.layers.{i}.self_attn.{name}.{k}"] = v.to(torch.bfloat16).float()
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    cfg = {"model_type": model_type, "num_hidden_layers": 4, "num_key_value_heads": NKV, "num_attention_heads": 4,
           "hidden_size": 4 * HD, "full_attn_layers": "0", "deltakv_center_ratio": 0.15, "cluster_metric": "l2",
           "cluster_on_kv": False, "deltakv_neighbor_count": 2, "cluster_soft_assignment": True, "cluster_temp": 10.0,
           **(cfg_extra or {})}
    (folder / "config.json").write_text(json.dumps(cfg))
    for d, u in mods.values():  # what was saved (bf16-rounded), as the reference would load it
        for m in (d, u):
            with torch.no_grad():
                for p in m.parameters():
                    p.copy_(p.to(torch.bfloat16).float())
    return mods, sd


def _reference_reconstruct(kv, down, up, k, step, sinks=16):
    """Sparse-vLLM's rules by hand: centers = sinks + every `step`-th token; fathers = top-k by -l2 on
    the K half (cluster_on_kv=False) among centers before the token; ref = their mean;
    recon = up(down(kv) - down(ref)) + ref."""
    T, D = kv.shape
    centers = list(range(sinks)) + list(range(sinks, T, step))
    out = {}
    for t in range(sinks, T):
        if t in centers:
            continue
        cand = [c for c in centers if c < t]
        d = torch.stack([torch.dist(kv[t, : D // 2], kv[c, : D // 2]) for c in cand])
        idx = d.topk(min(k, len(cand)), largest=False).indices
        ref = kv[[cand[int(j)] for j in idx]].mean(0)
        out[t] = up(down(kv[t]) - down(ref)) + ref
    return out


@pytest.mark.parametrize("down,up,bias", [("mlp_gelu", "mlp_gelu", True), ("mlp_swiglu", "linear", True),
                                          ("linear", "linear", False)])
def test_convert_reconstructs_as_the_reference(tmp_path, down, up, bias):
    mods, sd = _write_reference(tmp_path / "ref", down, up, bias)
    main([str(tmp_path / "ref"), str(tmp_path / "out")])
    comp = load_compressor(tmp_path / "out")
    c = comp.config
    assert (c.down, c.up, c.bias, c.kv_compressed_size, c.layers, c.full_attn_layers) == (down, up, bias, LAT, [1, 2, 3], [0])
    spec = c.reference
    assert (spec.stride, spec.num_sinks, spec.top_k, spec.cluster_on, spec.weighting) == (6, 16, 2, "k", "mean")
    assert c.k_after_norm is False
    g = torch.Generator().manual_seed(1)
    kv = torch.randn(60, 2 * NKV * HD, generator=g)
    for layer, (d, u) in mods.items():
        with torch.no_grad():
            want = _reference_reconstruct(kv, d, u, 2, 6)
            got = comp[layer](kv, select_references(spec, kv))
        keep = prototype_mask(spec, 60)
        assert sorted(want) == [t for t in range(60) if not keep[t]]
        for t, w in want.items():
            torch.testing.assert_close(got[t], w, rtol=1e-5, atol=1e-5)
    back = to_reference_state_dict(comp)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_qwen3_keeps_the_pre_norm_convention_and_shared_compressors_broadcast(tmp_path):
    folder = tmp_path / "ref"
    folder.mkdir()
    torch.manual_seed(0)
    d, u = nn.Linear(32, LAT), nn.Linear(LAT, 32)
    save_file({**{f"compress_down.{k}": v for k, v in d.state_dict().items()},
               **{f"compress_up.{k}": v for k, v in u.state_dict().items()}}, str(folder / "w.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3", "num_hidden_layers": 4, "num_key_value_heads": NKV,
                                                    "head_dim": HD, "full_attn_layers": [0, 2]}))
    comp, extra = convert(folder)
    assert comp.config.layers == [1, 3] and comp.config.k_after_norm is False
    assert extra["reference_training"]["qk_norm_model"] is True
    assert torch.equal(comp[3].down.proj.weight, d.weight) and torch.equal(comp[1].up.proj.bias, u.bias)


def test_split_kv_and_foreign_checkpoints_are_refused(tmp_path):
    folder = tmp_path / "split"
    folder.mkdir()
    save_file({"model.layers.1.self_attn.k_compress_down.weight": torch.zeros(4, 16)}, str(folder / "w.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2,
                                                    "num_key_value_heads": 1, "head_dim": 8}))
    with pytest.raises(CheckpointError, match="split K/V"):
        convert(folder)
    with pytest.raises(SystemExit) as e:
        main([str(folder), str(tmp_path / "out")])
    assert e.value.code == 2
