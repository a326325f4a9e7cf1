"""``deltakv-convert``: the authors' DeltaKV compressor checkpoints -> this project's format.

    deltakv-convert /ckpts/Qwen2.5-7B-Instruct-1M-Compressor /ckpts/converted [--top-k 4] [--num-sinks 16]

The reference layout (CURRENTF/DeltaKV's training saves only the trainable weights; read by
CURRENTF/Sparse-vLLM ``src/sparsevllm/utils/loader.py`` ``load_deltakv_compressors_to_cache_manager``):

* weights (``*.safetensors``, else ``*.bin`` / ``*.pt``), one pair per layer under any prefix:
  ``...layers.{i}....compress_down.<sub>`` / ``...compress_up.<sub>`` (a key without ``layers`` is a
  compressor shared by every compressed layer); ``<sub>`` names the module kind exactly as
  ``sparsevllm/utils/compressor.py`` ``create_compressor`` builds it: ``weight`` / ``bias`` (``nn.Linear``),
  ``0.*`` / ``2.*`` (``nn.Sequential(Linear, GELU, Linear)``: ``mlp_gelu``), ``w12.*`` / ``w3.*``
  (``mlp_swiglu``). Split K/V compressors (``k_compress_*`` / ``v_compress_*``) are refused, as the
  reference's loader does.
* ``config.json`` beside them (the HF config plus the DeltaKV fields), optional: model dims
  (``model_type``, ``num_hidden_layers``, ``num_key_value_heads``, ``head_dim`` or
  ``hidden_size / num_attention_heads``), ``full_attn_layers``, ``deltakv_center_ratio`` (or
  ``cluster_ratio``), ``cluster_metric``, ``cluster_on_kv``, ``deltakv_neighbor_count`` /
  ``deltakv_k_neighbors``, ``cluster_soft_assignment``, ``cluster_temp``. Without it give ``--model``
  (the base model's folder) for the dims.

What the converted checkpoint says (``compressor_config.json``):

* module kinds / widths / bias read off the tensors (``mlp_gelu`` keys ``0`` / ``2`` -> ``fc1`` / ``fc2``);
* reference: the reference's training rules: 16 sinks (``_plan``: ``sink_size = 16``), stride
  ``int(1 / ratio)`` (``stride_rounding=floor``), its metric and ``cluster_on``; weighting ``mean``, as
  Sparse-vLLM serves it (its training's softmax, ``cluster_temp``, is recorded under ``extra``);
  ``top_k`` from the config (``--top-k`` overrides; default 4, Sparse-vLLM's ``deltakv_k_neighbors``);
* ``k_after_norm=False``: the reference compresses K BEFORE a qk-norm model's ``k_norm`` (Qwen3:
  ``reshape_and_apply_qk_norm`` runs after ``comp_then_reconstruct``; Sparse-vLLM caches raw K and
  applies ``k_norm`` after reconstruction, ``_apply_sparse_k_norm_if_needed``). A qk-norm checkpoint
  converted here is therefore refused by this project's engine, which caches K after ``k_norm``,
  until it applies ``k_norm`` after reconstruction; the HF training wrapper taps K after ``k_norm``
  too. Models without qk-norm are unaffected.

``to_reference_state_dict`` writes a compressor back in the reference layout (tests: round trip).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from deltakv.checkpoint import CheckpointError, save_compressor
from deltakv.compressor import CompressorConfig, DeltaKVCompressor
from deltakv.reference import ReferenceSpec

REF_SINKS = 16  # the reference's training _plan: sink_size = 16
REF_TOP_K = 4  # Sparse-vLLM DeltaKVConfig.deltakv_k_neighbors
NAMES = ("compress_down", "compress_up")
# the reference's sub-module names -> ours, per kind
_SUB = {"linear": {"": "proj"}, "mlp_gelu": {"0": "fc1", "2": "fc2"}, "mlp_swiglu": {"w12": "w12", "w3": "w3"}}


def _kind(subs: set[str]) -> str:
    heads = {s.split(".")[0] for s in subs}
    if heads <= {"weight", "bias"}:
        return "linear"
    if heads <= {"0", "2"}:
        return "mlp_gelu"
    if heads <= {"w12", "w3"}:
        return "mlp_swiglu"
    raise CheckpointError(f"compressor sub-keys {sorted(subs)} are none of the reference's kinds "
                          "(Linear: weight/bias, mlp_gelu: 0.*/2.*, mlp_swiglu: w12.*/w3.*)")


def read_reference_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every compressor tensor of a reference checkpoint (a folder or one weights file)."""
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(list(path.glob("*.bin")) + list(path.glob("*.pt")))
    else:
        files = [path]
    if not files:
        raise CheckpointError(f"{path} holds no weights (*.safetensors, *.bin or *.pt)")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(f))
        else:
            sd = torch.load(str(f), map_location="cpu", weights_only=True)
        for key, value in sd.items():
            parts = key.split(".")
            if any(p in ("k_compress_down", "v_compress_down", "k_compress_up", "v_compress_up") for p in parts):
                raise CheckpointError(f"{f}: split K/V compressor key {key!r}; only joined K|V compressors "
                                      "(compress_down / compress_up) convert (the reference's loader refuses these too)")
            if any(p in NAMES for p in parts):
                out[key] = value
    if not out:
        raise CheckpointError(f"{path}: no compress_down / compress_up tensors (is this a DeltaKV compressor?)")
    return out


