"""Sparse-method knobs, budget formulas, memory accounting and the budget >= prompt == vanilla rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from sparse_engine import LLM, SamplingParams
from sparse_engine.cache.budgets import (adakv_select, exp_decay_budgets, format_budgets, pyramid_budgets)
from sparse_engine.cache.registry import METHODS, get_method
from sparse_engine.models.spec import ModelSpec

POOL = 1 << 28  # 256 MiB KV pool: the CUDA default (85% of free memory) would starve later LLMs
CONF = Path(__file__).resolve().parents[1] / "conf" / "method"


@pytest.fixture(scope="module")
def tiny_path(tiny_model_factory):
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def spec30(shipped_model_path):
    return ModelSpec.from_pretrained(shipped_model_path)  # 30 layers: config only, no weights


# ------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_method_yaml_matches_dataclass(path, spec30):
    """Every conf/method file names a registered method and only its knobs, and validates."""
    data = yaml.safe_load(path.read_text())
    cls = get_method(data.pop("name"))
    assert cls.name == path.stem
    cfg = cls.make_config(**data)
    cfg.validate(spec30)


def test_every_method_has_a_yaml():
    missing = set(METHODS) - {p.stem for p in CONF.glob("*.yaml")}
    assert not missing, f"registered methods without conf/method/<name>.yaml: {sorted(missing)}"


BAD = [
    ("snapkv", dict(budget=0), "budget must be a positive"),
    ("snapkv", dict(budget=-5), "budget must be a positive"),
    ("snapkv", dict(budget=30, window_size=32), "exceeds budget"),
    ("snapkv", dict(pool_kernel_size=4), "odd"),
    ("snapkv", dict(pooling="median"), "pooling"),
    ("snapkv", dict(head_wise=False, adaptive=True), "head_wise"),
    ("snapkv", dict(budget_decay=1.5), r"\(0, 1\]"),
    ("adakv", dict(adakv_floor=2.0), "fraction"),
    ("pyramidkv", dict(budget=0), "budget must be a positive"),
    ("pyramidkv", dict(budget_decay=0.9), "linear"),
    ("streaming", dict(budget=0), "budget must be a positive"),
    ("streaming", dict(budget=4, sink_size=4), "ring"),
    ("streaming", dict(budget_decay=0.0), r"\(0, 1\]"),
    ("omnikv", dict(full_attn_layers=[1, 2]), "must include layer 0"),
    ("omnikv", dict(full_attn_layers=[0, 30]), "out of range"),
    ("omnikv", dict(full_attn_layers=[0, -1]), "out of range"),
    ("omnikv", dict(num_top_tokens=1.5), r"\(0, 1\]"),
    ("omnikv", dict(num_top_tokens=0.0), r"\(0, 1\]"),
    ("omnikv", dict(num_top_tokens=0), "positive"),
    ("omnikv", dict(num_top_tokens_in_prefill=2.0), r"\(0, 1\]"),
]


@pytest.mark.parametrize("name,knobs,match", BAD, ids=[f"{n}-{'-'.join(k)}" for n, k, _ in BAD])
def test_bad_knobs_raise_clear_errors(spec30, name, knobs, match):
    with pytest.raises(ValueError, match=match):
        get_method(name).make_config(**knobs).validate(spec30)


def test_bad_knob_through_llm(tiny_path):
    with pytest.raises(ValueError, match="out of range"):
        LLM(tiny_path, method="omnikv", full_attn_layers=[0, 7])  # the tiny model has 4 layers
    with pytest.raises(TypeError, match="Unknown config key 'window'"):
        LLM(tiny_path, method="snapkv", window=8)


# ------------------------------------------------------------------------------ budgets
def test_pyramid_budgets_linear_with_snapkv_total():
    b = pyramid_budgets(512, 30, 36)
    assert sum(b) == 512 * 30 and b == sorted(b, reverse=True) and min(b) >= 36
    assert max(b) - min(b) > 800  # a real slope: ~2*512 - 512/20 at the bottom
    steps = [b[i] - b[i + 1] for i in range(29)]
    assert max(steps) - min(steps) <= 1  # linear up to rounding
    assert "layer  29" in format_budgets(b) and "total 15360" in format_budgets(b)


def test_exp_decay_budgets():
    assert exp_decay_budgets(1024, 6, 0.5, 100) == [1024, 512, 256, 128, 100, 100]
    assert exp_decay_budgets(64, 3, 1.0, 8) == [64, 64, 64]


def test_adakv_select_splits_layer_budget():
    torch.manual_seed(0)
    scores = torch.rand(3, 100)
    scores[0] *= 10  # head 0 is much more peaked: it should win more of the budget
    picks = adakv_select(scores, 20, 0.2)
    lens = [len(p) for p in picks]
    assert sum(lens) == 60 and lens[0] > 20 and min(lens) >= 4


# ------------------------------------------------------------------------------ memory accounting
def _prefill(llm, prompt):
    seq = llm.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    while seq.num_computed < seq.num_prompt_tokens:
        llm.step()
    return seq


KV_CASES = {
    "snapkv": dict(budget=100),
    "adakv": dict(budget=100),
    "pyramidkv": dict(budget=100, window_size=16),
    "streaming": dict(budget=128, budget_decay=0.5, min_budget=40),
    "omnikv": dict(full_attn_layers=[0, 1], num_top_tokens=32),
}


@pytest.mark.parametrize("name", list(KV_CASES))
def test_kv_bytes_after_prefill_follow_budget_formula(tiny_path, name):
    """kv_stats() per-sequence bytes and the pool's used slots equal the budget formula."""
    llm = LLM(tiny_path, method=name, dtype="float32", kv_cache_bytes=POOL, chunk_prefill_size=256, **KV_CASES[name])
    prompt = torch.randint(3, 256, (700,), generator=torch.Generator().manual_seed(0)).tolist()
    seq = _prefill(llm, prompt)
    spec, stats = llm.spec, llm.kv_stats()
    if name == "omnikv":
        tokens = 700 * spec.num_layers * spec.num_kv_heads  # logical masking: nothing evicted
    else:
        tokens = sum(min(700, b) for b in llm.method.budgets) * spec.num_kv_heads
        assert tokens < 700 * spec.num_layers * spec.num_kv_heads
    assert stats["per_sequence_bytes"][seq.seq_id] == tokens * stats["bytes_per_slot"]
    assert stats["slots_used"] == tokens  # freed for real: the pool agrees
    if name == "pyramidkv":
        assert llm.method.budgets == pyramid_budgets(100, 4, 20) and sum(llm.method.budgets) == 400
    if name == "streaming":
        assert llm.method.budgets == [128, 64, 40, 40]
    llm.abort_all()
    assert llm.kv_stats()["slots_used"] == 0


