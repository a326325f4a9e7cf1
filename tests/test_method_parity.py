"""Each sparse method against its naive HF-eager reference (tests/method_reference.py).

For every method: the kept token positions per layer (per KV head when head-wise) equal the
reference's, the KV bytes after prefill equal the method's budget formula, and >= 16 greedy tokens
equal the reference's on prompts of >= 1,000 tokens, with chunked prefill in the engine.
"""

from __future__ import annotations

import pytest
import torch

from sparse_engine import LLM
from sparse_engine.cache.budgets import exp_decay_budgets, pyramid_budgets
from tests.hf_reference import first_divergence_is_tie
from tests.method_reference import (OmniKVRef, SnapKVRef, StreamingRef, engine_run, load_ref_model,
                                    ref_generate)

POOL = 1 << 28  # 256 MiB KV pool: the CUDA default (85% of free memory) would starve later LLMs
STEPS = 16
PROMPT_LEN = 1100
CHUNK = 360  # engine prefill chunks end at 360, 720, 1080: the 32-query window [1068, 1100) spans two


@pytest.fixture(scope="module")
def tiny(tiny_model_factory):
    path = tiny_model_factory("llama")
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 256, (PROMPT_LEN,), generator=g).tolist()
    return path, load_ref_model(path), prompt


def _omni_trace(llm):
    def f(seq):
        pos = llm.pool.pos[seq.kv.tables[0].head(0)]
        return {l: (None if c is None else sorted(pos[c].tolist())) for l, c in seq.kv.state.get("cols", {}).items()}
    return f


def _assert_tokens(toks, ref_toks, ref_logits):
    ok, why = first_divergence_is_tie(toks, ref_toks, ref_logits)
    assert ok, why
    assert len(toks) >= 16


def _check_snap(path, hf, prompt, method, knobs, ref, chunk=CHUNK):
    llm = LLM(path, method=method, dtype="float32", kv_cache_bytes=POOL, chunk_prefill_size=chunk, **knobs)
    toks, _, kept, kv_bytes, _ = engine_run(llm, prompt, STEPS)
    ref_toks, ref_logits = ref_generate(hf, prompt, STEPS, ref)
    for layer, heads in kept.items():
        assert heads == ref.kept[layer], f"{method} {knobs}: layer {layer} keeps other positions than the reference"
    spec = llm.spec
    assert kv_bytes == sum(min(len(prompt), b) for b in ref.budgets) * spec.num_kv_heads * llm.pool.bytes_per_slot
    _assert_tokens(toks, ref_toks, ref_logits)
    return llm, kept


SNAP_CASES = {
    "snapkv-headwise": ("snapkv", dict(budget=200), dict(mode="head")),
    "snapkv-layer-shared-maxpool": ("snapkv", dict(budget=160, head_wise=False, pooling="max", pool_kernel_size=7),
                                    dict(mode="layer", pooling="max", kernel=7)),
    "adakv": ("adakv", dict(budget=200), dict(mode="ada")),
    "snapkv-expdecay": ("snapkv", dict(budget=300, budget_decay=0.6, min_budget=64), dict(mode="head")),
}


@pytest.mark.parametrize("case", list(SNAP_CASES))
def test_snapkv_family_matches_reference(tiny, case):
    path, hf, prompt = tiny
    method, knobs, ref_kw = SNAP_CASES[case]
    llm = LLM(path, method=method, dtype="float32", kv_cache_bytes=POOL, **knobs)
    ref = SnapKVRef(llm.method.budgets, llm.spec.num_kv_heads, **ref_kw)
    _, kept = _check_snap(path, hf, prompt, method, knobs, ref)
    if case == "adakv":  # heads really got different budgets, summing to the layer's total
        lens = [len(h) for h in kept[1]]
        assert len(set(lens)) > 1 and sum(lens) == 200 * len(lens)
    if case == "snapkv-layer-shared-maxpool":
        assert all(heads[0] == heads[1] for heads in kept.values())