def _split(weights: dict[str, torch.Tensor]) -> dict[int | None, dict[str, dict[str, torch.Tensor]]]:
    """``{layer (None = shared): {"compress_down": {sub: tensor}, "compress_up": {...}}}``."""
    per: dict = {}
    for key, value in weights.items():
        parts = key.split(".")
        name = next(p for p in parts if p in NAMES)
        at = parts.index(name)
        layer = None
        if "layers" in parts[:at]:
            i = parts.index("layers")
            try:
                layer = int(parts[i + 1])
            except (IndexError, ValueError):
                raise CheckpointError(f"cannot read the layer index of {key!r}") from None
        per.setdefault(layer, {}).setdefault(name, {})[".".join(parts[at + 1:])] = value
    if None in per and len(per) > 1:
        raise CheckpointError("the checkpoint mixes shared (no layers.{i}) and per-layer compressors")
    return per


def _dims(cfg: dict, model: str | None) -> dict:
    src = dict(cfg)
    if model is not None:
        from transformers import AutoConfig

        src = {**AutoConfig.from_pretrained(model).to_dict(), **{k: v for k, v in cfg.items() if k.startswith(
            ("deltakv", "cluster", "full_attn", "compressor", "kv_", "use_"))}}
    text = src.get("text_config") if isinstance(src.get("text_config"), dict) else None
    src = {**text, **{k: v for k, v in src.items() if k not in text}} if text and "num_hidden_layers" not in src else src
    need = ("model_type", "num_hidden_layers", "num_key_value_heads")
    missing = [k for k in need if k not in src]
    if missing:
        raise CheckpointError(f"the checkpoint's config.json lacks {missing}: give --model /path/to/the/base/model")
    head_dim = src.get("head_dim") or src["hidden_size"] // src["num_attention_heads"]
    return {"model_type": src["model_type"], "num_hidden_layers": int(src["num_hidden_layers"]),
            "num_kv_heads": int(src["num_key_value_heads"]), "head_dim": int(head_dim), "src": src}


def _layer_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, str):
        return [int(x) for x in value.replace(" ", "").split(",") if x != ""]
    return [int(x) for x in value]


