"""DeltaKV's end-of-step frees under a raised exception (issue 17).

A real SIGINT is held until a step completes (`deferred_sigint`), but an exception RAISED inside
DeltaKV's per-step work leaked: the latent rows of the layers compressed before a failing
compression call (stored, not yet recorded), the scratch of every group after the first when one
scratch free raised, and a layer's compressed slots when their free raised (table left pointing at
freed slots, other layers not compressed). Each test injects one exception, expects the failed
`generate` to raise it, and checks that every slot and latent row comes back and the engine still
gives the uninterrupted tokens.
"""

from __future__ import annotations

import pytest

from sparse_engine import SamplingParams
from test_faults_engine import make, prompts, resources, toks

SPS = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (12, 9, 14, 7)]


class Injected(RuntimeError):
    pass


@pytest.fixture(scope="module")
def tiny(tiny_model_factory):
    return str(tiny_model_factory("llama"))


def _check_recovers(llm, tiny, ps, before, **over):
    assert resources(llm) == before
    fresh = make(tiny, "deltakv", **over).generate(ps, SPS, use_tqdm=False)
    assert toks(llm.generate(ps, SPS, use_tqdm=False)) == toks(fresh)
    assert resources(llm) == before


def test_compression_call_raising_leaks_no_latent_rows(tiny):
    """The second sparse layer's `encode` raises once: nothing of that compression stays stored
    (every layer is encoded before one store call) and earlier compressions' rows go back with
    their sequences."""
    llm = make(tiny, "deltakv")
    ps = prompts(4)
    before = resources(llm)
    pair = llm.method.compressor[llm.method.sparse[1]]
    orig, fired = pair.encode, []

    def encode(*a, **k):
        if not fired:
            fired.append(llm.method.store.mem.used)  # rows stored by the layers before this one
            raise Injected("encode failed")
        return orig(*a, **k)

    pair.encode = encode
    with pytest.raises(Injected):
        llm.generate(ps, SPS, use_tqdm=False)
    pair.encode = orig
    assert fired
    _check_recovers(llm, tiny, ps, before)


@pytest.mark.parametrize("where", ["end_step", "after_step"])
def test_a_free_raising_in_the_step_end_frees_the_rest(tiny, where):
    """`pool.free` raises once, after doing its work (an error on the way out), inside DeltaKV's
    end-of-step frees: scratch of several groups (`end_step`) or the compressed slots of several
    sparse layers (`after_step`). Every other free still happens; nothing is freed twice."""
    llm = make(tiny, "deltakv", chunk_prefill_size=32)
    ps = prompts(4, lengths=(140, 20, 97, 75))
    before = resources(llm)
    m, pool = llm.method, llm.pool
    inside, fired, orig_free = [0], [], pool.free
    orig_hook = getattr(m, where)

    def hook(*a, **k):
        if where == "end_step":
            groups = [gp for gp in (a[0].method_data or {}).values() if gp is not None and gp.scratch_real is not None]
            inside[0] = len(groups)  # armed only when several groups hold scratch
        else:
            inside[0] = len(m.sparse)
        try:
            return orig_hook(*a, **k)
        finally:
            inside[0] = 0

    def free(slots):
        orig_free(slots)
        if inside[0] >= 2 and not fired:
            fired.append(1)
            raise Injected(f"free failed in {where}")

    setattr(m, where, hook)
    pool.free = free
    with pytest.raises(Injected):
        llm.generate(ps, SPS, use_tqdm=False)
    setattr(m, where, orig_hook)
    pool.free = orig_free
    assert fired
    _check_recovers(llm, tiny, ps, before, chunk_prefill_size=32)
