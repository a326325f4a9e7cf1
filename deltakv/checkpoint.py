"""Compressor checkpoint format: what training writes and what the inference engine loads.

A checkpoint is a directory holding

* ``compressor.safetensors``: only the compressor weights, keys ``layers.<layer>.down.*`` /
  ``layers.<layer>.up.*`` (float32);
* ``compressor_config.json``: ``{"format_version": 1, "compressor": CompressorConfig.to_dict(), ...}``,
  i.e. model dims (``model_type``, ``num_hidden_layers``, ``num_kv_heads``, ``head_dim``, ``kv_width``),
  the compressed ``layers`` and ``full_attn_layers``, ``kv_compressed_size``, ``down`` / ``up`` kinds,
  ``down_hidden``, ``bias``, ``linear_skip`` and the ``reference`` spec, plus free-form ``extra``
  (training metadata).

Engine-side API::

    from deltakv.checkpoint import load_compressor
    comp = load_compressor(path, expected_model_config=hf_config)   # a DeltaKVCompressor, eval mode
    spec = comp.reference                     # ReferenceSpec: num_sinks, stride, metric, top_k, ...
    comp.config.layers, comp.config.full_attn_layers, comp.config.kv_compressed_size
    pair = comp[layer]                        # ResidualCompressor of that layer
    latent = pair.encode(kv, ref)             # = pair.down(kv) - pair.down(ref); kv = cat([k, v], -1) pre-RoPE
    kv_hat = pair.decode(latent, ref)         # = pair.up(latent) + ref
    # references: deltakv.reference.select_references_from(spec, kv, pos, proto_kv, proto_pos)

``load_compressor`` accepts the directory (``*.safetensors`` first, then ``*.bin`` / ``*.pt``) or a
single weights file next to its ``compressor_config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from deltakv.compressor import CompressorConfig, DeltaKVCompressor

FORMAT_VERSION = 1
WEIGHTS_NAME = "compressor.safetensors"
CONFIG_NAME = "compressor_config.json"


class CheckpointError(ValueError):
    """A compressor checkpoint is missing, malformed, or does not fit the model."""


def save_compressor(directory: str | Path, compressor: DeltaKVCompressor, extra: dict | None = None,
                    state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``compressor.safetensors`` + ``compressor_config.json`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else compressor.state_dict()
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}
    save_file(sd, str(directory / WEIGHTS_NAME), metadata={"format": "deltakv", "format_version": str(FORMAT_VERSION)})
    meta = {"format_version": FORMAT_VERSION, "compressor": compressor.config.to_dict(), "extra": extra or {}}
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
    return directory


def _find_files(path: Path) -> tuple[Path, Path]:
    if not path.exists():
        raise CheckpointError(
            f"Compressor checkpoint {path} does not exist; give the directory that holds {WEIGHTS_NAME} and "
            f"{CONFIG_NAME} (training writes it to <output_dir>/compressor)."
        )
    if path.is_file():
        weights, folder = path, path.parent
    else:
        folder = path
        candidates = [folder / WEIGHTS_NAME] + sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) \
            + sorted(folder.glob("*.pt"))
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise CheckpointError(f"{folder} holds no compressor weights (*.safetensors, *.bin or *.pt)")
        weights = found[0]
    config = folder / CONFIG_NAME
    if not config.is_file():
        raise CheckpointError(f"{config} is missing; a compressor checkpoint needs its config to be rebuilt")
    return weights, config


def read_config(path: str | Path) -> tuple[CompressorConfig, dict]:
    """``(CompressorConfig, extra)`` of a checkpoint directory or weights file."""
    _, config_file = _find_files(Path(path))
    meta = json.loads(config_file.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{config_file}: format_version {meta.get('format_version')} != {FORMAT_VERSION}")
    return CompressorConfig.from_dict(meta["compressor"]), meta.get("extra", {})


def check_against_model(config: CompressorConfig, model_config) -> None:
    """Raise ``CheckpointError`` unless the compressor fits a HF model config."""
    from deltakv.hf_model import model_dims

    dims = model_dims(model_config)
    problems = []
    if dims.num_hidden_layers != config.num_hidden_layers:
        problems.append(f"layers: checkpoint {config.num_hidden_layers}, model {dims.num_hidden_layers}")
    if dims.kv_width != config.kv_width:
        problems.append(
            f"joined KV width: checkpoint {config.kv_width} (2*{config.num_kv_heads}*{config.head_dim}), "
            f"model {dims.kv_width} (2*{dims.num_kv_heads}*{dims.head_dim})"
        )
    if problems:
        raise CheckpointError(
            "Compressor checkpoint does not match the model (" + "; ".join(problems) + "). "
            "Use a compressor trained for this model, or train one with deltakv-train model.path=<this model>."
        )


def load_compressor(path: str | Path, expected_model_config=None, device: str | torch.device = "cpu") -> DeltaKVCompressor:
    """Rebuild a ``DeltaKVCompressor`` from a checkpoint (directory or weights file), in eval mode."""
    path = Path(path).expanduser()
    weights, _ = _find_files(path)
    config, _ = read_config(path)
    if expected_model_config is not None:
        check_against_model(config, expected_model_config)
    if weights.suffix == ".safetensors":
        sd = load_file(str(weights))
    else:
        sd = torch.load(weights, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    sd = {k.removeprefix("compressor."): v for k, v in sd.items()}
    comp = DeltaKVCompressor(config)
    expected = comp.state_dict()
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    mismatched = [f"{k}: file {tuple(sd[k].shape)} vs config {tuple(v.shape)}"
                  for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{weights} does not match {CONFIG_NAME}: missing {missing[:4]}, unexpected {unexpected[:4]}, "
            f"shape mismatches {mismatched[:4]}"
        )
    comp.load_state_dict(sd)
    return comp.to(device).eval()
