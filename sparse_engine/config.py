"""`EngineConfig`: every engine knob in one validated dataclass (method knobs live with the method)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import re
from dataclasses import dataclass

DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")


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
        cpu_decode_weights: "auto" (on CPU in float32: a oneDNN copy of each weight serves decode-
            sized calls, ~1.3-1.5x faster decode, one more copy of the weights in memory), "mkldnn"
            (require it), or "dense" (off; decode logits then match a plain GEMM bit for bit).
        admission: when a waiting request starts while others run. "prompt" (default): only when
            the free KV budget holds its whole prompt at the method's footprint (`admission_slots` /
            `max_rows`: DeltaKV's compressed size, vanilla's every token) on top of what the running
            prompts still need, so a request is not started only to be preempted and recomputed
            (vLLM V0's whole-prompt check). "chunk": as soon as its next chunk fits (vLLM V1's
            rule: more overlap, and under a tight budget prompts prefilled, preempted and prefilled
            again: 77 recomputed prompts of 16 in vanilla's 16 x 4K budget run). With nothing
            running, both rules start a request whose next chunk fits.
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
    cpu_decode_weights: str = "auto"
    admission: str = "prompt"

    def validate(self) -> None:
        """Raise a ValueError / TypeError naming the knob, its value and the fix (never later, deep
        inside a step). Whole-number float sizes (`kv_cache_bytes=2e9`) are accepted as ints."""
        for name in ("max_num_seqs", "max_num_batched_tokens", "chunk_prefill_size"):
            _int(name, getattr(self, name))
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.max_model_len is not None:
            _int("max_model_len", self.max_model_len, "or None (the model's max_position_embeddings)")
            if self.max_model_len <= 0:
                raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.kv_cache_bytes is not None:
            if isinstance(self.kv_cache_bytes, float) and math.isfinite(self.kv_cache_bytes) \
                    and self.kv_cache_bytes.is_integer():
                self.kv_cache_bytes = int(self.kv_cache_bytes)
            _int("kv_cache_bytes", self.kv_cache_bytes, "number of bytes or None")
            if self.kv_cache_bytes <= 0:
                raise ValueError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        if isinstance(self.gpu_memory_utilization, bool) or not isinstance(self.gpu_memory_utilization, numbers.Real):
            raise TypeError(f"gpu_memory_utilization must be a number in (0, 1], got {self.gpu_memory_utilization!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        _int("seed", self.seed)
        if not -(1 << 63) <= self.seed < (1 << 64):
            raise ValueError(f"seed must be an int in [-2**63, 2**64), got {self.seed}")
        if not isinstance(self.device, str) or not DEVICE_RE.fullmatch(self.device):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto|float32|bfloat16|float16, got {self.dtype!r}")
        if self.load_format not in ("safetensors", "random"):
            raise ValueError(f"load_format must be 'safetensors' or 'random', got {self.load_format!r}")
        if self.cpu_decode_weights not in ("auto", "mkldnn", "dense"):
            raise ValueError(f"cpu_decode_weights must be 'auto', 'mkldnn' or 'dense', got {self.cpu_decode_weights!r}")
        if self.admission not in ("prompt", "chunk"):
            raise ValueError(f"admission must be 'prompt' (start a request when its whole prompt fits) or 'chunk' "
                             f"(when its next chunk fits), got {self.admission!r}")
        if not (self.use_triton == "auto" or isinstance(self.use_triton, bool)):
            raise ValueError(f"use_triton must be 'auto', True or False, got {self.use_triton!r}")


def _int(name: str, value, also: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int{' ' + also if also else ''}, got {value!r} ({type(value).__name__})")


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
