"""DeltaKV's reconstruction cache across decode steps (`reuse_reconstructed`): the column assignment
against a naive LRU written here, and the engine with the cache against the engine without it
(exact: a reconstructed token never changes). The every-method checks (batch invariance,
interrupts, preemption, `slots_needed` bound, sessions) run it as the variant `deltakv:reuse` in
`tests/test_every_method.py`."""

from __future__ import annotations

import random

import pytest
import torch

from deltakv.testing import tiny_compressor
from sparse_engine import LLM, SamplingParams
from sparse_engine.cache import deltakv_recon_cache as rc
from sparse_engine.presets import preset


def naive_lru(cache: list[list], sel: list[int], now: int) -> tuple[dict, set]:
    """One row: cache = [[pos, stamp], ...] per column (pos -1 empty). Selected positions already
    cached keep their column; misses, in selection order, take the free columns (not read this step)
    least recently read first, ties by column index. Returns {pos: column}, the missed positions."""
    where = {p: c for c, (p, _) in enumerate(cache) if p >= 0}
    got = {p: where[p] for p in sel if p in where}
    free = sorted((cache[c][1], c) for c in range(len(cache)) if c not in got.values())
    misses = [p for p in sel if p not in where]
    for p, (_, c) in zip(misses, free):
        got[p] = c
        cache[c][0] = p
    for c in got.values():
        cache[c][1] = now
    return got, set(misses)


@pytest.mark.parametrize("seed", range(4))
def test_assignment_equals_a_naive_lru(seed):
    rnd = random.Random(seed)
    G, caps, w = 3, [12, 9, 16], 8
    C = max(caps)
    cpos = torch.full((G, C), -1, dtype=torch.long)
    stamp = torch.full((G, C), -1, dtype=torch.long)
    naive = [[[-1, -1] for _ in range(cap)] for cap in caps]
    pool = list(range(40))
    for now in range(1, 30):
        sels = [sorted(rnd.sample(pool[: 10 + now], rnd.randint(0, w))) for _ in range(G)]
        li = torch.zeros(G, w, dtype=torch.long)
        lvalid = torch.zeros(G, w, dtype=torch.bool)
        rpos = torch.zeros(G, w, dtype=torch.long)
        for g, sel in enumerate(sels):
            lvalid[g, : len(sel)] = True
            rpos[g, : len(sel)] = torch.tensor(sel, dtype=torch.long)
            li[g, : len(sel)] = torch.tensor(sel, dtype=torch.long) + 100  # any payload, carried to the misses
        a = rc.assign(cpos, stamp, now, caps, li, lvalid, rpos, p_max=64)
        for g, sel in enumerate(sels):
            want, missed = naive_lru(naive[g], sel, now)
            assert cpos[g, : caps[g]].tolist() == [p for p, _ in naive[g]], f"step {now} row {g}: cached positions"
            assert stamp[g, : caps[g]].tolist() == [s for _, s in naive[g]], f"step {now} row {g}: stamps"
            m = int(a.valid[g].sum())
            assert sorted(a.pos[g, :m].tolist()) == sorted(missed)
            assert a.valid[g, m:].sum() == 0
            assert {int(p): int(c) for p, c in zip(a.pos[g, :m], a.col[g, :m])} == {p: want[p] for p in missed}
            assert (a.li[g, :m] == a.pos[g, :m] + 100).all()  # the misses' own payload
            assert sorted(torch.nonzero(a.used[g]).flatten().tolist()) == sorted(want.values())


SP = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
KNOBS = dict(dtype="float32", chunk_prefill_size=32, kv_cache_bytes=1 << 24, latent_dtype="int8", recent_size=8,
             num_top_tokens=12, decode_compress_block=4)


def _prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 250, (n,), generator=g).tolist() for n in (90, 140, 60)]


@pytest.fixture(scope="module")
def tiny(tiny_model_factory):
    return str(tiny_model_factory("llama"))


