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
import os
import zipfile
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
    """Write ``compressor.safetensors`` + ``compressor_config.json`` into ``directory``.

    Each file is written under a temporary name, flushed to disk and renamed over the old one, so a
    kill mid-save leaves the previous complete file (or none), never a truncated one."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else compressor.state_dict()
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}
    meta = {"format_version": FORMAT_VERSION, "compressor": compressor.config.to_dict(), "extra": extra or {}}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(
        sd, str(tmp), metadata={"format": "deltakv", "format_version": str(FORMAT_VERSION)}))
    atomic_write(directory / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
    return directory


def atomic_write(path: str | Path, write) -> Path:
    """``write(tmp_path)`` into a hidden temporary file next to ``path``, fsync it, rename it to ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def fsync_path(path: str | Path) -> None:
    """Flush a file (or a directory's entries) to disk; best effort where the OS does not allow it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    try:
        meta = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file} is not valid JSON ({e}): the file is truncated or corrupt. Re-save "
                              "the compressor, or use another checkpoint.") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("compressor"), dict):
        raise CheckpointError(f"{config_file} holds no 'compressor' section: not a DeltaKV compressor config")
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
    try:
        if weights.suffix == ".safetensors":
            sd = load_file(str(weights))
        else:
            sd = torch.load(weights, map_location="cpu", weights_only=True)
            sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    except Exception as e:  # SafetensorError, pickle / zip errors: a raw traceback names no fix
        size = weights.stat().st_size if weights.exists() else 0
        raise CheckpointError(
            f"{weights} ({size} bytes) cannot be read: {type(e).__name__}: {e}. The file is truncated or corrupt "
            "(e.g. a copy or a save that was cut off); re-save the compressor or use another checkpoint."
        ) from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{weights} holds no tensor state dict (got {type(sd).__name__})")
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


# ---------------------------------------------------------------------------------------------- training
TRAINER_STATE = "trainer_state.json"


def training_checkpoint_problem(path: str | Path) -> str | None:
    """Why a ``checkpoint-*`` folder written by ``deltakv-train`` cannot be resumed from, or None.

    Checks what resuming reads: ``trainer_state.json`` (parses, has a global step), the compressor
    (config + weights load and fit each other) and every torch archive (``*.pt`` / ``*.pth`` /
    ``*.bin``: zip CRCs intact, nothing unpickled); optimizer and scheduler states must exist unless
    the folder is a DeepSpeed checkpoint (``latest`` file)."""
    path = Path(path)
    if not path.is_dir():
        return "not a directory"
    state = path / TRAINER_STATE
    if not state.is_file():
        return f"{TRAINER_STATE} is missing"
    try:
        step = json.loads(state.read_text()).get("global_step")
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        return f"{TRAINER_STATE} is not valid JSON ({e})"
    if not isinstance(step, int):
        return f"{TRAINER_STATE} has no global_step"
    try:
        load_compressor(path)
    except CheckpointError as e:
        return str(e)
    if not (path / "latest").exists():
        for name in ("optimizer.pt", "scheduler.pt"):
            if not (path / name).is_file():
                return f"{name} is missing"
    for archive in sorted([*path.glob("*.pt"), *path.glob("*.pth"), *path.glob("*.bin")]):
        try:
            with zipfile.ZipFile(archive) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            return f"{archive.name} is truncated or corrupt ({e})"
        if bad is not None:
            return f"{archive.name} is corrupt (bad CRC in {bad})"
    return None
