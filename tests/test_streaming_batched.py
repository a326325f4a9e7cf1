"""`streaming` on the batch hooks: every step runs batched and equals the per-sequence path.

The per-sequence hooks (`write` / `attend`, kept for composition) are the reference: a subclass that
returns False from `batched` runs them. Both must give the same tokens, logits (to fp32 rounding),
kept positions and KV bytes, with several sequences per step (decode rows and prefill chunks mixed),
chunks that overflow the ring (kept, dropped and rewritten tokens), decaying budgets, a model
sliding window, and forks (copy-on-write of shared ring slots).
"""

from __future__ import annotations

import pytest
import torch

from sparse_engine import LLM, SamplingParams
from sparse_engine.cache import registry
from sparse_engine.cache.streaming import StreamingCache

POOL = 1 << 26


class PerSequenceStreaming(StreamingCache):
    name = "streaming_per_sequence"

    def batched(self, plan) -> bool:
        return False


@pytest.fixture(autouse=True)
def _register(monkeypatch):
    monkeypatch.setitem(registry.METHODS, PerSequenceStreaming.name, PerSequenceStreaming)


def _ids(n, seed):
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _record_plans(llm):
    plans = []
    prepare = llm.runner.prepare

    def spy(batch):
        plan = prepare(batch)
        plans.append((plan.batched, plan.all_decode, plan.method_data is not None))
        if plan.batched and plan.write_slots is not None:
            # one writer per slot and layer (else index_copy picks one at random on CUDA); only the
            # scratch slot of never-kept overflow tokens may repeat
            trash = llm.method._trash
            for w in plan.write_slots:
                w = w if trash is None else w[w != trash[0]]
                assert w.unique().numel() == w.numel()
        return plan

    llm.runner.prepare = spy
    return plans


CASES = {
    # (family, model overrides, knobs, chunk_prefill_size)
    "uniform-chunk37": ("llama", {}, dict(budget=64, sink_size=4), 37),
    "uniform-chunk>ring": ("llama", {}, dict(budget=48, sink_size=4), 160),
    "decay": ("llama", {}, dict(budget=96, budget_decay=0.6, min_budget=12, sink_size=2), 100),
    "no-sink": ("qwen2", {}, dict(budget=40, sink_size=0), 64),
    "sliding-window": ("qwen2", dict(use_sliding_window=True, sliding_window=30, max_window_layers=0),
                       dict(budget=64, sink_size=4), 50),
}


@pytest.mark.parametrize("case", list(CASES))
def test_batched_equals_per_sequence_path(tiny_model_factory, case):
    family, overrides, knobs, chunk = CASES[case]
    path = tiny_model_factory(family, **overrides)
    prompts = [_ids(n, n) for n in (230, 41, 150, 7)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, return_logits=True)
    outs = {}
    for name in ("streaming", PerSequenceStreaming.name):
        llm = LLM(path, method=name, dtype="float32", kv_cache_bytes=POOL, chunk_prefill_size=chunk, **knobs)
        plans = _record_plans(llm)
        outs[name] = llm.generate(prompts, params, use_tqdm=False)
        assert llm.kv_stats()["slots_used"] == 0
        if name == "streaming":
            assert all(b for b, _, _ in plans), "every streaming step must run on the batch hooks"
            assert any(d for _, d, _ in plans) and any(w for _, _, w in plans)  # decode and windowed chunks ran
            if overrides.get("use_sliding_window"):
                assert llm.method.sliding_window == 30
        else:
            assert not any(b for b, _, _ in plans)
    for got, ref in zip(outs["streaming"], outs[PerSequenceStreaming.name]):
        assert got["token_ids"] == ref["token_ids"]
        assert got["kv_bytes"] == ref["kv_bytes"]
        assert max(float((a - b).abs().max()) for a, b in zip(got["logits"], ref["logits"])) < 1e-4


def test_batched_keeps_the_reference_positions(tiny_model_factory):
    """After every step each layer's table holds exactly {pos < sink} U (p - ring, p], same slot ids
    while decoding a full ring (in-place overwrite)."""
    path = tiny_model_factory("llama")
    llm = LLM(path, method="streaming", dtype="float32", kv_cache_bytes=POOL, chunk_prefill_size=70,
              budget=50, budget_decay=0.8, min_budget=9, sink_size=3)
    seq = llm.add_request(_ids(333, 3), SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    slot_sets = []
    while not seq.finished:
        llm.step()
        if seq.finished:
            break
        p = seq.num_computed - 1  # the last token written
        for layer, table in enumerate(seq.kv.tables):
            ring = llm.method.budgets[layer] - 3
            want = sorted(set(range(min(3, p + 1))) | set(range(max(0, p - ring + 1), p + 1)))
            for h in range(table.num_kv_heads):
                assert sorted(llm.pool.pos[table.head(h)].tolist()) == want, (layer, h, p)
        if seq.num_computed > seq.num_prompt_tokens:
            slot_sets.append([set(t.all_slots().tolist()) for t in seq.kv.tables])
    assert len(slot_sets) > 3 and all(s == slot_sets[0] for s in slot_sets)


def test_batched_forks_equal_per_sequence_path(tiny_model_factory):
    """Session forks share ring slots: batched copy-on-write (two forks overwriting the same shared
    slot in one step) gives the per-sequence path's tokens and returns every slot."""
    path = tiny_model_factory("qwen2")
    ctx, turns = _ids(200, 6), [_ids(30, 7), _ids(3, 8), _ids(90, 9)]
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    got = {}
    for name in ("streaming", PerSequenceStreaming.name):
        llm = LLM(path, method=name, dtype="float32", kv_cache_bytes=POOL, budget=48, sink_size=4,
                  chunk_prefill_size=64)
        got[name] = [o["token_ids"] for o in llm.generate_session(ctx, turns, sp, accumulate=False)]
        alone = [llm.generate_session(ctx, [t], sp, accumulate=False)[0]["token_ids"] for t in turns]
        assert got[name] == alone
        assert llm.kv_stats()["slots_used"] == 0
    assert got["streaming"] == got[PerSequenceStreaming.name]


def test_layer_hook_does_not_sync(tiny_model_factory, monkeypatch):
    """forward_layer (write, windowed chunk attention, plain decode attention) reads no host value of
    a device tensor: all per-step decisions were made in begin_step."""
    path = tiny_model_factory("llama")
    llm = LLM(path, method="streaming", dtype="float32", kv_cache_bytes=POOL, chunk_prefill_size=90, budget=40)
    method, calls = llm.method, []
    forward_layer = method.forward_layer

    def forbid(name):
        def f(*a, **k):
            raise AssertionError(f"host sync in a per-layer hook: Tensor.{name}")
        return f

    def guarded(plan, layer, *args):
        calls.append(any(w.layers[layer] for w in plan.method_data or ()))
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy"):
                m.setattr(torch.Tensor, name, forbid(name))
            return forward_layer(plan, layer, *args)

    method.forward_layer = guarded
    llm.generate([_ids(200, 1), _ids(33, 2)], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
                 use_tqdm=False)
    assert any(calls) and not all(calls)  # windowed chunks and plain steps both ran