# ------------------------------------------------------------------------------ budget >= prompt
BIG = {
    "snapkv": dict(budget=4096),
    "adakv": dict(budget=4096),
    "pyramidkv": dict(budget=4096, beta=1.0),
    "streaming": dict(budget=4096),
    "omnikv": dict(full_attn_layers=[0, 2], num_top_tokens=1.0, num_top_tokens_in_prefill=1.0),
}


@pytest.fixture(scope="module")
def vanilla_run(tiny_path):
    llm = LLM(tiny_path, method="vanilla", dtype="float32", kv_cache_bytes=POOL, chunk_prefill_size=128)
    prompts = [torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (40, 300)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, return_logits=True)
    return prompts, params, llm.generate(prompts, params, use_tqdm=False)


@pytest.mark.parametrize("name", list(BIG))
def test_budget_covering_prompt_equals_vanilla(tiny_path, vanilla_run, name):
    prompts, params, ref = vanilla_run
    llm = LLM(tiny_path, method=name, dtype="float32", kv_cache_bytes=POOL, chunk_prefill_size=128, **BIG[name])
    outs = llm.generate(prompts, params, use_tqdm=False)
    for o, r in zip(outs, ref):
        assert o["token_ids"] == r["token_ids"]
        assert all(torch.equal(a, b) for a, b in zip(o["logits"], r["logits"]))
        assert o["kv_bytes"] == r["kv_bytes"]


def test_streaming_fork_copies_shared_ring_slots(tiny_path):
    """A forked sequence shares ring slots: in-place overwrites must copy them first (copy-on-write)."""
    from sparse_engine.engine.sequence import Sequence, Status

    llm = LLM(tiny_path, method="streaming", budget=64, dtype="float32", kv_cache_bytes=POOL)
    prompt = torch.randint(3, 256, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    ref = llm.generate([prompt], params, use_tqdm=False)[0]["token_ids"]
    a = llm.add_request(prompt, params)
    while a.num_computed < a.num_prompt_tokens:
        llm.step()
    b = Sequence(list(a.token_ids), params)
    b.prompt_token_ids, b.num_computed, b.status = list(a.prompt_token_ids), a.num_computed, Status.RUNNING
    llm.method.fork(a, b)
    assert llm.method.slots_needed(b, 1) > 0  # copy-on-write slots are reserved
    llm.scheduler.running.append(b)
    while not (a.finished and b.finished):
        llm.step()
    assert a.output_token_ids == ref and b.output_token_ids == ref
    assert llm.kv_stats()["slots_used"] == 0
