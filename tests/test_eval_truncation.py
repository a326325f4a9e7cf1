"""LongBench truncation length per model: the official model2maxlen values live in conf/model/*.yaml
(longbench_max_len) and reach benchmark.max_input_tokens; the summary / table header prints it;
experiments/table_longbench.py sizes its budget from prompts truncated exactly as the run does."""

from __future__ import annotations

import json

import pytest

from benchmark.eval_runner import compose

# LongBench's config/model2maxlen.json (THUDM/LongBench) for the models we ship configs of
OFFICIAL = {"Llama-3.1-8B-Instruct": 120000, "Qwen2.5-7B-Instruct": 120000}
# LongBench v1's LongBench/config/model2maxlen.json: the value per context class (8K, 32K)
V1 = {"xgen-7b-8k": 7500, "chatglm2-6b-32k": 31500}


@pytest.mark.parametrize("model,want", [("llama3_1_8b", OFFICIAL["Llama-3.1-8B-Instruct"]),
                                        ("qwen2_5_7b_1m", OFFICIAL["Qwen2.5-7B-Instruct"]),
                                        ("qwen3_8b", V1["chatglm2-6b-32k"]),
                                        ("smollm2_135m", V1["xgen-7b-8k"])])
def test_model_configs_carry_the_official_length(model, want):
    for bench in ("longbench", "longbench_e"):
        cfg = compose([f"benchmark={bench}", f"model={model}", "model.path=/m"])
        assert cfg.model.longbench_max_len == want and cfg.benchmark.max_input_tokens == want
    assert compose(["benchmark=longbench", "benchmark.max_input_tokens=2000"]).benchmark.max_input_tokens == 2000


@pytest.fixture(scope="module")
def tok(shipped_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shipped_model_path)


def _long_data(root, articles, n_articles=60):
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"input": "Which city is named?", "context": " ".join(articles[i: i + n_articles]), "answers": ["x"],
             "length": 9000, "all_classes": None, "_id": f"h{i}"} for i in (0, 100)]
    (root / "hotpotqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_prompts_truncated_to_the_model_length_and_header(tmp_path, tok, articles):
    from benchmark.eval_runner import summary_markdown
    from benchmark.longbench import build_requests, score

    data = _long_data(tmp_path / "lb", articles)
    b = compose(["benchmark=longbench", f"benchmark.data_dir={data}", "benchmark.tasks=[hotpotqa]"]).benchmark
    reqs = build_requests(b, tok, 200_000)
    assert {r.meta["max_input_tokens"] for r in reqs} == {7500}
    assert all(7400 <= len(r.prompt_ids) <= 7500 + 80 for r in reqs)  # 7500 + the chat template's tokens
    recs = [{"task": "hotpotqa", "pred": "x", **r.meta} for r in reqs]
    out = score(recs, b)
    assert "truncated to 7500 tokens" in out["header"][0] and "model2maxlen" in out["header"][0]
    summary = {"benchmark": "longbench", "label": "x", "backend": "hf", "method": "vanilla", "knobs": {},
               "model": "m", "query_mode": "aware", "query_agnostic_effective": False, "session_mode": "native",
               "n_records": 2, "wall_s": 1.0, "result": out}
    assert "truncated to 7500 tokens" in summary_markdown(summary)
    # a backend with a shorter max_model_len clamps it (and the header says so)
    short = build_requests(b, tok, 4096)
    assert {r.meta["max_input_tokens"] for r in short} == {4096 - 32}
    assert "clamped" in score([{"task": "hotpotqa", "pred": "x", **r.meta} for r in short], b)["header"][0]


def test_table_budget_uses_the_runs_truncation(tmp_path, tok, articles):
    from benchmark.longbench import build_requests
    from experiments.table_longbench import prompt_stats, run_max_model_len

    data = _long_data(tmp_path / "lb", articles)
    ov = [f"benchmark.data_dir={data}", "benchmark.tasks=[hotpotqa]", "engine.max_model_len=4096"]
    cfg = compose(["benchmark=longbench", *ov])
    assert run_max_model_len(cfg) == 4096
    assert run_max_model_len(compose(["benchmark=longbench"])) == 8192  # the shipped model's context
    mean, trunc = prompt_stats(ov)
    reqs = build_requests(cfg.benchmark, tok, 4096)  # what the run builds
    assert mean == sum(r.n_prompt_tokens for r in reqs) / len(reqs) and trunc == [4096 - 32]
    mean_default, trunc_default = prompt_stats(ov[:2])
    assert trunc_default == [7500] and mean_default > mean
