"""SCBench as the official code runs and scores it: the official 12 tasks and max_turns=5 by default,
math_find prompts as eval_utils.py produces them, the official scorers' quirks by default and
``scbench.scoring=corrected`` as the named alternative, RepoQA's tree-sitter sanitiser."""

from __future__ import annotations

import json
import re

import pytest
from omegaconf import OmegaConf

from benchmark import metrics as M
from benchmark.eval_runner import compose

OFFICIAL_12 = ["scbench_kv", "scbench_prefix_suffix", "scbench_vt", "scbench_repoqa", "scbench_qa_eng",
               "scbench_qa_chn", "scbench_choice_eng", "scbench_many_shot", "scbench_summary", "scbench_mf",
               "scbench_summary_with_needles", "scbench_repoqa_and_kv"]  # scbench/scripts/run_all_tasks.sh


def test_official_defaults():
    from benchmark.scbench import resolve_tasks

    b = compose(["benchmark=scbench"]).benchmark
    assert resolve_tasks(b.tasks) == OFFICIAL_12
    assert b.max_turns == 5 and b.scoring == "official" and b.repoqa_sanitizer == "tree_sitter"
    assert compose(["benchmark=scbench", "scbench.scoring=corrected"]).benchmark.scoring == "corrected"
    assert len(resolve_tasks("all")) == 16


def test_official_scorer_quirks_and_corrected():
    s = M.scbench_sample_score
    # qa_chn: plain-string label iterated per character -> best F1 against one character
    assert s("scbench_qa_chn", "张无忌", "张无忌") == pytest.approx(0.5)
    assert s("scbench_qa_chn", "张无忌", "张无忌", scoring="corrected") == 1.0
    # many_shot: any shared character counts as correct
    assert s("scbench_many_shot", "negative", "positive") == 1.0
    assert s("scbench_many_shot", "negative", "positive", scoring="corrected") == 0.0
    assert s("scbench_many_shot", "xyz", "ab") == 0.0
    # qa_eng's label is a list: the same under both
    assert s("scbench_qa_eng", "in warsaw", ["Warsaw"]) == s("scbench_qa_eng", "in warsaw", ["Warsaw"], "corrected") == 1.0
    # vt: a string label is iterated per character too
    assert s("scbench_vt", "X", "XY") == 0.5 and s("scbench_vt", "X", "XY", scoring="corrected") == 0.0
    # passkey: the label as stored is compared to the first integer string
    assert s("scbench_passkey", "it is 12345", 12345) == 0.0
    assert s("scbench_passkey", "it is 12345", 12345, scoring="corrected") == 1.0
    assert s("scbench_passkey", "it is 12345", "12345") == 1.0
    with pytest.raises(ValueError, match="official"):
        s("scbench_kv", "x", "x", scoring="fixed")


def test_scdq_repoqa_and_kv_kv_half_is_zero_officially():
    from benchmark.scbench import score

    recs = [{"task": "scbench_repoqa_and_kv", "turn": 0, "repo": "r", "label": "beef-1234", "subtask": "scbench_kv",
             "pred": "the value is beef-1234"},
            {"task": "scbench_qa_chn", "turn": 0, "label": "张无忌", "pred": "张无忌"}]
    off = score([dict(r) for r in recs], OmegaConf.create({"mode": "scdq", "scoring": "official"}))
    cor = score([dict(r) for r in recs], OmegaConf.create({"mode": "scdq", "scoring": "corrected"}))
    assert off["scores"] == {"scbench_repoqa_and_kv/kv": 0.0, "scbench_qa_chn": 50.0}
    assert cor["scores"] == {"scbench_repoqa_and_kv/kv": 100.0, "scbench_qa_chn": 100.0}
    mt = score([dict(r) for r in recs], OmegaConf.create({"mode": "multi_turn", "scoring": "official"}))
    assert mt["scores"]["scbench_repoqa_and_kv/kv"] == 100.0  # multi-turn passes predictions: scored
    assert any("scoring: official" in h for h in off["header"]) and any("corrected" in h for h in cor["header"])


MF_TURNS = [{"input": "The maximum number in the list is", "answer": 97},
            {"input": "The minimum number in the list is", "answer": 1},
            {"input": "The median of the list is", "answer": 50}]


def _write_mf(root, n_turns=3):
    root.mkdir(parents=True, exist_ok=True)
    row = {"id": 0, "context": "List: [4, 97, 1, 50, 33]", "multi_turns": MF_TURNS[:n_turns]}
    (root / "scbench_mf.jsonl").write_text(json.dumps(row) + "\n")
    return root


def _official_prefix(text):
    return f"What is {re.findall(r'The .+ is', text)[0].lower()[:-3]}?"


@pytest.fixture(scope="module")
def tok(shipped_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shipped_model_path)


