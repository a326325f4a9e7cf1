"""SparseX: segment store, RoPE re-alignment, Sparse-Q selective recomputation (tiny random models)."""

from __future__ import annotations

import pytest
import torch

from sparse_engine import LLM, SamplingParams
from sparse_engine.cache.segment_store import SegmentStore, rerotate
from sparse_engine.layers.rotary import apply_rope, rope_cos_sin

POOL = 1 << 25


@pytest.fixture(scope="module")
def tiny(tiny_model_factory):
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def parts():
    g = torch.Generator().manual_seed(3)
    r = lambda n: torch.randint(3, 256, (n,), generator=g).tolist()  # noqa: E731
    return {"sys": r(24), "docs": [r(70) for _ in range(4)], "q": r(12)}


def _sp(n=6):
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, return_logits=True)


def _prime(llm, parts):
    d = parts["docs"]
    llm.generate([parts["q"], parts["q"]], _sp(1), use_tqdm=False,
                 segments=[[parts["sys"], d[0], d[1]], [parts["sys"], d[2], d[3]]])


def _max_logit_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a["logits"], b["logits"]))


def test_rerotate_equals_rope_at_new_positions():
    g = torch.Generator().manual_seed(0)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
    k_pre = torch.randn(50, 3, 64, generator=g)
    old = torch.arange(900, 950)
    new = torch.arange(17, 67)
    k_old = apply_rope(k_pre, *rope_cos_sin(inv_freq, old))
    k_new = apply_rope(k_pre, *rope_cos_sin(inv_freq, new))
    torch.testing.assert_close(rerotate(k_old, old, new, inv_freq), k_new, atol=2e-5, rtol=1e-5)
    # an attention scaling (YaRN-like) inside k passes through unchanged
    k_old_s = apply_rope(k_pre, *rope_cos_sin(inv_freq, old, 1.3))
    torch.testing.assert_close(rerotate(k_old_s, old, new, inv_freq), apply_rope(k_pre, *rope_cos_sin(inv_freq, new, 1.3)),
                               atol=3e-5, rtol=1e-5)


def _prefill_only(llm, prompt, segments):
    """Run the prefill step of one request; return (seq, per-layer [Hkv, P] K of the prompt)."""
    seq = llm.add_request(prompt, _sp(4), segments=segments)
    llm.step()
    P = seq.num_prompt_tokens
    ks = [llm.pool.k[t.slots[:, :P]].clone() for t in seq.kv.tables]
    pos = [llm.pool.pos[t.slots[:, :P]].clone() for t in seq.kv.tables]
    while llm.scheduler.has_work():
        llm.step()
    return seq, ks, pos


def test_reused_k_realigned_equals_k_computed_there(tiny, parts):
    """Layer 0 K does not depend on context: a reused segment's K, re-rotated to its new positions,
    must equal the K full computation writes there (naive reuse: nothing recomputed)."""
    d = parts["docs"]
    segs = [parts["sys"], d[3], d[0]]
    van = LLM(tiny, dtype="float32", kv_cache_bytes=POOL)
    _, k_ref, pos_ref = _prefill_only(van, parts["q"], segs)
    sx = LLM(tiny, method="sparsex", dtype="float32", kv_cache_bytes=POOL, recompute_ratio=0.0,
             full_recompute_layers=0, num_first_tokens=0)
    _prime(sx, parts)
    seq, k, pos = _prefill_only(sx, parts["q"], segs)
    assert sx.kv_stats()["sparsex_reused_tokens"] == 140 and sx.kv_stats()["sparsex_recomputed_tokens"] == 0
    assert torch.equal(pos[0], pos_ref[0])
    torch.testing.assert_close(k[0], k_ref[0], atol=2e-5, rtol=1e-5)
    # upper layers of reused tokens carry their old context: they differ (that is what Sparse-Q fixes)
    assert float((k[-1] - k_ref[-1]).abs().max()) > 1e-3


def test_recompute_ratio_one_equals_full_recomputation(tiny, parts):
    d = parts["docs"]
    segs = [[parts["sys"], d[3], d[0]], [parts["sys"], d[1], d[2], d[0]]]
    van = LLM(tiny, dtype="float32", kv_cache_bytes=POOL)
    ref = van.generate([parts["q"], parts["q"]], _sp(), use_tqdm=False, segments=segs)
    sx = LLM(tiny, method="sparsex", dtype="float32", kv_cache_bytes=POOL, recompute_ratio=1.0)
    _prime(sx, parts)
    out = sx.generate([parts["q"], parts["q"]], _sp(), use_tqdm=False, segments=segs)  # one batch, two plans
    st = sx.kv_stats()
    assert st["sparsex_prefix_tokens"] == 2 * 24 and st["sparsex_reused_tokens"] == 140 + 210
    assert st["sparsex_recomputed_tokens"] == st["sparsex_reused_tokens"]
    for o, r in zip(out, ref):
        assert o["token_ids"] == r["token_ids"]
        assert _max_logit_diff(o, r) < 1e-4


