"""Shared fixtures: the shipped model, the shipped corpus, and tiny random HF models of each family."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread per test process: CI runs `pytest -n 2` on 2 cores, and two threads per worker
# stall each other on every synchronising op (gathers were measured 50x slower oversubscribed).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shipped_model_path():
    from data_prepare.resources import shipped_model_dir

    return shipped_model_dir()


@pytest.fixture(scope="session")
def articles():
    from data_prepare.resources import shipped_articles

    return shipped_articles()


def make_tiny_model(path, family: str, seed: int = 0, **overrides):
    """Save a tiny random HF model of `family` (llama | qwen2 | qwen3 | mistral) into `path`."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}[family]
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
              rms_norm_eps=1e-6, tie_word_embeddings=(family != "llama"), bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    cfg = cls(**kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init: logits far from ties, real attention patterns
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif "bias" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    cache = {}

    def factory(family: str, **overrides):
        key = (family, tuple(sorted(overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"tiny_{family}")
            cache[key] = make_tiny_model(path, family, **overrides)
        return cache[key]

    return factory
