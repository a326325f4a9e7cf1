"""`ModelSpec`: the few facts about a decoder that the engine needs, read from a HF config.json.

One decoder serves the Llama / Qwen2 / Qwen3 / Mistral family; they differ only in the flags below.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass
class ModelSpec:
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2
    qk_norm: bool  # Qwen3: RMSNorm on q and k per head, before RoPE
    eos_token_ids: tuple[int, ...]
    inv_freq: torch.Tensor  # RoPE inverse frequencies [head_dim // 2], float32
    rope_attention_scaling: float
    sliding_window: int | None
    torch_dtype: torch.dtype
    hf_config: object  # the transformers config, for tools that need more

    @property
    def num_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def kv_width(self) -> int:
        """Joined K and V width per token and layer (what DeltaKV compresses)."""
        return 2 * self.num_kv_heads * self.head_dim

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelSpec":
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(path)
        return cls.from_hf_config(cfg)

    @classmethod
    def from_hf_config(cls, cfg) -> "ModelSpec":
        archs = list(getattr(cfg, "architectures", None) or [])
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"Unsupported architecture {archs or cfg.model_type!r}. sparse_engine serves "
                f"{sorted(SUPPORTED_ARCHITECTURES)}; convert the model or add a decoder variant in "
                "sparse_engine/models/decoder.py."
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        inv_freq, scaling = _rope_parameters(cfg, head_dim)
        eos = cfg.eos_token_id
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        gen_eos = _generation_eos(cfg)
        dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        return cls(
            architecture=arch,
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=cfg.intermediate_size,
            vocab_size=cfg.vocab_size,
            rms_norm_eps=cfg.rms_norm_eps,
            max_position_embeddings=cfg.max_position_embeddings,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or bool(getattr(cfg, "attention_bias", False)),
            qk_norm=family == "qwen3",
            eos_token_ids=tuple(dict.fromkeys(eos + gen_eos)),
            inv_freq=inv_freq,
            rope_attention_scaling=float(scaling),
            sliding_window=getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", False) else None,
            torch_dtype=dtype,
            hf_config=cfg,
        )


def _generation_eos(cfg) -> tuple[int, ...]:
    path = getattr(cfg, "_name_or_path", None)
    if not path or not (Path(path) / "generation_config.json").exists():
        return ()
    import json

    eos = json.loads((Path(path) / "generation_config.json").read_text()).get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (eos,)


def _rope_parameters(cfg, head_dim: int) -> tuple[torch.Tensor, float]:
    """RoPE frequencies via transformers' own init functions (linear, llama3, yarn, longrope...)."""
    params = getattr(cfg, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "dynamic":
        raise ValueError("rope_type 'dynamic' changes frequencies with length; it is not supported. "
                         "Use a model with static RoPE scaling (default, linear, llama3, yarn).")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        return inv, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, device=torch.device("cpu"))
    return inv.float(), scaling
