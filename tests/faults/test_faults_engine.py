"""Engine faults (issue 17): bad input in a batch, interrupts, SnapKV's eviction order, seeding, odd values.

Each test reproduces one fault of the issue and failed on the code before the fix:

1. one invalid prompt in a `generate` batch left the valid ones queued: the next call ran them too;
4. Ctrl-C (a real SIGINT) inside `generate_session` left the session, its forked turns and their
   slots behind; an interrupted `generate` also aborted requests of other callers (lost work);
5. SnapKV's `compress_layer` removed the evicted slots from the table before freeing them: an
   interrupt inside the free leaked them;
6. values that were accepted and failed later (or never): `temperature=nan`, `stop_token_ids=5`,
   `max_tokens=2.5`, `stop=[""]`, `max_model_len` past the model's positions, `device="cuda"` without CUDA;
7. a sampled request without a seed depended on how many requests the process had run before.
"""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch

from sparse_engine import LLM, SamplingParams
from sparse_engine.cache.registry import METHODS

from test_every_method import knobs  # noqa: E402  (tests/ is on sys.path: conftest.py)

ALL = sorted(METHODS)
SMALL = dict(dtype="float32", device="cpu", chunk_prefill_size=64, kv_cache_bytes=1 << 22)


def make(path, method="vanilla", **over) -> LLM:
    # the every-method checks' small budgets: eviction / compression happens on the longer prompts
    return LLM(path, method=method, **{**SMALL, **knobs(method), **over})


@pytest.fixture(scope="module")
def tiny(tiny_model_factory):
    return str(tiny_model_factory("llama"))