def test_partial_recompute_between_naive_and_full(tiny, parts):
    d = parts["docs"]
    segs = [[parts["sys"], d[3], d[0]], [parts["sys"], d[1], d[2]], [parts["sys"], d[2], d[1], d[3]]]
    qs = [parts["q"]] * 3
    ref = LLM(tiny, dtype="float32", kv_cache_bytes=POOL).generate(qs, _sp(1), use_tqdm=False, segments=segs)
    errs = {}
    for ratio in (0.0, 0.5, 1.0):
        sx = LLM(tiny, method="sparsex", dtype="float32", kv_cache_bytes=POOL, recompute_ratio=ratio)
        _prime(sx, parts)
        out = sx.generate(qs, _sp(1), use_tqdm=False, segments=segs)
        st = sx.kv_stats()
        reused, recomputed = st["sparsex_reused_tokens"], st["sparsex_recomputed_tokens"]
        n_first = 2 * 6  # 2 first tokens of each reused segment ([sys, d2] of the last request is a prefix hit)
        assert reused == 6 * 70 and st["sparsex_prefix_tokens"] == 3 * 24 + 70
        assert recomputed == {0.0: n_first, 0.5: reused // 2, 1.0: reused}[ratio]
        errs[ratio] = sum(_max_logit_diff(o, r) for o, r in zip(out, ref))
    assert errs[1.0] < 1e-4 < errs[0.5] < errs[0.0]


def test_exact_prefix_reuse_is_prefix_caching(tiny, parts):
    """The same segments in the same order: every segment is shared as it is (no recomputation)."""
    segs = [parts["sys"], parts["docs"][0], parts["docs"][1]]
    ref = LLM(tiny, dtype="float32", kv_cache_bytes=POOL).generate(parts["q"], _sp(), use_tqdm=False, segments=segs)
    sx = LLM(tiny, method="sparsex", dtype="float32", kv_cache_bytes=POOL, recompute_ratio=0.0,
             full_recompute_layers=0, num_first_tokens=0)
    sx.generate(parts["q"], _sp(1), use_tqdm=False, segments=segs)
    used_before = sx.pool.num_used
    out = sx.generate(parts["q"], _sp(), use_tqdm=False, segments=segs)
    st = sx.kv_stats()
    assert st["sparsex_prefix_tokens"] == 24 + 140 and st["sparsex_reused_tokens"] == 0
    assert out["token_ids"] == ref["token_ids"] and _max_logit_diff(out, ref) < 1e-4
    assert sx.pool.num_used == used_before  # shared slots: nothing new stays allocated


def test_separator_token_segments_and_chunked_fallback(tiny, parts):
    sep = 1
    d = parts["docs"]
    first = d[0] + [sep] + d[1] + [sep] + parts["q"]
    second = d[1] + [sep] + d[0] + [sep] + parts["q"]
    ref = LLM(tiny, dtype="float32", kv_cache_bytes=POOL).generate(second, _sp(), use_tqdm=False)
    sx = LLM(tiny, method="sparsex", dtype="float32", kv_cache_bytes=POOL, separator_token_id=sep,
             recompute_ratio=1.0)
    sx.generate(first, _sp(1), use_tqdm=False)
    assert sx.kv_stats()["segment_store_entries"] == 2
    out = sx.generate(second, _sp(), use_tqdm=False)
    assert sx.kv_stats()["sparsex_reused_tokens"] == 142
    assert out["token_ids"] == ref["token_ids"] and _max_logit_diff(out, ref) < 1e-4
    # a prompt longer than one step's token budget is chunked: no reuse, still the right answer
    small = LLM(tiny, method="sparsex", dtype="float32", kv_cache_bytes=POOL, separator_token_id=sep,
                recompute_ratio=0.0, max_num_batched_tokens=64, chunk_prefill_size=64)
    small.generate(first, _sp(1), use_tqdm=False)
    out = small.generate(second, _sp(), use_tqdm=False)
    assert small.kv_stats()["sparsex_reused_tokens"] == 0
    assert out["token_ids"] == ref["token_ids"] and _max_logit_diff(out, ref) < 1e-4


def test_store_eviction_respects_byte_budget(tiny, parts):
    g = torch.Generator().manual_seed(9)
    probe = LLM(tiny, method="sparsex", dtype="float32", kv_cache_bytes=POOL)
    per_seg = probe.method.store.entry_bytes(40)
    budget = 3 * per_seg + per_seg // 2  # room for three 40-token segments
    sx = LLM(tiny, method="sparsex", dtype="float32", kv_cache_bytes=POOL, store_bytes=budget, recompute_ratio=0.3)
    store = sx.method.store
    segs_seen = []
    for i in range(6):
        seg = torch.randint(3, 256, (40,), generator=g).tolist()
        segs_seen.append(seg)
        reuse = segs_seen[max(0, i - 2)]
        sx.generate(parts["q"], _sp(2), use_tqdm=False, segments=[reuse, seg] if reuse is not seg else [seg])
        assert store.nbytes <= budget and store.nbytes == len(store) * per_seg
    assert store.num_evictions >= 3 and len(store) == 3
    assert store.num_hits >= 4
    # nothing leaks: with no request running the pool holds exactly the store's slots
    held = torch.cat([e.all_slots() for e in store.entries.values()]).unique()
    assert sx.pool.num_used == len(held) == 3 * 40 * sx.spec.num_layers * sx.spec.num_kv_heads
    store.clear()
    assert sx.pool.num_used == 0 and store.nbytes == 0
    # a segment larger than the whole budget is not stored
    st = SegmentStore(sx.pool, per_seg - 1, sx.spec.num_layers, sx.spec.num_kv_heads)
    slots = [sx.pool.allocate(2 * 40).view(2, 40) for _ in range(sx.spec.num_layers)]
    assert not st.put("k", 0, "c", True, slots) and st.nbytes == 0


def test_store_gives_way_when_pool_is_short(tiny, parts):
    probe = LLM(tiny, dtype="float32", kv_cache_bytes=POOL)
    per_token = probe.kv_stats()["bytes_per_token"]
    sx = LLM(tiny, method="sparsex", dtype="float32", kv_cache_bytes=400 * per_token, store_bytes=1 << 30)
    g = torch.Generator().manual_seed(5)
    for _ in range(4):  # each request stores ~220 tokens; the pool holds 400
        docs = [torch.randint(3, 256, (110,), generator=g).tolist() for _ in range(2)]
        sx.generate(parts["q"], _sp(2), use_tqdm=False, segments=docs)
    assert sx.kv_stats()["segment_store_evictions"] >= 2


def test_composes_with_omnikv_decode(tiny, parts, monkeypatch):
    """SparseX prefill + OmniKV sparse decode; ratio 1 equals plain OmniKV."""
    from sparse_engine.cache import registry
    from sparse_engine.cache.omnikv import OmniKVCache
    from sparse_engine.cache.sparsex import sparsex_over

    monkeypatch.setitem(registry.METHODS, "sparsex+omnikv", sparsex_over(OmniKVCache))
    omni = dict(full_attn_layers=[0, 1], num_top_tokens=32, sink_size=2, recent_size=4)
    d = parts["docs"]
    segs = [parts["sys"], d[3], d[0]]
    ref = LLM(tiny, method="omnikv", dtype="float32", kv_cache_bytes=POOL, **omni).generate(
        parts["q"], _sp(), use_tqdm=False, segments=segs)
    sx = LLM(tiny, method="sparsex+omnikv", dtype="float32", kv_cache_bytes=POOL, recompute_ratio=1.0, **omni)
    _prime(sx, parts)
    out = sx.generate(parts["q"], _sp(), use_tqdm=False, segments=segs)
    assert sx.kv_stats()["sparsex_reused_tokens"] == 140
    assert out["token_ids"] == ref["token_ids"] and _max_logit_diff(out, ref) < 1e-4
    with pytest.raises(ValueError, match="full_attn_layers"):
        LLM(tiny, method="sparsex+omnikv", dtype="float32", kv_cache_bytes=POOL, full_attn_layers=[1])


def test_config_validation(tiny):
    with pytest.raises(ValueError, match="recompute_ratio"):
        LLM(tiny, method="sparsex", dtype="float32", kv_cache_bytes=POOL, recompute_ratio=1.5)
    with pytest.raises(ValueError, match="full_recompute_layers >= 1"):
        LLM(tiny, method="sparsex", dtype="float32", kv_cache_bytes=POOL, full_recompute_layers=0)
    with pytest.raises(ValueError, match="full_recompute_layers"):
        LLM(tiny, method="sparsex", dtype="float32", kv_cache_bytes=POOL, full_recompute_layers=9)
    with pytest.raises(TypeError, match="no knob"):
        from sparse_engine.cache.sparsex import SparseXCache
        SparseXCache.make_config(ratio=0.1)