def test_pyramidkv_matches_reference(tiny):
    path, hf, prompt = tiny
    budgets = pyramid_budgets(200, 4, 36)
    assert budgets[0] > budgets[-1] and sum(budgets) == 800
    _check_snap(path, hf, prompt, "pyramidkv", dict(budget=200), SnapKVRef(budgets, 2))


def test_streaming_matches_reference(tiny):
    path, hf, prompt = tiny
    budgets = exp_decay_budgets(256, 4, 0.7, 20)
    llm = LLM(path, method="streaming", dtype="float32", kv_cache_bytes=POOL, chunk_prefill_size=300, budget=256, budget_decay=0.7, min_budget=20)
    toks, _, kept, kv_bytes, _ = engine_run(llm, prompt, STEPS)
    ref = StreamingRef(budgets)
    ref_toks, ref_logits = ref_generate(hf, prompt, STEPS, ref)
    for layer in range(4):
        assert all(h == ref.kept_after_prefill(layer) for h in kept[layer]), f"layer {layer}"
    assert kv_bytes == sum(budgets) * 2 * llm.pool.bytes_per_slot
    _assert_tokens(toks, ref_toks, ref_logits)


def test_streaming_ring_overwrites_in_place(tiny):
    """Once full, decode writes no new slots: same slot ids, O(1) update, slots_needed == 0."""
    path, _, prompt = tiny
    llm = LLM(path, method="streaming", dtype="float32", kv_cache_bytes=POOL, budget=64, sink_size=4)
    seen = []

    def probe(seq):
        seen.append(([set(t.all_slots().tolist()) for t in seq.kv.tables], llm.method.slots_needed(seq, 1),
                     llm.pool.num_used))
        return None

    engine_run(llm, prompt[:300], 6, on_step=probe)
    assert all(s[0] == seen[0][0] and s[1] == 0 and s[2] == seen[0][2] for s in seen)
    assert seen[0][2] == 64 * 4 * 2


@pytest.mark.parametrize("chunked", [False, True], ids=["decode", "decode+chunked-prefill"])
def test_omnikv_matches_reference(tiny, chunked):
    path, hf, prompt = tiny
    if chunked:
        knobs = dict(full_attn_layers=[0, 2], num_top_tokens=0.1, num_top_tokens_in_prefill=100, recent_size=16)
    else:
        knobs = dict(full_attn_layers=[0, 1], num_top_tokens=64)
    chunk = 300 if chunked else 4096
    llm = LLM(path, method="omnikv", dtype="float32", kv_cache_bytes=POOL, chunk_prefill_size=chunk, **knobs)
    toks, _, kept, kv_bytes, trace = engine_run(llm, prompt, STEPS, on_step=_omni_trace(llm))
    ref = OmniKVRef(4, knobs["full_attn_layers"], knobs["num_top_tokens"], knobs.get("num_top_tokens_in_prefill"),
                    sink=4, recent=knobs.get("recent_size", 32))
    ref_toks, ref_logits = ref_generate(hf, prompt, STEPS, ref, chunk=chunk)
    _assert_tokens(toks, ref_toks, ref_logits)
    n = min(len(trace), len(ref.history))
    assert n >= STEPS - 1
    for i in range(n):  # the positions each observation layer selected, step by step
        assert trace[i] == ref.history[i], f"step {i}: selections differ"
    assert any(v is not None for v in trace[-1].values())
    assert kv_bytes == len(prompt) * 4 * 2 * llm.pool.bytes_per_slot  # logical masking keeps everything


# ------------------------------------------------------------------------------ shipped model
@pytest.mark.slow
def test_shipped_model_snapkv(shipped_model_path, articles):
    """The real model on 1,000 tokens of real text: head-wise SnapKV equals its reference."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shipped_model_path)
    prompt = tok.encode(" ".join(articles[:40]))[:1000]
    hf = load_ref_model(shipped_model_path)
    llm = LLM(shipped_model_path, method="snapkv", dtype="float32", kv_cache_bytes=POOL, budget=128)
    ref = SnapKVRef(llm.method.budgets, 3)
    del llm
    _check_snap(shipped_model_path, hf, prompt, "snapkv", dict(budget=128), ref, chunk=500)