def test_math_find_prompts_as_the_official_code_builds_them(tmp_path, tok):
    from benchmark.scbench import build_requests

    data = _write_mf(tmp_path / "sc")
    base = ["benchmark=scbench", f"benchmark.data_dir={data}", "benchmark.tasks=[scbench_mf]"]
    mt = build_requests(compose(base).benchmark, tok, 8192)[0]
    first = tok.decode(mt.context_ids)
    assert _official_prefix(MF_TURNS[0]["input"]) + "\n\nList: [4, 97, 1, 50, 33]\n\n" + MF_TURNS[0]["input"] in first
    # chat follow-ups: every one carries the LAST turn's question (official leaked loop variable)
    sys_gen = tok.apply_chat_template([{"role": "system", "content": ""}], add_generation_prompt=True, tokenize=False)
    for k in (1, 2):
        want = tok.apply_chat_template(
            [{"role": "system", "content": ""}, {"role": "assistant", "content": str(MF_TURNS[k - 1]["answer"])},
             {"role": "user", "content": _official_prefix(MF_TURNS[-1]["input"]) + "\n\n" + MF_TURNS[k]["input"]}],
            add_generation_prompt=True, tokenize=False).replace(sys_gen, "")
        assert mt.turns[k] == tok(want, add_special_tokens=False).input_ids
    assert _official_prefix(MF_TURNS[1]["input"]) not in tok.decode(mt.turns[1])
    # scdq: the context starts with the first turn's raw input; queries carry their own question
    sd = build_requests(compose([*base, "benchmark.mode=scdq"]).benchmark, tok, 8192)[0]
    ctx = tok.decode(sd.context_ids)
    assert MF_TURNS[0]["input"] + "\n\nList: [4, 97, 1, 50, 33]" in ctx and "What is" not in ctx
    for k, q in enumerate(sd.turns):
        assert _official_prefix(MF_TURNS[k]["input"]) + "\n\n" + MF_TURNS[k]["input"] in tok.decode(q)
    # without a chat template each follow-up has its own question (the official non-chat template)
    plain = build_requests(compose([*base, "benchmark.chat_template=false"]).benchmark, tok, 8192)[0]
    assert tok.decode(plain.turns[1]) == "97\n\n" + _official_prefix(MF_TURNS[1]["input"]) + "\n\n" + MF_TURNS[1]["input"]


def test_max_turns_default_keeps_five(tmp_path, tok):
    from benchmark.scbench import build_requests

    root = tmp_path / "sc"
    root.mkdir()
    turns = [{"input": f'Key: "k{i}"\nThe value associated with the specified key is: ', "answer": f"v{i}"}
             for i in range(7)]
    (root / "scbench_kv.jsonl").write_text(json.dumps({"context": "JSON data: {}", "multi_turns": turns}) + "\n")
    reqs = build_requests(compose(["benchmark=scbench", f"benchmark.data_dir={root}",
                                   "benchmark.tasks=[scbench_kv]"]).benchmark, tok, 8192)
    assert len(reqs[0].turns) == 5 and [m["label"] for m in reqs[0].turn_meta] == [f"v{i}" for i in range(5)]


FN = "def add(a, b):\n    return a + b"
OTHER = "def mul(x, y):\n    z = x * y\n    return z"


def test_repoqa_sanitiser_tree_sitter():
    err = M.tree_sitter_error()
    if err:
        pytest.skip(f"tree-sitter not importable here: {err}")
    needles = [{"name": "add", "needle": FN}, {"name": "mul", "needle": OTHER}]
    out = ("Here:\n```python\nimport os\nimport sys\nfrom typing import Any\n\n\n" + FN
           + "\n\n\nif __name__ == '__main__':\n    print(add(1, 2))\n    print(add(3, 4))\n```")
    assert M.extract_code_block(out, "python") == FN
    assert M.repoqa_score(out, "add", needles, lang="python") == 1.0
    # the whole block (imports, usage) is far from the needle: the old sanitiser failed it
    assert M.repoqa_score(out, "add", needles, lang="python", sanitizer="first_block") == 0.0
    # no function in any block: the first block; no block at all: the whole output
    assert M.extract_code_block("```\nx = 1\n```", "python") == "x = 1\n"
    assert M.extract_code_block("  just text ", "python") == "just text"


def test_repoqa_needs_tree_sitter_or_an_explicit_choice(tmp_path, monkeypatch):
    from benchmark import scbench

    (tmp_path / "scbench_repoqa.jsonl").write_text("")
    b = compose(["benchmark=scbench", f"benchmark.data_dir={tmp_path}", "benchmark.tasks=[scbench_repoqa]"]).benchmark
    monkeypatch.setattr(M, "tree_sitter_error", lambda: "ModuleNotFoundError: tree_sitter_languages")
    with pytest.raises(ImportError, match="first_block"):
        scbench.check_data(b)
    b2 = compose(["benchmark=scbench", f"benchmark.data_dir={tmp_path}", "benchmark.tasks=[scbench_repoqa]",
                  "benchmark.repoqa_sanitizer=first_block"]).benchmark
    assert scbench.check_data(b2) == ["scbench_repoqa"]
