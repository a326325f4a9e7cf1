"""Long load test (issue 17, `-m slow`): 1,000 mixed requests per registered cache method on a pool
small enough to force preemption, with interrupts at random points, sessions and aborted requests;
after every call nothing may be left behind, and at the end zero slots are used and no sequence lives.

Mix (seeded per method): `generate` batches of short (4..40) and long (100..300) prompts with random
max_tokens, greedy and sampled, stop ids / ignore_eos; `generate_session` calls (accumulating and
forked turns); server-style requests (`add_request` + manual `step`s) of which some are aborted
mid-flight; and about one call in four interrupted by a real SIGINT delivered inside a random KV pool
operation (allocate / free) of that call: a Ctrl-C in the middle of a step, of an eviction, of a
release. Before the fix such an interrupt leaked slots (SnapKV's eviction, DeltaKV's per-step
scratch, StreamingLLM's ring) or left sequences scheduled; now the engine completes the step, then
raises, and the call gives everything back.
"""

from __future__ import annotations

import os
import random
import signal

import pytest

from sparse_engine import SamplingParams
from sparse_engine.cache.registry import METHODS

from test_every_method import make_llm, store_slots  # noqa: E402  (tests/ is on sys.path: conftest.py)

N_REQUESTS = 1000
MAX_PROMPT, MAX_NEW = 300, 24
POOL_X = 2.5  # pool = 2.5 x the largest request's admission bound: a few long requests at once, then preemption


class PoolChaos:
    """A real Ctrl-C (SIGINT to this process) inside the `n`-th KV pool allocate / free after `arm(n)`,
    before the operation acts: a Ctrl-C at a random moment of the engine's work, made reproducible."""

    def __init__(self, llm):
        self.pool, self.left, self.fired = llm.pool, None, 0
        self.alloc, self.free = llm.pool.allocate, llm.pool.free
        llm.pool.allocate = lambda n: self._tick() or self.alloc(n)
        llm.pool.free = lambda slots: self._tick() or self.free(slots)

    def arm(self, n: int) -> None:
        self.left = n

    def disarm(self) -> None:
        self.left = None

    def _tick(self):
        if self.left is not None:
            self.left -= 1
            if self.left == 0:
                self.left = None
                self.fired += 1
                os.kill(os.getpid(), signal.SIGINT)


def engine_for(path: str, method: str):
    probe = make_llm(path, method)
    need = probe.method.max_slots(MAX_PROMPT + MAX_NEW)
    slots = int(need * POOL_X)
    bps = probe.pool.bytes_per_slot
    rows = probe.method.max_rows(MAX_PROMPT + MAX_NEW)
    if rows == 0:
        return make_llm(path, method, kv_cache_bytes=slots * bps, max_num_seqs=16)
    rb = probe.method.store.row_bytes
    lat = int(rows * POOL_X + 1) * rb
    total = slots * bps + lat + rb
    return make_llm(path, method, kv_cache_bytes=total, latent_share=(lat + rb) / total, max_num_seqs=16)


def check_clean(llm, what: str) -> None:
    st, held = llm.kv_stats(), store_slots(llm)
    rc = llm.pool.refcount
    assert not llm.scheduler.running and not llm.scheduler.waiting, f"{what}: sequences left in the scheduler"
    assert not llm._seqs, f"{what}: {len(llm._seqs)} sequences still registered"
    assert st["slots_used"] == held, f"{what}: slots_used {st['slots_used']}, {held} held by the method's store"
    assert int((rc != 0).sum()) == held and int(rc.min()) >= 0, f"{what}: refcounts off"
    assert st.get("latent_rows_used", 0) == 0, f"{what}: {st['latent_rows_used']} latent rows still used"


def request(rng: random.Random):
    n = rng.randint(100, MAX_PROMPT) if rng.random() < 0.3 else rng.randint(4, 40)
    prompt = [rng.randint(3, 255) for _ in range(n)]
    sampled = rng.random() < 0.5
    sp = SamplingParams(temperature=rng.choice([0.7, 1.0]) if sampled else 0.0, top_k=rng.choice([0, 20]),
                        max_tokens=rng.randint(1, MAX_NEW), ignore_eos=rng.random() < 0.7,
                        stop_token_ids=[rng.randint(3, 255)] if rng.random() < 0.2 else [],
                        seed=rng.randint(0, 99) if sampled and rng.random() < 0.5 else None)
    return prompt, sp


