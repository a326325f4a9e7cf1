"""deltakv-eval refuses unknown names and bad values before any work: non-zero exit, the valid names
and the closest one, no run folder; in a ``-m`` sweep every job is checked before the first runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmark.eval_runner import ConfigError, compose, method_and_knobs, run_eval, validate_cli

REPO = Path(__file__).resolve().parents[1]


def _cli(tmp_path, *args, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "benchmark.eval_runner", *args, f"results_root={tmp_path / 'runs'}",
                        "progress=false"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=timeout)
    return r, time.time() - t0


def _nothing_written(tmp_path):
    root = tmp_path / "runs"
    return not root.exists() or not any(root.rglob("*"))


def test_misspelt_method_fails_fast_with_closest_name(tmp_path):
    r, dt = _cli(tmp_path, "method=snapkvv", "benchmark=niah")
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    err = " ".join(r.stderr.split())
    assert "unknown method 'snapkvv'" in err and "Closest: 'snapkv'" in err
    assert "pyramidkv" in err and "streaming" in err  # the valid names
    assert dt < 5.0, f"took {dt:.1f}s"
    assert _nothing_written(tmp_path)


@pytest.mark.parametrize("args,needle", [
    (["benchmark=niahh"], "Closest: 'niah'"),
    (["model=smollm2"], "Closest: 'smollm2_135m'"),
    (["method.name=snapkvv"], "Closest: 'snapkv'"),
    (["backend=hff"], "Closest: 'hf'"),
    (["compressor=deltakvv"], "Closest: 'deltakv'"),
    (["data=newz"], "Closest: 'news'"),
])
def test_unknown_names_in_every_group(args, needle):
    with pytest.raises(ConfigError) as e:
        validate_cli(args)
    assert needle in str(e.value)


def test_kv_budget_says_what_it_got_and_what_is_allowed(tmp_path):
    r, _ = _cli(tmp_path, "method=snapkv", "benchmark=niah", "kv_budget=0.2")
    assert r.returncode == 2, r.stderr[-2000:]
    err = " ".join(r.stderr.split())
    assert "got 0.2" in err and "positive whole number" in err and "got 0 " not in err + " "
    assert _nothing_written(tmp_path)
    for bad in ("0", "-3", "abc", "true"):
        with pytest.raises(ConfigError, match="kv_budget must be"):
            validate_cli(["method=snapkv", f"kv_budget={bad}"])
    with pytest.raises(ConfigError, match="got 0.5"):
        method_and_knobs(compose(["method=snapkv", "kv_budget=0.5"]))
    assert validate_cli(["method=snapkv", "kv_budget=64"]) == 1


def test_sweep_with_a_misspelt_choice_runs_nothing(tmp_path):
    r, dt = _cli(tmp_path, "-m", "benchmark=niah", "method=vanilla,snapkvv", "backend=hf")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "snapkvv" in r.stderr and "snapkv" in r.stderr
    assert _nothing_written(tmp_path)  # vanilla (the valid job) did not run either
    with pytest.raises(ConfigError, match="got 0.5"):
        validate_cli(["-m", "method=snapkv", "kv_budget=64,0.5"])


def test_sweep_jobs_are_composed_and_checked_up_front(tmp_path):
    # each choice is a valid name, but job 2 (hf backend + snapkv) cannot run: refused before job 1 runs
    r, _ = _cli(tmp_path, "-m", "benchmark=niah", "backend=hf", "method=vanilla,snapkv",
                "benchmark.context_lengths=[160]", "benchmark.depths=[50]")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "method=vanilla only" in r.stderr and "method=snapkv" in r.stderr
    assert _nothing_written(tmp_path)
    assert validate_cli(["-m", "benchmark=niah", "method=vanilla,snapkv", "query_mode=aware,agnostic"]) == 4


def test_run_eval_validates_before_making_the_run_folder(tmp_path):
    root = tmp_path / "runs"
    for ov, match in ((["method.name=snapkvv"], "Closest: 'snapkv'"),
                      (["method=snapkv", "kv_budget=0.2"], "got 0.2"),
                      (["query_mode=agnostc"], "Closest: 'agnostic'"),
                      (["model.path=/nonexistent/model"], "neither a local folder")):
        cfg = compose(["benchmark=niah", f"results_root={root}", "progress=false", "print_table=false", *ov])
        with pytest.raises(ConfigError, match=match):
            run_eval(cfg)
        assert not root.exists()
