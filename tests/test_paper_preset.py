"""The reference's serving rules as named options, and `preset=paper` (issue 15, item 1).

Each rule is checked against a hand-written implementation of the REFERENCE's rule in this file
(naive loops over heads / queries / tokens, written from CURRENTF/Sparse-vLLM@0975d3f, the engine as
the paper ran it, and @18d3104, its latest engine), on small tensors taken from a running engine:

* which history tokens are picked, per `score_mode` (raw_qk: raw q.k, mean over the chunk's queries
  with invisible keys counting 0, max over heads; softmax_candidates: softmax over the candidates
  only, max over heads; softmax_all: ours), for OmniKV and DeltaKV, in prefill and decode;
* where the prototypes fall (`proto_grid`: per eviction block vs one global grid) and which tokens
  stay exact (`exact_window`: multiples of the recent window vs exactly `recent_size`), simulated
  step by step as the reference's `_deltakv_evict_one_seq` does;
* the paper preset end to end: runs, batched == per-sequence, lossless with an identity compressor;
* the preset's YAML (conf/preset_method) equals `sparse_engine.presets`.
"""

from __future__ import annotations

import math

import pytest
import torch

from deltakv.reference import ReferenceSpec
from deltakv.testing import tiny_compressor
from sparse_engine import LLM, SamplingParams
from sparse_engine.presets import PRESETS, preset

COMMON = dict(dtype="float32", chunk_prefill_size=32, kv_cache_bytes=1 << 24)
SP = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tiny_model_factory):
    return str(tiny_model_factory("llama"))


def prompts(lengths=(70, 45), seed=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 250, (n,), generator=g).tolist() for n in lengths]


