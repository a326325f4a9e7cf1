"""NIAH haystacks have the asked length (within 1%, by tokens) for any length, longer than the
shipped corpus included; the actual lengths are reported."""

from __future__ import annotations

import random

import pytest


@pytest.fixture(scope="module")
def tok(shipped_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shipped_model_path)


def _count(tok, smp) -> int:
    ctx = tok(smp["context"], truncation=False).input_ids
    q = tok(smp["query"], add_special_tokens=False, truncation=False).input_ids
    return len(ctx) + len(q)


@pytest.mark.parametrize("length", [150_000, 300_000])
def test_long_haystacks_have_the_asked_length(tok, length):
    from benchmark.niah import _haystack_tokens, make_sample

    corpus = len(_haystack_tokens(id(tok), tok)[0])
    assert length > corpus  # longer than the corpus: it must be cycled
    smp = make_sample(tok, length, 50.0, random.Random(3), use_chat=True)
    n = _count(tok, smp)
    assert abs(n - length) <= length // 100, (n, length)
    assert smp["value"] in smp["context"]
    pos = smp["context"].find(smp["value"]) / len(smp["context"])
    assert 0.4 < pos < 0.6


@pytest.mark.parametrize("length", [200, 1000, 5000])
def test_short_haystacks_too(tok, length):
    from benchmark.niah import make_sample

    for depth in (0.0, 100.0):
        smp = make_sample(tok, length, depth, random.Random(length), use_chat=False)
        assert abs(_count(tok, smp) - length) <= max(1, length // 100)


def test_actual_lengths_reported():
    from omegaconf import OmegaConf

    from benchmark.eval_runner import summary_markdown
    from benchmark.niah import score

    recs = [{"pred": "1234567", "needle": "1234567", "length": 1000, "depth": 0.0, "actual_tokens": 998},
            {"pred": "no", "needle": "7654321", "length": 1000, "depth": 50.0, "actual_tokens": 1001},
            {"pred": "5555555", "needle": "5555555", "length": 4000, "depth": 0.0, "actual_tokens": 4000}]
    out = score(recs, OmegaConf.create({}))
    assert out["actual_tokens"] == {"L=1000": {"min": 998, "max": 1001, "mean": 999.5},
                                    "L=4000": {"min": 4000, "max": 4000, "mean": 4000.0}}
    assert any("L=1000: 998-1001" in h for h in out["header"])
    summary = {"benchmark": "niah", "label": "x", "backend": "hf", "method": "vanilla", "knobs": {}, "model": "m",
               "query_mode": "aware", "query_agnostic_effective": False, "session_mode": "native", "n_records": 3,
               "wall_s": 1.0, "result": out}
    assert "L=1000: 998-1001" in summary_markdown(summary)
