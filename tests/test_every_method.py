"""Every registered cache method through the same engine checks (a method added to
`sparse_engine.cache.registry.METHODS` is picked up here automatically; give it knobs in `KNOBS`).

On a tiny random llama (float32, CPU, greedy, chunked prefill of 64) with small budgets so that
eviction / compression really happens on the longer prompts (20..300 tokens):

1. batch generate returns `max_tokens` tokens per prompt;
2. batch invariance: each prompt alone gives the batch's tokens (tokens, not logits: batches are padded);
3. no slot leak: afterwards only a method-wide store (SparseX segments, read from `kv_stats()`) holds
   slots, each with one reference; every other refcount is 0;
4. an interrupt (KeyboardInterrupt at the start of a step, or inside the forward after the step's
   slots were allocated; in prefill and in decode) returns every slot, and the next generate gives the
   uninterrupted tokens;
5. preemption: pools from exactly the largest request's `max_slots` up (some of them preempt, in prefill
   and in decode) give the roomy pool's tokens;
6. `slots_needed` is an upper bound: in every step the slots allocated (and not yet freed) never
   exceed the sum the scheduler reserved through `method.slots_needed(seq, n)` for that step (slots a
   method grows as evictable caches, its `reclaimable()`, are counted apart);
7. `generate_session` runs (accumulating and forked turns) and leaves no slots behind.
"""

from __future__ import annotations

import functools

import pytest
import torch

from sparse_engine import LLM, SamplingParams
from sparse_engine.cache.registry import METHODS

# Named options that change what a method keeps or reads get every check too: name -> (method, knobs).
VARIANTS = {"deltakv:reuse": ("deltakv", dict(reuse_reconstructed=True, reconstructed_cache_factor=1.5))}
ALL = sorted(METHODS) + sorted(VARIANTS)  # read at collection time: new methods join every check

COMMON = dict(dtype="float32", device="cpu", chunk_prefill_size=64, kv_cache_bytes=1 << 22)  # 32768 slots
LENGTHS = (20, 75, 140, 300, 97)
MAX_TOKENS = (10, 6, 8, 12, 16)


@functools.cache
def _tiny_deltakv_compressor():
    """A lossy random linear DeltaKV compressor (latent 16 of the joined width 64) for the tiny llama:
    layer 0 full, layers 1-3 compressed."""
    from deltakv.testing import tiny_compressor

    return tiny_compressor(latent=16, seed=0)


# Knobs per method (callables are called once per engine). Budgets are small: prompts beyond them evict.
KNOBS = {
    "snapkv": dict(budget=64, window_size=8),
    "adakv": dict(budget=64, window_size=8),
    "pyramidkv": dict(budget=64, window_size=8),
    "streaming": dict(budget=48, sink_size=4),
    "omnikv": dict(full_attn_layers=[0], num_top_tokens=16, num_top_tokens_in_prefill=32, recent_size=8),
    "deltakv": dict(deltakv_path=_tiny_deltakv_compressor, latent_dtype="int8", num_top_tokens=16,
                    num_top_tokens_in_prefill=32, recent_size=8, decode_compress_block=4),
    "sparsex": {},  # no segments, no separator: plain requests
    "kivi": dict(bits=2, group_size=8, residual_length=8, sink_size=4),  # groups of 8: prompts >= 20 quantize
}


def knobs(method: str) -> dict:
    base, extra = VARIANTS.get(method, (method, {}))
    return {**{k: (v() if callable(v) else v) for k, v in KNOBS.get(base, {}).items()}, **extra}


def make_llm(path, method: str, **over) -> LLM:
    return LLM(path, method=VARIANTS.get(method, (method,))[0], **{**COMMON, **knobs(method), **over})


def budget_for(probe: LLM, slots: int, extra_rows: float = 1.0) -> dict:
    """Knobs giving a pool of (at least) `slots` slots; a method that also keeps rows outside the
    pool (DeltaKV latents) gets room for the largest request's rows (x extra_rows) in the SAME
    `kv_cache_bytes`, through an explicit latent_share."""
    bps = probe.pool.bytes_per_slot
    rows = max(probe.method.max_rows(n + m) for n, m in zip(LENGTHS, MAX_TOKENS))
    if rows == 0:
        return dict(kv_cache_bytes=slots * bps)
    rb = probe.method.store.row_bytes
    lat = int(rows * extra_rows + 1) * rb
    total = slots * bps + lat + rb
    return dict(kv_cache_bytes=total, latent_share=(lat + rb) / total)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in LENGTHS]


def params() -> list[SamplingParams]:
    return [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in MAX_TOKENS]


