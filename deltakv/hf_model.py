"""Loading a frozen HF causal LM and reading the dims the compressor needs.

Supported: the Llama family of decoders whose attention has separate ``k_proj`` / ``v_proj``
(``llama``, ``qwen2``, ``qwen3``, ``mistral``). Nothing is downloaded: the model is a local folder
(or the shipped ``smollm2-135m``, see ``data_prepare.resources``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
QK_NORM_MODEL_TYPES = ("qwen3",)  # RMSNorm on each head's K before RoPE (self_attn.k_norm)


class UnsupportedModelError(ValueError):
    """The base model's architecture cannot be tapped for pre-RoPE K/V."""


@dataclass(frozen=True)
class ModelDims:
    model_type: str
    num_hidden_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int

    @property
    def kv_width(self) -> int:
        """Joined K+V width per token and layer: ``2 * num_kv_heads * head_dim``."""
        return 2 * self.num_kv_heads * self.head_dim

    @property
    def qk_norm(self) -> bool:
        """K has a per-head norm before RoPE: the tap (and the compressor) see K after it."""
        return self.model_type in QK_NORM_MODEL_TYPES


def model_dims(config) -> ModelDims:
    """Read the compressor-relevant dims from a HF config (raises for unsupported architectures)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"Model type {model_type!r} (architectures={getattr(config, 'architectures', None)}) is not supported; "
            f"DeltaKV taps k_proj/v_proj of these decoder families: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelDims(model_type, config.num_hidden_layers, kv_heads, head_dim, config.hidden_size)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a supported causal LM, checking each has ``self_attn.k_proj/v_proj``."""
    model_dims(model.config)
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None or not all(
        hasattr(layer, "self_attn") and hasattr(layer.self_attn, "k_proj") and hasattr(layer.self_attn, "v_proj")
        for layer in layers
    ):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no model.layers[i].self_attn.k_proj/v_proj; DeltaKV cannot tap its K/V."
        )
    return layers


def pick_dtype(dtype: str) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 on CPU; else the named dtype."""
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"model.dtype={dtype!r} is unknown; choose auto or one of {sorted(table)}")
    return table[dtype]


def load_frozen_lm(path: str | Path | None, dtype: str = "auto", attn_implementation: str = "sdpa"):
    """Load ``(model, tokenizer)`` from a local folder (or the shipped model), all params frozen."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from data_prepare.resources import resolve_model_path

    folder = resolve_model_path(path)
    config = AutoConfig.from_pretrained(folder)
    model_dims(config)  # fail fast, before loading weights
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=pick_dtype(dtype), attn_implementation=attn_implementation
    )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    decoder_layers(model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer
