"""Greedy parity of sparse_engine with HF transformers `generate` (independent reference)."""

from __future__ import annotations

import pytest
import torch

from sparse_engine import LLM, SamplingParams
from tests.hf_reference import first_divergence_is_tie, hf_greedy, load_hf


def _prompts_from_text(tokenizer, articles, lengths):
    ids = tokenizer.encode(" ".join(articles[:60]))
    out, off = [], 0
    for n in lengths:
        out.append(ids[off : off + n])
        off += 97  # different windows of real text
    return out


def _check_parity(llm, hf, prompts, steps=32):
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True, return_logits=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for p, o in zip(prompts, outs):
        ref_tokens, ref_logits = hf_greedy(hf, p, steps)
        diff = (o["logits"][0] - ref_logits[0]).abs().max().item()
        assert diff < 1e-3, f"prompt of {len(p)} tokens: last-position logits differ by {diff:.2e}"
        ok, why = first_divergence_is_tie(o["token_ids"], ref_tokens, ref_logits)
        assert ok, f"prompt of {len(p)} tokens: {why}"


def test_shipped_model_batch_chunked_prefill(shipped_model_path, articles):
    lengths = [5, 17, 64, 200, 511, 900, 1500, 2000]
    llm = LLM(shipped_model_path, dtype="float32", chunk_prefill_size=384, max_num_batched_tokens=1024)
    hf = load_hf(shipped_model_path)
    prompts = _prompts_from_text(llm.tokenizer, articles, lengths)
    _check_parity(llm, hf, prompts)
    assert llm.kv_stats()["slots_used"] == 0


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_tiny_random_models(tiny_model_factory, family):
    path = tiny_model_factory(family)
    hf = load_hf(path)

    llm = LLM(path, dtype="float32", chunk_prefill_size=50, max_num_batched_tokens=120)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 33, 130, 300, 601)]
    _check_parity(llm, hf, prompts, steps=24)