# ------------------------------------------------------------------ the reference's scores, by hand
def reference_scores(mode: str, q, q_pos, k, kpos, cand, scale):
    """q [n, Hq, D], k [Hkv, T, D], kpos [T], cand [T] bool. One score per key, naive loops."""
    n, hq, _ = q.shape
    hkv, T = k.shape[0], k.shape[1]
    g = hq // hkv
    out = [-math.inf] * T
    for h in range(hq):
        kh = k[h // g]
        if mode == "raw_qk":  # mean over the chunk's queries (invisible keys: 0), then max over heads
            for t in range(T):
                total = 0.0
                for i in range(n):
                    if kpos[t] <= q_pos[i]:
                        total += float(q[i, h] @ kh[t]) * scale
                out[t] = max(out[t], total / n)
            continue
        for i in range(n):
            cols = [t for t in range(T) if kpos[t] <= q_pos[i] and (mode == "softmax_all" or cand[t])]
            logits = torch.tensor([float(q[i, h] @ kh[t]) * scale for t in cols], dtype=torch.float64)
            probs = torch.softmax(logits, 0) if cols else logits
            for t, p in zip(cols, probs.tolist()):
                out[t] = max(out[t], p)
    return torch.tensor(out, dtype=torch.float64)


def reference_pick(mode, q, q_pos, k, kpos, cand, scale, top):
    s = reference_scores(mode, q, q_pos, k, kpos, cand, scale).masked_fill(~cand, -math.inf)
    return set(s.topk(top).indices.tolist())


class Recorder:
    """Wraps a method's per-sequence `observe`: records (q, q_pos, keys, positions, start) at every
    observation layer call, and the selection it made (positions)."""

    def __init__(self, method, selection_of):
        self.calls, self.method, self.selection_of = [], method, selection_of
        orig = method.observe

        def observe(seq, layer, q, q_pos, view):
            orig(seq, layer, q, q_pos, view)
            if layer in method.observers:
                k, kpos = method.pool.k[view.slots].clone(), method.pool.pos[view.slots].clone()
                valid = view.valid.to(kpos.device)
                self.calls.append(dict(q=q.clone(), q_pos=q_pos.clone(), k=k[:, valid[0]], kpos=kpos[0][valid[0]],
                                       start=seq.num_computed, prompt=seq.num_prompt_tokens,
                                       upto=getattr(getattr(seq.kv, "state", None), "compressed_upto", None),
                                       sel=self.selection_of(seq, layer, kpos[0][valid[0]])))

        method.observe = observe


def _omnikv_selection(seq, layer, kpos):
    cols = seq.kv.state["cols"][layer]
    return None if cols is None else set(kpos[cols].tolist())


def _deltakv_selection(seq, layer, kpos):
    sel = seq.kv.state.sel.get(layer)
    return None if sel is None else set(sel.tolist())


@pytest.mark.parametrize("mode", ["raw_qk", "softmax_candidates", "softmax_all"])
def test_omnikv_selection_per_score_mode_equals_the_reference_rule(tiny, mode):
    """OmniKV's picks at prefill chunks and decode steps = the hand-computed rule (history =
    [sink, start - recent), + 1 at decode with recent_includes_current)."""
    llm = LLM(tiny, method="omnikv", full_attn_layers=[0], num_top_tokens=6, num_top_tokens_in_prefill=9,
              sink_size=3, recent_size=5, score_mode=mode, recent_includes_current=True, **COMMON)
    llm.method.batched = lambda plan: False
    rec = Recorder(llm.method, _omnikv_selection)
    llm.generate(prompts(), SP, use_tqdm=False)
    checked = {"prefill": 0, "decode": 0}
    for c in rec.calls:
        decode = c["start"] >= c["prompt"]
        hi = c["start"] - 5 + (1 if decode else 0)
        cand = (c["kpos"] >= 3) & (c["kpos"] < hi)
        top = 6 if decode else 9
        if int(cand.sum()) <= top:
            assert c["sel"] is None
            continue
        want = reference_pick(mode, c["q"], c["q_pos"], c["k"], c["kpos"], cand, llm.method.scale, top)
        picked = c["sel"] - set(c["kpos"][~cand].tolist())
        assert picked == {int(c["kpos"][i]) for i in want}, (mode, c["start"])
        checked["decode" if decode else "prefill"] += 1
    assert checked["prefill"] >= 2 and checked["decode"] >= 8


@pytest.mark.parametrize("mode", ["raw_qk", "softmax_candidates"])
def test_deltakv_selection_per_score_mode_equals_the_reference_rule(tiny, mode):
    """DeltaKV (paper rules): candidates = the compressed region [sinks, compressed_upto) (the
    reference's `get_compressed_lens`), every prefill chunk selects (`always`), picks = the
    hand-computed rule."""
    knobs = {**preset("paper", "deltakv"), "score_mode": mode}
    llm = LLM(tiny, method="deltakv", deltakv_path=tiny_compressor(latent=24, seed=5), latent_dtype="float32",
              num_top_tokens=6, num_top_tokens_in_prefill=9, recent_size=6, **knobs, **COMMON)
    llm.method.batched = lambda plan: False
    rec = Recorder(llm.method, _deltakv_selection)
    llm.generate(prompts(), SP, use_tqdm=False)
    checked = {"prefill": 0, "decode": 0}
    for c in rec.calls:
        decode = c["start"] >= c["prompt"]
        cand = (c["kpos"] >= 4) & (c["kpos"] < c["upto"])
        top = 6 if decode else 9
        if int(cand.sum()) <= top:
            assert c["sel"] is None
            continue
        want = reference_pick(mode, c["q"], c["q_pos"], c["k"], c["kpos"], cand, llm.method.scale, top)
        assert c["sel"] == {int(c["kpos"][i]) for i in want}, (mode, c["start"])
        checked["decode" if decode else "prefill"] += 1
    assert checked["prefill"] >= 1 and checked["decode"] >= 8


def test_long_prompt_gate_and_never():
    """prefill_select: the paper's OmniKV selects in prefill only past sinks + recent + top + chunk;
    the latest engine never; ours with num_top_tokens_in_prefill."""
    from types import SimpleNamespace

    from sparse_engine.cache.scoring import step_budget

    cfg = SimpleNamespace(num_top_tokens=10, num_top_tokens_in_prefill=None, recent_size=5, prefill_select="long_prompt")
    assert step_budget(cfg, False, 3 + 5 + 10 + 32, 3, 32) is None  # = threshold: short text
    assert step_budget(cfg, False, 3 + 5 + 10 + 33, 3, 32) == 10  # longer: top in prefill = top
    assert step_budget(cfg, True, 20, 3, 32) == 10
    cfg.prefill_select = "never"
    assert step_budget(cfg, False, 10_000, 3, 32) is None
    cfg.prefill_select, cfg.num_top_tokens_in_prefill = "budget", None
    assert step_budget(cfg, False, 10_000, 3, 32) is None
    cfg.prefill_select = "always"
    assert step_budget(cfg, False, 10, 3, 32) == 10


# ------------------------------------------------------------------ prototypes and the exact window
def reference_layout(total_steps, sinks, stride, recent, per_block: bool, blocks: bool, block=1):
    """After each step (token counts given), the positions a sparse layer holds exact, simulated as
    the reference evicts (blocks / per_block) or as ours (fixed window / global grid)."""
    held, compressed_upto, out, prev = [], 0, [], 0
    for total, is_decode in total_steps:
        held, prev = held + list(range(prev, total)), total
        base = max(compressed_upto, sinks)
        if blocks:
            buf = total - base
            evict = (buf - recent) // recent * recent if buf > recent else 0
            boundary = base + evict if evict > 0 else None
        else:
            boundary = total - recent
            if boundary <= sinks or (is_decode and boundary - compressed_upto < block):
                boundary = None
        if boundary is not None:
            if per_block:
                protos = set(range(base, boundary, stride))
            else:
                protos = {p for p in range(base, boundary) if (p - sinks) % stride == 0}
            held = [p for p in held if p < base or p >= boundary or p in protos]
            compressed_upto = boundary
        out.append(list(held))
    return out


@pytest.mark.parametrize("grid,window", [("per_block", "blocks"), ("global", "fixed"), ("per_block", "fixed"),
                                         ("global", "blocks")])
def test_prototype_grid_and_exact_window_equal_the_reference(tiny, grid, window):
    """Stride 4 does not divide recent 6: the two grids differ. After every step, the exact
    positions of each sparse layer = the simulation; the latent positions = the rest; blocks keep
    between recent and 2*recent-1 tokens exact."""
    llm = LLM(tiny, method="deltakv", deltakv_path=tiny_compressor(), latent_dtype="float32", recent_size=6,
              decode_compress_block=3, proto_grid=grid, exact_window=window, num_top_tokens=4096, **COMMON)
    m = llm.method
    steps, seen = [], []
    orig = m.after_step

    def after_step(seq, prefill_done, num_new_tokens):
        orig(seq, prefill_done, num_new_tokens)
        steps.append((seq.num_computed, num_new_tokens == 1))  # one sequence
        tables = [m.pool.pos[seq.kv.tables[l].padded()[0][0]].tolist() for l in m.sparse]
        seen.append((tables, seq.kv.state.lat_pos.tolist(), seq.num_computed))

    m.after_step = after_step
    llm.generate(prompts((75,)), SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    want = reference_layout(steps, 4, 4, 6, grid == "per_block", window == "blocks", block=3)
    assert len(want) == len(seen) > 20
    for (tables, lat, total), exp in zip(seen, want):
        for t in tables:
            assert sorted(t) == exp
        assert sorted(lat) == sorted(set(range(total)) - set(exp))
        tail = total - max([p for p in range(total) if p not in exp] + [3]) - 1  # exact tokens after the last compressed one
        if window == "blocks" and total > 4 + 6:
            assert 6 <= tail <= 11
    if grid == "per_block":  # the grids differ here (4 does not divide 6): the test would see it
        assert want != reference_layout(steps, 4, 4, 6, False, window == "blocks", block=3)


# ------------------------------------------------------------------ the preset end to end
@pytest.mark.parametrize("method", ["deltakv", "omnikv"])
def test_paper_preset_batched_equals_per_sequence(tiny, method):
    """LLM(..., **paper preset) runs; the whole-batch path gives the per-sequence path's tokens and
    logits (the rules are implemented once for both)."""
    knobs = {**preset("paper", method), "num_top_tokens": 8, "recent_size": 6}
    if method == "deltakv":
        knobs.update(deltakv_path=tiny_compressor(latent=24, seed=5), latent_dtype="float32", num_top_tokens_in_prefill=10)
    else:
        knobs.update(sink_size=3, prefill_select="budget", num_top_tokens_in_prefill=10)  # small prompts: select in prefill
    sp = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, return_logits=True)

    def run(batched):
        llm = LLM(tiny, method=method, **knobs, **COMMON)
        if not batched:
            llm.method.batched = lambda plan: False
        out = llm.generate(prompts((70, 45, 100)), sp, use_tqdm=False)
        assert llm.kv_stats()["slots_used"] == 0
        return out

    a, b = run(True), run(False)
    assert [o["token_ids"] for o in a] == [o["token_ids"] for o in b]
    for x, y in zip(a, b):
        torch.testing.assert_close(torch.stack(x["logits"]), torch.stack(y["logits"]), rtol=1e-4, atol=1e-4)


def test_paper_preset_lossless_compressor_equals_vanilla(tiny):
    """Per-block prototypes (father POSITIONS in the latent rows) and block eviction, with a lossless
    compressor and a top-k covering the history: vanilla's tokens, on both paths."""
    ref = LLM(tiny, **COMMON).generate(prompts(), SP, use_tqdm=False)
    for batched in (True, False):
        llm = LLM(tiny, method="deltakv", deltakv_path=tiny_compressor(), latent_dtype="float32", recent_size=6,
                  num_top_tokens=4096, **preset("paper", "deltakv"), **COMMON)
        if not batched:
            llm.method.batched = lambda plan: False
        out = llm.generate(prompts(), SP, use_tqdm=False)
        assert [o["token_ids"] for o in out] == [o["token_ids"] for o in ref]
        assert llm.kv_stats()["compressed_tokens"] > 50


def test_preset_yaml_equals_the_python_presets():
    """conf/preset_method/<preset>_<method>.yaml = sparse_engine.presets; `preset=paper` composes them."""
    from pathlib import Path

    import yaml

    from benchmark.eval_runner import compose, method_and_knobs

    conf = Path(__file__).resolve().parents[1] / "conf"
    files = sorted(p.stem for p in (conf / "preset_method").glob("*.yaml"))
    assert files == sorted(f"{p}_{m}" for p in PRESETS for m in PRESETS[p])
    for p, methods in PRESETS.items():
        for m, knobs in methods.items():
            assert yaml.safe_load((conf / "preset_method" / f"{p}_{m}.yaml").read_text()) == knobs
            name, got = method_and_knobs(compose([f"method={m}", f"preset={p}"]))
            assert name == m and {k: got[k] for k in knobs} == knobs
    name, got = method_and_knobs(compose(["method=omnikv", "preset=paper", "method.recent_size=7"]))
    assert got["recent_size"] == 7 and got["score_mode"] == "raw_qk"  # the command line wins
    _, plain = method_and_knobs(compose(["method=omnikv"]))
    assert plain["score_mode"] == "softmax_all" and plain["sink_size"] == 4  # no preset: the method's own defaults
    with pytest.raises(ValueError, match="unknown preset"):
        preset("nope", "deltakv")


def test_bad_rule_values_are_refused(tiny):
    for kw, field in [(dict(score_mode="softmax"), "score_mode"), (dict(proto_grid="local"), "proto_grid"),
                      (dict(exact_window="x"), "exact_window"), (dict(prefill_compress="lazy"), "prefill_compress"),
                      (dict(select_candidates="all"), "select_candidates"), (dict(prefill_select="sometimes"), "prefill_select")]:
        with pytest.raises(ValueError, match=field):
            LLM(tiny, method="deltakv", deltakv_path=tiny_compressor(), **kw, **COMMON)
    with pytest.raises(ValueError, match="recent_includes_current"):
        LLM(tiny, method="omnikv", full_attn_layers=[0], recent_includes_current="yes", **COMMON)
