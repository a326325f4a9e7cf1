"""Load HF safetensors weights into our own modules (no HF modules are wrapped)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from .decoder import PACKED, CausalLM
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
    modules = dict(model.named_modules())
    loaded = set()
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for name in fh.keys():
                target, rows = packed_target(name, modules)
                if target not in params:
                    continue  # rotary buffers, unused heads ...
                t = fh.get_tensor(name)
                dst = params[target].data if rows is None else params[target].data[rows[0] : rows[1]]
                if dst.shape != t.shape:
                    raise ValueError(f"{f.name}: {name} has shape {tuple(t.shape)}, the config implies "
                                     f"{tuple(dst.shape)}; config.json and weights disagree.")
                dst.copy_(t.to(dtype))
                loaded.add(name if rows is None else f"{target}#{rows[0]}")
    if spec.tie_word_embeddings:
        loaded.add("lm_head.weight")
    missing = set(expected_names(params, modules)) - loaded
    if missing:
        raise ValueError(f"Weights missing from {path}: {sorted(missing)[:5]}{' ...' if len(missing) > 5 else ''}")
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def packed_target(name: str, modules: dict) -> tuple[str, tuple[int, int] | None]:
    """Where checkpoint tensor `name` goes: (parameter name, rows of its shard) for the packed
    projections (`q_proj` -> rows of `qkv_proj` ...), (name, None) otherwise."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in PACKED:
        packed, shard = PACKED[parts[-2]]
        mod_name = ".".join(parts[:-2] + [packed])
        mod = modules.get(mod_name)
        if mod is not None:
            sizes = mod.shard_sizes
            lo = sum(sizes[:shard])
            return f"{mod_name}.{parts[-1]}", (lo, lo + sizes[shard])
    return name, None


def expected_names(params: dict, modules: dict) -> list[str]:
    """Names the checkpoint must fill: plain parameters, and one entry per shard of packed ones."""
    out = []
    for name, p in params.items():
        mod = modules.get(name.rsplit(".", 1)[0])
        sizes = getattr(mod, "shard_sizes", None)
        if sizes is None:
            out.append(name)
        else:
            out.extend(f"{name}#{sum(sizes[:i])}" for i in range(len(sizes)))
    return out
