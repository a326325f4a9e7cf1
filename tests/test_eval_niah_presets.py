"""NIAH presets beside the default: ``ruler`` (RULER's single-needle template and depth grid) and
``gkamradt`` (LLMTest_NeedleInAHaystack's token-based depth percent); the summary says which."""

from __future__ import annotations

import random

import pytest
from omegaconf import OmegaConf

from benchmark.eval_runner import compose

# RULER scripts/data/synthetic/constants.py, task 'niah' (the multi-value wording)
RULER_NIAH_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize "
                       "it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special "
                       "magic {type_needle_v} for {query} mentioned in the provided text?")
RULER_NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"


def _ruler_single(text: str) -> str:
    """niah.py's rewrite for one needle and one value, then type_needle_v 'numbers' -> 'number'."""
    for a, b in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        text = text.replace(a, b)
    return text


@pytest.fixture(scope="module")
def tok(shipped_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shipped_model_path)


def test_preset_grids():
    from benchmark.niah import depths_of, max_tokens_of

    for preset, n_depths, max_new in (("default", 5, 16), ("ruler", 40, 128), ("gkamradt", 35, 300)):
        b = compose(["benchmark=niah", f"benchmark.preset={preset}"]).benchmark
        d = depths_of(b)
        assert len(d) == n_depths and d[0] == 0 and d[-1] == 100 and max_tokens_of(b) == max_new
    b = compose(["benchmark=niah", "benchmark.preset=ruler", "benchmark.depths=[10,90]"]).benchmark
    assert depths_of(b) == [10.0, 90.0]
    assert depths_of(compose(["benchmark=niah", "benchmark.preset=ruler"]).benchmark)[:4] == [0, 3, 5, 8]


def test_unknown_preset_names_the_closest():
    from benchmark.niah import check_data

    with pytest.raises(ValueError, match="Closest: 'ruler'"):
        check_data(compose(["benchmark=niah", "benchmark.preset=rular"]).benchmark)


def test_ruler_prompt_and_length(tok):
    from benchmark.niah import build_requests

    b = compose(["benchmark=niah", "benchmark.preset=ruler", "benchmark.context_lengths=[2048]",
                 "benchmark.depths=[50]", "benchmark.chat_template=false"]).benchmark
    req = build_requests(b, tok, 8192)[0]
    text = tok.decode(req.prompt_ids)
    key, value = req.meta["key"], req.meta["needle"]
    head, tail = _ruler_single(RULER_NIAH_TEMPLATE).format(type_needle_v="number", query=key, context="\x00").split("\x00")
    prefix = _ruler_single(RULER_NIAH_PREFIX).format(type_needle_v="number", query=key)
    assert text.startswith(head) and text.endswith(tail + prefix)
    assert f"One of the special magic numbers for {key} is: {value}." in text
    assert abs(len(req.prompt_ids) - (2048 - 128)) <= 2048 // 100  # RULER: prompt + generated = L
    assert req.params.max_tokens == 128
    i = text.index(value) / len(text)
    assert 0.35 < i < 0.65


def test_gkamradt_token_depth(tok):
    from benchmark.niah import GK_NEEDLE, GK_SYSTEM, make_sample_gkamradt

    period = set(tok(".", add_special_tokens=False).input_ids)
    for depth in (0.0, 37.0, 100.0):
        smp = make_sample_gkamradt(tok, 3000 - 200, depth, random.Random(5), use_chat=False)
        assert smp["document_tokens"] == 2800 and abs(smp["measured"] - 2800) <= 28
        doc = smp["context"][len(GK_SYSTEM) + 2:]
        needle = GK_NEEDLE.format(key=smp["key"], value=smp["value"])
        before = doc[: doc.index(needle)]
        n_before = len(tok(before, add_special_tokens=False).input_ids)
        if depth == 0:
            assert n_before == 0
        elif depth == 100:
            assert doc.rstrip("\n").endswith(needle.strip())
        else:
            assert n_before <= int(2800 * depth / 100) + 2 and n_before > int(2800 * depth / 100) - 200
            assert tok(before, add_special_tokens=False).input_ids[-1] in period  # moved back to a "."
        assert "Don't give information outside the document" in smp["query"]


def test_gkamradt_chat_messages(tok):
    from benchmark.niah import GK_SYSTEM, make_sample_gkamradt

    smp = make_sample_gkamradt(tok, 800, 50.0, random.Random(1), use_chat=True)
    assert GK_SYSTEM in smp["context"] and smp["context"].count("<|im_start|>user") == 2
    assert smp["query"].startswith("What is the special magic number for")


def test_header_names_the_preset():
    from benchmark.niah import score

    recs = [{"pred": "1234567", "needle": "1234567", "length": 1000, "depth": 0.0, "actual_tokens": 872}]
    out = score(recs, OmegaConf.create({"preset": "ruler", "depths": [0]}))
    assert out["preset"] == "ruler" and out["header"][0].startswith("NIAH preset: ruler")
    assert "NIAH preset: default" in score(recs, OmegaConf.create({}))["header"][0]