def tokens(outs) -> list[list[int]]:
    return [o["token_ids"] for o in outs]


def store_slots(llm: LLM) -> int:
    """Slots a method-wide store holds between requests (SparseX's segment store), from kv_stats()."""
    st = llm.kv_stats()
    return st.get("segment_store_bytes", 0) // st["bytes_per_slot"]


def assert_no_leak(llm: LLM, what: str) -> None:
    st, held = llm.kv_stats(), store_slots(llm)
    rc = llm.pool.refcount
    assert not llm.scheduler.running and not llm.scheduler.waiting, f"{what}: requests left in the scheduler"
    assert st["slots_used"] == held, f"{what}: slots_used {st['slots_used']}, expected {held} (store-held only)"
    assert int((rc != 0).sum()) == held, f"{what}: {int((rc != 0).sum())} slots with refcount != 0, expected {held}"
    assert int(rc.min()) >= 0 and int(rc.max()) <= 1, f"{what}: refcounts in [{int(rc.min())}, {int(rc.max())}]"


@pytest.fixture(scope="module")
def tiny(tiny_model_factory):
    return str(tiny_model_factory("llama"))


@functools.cache
def _reference(path: str, method: str) -> tuple[tuple[tuple[int, ...], ...], dict]:
    """Uninterrupted batch run on a roomy pool (cached per worker process): tokens, finish reasons, stats."""
    llm = make_llm(path, method)
    outs = llm.generate(prompts(), params(), use_tqdm=False)
    assert_no_leak(llm, f"{method} reference batch")
    return tuple(tuple(t) for t in tokens(outs)), {"finish": [o["finish_reason"] for o in outs], **llm.kv_stats()}


def reference_tokens(path, method) -> list[list[int]]:
    return [list(t) for t in _reference(path, method)[0]]


# ---------------------------------------------------------------------------------------------- 1, 3
@pytest.mark.parametrize("method", ALL)
def test_batch_generate_lengths_and_no_leak(tiny, method):
    llm = make_llm(tiny, method)
    outs = llm.generate(prompts(), params(), use_tqdm=False)
    assert len(outs) == len(LENGTHS)
    assert [len(o["token_ids"]) for o in outs] == list(MAX_TOKENS)
    assert [o["finish_reason"] for o in outs] == ["length"] * len(LENGTHS)
    assert [o["prompt_token_ids"] for o in outs] == prompts()
    st = llm.kv_stats()
    assert st["num_preemptions"] == 0, "the roomy pool must not preempt (check 5 does that)"
    per_token = st["bytes_per_token"]  # every layer and KV head at full precision
    assert all(o["kv_bytes"] <= (n + m - 1) * per_token for o, n, m in zip(outs, LENGTHS, MAX_TOKENS)), \
        f"{method}: a request held more KV than vanilla would: {[o['kv_bytes'] for o in outs]}"
    assert_no_leak(llm, f"{method} after batch generate")
    # a second batch on the same engine gives the same tokens (no state carried between requests)
    assert tokens(llm.generate(prompts(), params(), use_tqdm=False)) == tokens(outs)
    assert_no_leak(llm, f"{method} after a second batch generate")


# ---------------------------------------------------------------------------------------------- 2
@pytest.mark.parametrize("method", ALL)
def test_batch_invariance(tiny, method):
    batch = reference_tokens(tiny, method)
    llm = make_llm(tiny, method)
    alone = [llm.generate([p], [sp], use_tqdm=False)[0]["token_ids"] for p, sp in zip(prompts(), params())]
    diff = [(n, a, b) for n, a, b in zip(LENGTHS, alone, batch) if a != b]
    assert not diff, f"{method}: prompts whose tokens alone != in the batch (len, alone, batch): {diff}"
    assert_no_leak(llm, f"{method} after single-prompt runs")


# ---------------------------------------------------------------------------------------------- 4
class _Interrupt:
    """Raise KeyboardInterrupt in the `at`-th engine step: at the start of `runner.run` ("step-start") or
    inside the forward, before decoder layer 2, after the method allocated the step's slots ("mid-forward")."""

    def __init__(self, llm: LLM, at: int, where: str):
        self.calls, self.at, self.fired = 0, at, False
        if where == "step-start":
            orig = llm.runner.run

            def run(batch):
                self._tick()
                return orig(batch)

            llm.runner.run = run
            self.undo = lambda: delattr(llm.runner, "run")
        else:
            handle = llm.runner.model.model.layers[2].register_forward_pre_hook(lambda mod, args: self._tick())
            self.undo = handle.remove

    def _tick(self):
        self.calls += 1
        if self.calls == self.at:
            self.fired = True
            raise KeyboardInterrupt(f"simulated interrupt in step {self.at}")


