"""Sharded evaluation (issue 18.7): NIAH run unsharded and as 2 shards (+ merge) gives the same
predictions, scored records and summary (timings aside); the shards partition the requests; a merge
with a shard missing is refused naming it; ``shard=`` values are validated. Run folders are named
``<method>-<settings hash>`` (issue 18.8) and a run under the old name is still resumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmark.backends import HFBackend
from benchmark.eval_runner import compose, legacy_run_name, method_and_knobs, resolve_output_dir, run_eval
from benchmark.eval_shards import ShardsIncomplete, parse_shard

QUIET = ["progress=false", "print_table=false", "backend=hf", "benchmark=niah", "benchmark.context_lengths=[160]",
         "benchmark.depths=[0,50,100]", "benchmark.max_tokens=6"]


@pytest.fixture(scope="module")
def hf():
    b = HFBackend(None)
    yield b
    b.close()


def _lines(path: Path, drop=("time_s",)) -> list[dict]:
    return [{k: v for k, v in json.loads(ln).items() if k not in drop} for ln in path.read_text().splitlines()]


def _summary(path: Path) -> dict:
    s = json.loads(path.read_text())
    s.pop("wall_s")
    s["artifacts"] = {k: Path(v).name for k, v in s.get("artifacts", {}).items()}
    return s


def test_sharded_eval_equals_unsharded(tmp_path, hf):
    whole = run_eval(compose([*QUIET, f"results_root={tmp_path / 'a'}"]), backend=hf)
    assert whole["n_requests"] == 3
    cfg0 = compose([*QUIET, f"results_root={tmp_path / 'b'}", "shard=0/2"])
    assert run_eval(cfg0, backend=hf) is None  # shard 1 not run yet: no merge
    run = resolve_output_dir(cfg0)
    with pytest.raises(ShardsIncomplete, match=r"missing shard\(s\) \[1\].*shard=1/2"):
        run_eval(compose([*QUIET, f"results_root={tmp_path / 'b'}", "merge_shards=2"]))
    merged = run_eval(compose([*QUIET, f"results_root={tmp_path / 'b'}", "shard=1/2"]), backend=hf)
    assert merged is not None and merged["label"] == whole["label"]  # the last shard merged
    # requests 0, 2 in shard 0 and 1 in shard 1 (index modulo 2)
    done = [json.loads((run / "shards" / f"{i}-of-2" / "done.json").read_text()) for i in (0, 1)]
    assert [d["index"] for d in done] == [[0, 2], [1]]
    a = resolve_output_dir(compose([*QUIET, f"results_root={tmp_path / 'a'}"]))
    assert a.name == run.name
    preds = _lines(a / "predictions.jsonl")
    assert len(preds) == 3 and _lines(run / "predictions.jsonl") == preds
    assert _lines(run / "scored.jsonl") == _lines(a / "scored.jsonl")
    assert _summary(run / "summary.json") == _summary(a / "summary.json")
    # merging again by hand gives the same files
    again = run_eval(compose([*QUIET, f"results_root={tmp_path / 'b'}", "merge_shards=2"]))
    assert again["result"] == whole["result"] and _lines(run / "predictions.jsonl") == preds


@pytest.mark.parametrize("bad", ["2/2", "-1/2", "1", "a/b", "0/0", "1/2/3"])
def test_shard_values_are_checked(bad):
    with pytest.raises(ValueError, match="shard="):
        parse_shard(bad)


def test_shard_values_checked_before_hydra_runs():
    from benchmark.eval_runner import validate_cli

    with pytest.raises(ValueError, match=r"0 <= i < n"):
        validate_cli(["benchmark=niah", "shard=3/2"])
    with pytest.raises(ValueError, match="merge_shards"):
        validate_cli(["benchmark=niah", "merge_shards=0"])
    assert parse_shard("1/3") == (1, 3)


def test_run_folder_is_method_and_settings_hash(tmp_path):
    """The folder of a DeltaKV run no longer spells its compressor path (issue 18.8)."""
    cfg = compose(["method=deltakv", "method.deltakv_path=runs/smoke/compressor", f"results_root={tmp_path}"])
    out = resolve_output_dir(cfg)
    assert out.parent == tmp_path / "niah" and out.name.startswith("deltakv-") and len(out.name) == len("deltakv-") + 8
    # another setting -> another folder; results_root / batch_size / scoring do not change the name
    other = compose(["method=deltakv", "method.deltakv_path=runs/x", f"results_root={tmp_path}"])
    assert resolve_output_dir(other).name != out.name
    same = compose(["method=deltakv", "method.deltakv_path=runs/smoke/compressor", "results_root=/elsewhere",
                    "batch_size=3"])
    assert resolve_output_dir(same).name == out.name


def test_run_under_old_folder_name_is_resumed(tmp_path, hf):
    over = [*QUIET[:-2], "benchmark.depths=[0,100]", "benchmark.max_tokens=4", f"results_root={tmp_path}"]
    cfg = compose(over)
    assert run_eval(cfg, backend=hf, stop_after=1) is None  # a run started (1 of 2 requests) ...
    new = resolve_output_dir(cfg)
    old = new.parent / legacy_run_name(cfg, *method_and_knobs(cfg))  # ... under the pre-18.8 name
    new.rename(old)
    assert old.name == "hf-vanilla-aware" and resolve_output_dir(cfg) == old
    s = run_eval(cfg, backend=hf)
    assert s["label"] == "hf-vanilla-aware" and s["n_generated_now"] == 1 and not new.exists()


def test_shard_from_accelerate_or_torchrun_env():
    from benchmark.eval_shards import shard_from_env

    assert shard_from_env({"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)
    assert shard_from_env({"LOCAL_RANK": "0", "WORLD_SIZE": "4"}) == (0, 4)
    assert shard_from_env({"RANK": "0", "WORLD_SIZE": "1"}) is None and shard_from_env({}) is None


@pytest.mark.slow
def test_two_shard_processes_merge_into_the_unsharded_run(tmp_path, hf):
    """`deltakv-eval ... +shard=0/2` and `+shard=1/2` as two concurrent processes: the one that
    finishes last merges; the result equals the unsharded run's."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "benchmark.eval_runner", *QUIET, f"results_root={tmp_path / 'b'}", "torch_threads=1"]
    procs = [subprocess.Popen([*cli, f"+shard={i}/2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env, cwd=tmp_path) for i in (0, 1)]
    errs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    assert sum("merged 2 shards" in e for e in errs) >= 1
    run_eval(compose([*QUIET, f"results_root={tmp_path / 'a'}"]), backend=hf)
    a = resolve_output_dir(compose([*QUIET, f"results_root={tmp_path / 'a'}"]))
    b = resolve_output_dir(compose([*QUIET, f"results_root={tmp_path / 'b'}"]))
    assert _lines(b / "predictions.jsonl") == _lines(a / "predictions.jsonl")
    assert _summary(b / "summary.json") | {"n_generated_now": 3} == _summary(a / "summary.json")