def prompts(n=4, lengths=(20, 75, 140, 97), seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def toks(outs) -> list[list[int]]:
    return [list(o["token_ids"]) for o in outs]


def resources(llm: LLM) -> dict:
    """What a call may hold: slots and latent rows (beyond what a method-wide store keeps: SparseX's
    segment cache may legitimately grow), queued / running / registered sequences."""
    st = llm.kv_stats()
    store = st.get("segment_store_bytes", 0) // st["bytes_per_slot"]
    return {"slots_used": st["slots_used"] - store, "latent_rows_used": st.get("latent_rows_used", 0),
            "per_sequence_bytes": st["per_sequence_bytes"], "waiting": len(llm.scheduler.waiting),
            "running": len(llm.scheduler.running), "seqs": len(llm._seqs),
            "refcount_nonzero": int((llm.pool.refcount != 0).sum()) - store}


GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


# ------------------------------------------------------------------------------------------------ 1
def test_one_invalid_prompt_fails_the_call_and_leaves_the_engine_as_it_was(tiny):
    llm = make(tiny)
    ps = prompts(3)
    before = resources(llm)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([ps[0], ps[1], [3, 999_999]], GREEDY, use_tqdm=False)
    assert resources(llm) == before, "the valid prompts of the failed call stayed queued"
    assert not llm.scheduler.has_work()
    # the next call runs only its own prompt: as many steps as in a fresh engine
    def steps_of(engine):
        n, orig = [], engine.step
        engine.step = lambda: n.append(1) or orig()
        out = engine.generate([ps[2]], GREEDY, use_tqdm=False)
        del engine.step
        return len(out), len(n), toks(out)

    assert steps_of(llm) == steps_of(make(tiny)), "other requests ran too"
    # a bad SamplingParams in the list, an empty prompt, a too-long prompt: the same
    for bad_call in ([ps[0], ps[1]], [GREEDY, "greedy"]), ([ps[0], []], GREEDY), ([ps[0], list(range(3, 250)) * 20], GREEDY):
        with pytest.raises((ValueError, TypeError)):
            llm.generate(bad_call[0], bad_call[1], use_tqdm=False)
        assert resources(llm) == before


def test_a_failure_while_queueing_rolls_back(tiny):
    """Not a validation error: the queue itself fails half way (here: the 2nd add raises)."""
    llm = make(tiny)
    before = resources(llm)
    orig, calls = llm.scheduler.add, []

    def add(seq):
        calls.append(seq)
        if len(calls) == 2:
            raise MemoryError("simulated")
        orig(seq)

    llm.scheduler.add = add
    with pytest.raises(MemoryError):
        llm.generate(prompts(3), GREEDY, use_tqdm=False)
    del llm.scheduler.add
    assert resources(llm) == before
    assert toks(llm.generate(prompts(3), GREEDY, use_tqdm=False)) == toks(make(tiny).generate(prompts(3), GREEDY, use_tqdm=False))


# ------------------------------------------------------------------------------------------------ 4
class SigintAt:
    """Deliver a real SIGINT to this process at the start of the `at`-th engine step (Python raises
    KeyboardInterrupt in the main thread right after `os.kill` returns: a Ctrl-C at a known point)."""

    def __init__(self, llm: LLM, at: int):
        self.n, self.at, self.fired, self.orig = 0, at, False, llm.step

        def step():
            self.n += 1
            if self.n == self.at:
                self.fired = True
                os.kill(os.getpid(), signal.SIGINT)
            return self.orig()

        llm.step = step
        self.llm = llm

    def undo(self):
        del self.llm.step


@pytest.fixture
def sigint_raises():
    """Python's own Ctrl-C handler (KeyboardInterrupt) while the test runs, whatever the runner set."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def session_inputs():
    g = torch.Generator().manual_seed(11)
    ctx = torch.randint(3, 256, (150,), generator=g).tolist()
    turns = [[], torch.randint(3, 256, (5,), generator=g).tolist(), [9, 10, 11]]
    sps = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (3, 7, 5)]
    return ctx, turns, sps


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or os.name != "posix", reason="needs POSIX signals")
@pytest.mark.parametrize("accumulate", [True, False], ids=["accumulate", "forked"])
@pytest.mark.parametrize("method", ALL)
def test_sigint_inside_generate_session_releases_everything(tiny, method, accumulate, sigint_raises):
    ctx, turns, sps = session_inputs()
    ref = toks(make(tiny, method).generate_session(ctx, turns, sps, accumulate=accumulate))
    llm = make(tiny, method)
    counter = SigintAt(llm, at=10**9)
    llm.generate_session(ctx, turns, sps, accumulate=accumulate)
    total = counter.n  # steps of one session call
    counter.undo()
    llm = make(tiny, method)
    before = resources(llm)
    # in the context prefill, in a turn's prefill / first decode steps, near the end
    for at in sorted({1, 2, max(1, total // 2), max(1, total - 1)}):
        hook = SigintAt(llm, at)
        with pytest.raises(KeyboardInterrupt):
            llm.generate_session(ctx, turns, sps, accumulate=accumulate)
        hook.undo()
        assert hook.fired
        assert resources(llm) == before, f"{method}: after a SIGINT in step {at} of {total}"
        assert not llm.scheduler.has_work(), "orphan sequences still scheduled"
    assert toks(llm.generate_session(ctx, turns, sps, accumulate=accumulate)) == ref  # the engine is unharmed
    assert resources(llm) == before


@pytest.mark.parametrize("method", ALL)
def test_sigint_in_the_middle_of_a_step_leaks_nothing(tiny, method, sigint_raises):
    """A real SIGINT delivered inside KV pool operations (allocate / free: eviction, scratch, release)
    of a `generate`: the step completes, KeyboardInterrupt follows, and every slot comes back. (Raised
    right there, it leaked DeltaKV's per-step scratch, StreamingLLM ring slots, SnapKV's evicted ones.)"""
    llm = make(tiny, method)
    ps, sps = prompts(4), [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (6, 9, 4, 7)]
    ref = toks(make(tiny, method).generate(ps, sps, use_tqdm=False))
    before = resources(llm)
    counter = {"n": 0, "at": 0}
    alloc, free = llm.pool.allocate, llm.pool.free

    def tick():
        counter["n"] += 1
        if counter["n"] == counter["at"]:
            os.kill(os.getpid(), signal.SIGINT)

    llm.pool.allocate = lambda n: tick() or alloc(n)
    llm.pool.free = lambda slots: tick() or free(slots)
    llm.generate(ps, sps, use_tqdm=False)
    total, counter["n"] = counter["n"], 0
    for at in range(1, total + 1, max(1, total // 12)):  # ~12 points spread over the call's pool operations
        counter.update(n=0, at=at)
        with pytest.raises(KeyboardInterrupt):
            llm.generate(ps, sps, use_tqdm=False)
        assert resources(llm) == before, f"{method}: after a SIGINT at pool operation {at} of {total}"
    counter["at"] = 0
    assert toks(llm.generate(ps, sps, use_tqdm=False)) == ref


def test_interrupted_generate_keeps_other_callers_requests(tiny, sigint_raises):
    """A request queued through `add_request` (a server's) survives an interrupted `generate` of
    another caller and finishes with its uninterrupted tokens; the interrupted call's own requests
    are gone with their slots."""
    ps = prompts(4)
    alone = make(tiny).generate([ps[0]], GREEDY, use_tqdm=False)[0]["token_ids"]
    llm = make(tiny)
    other = llm.add_request(ps[0], GREEDY)
    llm.step()  # running, with KV
    hook = SigintAt(llm, at=3)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(ps[1:], GREEDY, use_tqdm=False)
    hook.undo()
    assert not other.finished, f"another caller's request was aborted ({other.finish_reason})"
    assert [s is other for s in list(llm.scheduler.waiting) + llm.scheduler.running] == [True]
    while llm.scheduler.has_work():
        llm.step()
    assert other.output_token_ids == list(alone) and other.finish_reason == "length"
    assert llm.kv_stats()["slots_used"] == 0


# ------------------------------------------------------------------------------------------------ 5
@pytest.mark.parametrize("method", ["snapkv", "adakv", "pyramidkv"])
def test_snapkv_interrupt_inside_the_eviction_free_leaks_nothing(tiny, method):
    """KeyboardInterrupt raised by `pool.free` when `compress_layer` hands it the evicted slots (as a
    Ctrl-C landing there would): every slot must still come back when the call is unwound."""
    llm = make(tiny, method)
    before = resources(llm)
    in_compress, fired = [False], []
    orig_compress, orig_free = llm.method.compress_layer, llm.pool.free

    def compress_layer(*a, **k):
        in_compress[0] = True
        try:
            return orig_compress(*a, **k)
        finally:
            in_compress[0] = False

    def free(slots):
        if in_compress[0] and not fired:
            fired.append(1)
            raise KeyboardInterrupt("Ctrl-C inside the eviction")
        return orig_free(slots)

    llm.method.compress_layer, llm.pool.free = compress_layer, free
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts(2, lengths=(140, 97)), GREEDY, use_tqdm=False)
    assert fired
    assert resources(llm) == before, "evicted slots were leaked (removed from the table before the free)"


# ------------------------------------------------------------------------------------------------ 7
SAMPLED = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)


def test_unseeded_sampling_does_not_depend_on_the_process_history(tiny):
    ps = prompts(3)
    fresh = toks(make(tiny).generate(ps, SAMPLED, use_tqdm=False))
    used = make(tiny)
    for _ in range(3):  # other work first: more sequence ids, other calls
        used.generate(prompts(5, seed=9), SAMPLED, use_tqdm=False)
    used.generate_session(*session_inputs(), accumulate=False)
    assert toks(used.generate(ps, SAMPLED, use_tqdm=False)) == fresh
    # requests of one call still differ from each other (same prompt, other position in the call)
    same = toks(make(tiny).generate([ps[0]] * 3, SAMPLED, use_tqdm=False))
    assert len({tuple(t) for t in same}) == 3
    # an explicit seed wins and is independent of the position
    seeded = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=5)
    a = toks(make(tiny).generate([ps[0], ps[1]], seeded, use_tqdm=False))
    b = toks(used.generate([ps[1], ps[0]], seeded, use_tqdm=False))
    assert a == b[::-1]


def test_unseeded_session_turns_do_not_depend_on_the_process_history(tiny):
    ctx, turns, _ = session_inputs()
    sps = [SAMPLED] * len(turns)
    fresh = toks(make(tiny).generate_session(ctx, turns, sps, accumulate=True))
    used = make(tiny)
    used.generate(prompts(4), SAMPLED, use_tqdm=False)
    assert toks(used.generate_session(ctx, turns, sps, accumulate=True)) == fresh


# ------------------------------------------------------------------------------------------------ 6
@pytest.mark.parametrize("kw, field, err", [
    (dict(temperature=math.nan), "temperature", ValueError),
    (dict(temperature=math.inf), "temperature", ValueError),
    (dict(top_p=math.nan), "top_p", ValueError),
    (dict(stop_token_ids=5), "stop_token_ids", TypeError),
    (dict(stop_token_ids=[2, "x"]), "stop_token_ids", TypeError),
    (dict(max_tokens=2.5), "max_tokens", TypeError),
    (dict(max_tokens="8"), "max_tokens", TypeError),
    (dict(top_k=1.5), "top_k", TypeError),
    (dict(stop=[""]), "stop", ValueError),
    (dict(stop=5), "stop", TypeError),
    (dict(seed=1.5), "seed", TypeError),
    (dict(seed=1 << 70), "seed", ValueError),
    (dict(ignore_eos="yes"), "ignore_eos", TypeError),
])
def test_sampling_params_refuse_bad_values(kw, field, err):
    with pytest.raises(err, match=field) as e:
        SamplingParams(**kw)
    value = next(iter(kw.values()))
    assert repr(value) in str(e.value) or str(value) in str(e.value), f"the message does not show the value: {e.value}"


def test_tiny_temperatures_are_greedy_not_nan(tiny):
    """temperature=1e-320 divided the logits into inf -> NaN probabilities -> a RuntimeError deep in
    torch.multinomial; below 1e-5 it is greedy (as vLLM)."""
    llm = make(tiny)
    ps = prompts(2)
    greedy = toks(llm.generate(ps, GREEDY, use_tqdm=False))
    tiny_t = SamplingParams(temperature=1e-320, max_tokens=6, ignore_eos=True)
    assert toks(llm.generate(ps, tiny_t, use_tqdm=False)) == greedy


def test_engine_knobs_refuse_bad_values(tiny):
    from sparse_engine.models.spec import ModelSpec

    positions = ModelSpec.from_pretrained(tiny).max_position_embeddings
    with pytest.raises(ValueError, match=f"max_model_len={positions + 1} exceeds .*max_position_embeddings={positions}"):
        LLM(tiny, max_model_len=positions + 1)
    bad_device = "cuda:99" if torch.cuda.is_available() else "cuda"
    with pytest.raises(ValueError, match=f"device='{bad_device}'"):
        LLM(tiny, device=bad_device)
    for kw, field in [(dict(device="gpu"), "device"), (dict(max_num_seqs=2.5), "max_num_seqs"),
                      (dict(max_num_seqs="4"), "max_num_seqs"), (dict(kv_cache_bytes="1GB"), "kv_cache_bytes"),
                      (dict(gpu_memory_utilization=math.nan), "gpu_memory_utilization"),
                      (dict(max_model_len=1.5), "max_model_len"), (dict(seed="0"), "seed")]:
        with pytest.raises((ValueError, TypeError), match=field):
            LLM(tiny, **kw)
    # a whole-number float size is a size
    assert LLM(tiny, **{**SMALL, "kv_cache_bytes": float(1 << 22)}).kv_budget_bytes == 1 << 22
