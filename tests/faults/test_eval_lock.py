"""Two evaluations on one output directory (issue 17.2): the second fails at once naming the
holder, the first's results stay intact; a lock left by a dead run is taken over; appended records
are whole lines, and a kill in the middle of an append tears at most the last line, which resume
drops.

Before: no lock - both runs wrote into the same predictions.jsonl (duplicated rows, mixed methods)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmark.eval_lock import LOCK_NAME, OutputDirLock, OutputDirLocked, append_lines, read_holder
from benchmark.eval_runner import PredictionStore

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
NIAH = ["backend=hf", "benchmark=niah", "benchmark.context_lengths=[160]", "benchmark.max_tokens=4",
        "progress=false", "print_table=false", "torch_threads=1"]

HOLD = """
import sys, time
from benchmark.eval_lock import OutputDirLock
lock = OutputDirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _holder(tmp_path: Path, code: str = HOLD, *args) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), *args], stdout=subprocess.PIPE, text=True,
                         env=ENV, cwd=REPO)
    assert p.stdout.readline().strip() == "locked"
    return p


def _eval(out: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "benchmark.eval_runner", *NIAH, f"output_dir={out}", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)


def test_second_eval_on_a_locked_dir_fails_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        t0 = time.time()
        p = _eval(out, "benchmark.depths=[50]")
        _, err = p.communicate(timeout=120)
        dt = time.time() - t0
    finally:
        holder.kill()
        holder.wait()
    assert p.returncode == 2, err[-2000:]
    msg = " ".join(err.split())
    assert f"pid {holder.pid} on host {socket.gethostname()}" in msg and "wait for it to finish" in msg, msg
    assert not (out / "run.json").exists() and not (out / "predictions.jsonl").exists()  # nothing touched
    # the refusal comes before any model load or torch import: interpreter + Hydra imports (measured
    # 1.7 s at load 9 on 2 cores; a model load alone takes longer than the bound)
    assert dt < 10, dt


@pytest.mark.slow
def test_two_concurrent_evals_on_one_dir(tmp_path):
    """Two real deltakv-eval processes: the second exits non-zero within seconds naming the first,
    whose predictions and summary are complete and unmixed."""
    out = tmp_path / "run"
    first = _eval(out, "benchmark.depths=[0,25,50,75,100]", "batch_size=1")
    deadline = time.time() + 120
    while read_holder(out / LOCK_NAME).get("pid") != first.pid:  # the first holds the folder
        assert first.poll() is None and time.time() < deadline, first.stderr.read()[-2000:] if first.poll() else ""
        time.sleep(0.05)
    t0 = time.time()
    second = _eval(out, "benchmark.depths=[0,25,50,75,100]", "batch_size=1")
    _, err2 = second.communicate(timeout=120)
    dt = time.time() - t0
    _, err1 = first.communicate(timeout=600)
    assert second.returncode == 2 and f"pid {first.pid}" in " ".join(err2.split()), err2[-2000:]
    assert first.returncode == 0, err1[-3000:]
    recs = [json.loads(ln) for ln in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["uid"] for r in recs) == sorted({r["uid"] for r in recs}) and len(recs) == 5
    assert json.loads((out / "summary.json").read_text())["n_records"] == 5
    print(f"second run refused after {dt:.1f}s")


def test_lock_file_of_a_dead_run_is_taken(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead_pid, "host": socket.gethostname(), "command": "x"}))
    with caplog.at_level(logging.WARNING, logger="deltakv.eval"):
        with OutputDirLock(tmp_path):
            assert read_holder(tmp_path / LOCK_NAME)["pid"] == os.getpid()
            with pytest.raises(OutputDirLocked, match=f"pid {os.getpid()}"):
                OutputDirLock(tmp_path).acquire()  # held: a second taker (even this process) is refused
    assert f"pid {dead_pid}" in caplog.text and "stale" in caplog.text
    assert read_holder(tmp_path / LOCK_NAME) == {}  # released: nobody named


LEAK = """
import fcntl, json, os, socket, sys, time
fd = os.open(os.path.join(sys.argv[1], ".eval.lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, json.dumps({"pid": int(sys.argv[2]), "host": socket.gethostname(), "command": "dead run"}).encode())
print("locked", flush=True)
time.sleep(120)
"""


def test_lock_held_by_a_leaked_fd_of_a_dead_run_is_taken_over(tmp_path, caplog):
    """The holder named in the file died but a forked child kept the flock: taken over, warned."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    child = _holder(tmp_path, LEAK, dead.stdout.strip())
    try:
        with caplog.at_level(logging.WARNING, logger="deltakv.eval"):
            with OutputDirLock(tmp_path):
                assert read_holder(tmp_path / LOCK_NAME)["pid"] == os.getpid()
        assert "taking over" in caplog.text and f"pid {dead.stdout.strip()}" in caplog.text
    finally:
        child.kill()
        child.wait()


def test_live_holder_is_not_taken_over(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(OutputDirLocked, match=f"pid {holder.pid}.*another output_dir"):
            OutputDirLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    with OutputDirLock(tmp_path):  # the holder died: the kernel released its lock
        pass


APPEND = """
import sys
from benchmark.eval_lock import append_lines
path, tag = sys.argv[1], sys.argv[2]
for i in range(int(sys.argv[3])):
    append_lines(path, ['{"uid": "%s-%d", "n_records": 1, "pad": "%s"}\\n' % (tag, i, tag * 70000)], fsync=False)
"""


def test_concurrent_appends_are_whole_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    procs = [subprocess.Popen([sys.executable, "-c", APPEND, str(path), tag, "60"], env=ENV, cwd=REPO)
             for tag in "abc"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    lines = path.read_text().splitlines()
    assert len(lines) == 180 and all(json.loads(ln)["pad"] == json.loads(ln)["uid"][0] * 70000 for ln in lines)


def test_kill_during_appends_tears_at_most_the_last_line(tmp_path):
    path = tmp_path / "predictions.jsonl"
    p = subprocess.Popen([sys.executable, "-c", APPEND, str(path), "k", "100000"], env=ENV, cwd=REPO)
    while not path.exists() or path.stat().st_size < 2_000_000:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    raw = path.read_bytes()
    n_complete = raw.count(b"\n")
    store = PredictionStore(path)
    assert store.dropped == (0 if raw.endswith(b"\n") else 1)
    assert len(store.records) == n_complete and [r["uid"] for r in store.records] == [f"k-{i}" for i in range(n_complete)]
    store.append([{"uid": "next", "n_records": 1}])  # after resume: a whole new line, not glued to a torn one
    assert json.loads(path.read_text().splitlines()[-1]) == {"uid": "next", "n_records": 1}


def test_torn_last_line_is_dropped_and_rewritten(tmp_path):
    path = tmp_path / "predictions.jsonl"
    store = PredictionStore(path)
    store.append([{"uid": "a", "n_records": 1}, {"uid": "b", "n_records": 1}])
    with open(path, "ab") as f:
        f.write(b'{"uid": "c", "n_rec')  # a kill inside the write
    again = PredictionStore(path)
    assert again.dropped == 1 and again.done == {"a", "b"}
    assert path.read_text() == '{"uid": "a", "n_records": 1}\n{"uid": "b", "n_records": 1}\n'
