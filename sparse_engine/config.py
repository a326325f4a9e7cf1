"""`EngineConfig`: every engine knob in one validated dataclass (method knobs live with the method)."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass


@dataclass
class EngineConfig:
    """Engine knobs. Sizes are in tokens unless named otherwise.

    Attributes:
        device: "auto" (cuda if available, else cpu), "cpu" or "cuda[:i]".
        dtype: "auto" (float32 on CPU, the checkpoint's dtype - bf16 by default - on CUDA),
            "float32", "bfloat16" or "float16".
        max_num_seqs: most sequences running at once (continuous batching width).
        max_num_batched_tokens: most tokens (prefill chunks + decode tokens) in one step.
        chunk_prefill_size: most prompt tokens of ONE sequence processed in one step.
        max_model_len: longest prompt + output; default = the model's max_position_embeddings.
        kv_cache_bytes: bytes for the KV pool; default 1 GiB on CPU, `gpu_memory_utilization` on CUDA.
        gpu_memory_utilization: fraction of free GPU memory (after weights) given to the KV pool.
        seed: seed for sampling requests that give none.
        use_triton: "auto" (Triton decode kernel on CUDA when importable), True, or False.
        load_format: "safetensors" (the folder's weights) or "random" (random weights of the
            config's shapes: for speed / memory benchmarks of large models without their weights).
    """

    device: str = "auto"
    dtype: str = "auto"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    chunk_prefill_size: int = 2048
    max_model_len: int | None = None
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float = 0.85
    seed: int = 0
    use_triton: str | bool = "auto"
    load_format: str = "safetensors"

    def validate(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "chunk_prefill_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto|float32|bfloat16|float16, got {self.dtype!r}")
        if self.load_format not in ("safetensors", "random"):
            raise ValueError(f"load_format must be 'safetensors' or 'random', got {self.load_format!r}")
        if self.use_triton not in ("auto", True, False):
            raise ValueError(f"use_triton must be 'auto', True or False, got {self.use_triton!r}")


def engine_field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(EngineConfig)}


def split_knobs(knobs: dict, method_fields: set[str], method_name: str) -> tuple[dict, dict]:
    """Split LLM(**knobs) into engine knobs and method knobs; unknown names get a suggestion."""
    engine_fields = engine_field_names()
    engine, method = {}, {}
    for key, value in knobs.items():
        if key in engine_fields:
            engine[key] = value
        elif key in method_fields:
            method[key] = value
        else:
            known = sorted(engine_fields | method_fields)
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise TypeError(
                f"Unknown config key '{key}' for method '{method_name}'.{hint} "
                f"Engine keys: {sorted(engine_fields)}; method keys: {sorted(method_fields)}."
            )
    return engine, method
