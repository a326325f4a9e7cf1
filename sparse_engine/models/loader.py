"""Load HF safetensors weights into our own modules (no HF modules are wrapped)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from .decoder import CausalLM
from .spec import ModelSpec


def random_model(spec: ModelSpec, dtype: torch.dtype, device: torch.device, seed: int = 0) -> CausalLM:
    """A model of the config's shapes with random weights (N(0, 0.02), norms 1): benchmarks only."""
    with torch.device("meta"):
        model = CausalLM(spec)
    model.to_empty(device=device)
    model.to(dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model.eval()


def load_model(path: str | Path, spec: ModelSpec, dtype: torch.dtype, device: torch.device) -> CausalLM:
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No *.safetensors in {path}. Save the model with save_pretrained(safe_serialization=True).")
    with torch.device("meta"):
        model = CausalLM(spec)
    model.to_empty(device=device)
    model.to(dtype)
    params = dict(model.named_parameters())
    loaded = set()
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for name in fh.keys():
                if name not in params:
                    continue  # rotary buffers, unused heads ...
                t = fh.get_tensor(name)
                if params[name].shape != t.shape:
                    raise ValueError(f"{f.name}: {name} has shape {tuple(t.shape)}, the config implies "
                                     f"{tuple(params[name].shape)}; config.json and weights disagree.")
                params[name].data.copy_(t.to(dtype))
                loaded.add(name)
    if spec.tie_word_embeddings:
        loaded.add("lm_head.weight")
    missing = set(params) - loaded
    if missing:
        raise ValueError(f"Weights missing from {path}: {sorted(missing)[:5]}{' ...' if len(missing) > 5 else ''}")
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()
