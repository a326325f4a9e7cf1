"""End-to-end evaluation harnesses on tiny fixtures in the official formats, with the shipped model
through the HF backend (and through sparse_engine when it imports): LongBench (+E), SCBench,
AIME, NIAH; resume after an interruption; bad-input messages; the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark.backends import Backend, GenParams, HFBackend, engine_import_error, middle_truncate_ids
from benchmark.eval_runner import PredictionStore, comparison_table, compose, resolve_output_dir, run_eval
from benchmark.fixtures import write_aime, write_longbench, write_scbench

REPO = Path(__file__).resolve().parents[1]
QUIET = ["progress=false", "print_table=false"]


@pytest.fixture(scope="module")
def hf():
    b = HFBackend(None)
    yield b
    b.close()


def _cfg(tmp_path, *overrides):
    return compose(["backend=hf", f"results_root={tmp_path / 'runs'}", *QUIET, *overrides])


def _records(summary_dir: Path):
    return [json.loads(line) for line in (summary_dir / "predictions.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ LongBench
def test_longbench_end_to_end(tmp_path, hf):
    data = write_longbench(tmp_path / "lb")
    cfg = _cfg(tmp_path, "benchmark=longbench", f"benchmark.data_dir={data}", "benchmark.tasks=[hotpotqa,trec,lcc]",
               "benchmark.gen_cap=4", "benchmark.limit=1")
    s = run_eval(cfg, backend=hf)
    assert set(s["result"]["scores"]) == {"hotpotqa", "trec", "lcc"}
    assert s["result"]["n"] == {"hotpotqa": 1, "trec": 1, "lcc": 1}
    out = resolve_output_dir(cfg)
    assert out.parent.name == "longbench" and out.name.startswith("vanilla-")
    assert (out / "summary.md").read_text().count("|") > 6
    recs = _records(out)
    assert len(recs) == 3 and all(r["gen_tokens"] <= 4 for r in recs)
    # trec (few-shot) gets no chat template; hotpotqa does (pred.py)
    tok = hf.tokenizer
    run = json.loads((out / "run.json").read_text())
    assert run["fingerprint"]["method"] == "vanilla" and run["backend_info"]["backend"] == "hf"
    from benchmark.longbench import build_requests

    reqs = {r.task: r for r in build_requests(cfg.benchmark, tok, hf.max_model_len)}
    assert "<|im_start|>" not in tok.decode(reqs["trec"].prompt_ids)
    assert "<|im_start|>user" in tok.decode(reqs["hotpotqa"].prompt_ids)
    # the summary scores are the official per-sample scores re-aggregated
    from benchmark.metrics import longbench_sample_score

    hp = [longbench_sample_score("hotpotqa", r["pred"], r["answers"]) for r in recs if r["task"] == "hotpotqa"]
    assert s["result"]["scores"]["hotpotqa"] == round(100 * sum(hp) / len(hp), 2)


def test_longbench_middle_truncation(tmp_path, hf):
    data = write_longbench(tmp_path / "lb")
    cfg = compose(["benchmark=longbench", f"benchmark.data_dir={data}", "benchmark.tasks=[hotpotqa]",
                   "benchmark.max_input_tokens=40", "benchmark.chat_template=false"])
    from benchmark.longbench import build_requests

    reqs = build_requests(cfg.benchmark, hf.tokenizer, hf.max_model_len)
    text = hf.tokenizer.decode(reqs[0].prompt_ids)
    assert len(reqs[0].prompt_ids) <= 42  # 2 x 20 tokens, +-1 from re-tokenising the joined text
    assert text.startswith("Answer the question based on")  # head kept
    assert text.rstrip().endswith("Answer:")  # tail (question) kept
    assert "Eiffel Tower is a wrought-iron" not in text  # middle dropped
    assert middle_truncate_ids(list(range(10)), 4) == [0, 1, 8, 9]


def test_longbench_query_agnostic_and_e_buckets(tmp_path, hf):
    data = write_longbench(tmp_path / "lbe", e=True)
    cfg = _cfg(tmp_path, "benchmark=longbench_e", f"benchmark.data_dir={data}", "benchmark.tasks=[hotpotqa]",
               "benchmark.gen_cap=4", "benchmark.limit=1", "query_mode=agnostic")
    s = run_eval(cfg, backend=hf)
    assert s["query_mode"] == "agnostic" and s["query_agnostic_effective"] is True
    assert s["session_mode"] == "native"
    assert set(s["result"]["buckets"]["hotpotqa"]) == {"0-4k", "4-8k", "8k+"}
    recs = _records(resolve_output_dir(cfg))
    assert {r["query_mode"] for r in recs} == {"agnostic"} and len(recs) == 1
    # the split puts the question in the turn, not in the context
    from benchmark.longbench import build_requests

    req = build_requests(cfg.benchmark, hf.tokenizer, hf.max_model_len, query_mode="agnostic")[0]
    assert "Marie Curie born" not in hf.tokenizer.decode(req.context_ids)
    assert "Marie Curie born" in hf.tokenizer.decode(req.turns[0])


def test_longbench_e_bucket_scoring_without_model():
    from omegaconf import OmegaConf

    from benchmark.longbench import score

    recs = [{"task": "hotpotqa", "pred": "Warsaw", "answers": ["Warsaw"], "length": 100},
            {"task": "hotpotqa", "pred": "no", "answers": ["Paris"], "length": 4000},
            {"task": "hotpotqa", "pred": "Paris", "answers": ["Paris"], "length": 8000}]
    out = score(recs, OmegaConf.create({"longbench_e": True}))
    assert out["scores"]["hotpotqa"] == 66.67
    assert out["buckets"]["hotpotqa"] == {"0-4k": 100.0, "4-8k": 0.0, "8k+": 100.0}


# ------------------------------------------------------------------------------------------ resume
def test_resume_after_interruption(tmp_path, hf):
    data = write_longbench(tmp_path / "lb")
    over = ["benchmark=longbench", f"benchmark.data_dir={data}", "benchmark.tasks=[hotpotqa,trec,lcc]",
            "benchmark.limit=1", "benchmark.gen_cap=3", "run_name=resume", "batch_size=1"]
    cfg = _cfg(tmp_path, *over)
    assert run_eval(cfg, backend=hf, stop_after=1) is None  # "killed" after one request
    out = Path(cfg.results_root) / "longbench" / "resume"
    first = _records(out)
    assert len(first) == 1
    with open(out / "predictions.jsonl", "a") as f:  # a kill in the middle of a write leaves a torn line
        f.write('{"uid": "trec/0", "task": "tr')
    s = run_eval(_cfg(tmp_path, *over), backend=hf)
    recs = _records(out)
    assert s["n_generated_now"] == 2 and s["n_records"] == 3
    assert sorted(r["uid"] for r in recs) == ["hotpotqa/0", "lcc/0", "trec/0"]
    assert recs[:1] == first  # finished requests are kept as they were
    # a finished run resumes to a no-op
    assert run_eval(_cfg(tmp_path, *over), backend=hf)["n_generated_now"] == 0
    # different settings in the same folder are refused unless overwrite=true
    with pytest.raises(ValueError, match="overwrite=true"):
        run_eval(_cfg(tmp_path, *over[:-1], "batch_size=1", "benchmark.gen_cap=5"), backend=hf)


def test_store_drops_incomplete_sessions(tmp_path):
    p = tmp_path / "predictions.jsonl"
    rows = [{"uid": "a", "n_records": 2, "turn": 0}, {"uid": "a", "n_records": 2, "turn": 1},
            {"uid": "b", "n_records": 2, "turn": 0}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    st = PredictionStore(p)
    assert st.done == {"a"} and st.dropped == 1
    assert len(p.read_text().splitlines()) == 2


# ------------------------------------------------------------------------------------------ bad input
def test_missing_data_dir_names_files_and_source(tmp_path):
    cfg = _cfg(tmp_path, "benchmark=longbench", f"benchmark.data_dir={tmp_path / 'nope'}",
               "benchmark.tasks=[qasper,lcc]")
    with pytest.raises(FileNotFoundError) as e:
        run_eval(cfg)  # fails before any model is loaded
    msg = str(e.value)
    assert "qasper.jsonl" in msg and "lcc.jsonl" in msg and "THUDM/LongBench" in msg
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "qasper.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="lacks lcc.jsonl"):
        run_eval(_cfg(tmp_path, "benchmark=longbench", f"benchmark.data_dir={tmp_path / 'part'}",
                      "benchmark.tasks=[qasper,lcc]"))
    with pytest.raises(FileNotFoundError, match="microsoft/SCBench"):
        run_eval(_cfg(tmp_path, "benchmark=scbench", f"benchmark.data_dir={tmp_path / 'nope'}"))
    with pytest.raises(FileNotFoundError, match="aime_2024"):
        run_eval(_cfg(tmp_path, "benchmark=aime", f"benchmark.data_path={tmp_path / 'nope.jsonl'}"))


def test_unknown_task_lists_known(tmp_path):
    with pytest.raises(ValueError) as e:
        run_eval(_cfg(tmp_path, "benchmark=longbench", "benchmark.tasks=[hotpot]"))
    assert "hotpot" in str(e.value) and "narrativeqa" in str(e.value) and "repobench-p" in str(e.value)
    with pytest.raises(ValueError, match="scbench_kv"):
        run_eval(_cfg(tmp_path, "benchmark=scbench", "benchmark.tasks=[nope]"))
    with pytest.raises(ValueError, match="method=vanilla only"):
        run_eval(_cfg(tmp_path, "benchmark=niah", "method.name=snapkv", "+method.budget=64"))


def test_cli_bad_input_exit_code(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "benchmark.eval_runner", "benchmark=longbench",
                        f"benchmark.data_dir={tmp_path / 'missing'}", "benchmark.tasks=[qasper]", "backend=hf"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "qasper.jsonl" in r.stderr and "THUDM/LongBench" in r.stderr


# ------------------------------------------------------------------------------------------ SCBench
def test_hf_session_matches_reprefill(hf):
    """The HF session (context prefilled once, cache cropped after each turn) generates exactly what
    re-prefilling the whole prefix for every turn generates."""
    tok = hf.tokenizer
    ctx = tok("Alice keeps a red key. Bob keeps a blue key.").input_ids
    turns = [tok(" Bob's key is", add_special_tokens=False).input_ids,
             tok(" Alice's key is", add_special_tokens=False).input_ids]
    p = GenParams(max_tokens=2)
    for acc in (True, False):
        native = hf.generate_session(ctx, turns, p, accumulate=acc)
        fallback = Backend.generate_session(hf, ctx, turns, p, accumulate=acc)
        assert [o.token_ids for o in native] == [o.token_ids for o in fallback]


@pytest.mark.parametrize("mode,tasks", [("multi_turn", ["scbench_kv", "scbench_choice_eng"]),
                                        ("scdq", ["scbench_qa_eng"])])
def test_scbench_end_to_end(tmp_path, hf, mode, tasks):
    data = write_scbench(tmp_path / "sc")
    cfg = _cfg(tmp_path, "benchmark=scbench", f"benchmark.data_dir={data}", f"benchmark.mode={mode}",
               f"benchmark.tasks=[{','.join(tasks)}]", "benchmark.gen_cap=5", f"run_name={mode}")
    s = run_eval(cfg, backend=hf)
    assert set(s["result"]["scores"]) == set(tasks)
    assert s["result"]["per_turn"][tasks[0]].keys() == {"0", "1"}
    recs = _records(Path(cfg.results_root) / "scbench" / mode)
    assert {r["turn"] for r in recs} == {0, 1} and all(r["query_mode"] == "aware" for r in recs)
    if mode == "multi_turn":
        assert len(recs) == 3
        kv = [r for r in recs if r["task"] == "scbench_kv"]
        assert [r["label"] for r in kv] == ["beef-1234", "cc33-dd44"]
        ch = [r for r in recs if r["task"] == "scbench_choice_eng"][0]
        assert ch["label"] == ["Paris", "B"]
    else:
        assert [r["label"] for r in recs] == [["Warsaw"], ["1889"]]


def test_scbench_prompt_structure(tmp_path, hf):
    from benchmark.scbench import build_requests

    data = write_scbench(tmp_path / "sc")
    tok = hf.tokenizer
    cfg = compose(["benchmark=scbench", f"benchmark.data_dir={data}", "benchmark.tasks=[scbench_kv]"])
    mt = build_requests(cfg.benchmark, tok, hf.max_model_len)[0]
    assert mt.accumulate and mt.turns[0] == []  # first query inside the context prefill
    first = tok.decode(mt.context_ids)
    assert first.startswith("<|im_start|>system") and "Extract the value corresponding" in first
    assert 'Key: "c0de-4444"' in first
    follow = tok.decode(mt.turns[1])
    # golden previous answer as the assistant turn, then the next query (official construction)
    assert follow.startswith("beef-1234<|im_end|>") and 'Key: "aa11-bb22"' in follow
    ag = build_requests(cfg.benchmark, tok, hf.max_model_len, query_mode="agnostic")[0]
    assert "c0de-4444\"\nThe value" not in tok.decode(ag.context_ids) and 'Key: "c0de-4444"' in tok.decode(ag.turns[0])
    cfg2 = compose(["benchmark=scbench", f"benchmark.data_dir={data}", "benchmark.tasks=[scbench_kv]",
                    "benchmark.mode=scdq"])
    sd = build_requests(cfg2.benchmark, tok, hf.max_model_len)[0]
    assert not sd.accumulate and 'Key: "c0de-4444"' not in tok.decode(sd.context_ids)


# ------------------------------------------------------------------------------------------ AIME
def test_aime_end_to_end(tmp_path, hf):
    path = write_aime(tmp_path / "aime.jsonl")
    cfg = _cfg(tmp_path, "benchmark=aime", f"benchmark.data_path={path}", "benchmark.n_samples=2",
               "benchmark.max_tokens=5", "benchmark.limit=1")
    s = run_eval(cfg, backend=hf)
    assert s["result"]["n_samples"] == 2 and s["result"]["n"]["pass@1"] == 1
    recs = _records(resolve_output_dir(cfg))
    assert len(recs) == 2 and {r["sample"] for r in recs} == {0, 1}
    assert recs[0]["answer"] == "5" and "pass@2" in s["result"]["scores"]


def test_aime_scoring_without_model():
    from omegaconf import OmegaConf

    from benchmark.aime import score

    recs = [{"problem_id": "1", "pred": "so \\boxed{5}", "answer": "5"},
            {"problem_id": "1", "pred": "\\boxed{6}", "answer": "5"},
            {"problem_id": "2", "pred": "\\boxed{40}", "answer": "040"},
            {"problem_id": "2", "pred": "forty", "answer": "040"}]
    out = score(recs, OmegaConf.create({}))
    assert out["scores"]["pass@1"] == 50.0  # (1/2 + 1/2) / 2
    assert out["scores"]["pass@2"] == 100.0 and out["scores"]["boxed_rate"] == 75.0


# ------------------------------------------------------------------------------------------ NIAH
def test_niah_end_to_end_heatmap(tmp_path, hf):
    cfg = _cfg(tmp_path, "benchmark=niah", "benchmark.context_lengths=[192]", "benchmark.depths=[0,100]",
               "benchmark.max_tokens=10")
    s = run_eval(cfg, backend=hf)
    grid = s["result"]["grid"]
    assert set(grid) == {"0", "100"} and set(grid["0"]) == {"192"}
    png = Path(s["artifacts"]["heatmap"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recs = _records(png.parent)
    assert all(abs(r["actual_tokens"] - r["length"]) <= 4 for r in recs)
    assert s["result"]["average"] >= 50.0  # the shipped model finds most needles at these lengths
    comp = comparison_table(png.parent.parent, "niah")
    assert s["label"] in comp and s["label"].startswith("vanilla-")


def test_niah_needle_depth_placement(hf):
    import random

    from benchmark.niah import make_sample

    s0 = make_sample(hf.tokenizer, 256, 0.0, random.Random(1), use_chat=False)
    s100 = make_sample(hf.tokenizer, 256, 100.0, random.Random(1), use_chat=False)
    pos0 = s0["context"].find(s0["value"]) / len(s0["context"])
    pos100 = s100["context"].find(s100["value"]) / len(s100["context"])
    assert pos0 < 0.3 and pos100 > 0.9


# ------------------------------------------------------------------------------------------ engine
@pytest.mark.skipif(engine_import_error() is not None,
                    reason=f"sparse_engine does not import yet: {engine_import_error()}")
def test_engine_backend_matches_hf_on_niah(tmp_path, hf):
    cfg = compose(["backend=engine", f"results_root={tmp_path / 'runs'}", *QUIET, "benchmark=niah",
                   "benchmark.context_lengths=[160]", "benchmark.depths=[50]", "benchmark.max_tokens=8"])
    s = run_eval(cfg)
    hcfg = _cfg(tmp_path, "benchmark=niah", "benchmark.context_lengths=[160]", "benchmark.depths=[50]",
                "benchmark.max_tokens=8")
    h = run_eval(hcfg, backend=hf)
    root = Path(cfg.results_root) / "niah"
    e_pred = _records(resolve_output_dir(cfg))[0]["pred"]
    h_pred = _records(resolve_output_dir(hcfg))[0]["pred"]
    assert e_pred == h_pred  # greedy vanilla engine == HF generate
    assert s["result"]["average"] == h["result"]["average"]
    assert s["label"] in (root / "comparison.md").read_text() and s["label"] != h["label"]


@pytest.mark.skipif(engine_import_error() is not None,
                    reason=f"sparse_engine does not import yet: {engine_import_error()}")
def test_all_methods_is_the_engine_registry():
    from benchmark.eval_runner import ALL_METHODS, TABLE_METHODS
    from sparse_engine.cache.registry import METHODS

    assert ALL_METHODS[0] == "vanilla" and sorted(ALL_METHODS) == sorted(METHODS)
    assert set(TABLE_METHODS) <= set(ALL_METHODS)  # the tables' default only names registered methods


# ------------------------------------------------------------------------------------------ config plumbing
def test_method_knobs_and_run_folder(tmp_path):
    from benchmark.eval_runner import kv_summary, method_and_knobs, resolve_output_dir

    assert method_and_knobs(compose(["kv_budget=64"])) == ("vanilla", {})  # vanilla ignores the budget
    name, knobs = method_and_knobs(compose(["method.name=streaming", "kv_budget=64", "+method.sink_size=8"]))
    if engine_import_error() is None:
        assert (name, knobs) == ("streaming", {"sink_size": 8, "budget": 64})
        name, knobs = method_and_knobs(compose(["method.name=omnikv", "kv_budget=32"]))
        assert knobs["num_top_tokens"] == 32 and knobs["full_attn_layers"] == [0, 1, 2, 8, 18]  # from conf/model
    out = resolve_output_dir(compose(["method.name=streaming", "+method.budget=64", "results_root=/r",
                                      "benchmark=niah", "query_mode=agnostic"]))
    assert out.parent == Path("/r/niah") and out.name.startswith("streaming-")  # + settings hash (issue 18.8)
    recs = [{"kv_bytes": 500, "context_tokens": 8, "gen_tokens": 2}, {"kv_bytes": 1000, "context_tokens": 10}]
    assert kv_summary(recs, 100) == {"kv_bytes_mean": 750, "kv_fraction_mean": 0.75}


def test_scbench_scoring_repoqa_and_subtasks_without_model():
    from omegaconf import OmegaConf

    from benchmark.scbench import score

    from benchmark.metrics import tree_sitter_error

    fa, fb = "def add(a, b):\n    return a + b", "def mul(x, y):\n    z = x * y\n    return z"
    recs = [
        {"task": "scbench_repoqa", "turn": 0, "repo": "r1", "func_name": "add", "label": fa, "lang": "python",
         "pred": "```python\n" + fa + "\n```"},
        {"task": "scbench_repoqa", "turn": 1, "repo": "r1", "func_name": "mul", "label": fb, "lang": "python",
         "pred": "```python\n" + fa + "\n```"},  # returns the wrong function
        {"task": "scbench_repoqa_and_kv", "turn": 0, "repo": "r2", "func_name": "add", "label": fa,
         "subtask": "scbench_repoqa", "pred": fa, "lang": "python"},
        {"task": "scbench_repoqa_and_kv", "turn": 1, "repo": "r2", "label": "beef-1234", "subtask": "scbench_kv",
         "pred": "beef-1234", "lang": "python"},
    ]
    sanitizer = "tree_sitter" if tree_sitter_error() is None else "first_block"
    out = score(recs, OmegaConf.create({"mode": "multi_turn", "repoqa_sanitizer": sanitizer}))
    assert out["scores"] == {"scbench_repoqa": 50.0, "scbench_repoqa_and_kv/kv": 100.0,
                             "scbench_repoqa_and_kv/repoqa": 100.0}
    assert out["per_turn"]["scbench_repoqa"] == {"0": 100.0, "1": 0.0}


def test_hydra_multirun_yields_one_comparison_table(tmp_path):
    """`deltakv-eval -m ...` sweeps land beside each other and share one comparison.md."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "benchmark.eval_runner", "-m", "backend=hf", "benchmark=niah",
                        "query_mode=aware,agnostic", "benchmark.context_lengths=[160]", "benchmark.depths=[50]",
                        "benchmark.max_tokens=8", f"results_root={tmp_path}", "progress=false", "torch_threads=1"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    comp = (tmp_path / "niah" / "comparison.md").read_text()
    assert comp.count("| hf | vanilla |") == 2 and "| aware |" in comp and "| agnostic |" in comp
    assert "L=160" in comp and "niah: all runs" in r.stdout