def _run(tiny, **over):
    llm = LLM(tiny, method="deltakv", deltakv_path=tiny_compressor(latent=16, seed=0), **{**KNOBS, **over})
    return llm, llm.generate(_prompts(), SP, use_tqdm=False)


@pytest.mark.parametrize("factor,preset_name", [(1.0, None), (2.0, None), (1.5, "paper"), (1.5, "latest")])
def test_reuse_gives_the_same_tokens_with_fewer_reconstructions(tiny, factor, preset_name):
    knobs = preset(preset_name, "deltakv") if preset_name else {}
    base, ref = _run(tiny, **knobs)
    llm, outs = _run(tiny, reuse_reconstructed=True, reconstructed_cache_factor=factor, **knobs)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
    st, st0 = llm.kv_stats(), base.kv_stats()
    assert st["reconstruct_cache_hits"] > 0
    assert st["reconstructed_tokens"] < st0["reconstructed_tokens"]
    assert st["slots_used"] == 0 and st["reconstruct_cache_slots"] == 0  # released with the sequences
    assert int((llm.pool.refcount != 0).sum()) == 0


def test_cache_bytes_are_counted(tiny):
    """Mid-decode, a sequence's kv_bytes with the cache = without + (its cache columns x sparse layers
    x KV heads) full-precision slots; the columns = min(ceil(factor x top-k), compressed tokens)."""
    prompt = _prompts()[1]
    got = {}
    for reuse in (False, True):
        llm = LLM(tiny, method="deltakv", deltakv_path=tiny_compressor(latent=16, seed=0), reuse_reconstructed=reuse,
                  reconstructed_cache_factor=1.5, **KNOBS)
        seq = llm.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
        for _ in range(len(prompt) // 32 + 4):
            llm.step()
        got[reuse] = (llm.method.kv_bytes(seq), seq.kv.state.num_latent)
    (b0, nl), (b1, _) = got[False], got[True]
    spec = llm.spec
    assert nl > KNOBS["num_top_tokens"]  # selecting a strict subset: the cache is on
    cols = min(-(-KNOBS["num_top_tokens"] * 3 // 2), nl)
    sparse = spec.num_layers - 1  # the tiny compressor keeps layer 0 full
    assert b1 - b0 == cols * sparse * spec.num_kv_heads * llm.pool.bytes_per_slot


def test_factor_is_validated(tiny):
    with pytest.raises(ValueError, match="reconstructed_cache_factor"):
        LLM(tiny, method="deltakv", deltakv_path=tiny_compressor(latent=16, seed=0), reuse_reconstructed=True,
            reconstructed_cache_factor=0.5, **KNOBS)


@pytest.mark.parametrize("kv_cache_bytes,drops", [(180_000, True), (220_000, None), (4_000_000, False)])
def test_caches_are_evictable_under_a_tight_budget(tiny, kv_cache_bytes, drops):
    """The caches take only slots nobody needs and are reclaimed before a sequence waits or is
    preempted: every budget that serves the requests without the cache serves them with it (before,
    the cache counted in `max_slots`, so 180,000 bytes refused the 140-token request, and it grew
    into the slots of the sequences it was meant to speed up), with no more preemptions and the
    same tokens; caches are dropped when room runs out and used when there is room."""
    over = dict(kv_cache_bytes=kv_cache_bytes, admission="chunk")  # prompts started early: room runs out
    base, ref = _run(tiny, **over)
    llm, outs = _run(tiny, reuse_reconstructed=True, **over)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
    assert llm.scheduler.num_preemptions <= base.scheduler.num_preemptions
    st = llm.kv_stats()
    assert st["reconstruct_cache_hits"] > 0
    if drops is not None:  # 180,000: room runs out while caches are held; 4 MB: it never does
        assert (st["reconstruct_caches_dropped"] > 0) == drops
    assert st["slots_used"] == 0 and st["reconstruct_cache_slots"] == 0
    assert int((llm.pool.refcount != 0).sum()) == 0