def convert(path: str | Path, model: str | None = None, top_k: int | None = None,
            num_sinks: int = REF_SINKS) -> tuple[DeltaKVCompressor, dict]:
    """``(compressor, extra)`` from a reference checkpoint (see the module docstring)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    cfg = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    dims = _dims(cfg, model)
    src = dims.pop("src")
    per = _split(read_reference_weights(path))
    full_cfg = _layer_list(src.get("full_attn_layers"))
    if None in per:  # shared compressor: every layer not kept full
        layers = [i for i in range(dims["num_hidden_layers"]) if i not in full_cfg]
        per = {i: per[None] for i in layers}
    layers = sorted(per)
    bad = [i for i in layers if not 0 <= i < dims["num_hidden_layers"]]
    if bad:
        raise CheckpointError(f"layers {bad} are outside the model's {dims['num_hidden_layers']} layers")
    first = per[layers[0]]
    if set(first) != set(NAMES):
        raise CheckpointError(f"layer {layers[0]} lacks {sorted(set(NAMES) - set(first))}")
    down, up = _kind(set(first["compress_down"])), _kind(set(first["compress_up"]))
    if up == "mlp_swiglu":
        raise CheckpointError("an mlp_swiglu compress_up has no counterpart here (ups: linear, mlp_gelu)")
    dsub, usub = first["compress_down"], first["compress_up"]
    latent = {"linear": lambda: dsub["weight"].shape[0], "mlp_gelu": lambda: dsub["2.weight"].shape[0],
              "mlp_swiglu": lambda: dsub["w3.weight"].shape[0]}[down]()
    down_hidden = {"linear": 0, "mlp_gelu": lambda: dsub["0.weight"].shape[0],
                   "mlp_swiglu": lambda: dsub["w3.weight"].shape[1]}[down]
    up_hidden = 0 if up == "linear" else usub["0.weight"].shape[0]
    bias = any(k.endswith("bias") for k in dsub) or any(k.endswith("bias") for k in usub)
    ratio = float(src.get("deltakv_center_ratio", src.get("cluster_ratio", 0.1)))
    k = top_k or int(src.get("deltakv_k_neighbors") or src.get("deltakv_neighbor_count") or REF_TOP_K)
    spec = ReferenceSpec(kind="cluster_e2e", num_sinks=num_sinks, cluster_ratio=ratio,
                         metric=str(src.get("cluster_metric", "l2")), top_k=k, weighting="mean",
                         temperature=float(src.get("cluster_temp", 10.0)), stride_rounding="floor",
                         l2_softmax_score="distance", cluster_on="kv" if src.get("cluster_on_kv", True) else "k")
    config = CompressorConfig(
        model_type=dims["model_type"], num_hidden_layers=dims["num_hidden_layers"], num_kv_heads=dims["num_kv_heads"],
        head_dim=dims["head_dim"], layers=layers, full_attn_layers=[i for i in full_cfg if i not in layers],
        kv_compressed_size=int(latent), down=down, up=up, down_hidden=int(down_hidden() if callable(down_hidden)
                                                                          else down_hidden),
        bias=bias, reference=spec, method="deltakv", k_after_norm=False, up_hidden=int(up_hidden))
    comp = DeltaKVCompressor(config)
    sd = {}
    for layer in layers:
        for name, ours, kind in (("compress_down", "down", down), ("compress_up", "up", up)):
            subs = per[layer].get(name)
            if subs is None or _kind(set(subs)) != kind:
                raise CheckpointError(f"layer {layer}: {name} is missing or of another kind than layer {layers[0]}'s")
            for sub, value in subs.items():
                head, _, leaf = sub.rpartition(".")
                sd[f"layers.{layer}.{ours}.{_SUB[kind][head]}.{leaf}"] = value.float()
    missing, unexpected = comp.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"converted weights do not fit: missing {missing[:4]}, unexpected {unexpected[:4]}")
    extra = {"converted_from": str(path), "reference_training": {
        "cluster_soft_assignment": src.get("cluster_soft_assignment"), "cluster_temp": src.get("cluster_temp"),
        "neighbor_count": src.get("deltakv_neighbor_count"), "qk_norm_model": str(dims["model_type"]).startswith("qwen3"),
        "k_convention": "K before k_norm (the reference's)"}}
    return comp.eval(), extra


def to_reference_state_dict(comp: DeltaKVCompressor, prefix: str = "model.layers.{i}.self_attn.") -> dict:
    """A compressor's weights under the reference's key names (the inverse of ``convert``)."""
    inv = {kind: {v: k for k, v in m.items()} for kind, m in _SUB.items()}
    c = comp.config
    out = {}
    for key, value in comp.state_dict().items():
        _, layer, side, mod, leaf = key.split(".")
        kind = c.down if side == "down" else c.up
        if mod == "skip":
            raise CheckpointError("a PCA linear skip path has no place in the reference layout")
        head = inv[kind][mod]
        name = "compress_down" if side == "down" else "compress_up"
        out[prefix.format(i=layer) + name + "." + (f"{head}.{leaf}" if head else leaf)] = value.detach().clone()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Convert a reference (CURRENTF/DeltaKV) compressor checkpoint to "
                                             "compressor.safetensors + compressor_config.json")
    ap.add_argument("source", help="the reference checkpoint folder (weights + config.json) or weights file")
    ap.add_argument("output", help="folder to write the converted checkpoint into")
    ap.add_argument("--model", default=None, help="base model folder (dims), when config.json lacks them")
    ap.add_argument("--top-k", type=int, default=None, help=f"fathers per token (default: config, else {REF_TOP_K})")
    ap.add_argument("--num-sinks", type=int, default=REF_SINKS, help="sinks the compressor was trained with")
    args = ap.parse_args(argv)
    try:
        comp, extra = convert(args.source, args.model, args.top_k, args.num_sinks)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"deltakv-convert: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    out = save_compressor(args.output, comp, extra=extra)
    c = comp.config
    print(f"[deltakv-convert] {len(c.layers)} layers, {c.down}/{c.up}, latent {c.kv_compressed_size} of "
          f"{c.kv_width}, stride {c.reference.stride}, top_k {c.reference.top_k} -> {out}")
    if extra["reference_training"]["qk_norm_model"]:
        print("[deltakv-convert] note: a qk-norm model; the reference compresses K before k_norm (k_after_norm=false)",
              file=sys.stderr)


if __name__ == "__main__":
    main()