def check_output(out, sp: SamplingParams) -> None:
    ids = list(out["token_ids"])
    assert 1 <= len(ids) <= sp.max_tokens and out["finish_reason"] in ("stop", "length"), (len(ids), out["finish_reason"])
    if sp.ignore_eos and not sp.stop_token_ids:
        assert len(ids) == sp.max_tokens


@pytest.fixture
def sigint_raises():
    """Python's own Ctrl-C handler (KeyboardInterrupt) while the test runs, whatever the runner set."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_load_1000_mixed_requests_leave_nothing_behind(tiny_model_factory, method, sigint_raises):
    path = str(tiny_model_factory("llama"))
    llm = engine_for(path, method)
    chaos = PoolChaos(llm)
    rng = random.Random(sorted(METHODS).index(method) + 17)
    count = {"requests": 0, "completed": 0, "interrupted_calls": 0, "aborted": 0, "sessions": 0}
    call = 0
    while count["requests"] < N_REQUESTS:
        call += 1
        kind = rng.choices(["batch", "session", "server"], weights=[6, 2, 2])[0]
        interrupt = kind != "server" and rng.random() < 0.3
        if interrupt:
            chaos.arm(rng.randint(1, 40))
        try:
            if kind == "batch":
                reqs = [request(rng) for _ in range(rng.randint(4, 24))]
                count["requests"] += len(reqs)
                outs = llm.generate([p for p, _ in reqs], [sp for _, sp in reqs], use_tqdm=False)
                for out, (_, sp) in zip(outs, reqs):
                    check_output(out, sp)
                count["completed"] += len(reqs)
            elif kind == "session":
                ctx = [rng.randint(3, 255) for _ in range(rng.randint(50, 250))]
                turns = [[rng.randint(3, 255) for _ in range(rng.randint(0, 8))] for _ in range(rng.randint(1, 3))]
                sps = [request(rng)[1] for _ in turns]
                count["requests"] += len(turns)
                count["sessions"] += 1
                outs = llm.generate_session(ctx, turns, sps, accumulate=rng.random() < 0.5)
                for out, sp in zip(outs, sps):
                    check_output(out, sp)
                count["completed"] += len(turns)
            else:  # a server: requests queued one by one, stepped by hand, some cancelled mid-flight
                reqs = [request(rng) for _ in range(rng.randint(2, 12))]
                count["requests"] += len(reqs)
                seqs = [(llm.add_request(p, sp), sp) for p, sp in reqs]
                for _ in range(rng.randint(0, 30)):
                    if llm.scheduler.has_work():
                        llm.step()
                for seq, _ in seqs:
                    if not seq.finished and rng.random() < 0.4:
                        llm.abort(seq)
                        count["aborted"] += 1
                while llm.scheduler.has_work():
                    llm.step()
                for seq, sp in seqs:
                    if seq.finish_reason != "abort":
                        check_output({"token_ids": seq.output_token_ids, "finish_reason": seq.finish_reason}, sp)
                        count["completed"] += 1
        except KeyboardInterrupt:
            assert interrupt, "an interrupt nobody raised"
            count["interrupted_calls"] += 1
        finally:
            chaos.disarm()
        check_clean(llm, f"{method}, call {call} ({kind}{', interrupted' if interrupt else ''})")
    st = llm.kv_stats()
    assert st["num_preemptions"] > 0, f"{method}: the pool of {st['slots_total']} slots never preempted"
    assert count["interrupted_calls"] >= 10 and count["aborted"] >= 10 and count["sessions"] >= 10, count
    if hasattr(llm.method, "store") and hasattr(llm.method.store, "clear"):  # SparseX's segment cache
        if store_slots(llm):
            llm.method.store.clear()
    assert llm.kv_stats()["slots_used"] == 0 and int((llm.pool.refcount != 0).sum()) == 0
    assert not llm._seqs and not llm.scheduler.has_work()
    print(f"{method}: {count}, preemptions {st['num_preemptions']}, slots {st['slots_total']}, "
          f"peak {st['slots_peak']}")
