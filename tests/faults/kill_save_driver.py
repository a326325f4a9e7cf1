"""Kill training at chosen points of its checkpoint saves, restart it, compare with an uninterrupted run.

Run by tests/faults/test_faults_training.py as its own process (``python kill_save_driver.py spec.json``)
so that the heavy imports happen once: every training run is a ``fork`` of this process, and a kill
is a real ``SIGKILL`` of that child, delivered by itself at the chosen point.

Kill points: the file operations of a save, each counted before and after it runs (``torch.save``,
safetensors ``save_file``, ``Path.write_text``, ``TrainerState.save_to_json``, ``os.replace`` /
``os.rename``, ``shutil.rmtree``), inside ``DeltaKVTrainer._save_checkpoint`` and after training
(final compressor, metrics). Point k (1-based) of the uninterrupted run's sequence is where a run
dies; "after" a file write, the file is first cut to a random fraction of its size, as if the kernel
had written only a prefix of it.

spec.json: {"root", "model", "work", "points": n, "seed": s, "result": path}. Writes to ``result``:
{"total_points", "ops", "runs": [{"k", "op", "trunc", "killed", "restart_rc", "resumed_from",
"max_abs_diff", "log"}]}.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import signal
import sys
import traceback

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import transformers.trainer_callback as hf_callback  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

import deltakv.checkpoint as ck  # noqa: E402
import deltakv.trainer as tr  # noqa: E402
from deltakv.config import TrainConfig  # noqa: E402
from deltakv.train import CONF_DIR, run_training  # noqa: E402

STATE = {"depth": 0, "tail": False, "ops": [], "kill_at": None, "trunc": 1.0}


def _point(name: str, path=None) -> None:
    if not (STATE["depth"] or STATE["tail"]):
        return
    STATE["ops"].append(name)
    if len(STATE["ops"]) == STATE["kill_at"]:
        if path is not None and name.startswith("after") and os.path.isfile(path) and STATE["trunc"] < 1.0:
            with open(path, "r+b") as f:
                f.truncate(int(os.path.getsize(path) * STATE["trunc"]))
        os.kill(os.getpid(), signal.SIGKILL)


def _wrap(owner, attr: str, label: str, path_arg=None):
    orig = getattr(owner, attr)

    def wrapper(*args, **kwargs):
        path = None
        if path_arg is not None:
            path = path_arg(args, kwargs)
            path = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
        _point(f"before {label}", path)
        out = orig(*args, **kwargs)
        _point(f"after {label}", path)
        return out

    setattr(owner, attr, wrapper)


def install_hooks() -> None:
    _wrap(torch, "save", "torch.save", lambda a, k: a[1] if len(a) > 1 else k.get("f"))
    _wrap(ck, "save_file", "save_file", lambda a, k: a[1] if len(a) > 1 else k.get("filename"))
    _wrap(pathlib.Path, "write_text", "write_text", lambda a, k: a[0])
    _wrap(hf_callback.TrainerState, "save_to_json", "save_to_json", lambda a, k: a[1] if len(a) > 1 else k.get("json_path"))
    _wrap(os, "replace", "os.replace", lambda a, k: a[1] if len(a) > 1 else k.get("dst"))
    _wrap(os, "rename", "os.rename", lambda a, k: a[1] if len(a) > 1 else k.get("dst"))
    _wrap(shutil, "rmtree", "rmtree", lambda a, k: a[0] if a else k.get("path"))

    save = tr.DeltaKVTrainer._save_checkpoint

    def _save_checkpoint(self, *a, **k):
        STATE["depth"] += 1
        try:
            return save(self, *a, **k)
        finally:
            STATE["depth"] -= 1

    tr.DeltaKVTrainer._save_checkpoint = _save_checkpoint
    train = tr.DeltaKVTrainer.train

    def train_then_tail(self, *a, **k):
        out = train(self, *a, **k)
        STATE["tail"] = True  # the final compressor and metrics.json are saves too
        return out

    tr.DeltaKVTrainer.train = train_then_tail


def overrides(root: str, model: str, out: str) -> list[str]:
    return [
        f"model.path={model}", "model.full_attn_layers=[0]", "data=text", f"data.sources.0.path={root}/corpus.txt",
        "data.seq_len=32", "data.eval_fraction=0.2", f"data.cache_dir={root}/packed",
        "compressor.kv_compressed_size=8", "compressor.down_hidden=16", "compressor.pca_batches=2",
        "compressor.reference.num_sinks=2", "compressor.reference.cluster_ratio=0.25",
        "trainer.max_steps=4", "trainer.save_steps=2", "trainer.logging_steps=1", "trainer.disable_tqdm=true",
        "trainer.learning_rate=1e-2", "eval.max_sequences=2", f"output_dir={out}",
    ]


def run_child(spec: dict, out: str, log: str, kill_at=None, trunc=1.0) -> tuple[int, dict]:
    """Fork; the child trains into `out` (dying at point `kill_at`); returns (status, child info)."""
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = TrainConfig.from_omegaconf(compose("train", overrides=overrides(spec["root"], spec["model"], out)))
    info_path = f"{log}.json"
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            STATE.update(kill_at=kill_at, trunc=trunc, ops=[], depth=0, tail=False)
            metrics = run_training(cfg)
            with open(info_path, "w") as f:
                json.dump({"ops": STATE["ops"], "resumed_from": metrics.get("train", {}).get("resumed_from")}, f)
            code = 0
        except BaseException:  # noqa: BLE001 - report anything, the parent decides
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    info = json.loads(pathlib.Path(info_path).read_text()) if os.path.exists(info_path) else {}
    return status, info


def max_abs_diff(a_dir: str, b_dir: str) -> float | None:
    try:
        a, b = ck.load_compressor(a_dir), ck.load_compressor(b_dir)
    except Exception:  # noqa: BLE001
        return None
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return None
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


def main() -> None:
    spec = json.loads(pathlib.Path(sys.argv[1]).read_text())
    work = pathlib.Path(spec["work"])
    work.mkdir(parents=True, exist_ok=True)
    install_hooks()
    ref = str(work / "reference")
    status, info = run_child(spec, ref, str(work / "reference.log"))
    if status != 0 or "ops" not in info:
        raise SystemExit(f"the uninterrupted run failed (status {status}); see {work / 'reference.log'}")
    ops = info["ops"]
    rng = random.Random(spec["seed"])
    points = sorted(rng.sample(range(1, len(ops) + 1), min(spec["points"], len(ops))))
    runs = []
    for k in points:
        out = str(work / f"kill-{k}")
        trunc = round(rng.random(), 3)
        status, _ = run_child(spec, out, f"{out}.kill.log", kill_at=k, trunc=trunc)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        status2, info2 = run_child(spec, out, f"{out}.restart.log")
        rc = os.WEXITSTATUS(status2) if os.WIFEXITED(status2) else -os.WTERMSIG(status2)
        tail = pathlib.Path(f"{out}.restart.log").read_text()[-1500:] if rc else ""
        runs.append({"k": k, "op": ops[k - 1], "trunc": trunc, "killed": killed, "restart_rc": rc,
                     "resumed_from": info2.get("resumed_from"),
                     "max_abs_diff": max_abs_diff(f"{ref}/compressor", f"{out}/compressor") if rc == 0 else None,
                     "log": tail})
    pathlib.Path(spec["result"]).write_text(json.dumps({"total_points": len(ops), "ops": ops, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