@pytest.mark.parametrize("where", ["step-start", "mid-forward"])
@pytest.mark.parametrize("at", [3, 9], ids=["prefill-step3", "decode-step9"])
@pytest.mark.parametrize("method", ALL)
def test_interrupt_returns_slots_and_engine_recovers(tiny, method, at, where):
    ref = reference_tokens(tiny, method)
    llm = make_llm(tiny, method)
    before = llm.kv_stats()["slots_used"]
    hook = _Interrupt(llm, at, where)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts(), params(), use_tqdm=False)
    hook.undo()
    assert hook.fired
    after = llm.kv_stats()["slots_used"]
    assert after == before, f"{method}: slots_used {after} after the interrupt, {before} before"
    assert_no_leak(llm, f"{method} after interrupt ({where}, step {at})")
    assert tokens(llm.generate(prompts(), params(), use_tqdm=False)) == ref
    assert_no_leak(llm, f"{method} after the generate that followed the interrupt")


# ---------------------------------------------------------------------------------------------- 5
PREEMPT_POOLS = (1.0, 1.25, 1.5, 2.0)  # x the largest request's admission bound (`method.max_slots`)


@pytest.mark.parametrize("method", ALL)
def test_preemption_gives_same_tokens(tiny, method):
    """Pools from exactly the largest request's bound up: each must give the roomy pool's tokens, and
    some must preempt (recorded: prompt length and whether the victim had finished its prefill)."""
    ref = reference_tokens(tiny, method)
    roomy = make_llm(tiny, method)
    need = max(roomy.method.max_slots(n + m) for n, m in zip(LENGTHS, MAX_TOKENS))
    runs, diffs = [], []
    for frac in PREEMPT_POOLS:
        slots = int(need * frac)
        # admission='chunk': prompts start when a chunk fits, so these pools do preempt ('prompt' avoids most)
        llm = make_llm(tiny, method, **budget_for(roomy, slots), admission="chunk")
        assert slots <= llm.pool.num_slots <= slots + 1
        assert llm.pool.num_slots * llm.pool.bytes_per_slot + llm.kv_stats().get("latent_arena_bytes", 0) \
            <= llm.kv_budget_bytes  # one budget: slots + latent rows
        events, orig = [], llm.scheduler._preempt

        def preempt(seq, orig=orig, events=events):
            events.append((seq.num_prompt_tokens, "decode" if seq.num_computed >= seq.num_prompt_tokens else "prefill"))
            orig(seq)

        llm.scheduler._preempt = preempt
        outs = llm.generate(prompts(), params(), use_tqdm=False)
        assert llm.kv_stats()["num_preemptions"] == len(events)
        assert [len(t) for t in tokens(outs)] == list(MAX_TOKENS)
        runs.append((slots, sorted(set(events))))
        diffs += [dict(pool=slots, prompt_len=n, preemptions=o["num_preemptions"], got=o["token_ids"], roomy=r)
                  for n, o, r in zip(LENGTHS, outs, ref) if o["token_ids"] != r]
        assert_no_leak(llm, f"{method} after generate on a pool of {slots} slots")
    assert any(ev for _, ev in runs), f"{method}: no pool in {[s for s, _ in runs]} slots preempted"
    assert not diffs, (f"{method}: tokens differ after preemption; preemptions per pool (slots, "
                       f"[(prompt_len, phase)]): {runs}; differing requests: {diffs}")


