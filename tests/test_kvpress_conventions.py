"""kvpress's conventions as options (issue 15.9), against budgets computed by hand from kvpress's rules
(NVIDIA/kvpress: ScorerPress n_kept = int(k_len * (1 - compression_ratio)); PyramidKVPress.get_layer_budget;
AdaKVPress n_safe = int(n_kept * alpha_safeguard) with the window inside n_kept; StreamingLLMPress)."""

from __future__ import annotations

import pytest
import torch

from sparse_engine import LLM, SamplingParams
from sparse_engine.cache.budgets import kvpress_pyramid_budgets, pyramid_budgets

POOL = 1 << 26
COMMON = dict(dtype="float32", kv_cache_bytes=POOL, chunk_prefill_size=128)


@pytest.fixture(scope="module")
def tiny(tiny_model_factory):
    return str(tiny_model_factory("llama"))


def prompt(n, seed=0):
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def held_after_prefill(llm, ids):
    """Tokens per (layer, KV head) right after prefill, and the positions of layer 0 head 0."""
    seq = llm.add_request(ids, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    while seq.num_computed < len(ids):
        llm.step()
    lens = seq.kv.lens.clone()
    pos = sorted(llm.pool.pos[seq.kv.tables[0].head(0)].tolist())
    return seq, lens, pos


def test_pyramid_kvpress_rule_by_hand():
    # T=1000, r=0.5, window 32, beta 20, 4 layers: cap = 532, min = 500/20 = 25, max = 975 >= 968 = T - w ->
    # max = 968, min = 1000 - 968 = 32; 1000 >= 968 >= 32 >= 32: steps (968-32)/3 = 312
    assert kvpress_pyramid_budgets(1000, 0.5, 32, 20, 4) == [968, 656, 344, 32]
    # r=0.9: min = 100/20 = 5 < window 32 -> uniform round(1000 * 0.1) = 100
    assert kvpress_pyramid_budgets(1000, 0.9, 32, 20, 4) == [100] * 4


def test_snapkv_compression_ratio_keeps_int_T_times_1_minus_r(tiny):
    llm = LLM(tiny, method="snapkv", compression_ratio=0.75, window_size=8, sink_size=4, **COMMON)
    seq, lens, pos = held_after_prefill(llm, prompt(301))
    assert bool((lens == int(301 * 0.25)).all())  # 75 per head and layer, window + sink inside
    assert pos[:4] == [0, 1, 2, 3] and pos[-8:] == list(range(293, 301))
    assert llm.method.kv_bytes(seq) == 4 * 2 * 75 * llm.pool.bytes_per_slot == \
        llm.method.expected_kv_tokens(301) * llm.pool.bytes_per_slot
    llm.abort_all()


def test_pyramidkv_compression_ratio_follows_kvpress(tiny):
    llm = LLM(tiny, method="pyramidkv", compression_ratio=0.5, window_size=32, sink_size=0, beta=20, **COMMON)
    _, lens, _ = held_after_prefill(llm, prompt(1000, 1))
    assert lens[:, 0].tolist() == [968, 656, 344, 32]
    llm.abort_all()


def test_pyramidkv_uniform_fallback(tiny):
    # budget 100, beta 20: the top layer's share 100/20 = 5 is below window 8 -> PyramidKV / kvpress: uniform
    llm = LLM(tiny, method="pyramidkv", budget=100, beta=20, window_size=8, pyramid_fallback="uniform", **COMMON)
    assert llm.method.budgets == [100] * 4
    _, lens, _ = held_after_prefill(llm, prompt(400, 2))
    assert bool((lens == 100).all())
    llm.abort_all()
    clamp = LLM(tiny, method="pyramidkv", budget=100, beta=20, window_size=8, **COMMON)
    assert clamp.method.budgets == pyramid_budgets(100, 4, 12, 20) != [100] * 4
    # above the threshold both rules are the same pyramid
    a = LLM(tiny, method="pyramidkv", budget=400, beta=20, window_size=8, pyramid_fallback="uniform", **COMMON)
    assert a.method.budgets == pyramid_budgets(400, 4, 12, 20)


def test_adakv_floor_counted_with_the_window(tiny):
    """kvpress: n_safe = int(n_kept * alpha) with the window inside n_kept; the window (and our sinks) are
    always kept, so a head is guaranteed int(budget * alpha) - sink - window scored tokens."""
    llm = LLM(tiny, method="adakv", budget=100, window_size=8, sink_size=4, adakv_floor=0.5,
              adakv_floor_with_window=True, **COMMON)
    scores = torch.rand(2, 300, generator=torch.Generator().manual_seed(0))
    scores[0] *= 100  # head 0 would take (almost) everything without a floor
    picks = llm.method.select(scores, 88, 100)
    lens = [len(p) for p in picks]
    assert sum(lens) == 176 and lens[1] == int(100 * 0.5) - 12 == 38  # exactly the floor: head 0 wins the rest
    ours = LLM(tiny, method="adakv", budget=100, window_size=8, sink_size=4, adakv_floor=0.5, **COMMON)
    assert [len(p) for p in ours.method.select(scores, 88, 100)][1] == int(0.5 * 88) == 44


@pytest.mark.parametrize("ratio", [None, 0.75])
def test_streaming_once_full_prefill_one_eviction_decode_grows(tiny, ratio):
    knobs = dict(budget=64, sink_size=4) if ratio is None else dict(compression_ratio=ratio, sink_size=4)
    llm = LLM(tiny, method="streaming", mode="once", **knobs, **COMMON)
    T = 300
    kept = 64 if ratio is None else int(T * (1 - ratio))
    seq, lens, pos = held_after_prefill(llm, prompt(T, 3))
    assert bool((lens == kept).all())
    assert pos == [0, 1, 2, 3] + list(range(T - (kept - 4), T))  # kvpress: sinks + the most recent
    while not seq.finished:
        held = int(seq.kv.lens[0, 0])
        llm.step()
    assert held == kept + 4  # decode appends: before the last of the 5 decode steps, 4 fed-back tokens were added
    # full-attention prefill: the first token is vanilla's
    van = LLM(tiny, method="vanilla", **COMMON).generate([prompt(T, 3)], SamplingParams(temperature=0.0, max_tokens=1),
                                                         use_tqdm=False)[0]
    assert seq.output_token_ids[0] == van["token_ids"][0]
    assert llm.kv_stats()["slots_used"] == 0


def test_bad_convention_knobs(tiny):
    for method, knobs, msg in (("snapkv", dict(compression_ratio=1.0), "compression_ratio"),
                               ("snapkv", dict(compression_ratio=0.5, budget_decay=0.9), "one or the other"),
                               ("pyramidkv", dict(pyramid_fallback="x"), "pyramid_fallback"),
                               ("streaming", dict(mode="x"), "mode"),
                               ("streaming", dict(compression_ratio=0.5), "mode='once'")):
        with pytest.raises(ValueError, match=msg):
            LLM(tiny, method=method, **knobs, **COMMON)


def test_streaming_once_engine_checks(tiny):
    """mode='once' through the checks of tests/test_every_method.py: batch invariance, no leak, a tight
    pool that preempts gives the same tokens, slots_needed bounds every step, sessions free everything."""
    from tests.test_every_method import (COMMON as EVERY, LENGTHS, MAX_TOKENS, StepLedger, _session_inputs,
                                         assert_no_leak, budget_for, params, prompts, tokens)

    knobs = dict(mode="once", budget=48, sink_size=4)
    llm = LLM(tiny, method="streaming", **knobs, **EVERY)
    ledger = StepLedger(llm)
    ref = tokens(llm.generate(prompts(), params(), use_tqdm=False))
    assert [llm.generate([p], [s], use_tqdm=False)[0]["token_ids"] for p, s in zip(prompts(), params())] == ref
    need = max(llm.method.max_slots(n + m) for n, m in zip(LENGTHS, MAX_TOKENS))
    # admission='chunk': prompts start when a chunk fits, so the tight pool does preempt
    tight = LLM(tiny, method="streaming", **knobs, **{**EVERY, **budget_for(llm, need), "admission": "chunk"})
    assert tokens(tight.generate(prompts(), params(), use_tqdm=False)) == ref
    assert tight.kv_stats()["num_preemptions"] > 0
    assert_no_leak(tight, "streaming once, tight pool")
    ctx, turns, sps = _session_inputs()
    for acc in (True, False):
        llm.generate_session(ctx, turns, sps, accumulate=acc)
    assert_no_leak(llm, "streaming once, sessions")
    assert not ledger.violations()
