"""AIME answers are checked with math-verify (lighteval / open-r1's verifier), falling back to the
string comparison of the last \\boxed{} when it is not installed; the summary says which."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from benchmark import metrics as M

RIGHT = [  # all are 33 (issue 16's list)
    "so m+n is \\boxed{m+n=33}",
    "\\boxed{(33)}",
    "there are \\boxed{33 \\text{ ways}}",
    "\\boxed{\\dfrac{66}{2}}",
    "The final answer is 33.",
    "\\boxed{33}",
    "\\boxed{033}",
]
WRONG = [
    "\\boxed{34}",
    "first I thought \\boxed{33}, but the answer is \\boxed{34}",
    "I cannot solve this.",
    "\\boxed{3.3}",
]


@pytest.mark.skipif(M.math_verify_error() is not None, reason="math-verify not installed")
@pytest.mark.parametrize("text", RIGHT)
def test_math_verify_accepts_equivalent_answers(text):
    assert M.math_answers_equal(text, "33") is True
    assert M.math_answers_equal(text, 33) is True


@pytest.mark.skipif(M.math_verify_error() is not None, reason="math-verify not installed")
@pytest.mark.parametrize("text", WRONG)
def test_math_verify_rejects_wrong_answers(text):
    assert M.math_answers_equal(text, "33") is False


def test_string_fallback_is_the_old_comparison(monkeypatch):
    assert M.math_answers_equal("\\boxed{033}", "33", checker="string")
    assert not M.math_answers_equal("\\boxed{m+n=33}", "33", checker="string")
    assert not M.math_answers_equal("The final answer is 33.", "33", checker="string")
    monkeypatch.setattr(M, "math_verify_error", lambda: "ModuleNotFoundError: math_verify")
    assert M.math_answers_equal("\\boxed{33}", "33") and not M.math_answers_equal("\\boxed{m+n=33}", "33")
    from benchmark.aime import score

    out = score([{"problem_id": "1", "pred": "\\boxed{33}", "answer": "33"}], OmegaConf.create({}))
    assert out["answer_checker"] == "string" and "math-verify not installed" in out["header"][0]
    with pytest.raises(ImportError, match="math-verify"):
        score([], OmegaConf.create({"answer_checker": "math_verify"}))


@pytest.mark.skipif(M.math_verify_error() is not None, reason="math-verify not installed")
def test_aime_score_uses_math_verify_and_says_so():
    from benchmark.aime import score

    recs = [{"problem_id": "1", "pred": t, "answer": "33"} for t in RIGHT[:4]] + \
        [{"problem_id": "2", "pred": t, "answer": "033"} for t in WRONG[:2]]
    out = score(recs, OmegaConf.create({}))
    assert out["answer_checker"] == "math_verify" and "math-verify" in out["header"][0]
    assert out["per_problem"] == {"1": 1.0, "2": 0.0}
    assert out["scores"]["pass@1"] == 50.0
    old = score([dict(r) for r in recs], OmegaConf.create({"answer_checker": "string"}))
    assert old["per_problem"]["1"] == 0.0  # the string comparison scored all four wrong