# ---------------------------------------------------------------------------------------------- 6
class StepLedger:
    """Per engine step: the slots the scheduler reserved (sum of the `slots_needed(seq, n)` it computed
    for each scheduled (seq, n)) and the peak number of slots allocated in the step and not yet freed
    again (scratch freed after use does not count twice). A step runs from `schedule()` to the next."""

    def __init__(self, llm: LLM):
        pool, method, sched = llm.pool, llm.method, llm.scheduler
        self.steps: list[dict] = []
        self.cur: dict | None = None
        self.mine = torch.zeros(pool.refcount.numel(), dtype=torch.bool)  # allocated in this step, still live
        needs: dict[int, tuple[int, int]] = {}
        in_schedule = [False]
        o_alloc, o_free, o_needed, o_sched = pool.allocate, pool.free, method.slots_needed, sched.schedule

        def slots_needed(seq, n):
            need = o_needed(seq, n)
            if in_schedule[0] and seq is not None:
                needs[id(seq)] = (n, need)
            return need

        def schedule():
            self.close()
            needs.clear()
            in_schedule[0] = True
            try:
                batch = o_sched()
            finally:
                in_schedule[0] = False
            reserved = 0
            for seq, n in batch:
                got = needs.get(id(seq))
                assert got is not None and got[0] == n, f"scheduled ({seq.seq_id}, {n}) without slots_needed({n})"
                reserved += got[1]
            self.mine.zero_()
            self.cur = dict(step=len(self.steps), reserved=reserved, live=0, peak=0, allocated=0,
                            ev_seen=method.reclaimable(), ev_grown=0,
                            batch=[(s.seq_id, s.num_computed, n) for s, n in batch])
            return batch

        def evictable():
            # slots a method grows as evictable caches (`reclaimable`, taken only from surplus and
            # reclaimed before anything waits) are not reservations: counted apart
            now = method.reclaimable()
            if now > self.cur["ev_seen"]:
                self.cur["ev_grown"] += now - self.cur["ev_seen"]
            self.cur["ev_seen"] = now

        def allocate(n):
            slots = o_alloc(n)
            if self.cur is not None:
                self.mine[slots.reshape(-1)] = True
                self.cur["live"] += n
                self.cur["allocated"] += n
                evictable()
                self.cur["peak"] = max(self.cur["peak"], self.cur["live"] - self.cur["ev_grown"])
            return slots

        def free(slots):
            o_free(slots)
            if self.cur is not None and slots.numel():
                s = slots.reshape(-1).unique()
                gone = s[self.mine[s] & (pool.refcount[s] == 0)]
                self.mine[gone] = False
                self.cur["live"] -= len(gone)
                evictable()

        method.slots_needed, sched.schedule, pool.allocate, pool.free = slots_needed, schedule, allocate, free

    def close(self):
        if self.cur is not None:
            self.steps.append(self.cur)
            self.cur = None

    def violations(self) -> list[dict]:
        self.close()
        return [s for s in self.steps if s["peak"] > s["reserved"]]


@pytest.mark.parametrize("workload", ["generate", "generate-tight-pool", "session"])
@pytest.mark.parametrize("method", ALL)
def test_slots_needed_is_an_upper_bound(tiny, method, workload):
    over = {}
    if workload == "generate-tight-pool":
        probe = make_llm(tiny, method)
        need = max(probe.method.max_slots(n + m) for n, m in zip(LENGTHS, MAX_TOKENS))
        over = budget_for(probe, need)
    llm = make_llm(tiny, method, **over)
    ledger = StepLedger(llm)
    if workload == "session":
        ctx, turns, sps = _session_inputs()
        llm.generate_session(ctx, turns, sps, accumulate=True)
        llm.generate_session(ctx, turns, sps, accumulate=False)
    else:
        llm.generate(prompts(), params(), use_tqdm=False)
    bad = ledger.violations()
    assert ledger.steps and any(s["allocated"] for s in ledger.steps)
    assert not bad, (f"{method}/{workload}: {len(bad)} of {len(ledger.steps)} steps allocated more slots than "
                     f"slots_needed reserved; first: {bad[:3]}")


# ---------------------------------------------------------------------------------------------- 7
def _session_inputs():
    g = torch.Generator().manual_seed(11)
    ctx = torch.randint(3, 256, (200,), generator=g).tolist()
    turns = [[], torch.randint(3, 256, (5,), generator=g).tolist(), [9, 10, 11]]
    sps = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (3, 7, 5)]
    return ctx, turns, sps


@pytest.mark.parametrize("accumulate", [True, False], ids=["accumulate", "forked-turns"])
@pytest.mark.parametrize("method", ALL)
def test_session_runs_and_frees(tiny, method, accumulate):
    ref = reference_tokens(tiny, method)
    llm = make_llm(tiny, method)
    ctx, turns, sps = _session_inputs()
    outs = llm.generate_session(ctx, turns, sps, accumulate=accumulate)
    assert [len(o["token_ids"]) for o in outs] == [sp.max_tokens for sp in sps]
    assert llm.kv_stats()["session_reused_tokens"] >= len(ctx) * len(turns)
    assert_no_leak(llm, f"{method} after generate_session(accumulate={accumulate})")
    again = llm.generate_session(ctx, turns, sps, accumulate=accumulate)
    assert tokens(again) == tokens(outs), f"{method}: the same session twice gave different tokens"
    assert tokens(llm.generate(prompts(), params(), use_tqdm=False)) == ref  # the engine is unharmed
    assert_no_leak(llm, f"{method} after sessions + generate")
