"""Sessions: a shared context is prefilled once and its KV forked for every turn (SCBench)."""

from __future__ import annotations

import pytest
import torch

from sparse_engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def path(tiny_model_factory):
    return tiny_model_factory("qwen2")


def _ids(n, seed):
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


SP = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def test_vanilla_session_equals_full_prompts(path):
    llm = LLM(path, dtype="float32")
    ctx, t1, t2 = _ids(300, 0), _ids(12, 1), _ids(9, 2)
    acc = llm.generate_session(ctx, [t1, t2], SP, accumulate=True)
    ref = llm.generate([ctx + t1, ctx + t1 + t2], SP, use_tqdm=False)
    assert [o["token_ids"] for o in acc] == [o["token_ids"] for o in ref]
    ind = llm.generate_session(ctx, [[], t1, t2], SP, accumulate=False)
    ref = llm.generate([ctx, ctx + t1, ctx + t2], SP, use_tqdm=False)
    assert [o["token_ids"] for o in ind] == [o["token_ids"] for o in ref]
    stats = llm.kv_stats()
    # accumulate: context (300), then +12 for turn 2 is reused... turn 1 forks 312, turn 2 forks 321
    assert stats["session_reused_tokens"] == (300 + 12) + (300 + 12 + 9) + 3 * 300
    assert stats["slots_used"] == 0  # session and forks all released


def test_compressing_methods_compress_the_context_once(path):
    ctx, turns = _ids(400, 3), [_ids(10, 4), _ids(10, 5)]
    snap = LLM(path, dtype="float32", method="snapkv", budget=64, window_size=8, sink_size=4)
    outs = snap.generate_session(ctx, turns, SP, accumulate=False)
    # the forks start from the compressed context: 64 tokens per KV head and layer + the turn's 10
    assert all(o["kv_bytes"] == (64 + 10 + 7) * 4 * 2 * snap.pool.bytes_per_slot for o in outs)
    assert snap.kv_stats()["slots_used"] == 0


def test_copy_on_write_keeps_forks_independent(path):
    # the streaming ring overwrites slots in place: shared session slots must be copied, not clobbered
    llm = LLM(path, dtype="float32", method="streaming", budget=48, sink_size=4)
    ctx, a, b = _ids(200, 6), _ids(30, 7), _ids(30, 8)
    both = llm.generate_session(ctx, [a, b], SP, accumulate=False)
    alone = llm.generate_session(ctx, [b], SP, accumulate=False)
    assert both[1]["token_ids"] == alone[0]["token_ids"]
    assert llm.kv_stats()["slots_used"] == 0
