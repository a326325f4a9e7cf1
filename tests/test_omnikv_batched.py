"""OmniKV on the batch hooks: a batch of sequences of different lengths (padded prefill chunks next to
decode rows, sequences that select next to ones whose history fits the budget) gives each sequence the
same greedy tokens and the same selections as running it alone; the per-layer hooks never sync."""

from __future__ import annotations

import pytest
import torch

from sparse_engine import LLM, SamplingParams

POOL = 1 << 28
STEPS = 10
LENGTHS = (30, 260, 500, 90, 333)  # 30: its history fits the int budgets (never selects)

CASES = {
    "int-budget+prefill": dict(full_attn_layers=[0, 1], num_top_tokens=48, num_top_tokens_in_prefill=64,
                               recent_size=16),
    "fraction-budget": dict(full_attn_layers=[0, 2], num_top_tokens=0.2, sink_size=2, recent_size=8),
}
KERNEL = "int-budget+prefill+decode-kernel"  # decode attention by a kernel reading the pool (kv=None to observers)
CASES[KERNEL] = CASES["int-budget+prefill"]


@pytest.fixture(scope="module")
def tiny(tiny_model_factory):
    return tiny_model_factory("llama")


def _prompts():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in LENGTHS]


def _llm(tiny, case):
    llm = LLM(tiny, method="omnikv", dtype="float32", kv_cache_bytes=POOL, chunk_prefill_size=128, **CASES[case])
    if case == KERNEL:  # what the Triton kernel does on CUDA, in PyTorch
        from sparse_engine.kernels.decode_attention import decode_attention_torch

        llm.method.decode_kernel = decode_attention_torch
    return llm


def _run(llm, prompts):
    """Greedy decode of `prompts` submitted together; returns tokens and the final selections."""
    params = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True)
    seqs = [llm.add_request(p, params) for p in prompts]
    sels = {}
    while not all(s.finished for s in seqs):
        llm.step()
        for s in seqs:  # the selection of each sequence's last step, as positions
            if not s.finished and s.kv is not None:
                pos = llm.pool.pos[s.kv.tables[0].head(0)]
                sels[s.seq_id] = {l: (None if c is None else sorted(pos[c].tolist()))
                                  for l, c in s.kv.state.get("cols", {}).items()}
    return [s.output_token_ids for s in seqs], [sels[s.seq_id] for s in seqs]


@pytest.mark.parametrize("case", list(CASES))
def test_batch_equals_each_alone(tiny, case):
    knobs = CASES[case]
    prompts = _prompts()
    llm = _llm(tiny, case)
    llm.method.prefill_together = True  # cover padded multi-sequence prefill groups (the default is one per chunk)
    steps = []
    orig = llm.method.begin_step

    def spy(plan):
        steps.append((plan.batched, [g.size for g in plan.groups], [g.decode for g in plan.groups]))
        orig(plan)

    llm.method.begin_step = spy
    toks, sels = _run(llm, prompts)
    assert all(b for b, _, _ in steps)  # every step ran on the batch hooks
    assert any(len(d) == 2 for _, _, d in steps)  # decode rows next to prefill chunks
    assert any(not d[-1] and s[-1] > 1 for _, s, d in steps)  # padded multi-sequence prefill groups
    for i, p in enumerate(prompts):
        (t,), (s,) = _run(_llm(tiny, case), [p])
        assert toks[i] == t, f"prompt {i} ({len(p)} tokens): batched tokens differ from alone"
        assert sels[i] == s, f"prompt {i}: selections differ"
    if isinstance(knobs["num_top_tokens"], int):
        assert all(v is None for v in sels[0].values())  # the short prompt never selects
    assert all(v is not None for v in sels[2].values())  # the long one does


def test_layer_hooks_do_not_sync(tiny, monkeypatch):
    """layer_view / observe_layer touch no host value of a device tensor (no .item / .tolist / bool)."""
    llm = _llm(tiny, "int-budget+prefill")
    method, calls = llm.method, {"view": 0, "observe": 0}

    def forbid(name):
        def f(*a, **k):
            raise AssertionError(f"host sync in a per-layer hook: Tensor.{name}")
        return f

    def guarded(fn, key):
        def run(*a, **k):
            calls[key] += 1
            with monkeypatch.context() as m:
                for name in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy"):
                    m.setattr(torch.Tensor, name, forbid(name))
                return fn(*a, **k)
        return run

    method.layer_view = guarded(method.layer_view, "view")
    method.observe_layer = guarded(method.observe_layer, "observe")
    _run(llm, _prompts()[1:3])
    assert calls["view"] > 0 and calls["observe"] > 0


def test_scoring_blocks_change_nothing(tiny, monkeypatch):
    """Scoring one sequence and one query row at a time (bounded memory) selects what one block does."""
    from sparse_engine.cache import scoring

    prompts = _prompts()
    toks, sels = _run(_llm(tiny, "int-budget+prefill"), prompts)
    monkeypatch.setattr(scoring, "_KEY_ELEMS", 1)
    monkeypatch.setattr(scoring, "_SCORE_ELEMS", 1)
    toks2, sels2 = _run(_llm(tiny, "int-budget+prefill"), prompts)
    assert toks2 == toks and sels2 == sels
