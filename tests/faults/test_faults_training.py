"""Training / checkpoint / packing faults (issue 17, items 3 and 6).

3. A kill while a checkpoint is written must never break later restarts: checkpoints are written under
   a temporary name and renamed when complete, and resume skips an incomplete or corrupt newest
   checkpoint (with a warning) for the previous one. Shown by SIGKILLs at >= 20 points of the saves
   (several seeds; slow) and by corrupting the newest checkpoint in each way resume checks.
6. `trainer.save_steps=0`, a corrupt `compressor.safetensors` and `deltakv-pack` without a data path
   get one clear sentence (they gave an HF error, a raw SafetensorError and a "???" traceback).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltakv.checkpoint import CheckpointError, load_compressor, save_compressor
from deltakv.testing import tiny_training_setup
from deltakv.train import CONF_DIR, run_training

from test_train_run import config, overrides  # noqa: E402  (the tiny run's overrides; tests/ is on sys.path)

REPO = Path(CONF_DIR).parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_training_setup(tmp_path_factory.mktemp("train_faults"))


def assert_same_compressor(a_dir: Path, b_dir: Path) -> None:
    a, b = load_compressor(a_dir), load_compressor(b_dir)
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=k)


@pytest.fixture(scope="module")
def straight(setup, tmp_path_factory):
    """An uninterrupted run: the reference every resumed run must reproduce."""
    root, model = setup
    out = tmp_path_factory.mktemp("straight")
    run_training(config(*overrides(root, model, out)))
    return out


# ------------------------------------------------------------------------------------------------ 3
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CORRUPTIONS = {
    "no-trainer-state": lambda c: (c / "trainer_state.json").unlink(),
    "no-optimizer": lambda c: (c / "optimizer.pt").unlink(),
    "truncated-optimizer": lambda c: _truncate(c / "optimizer.pt"),
    "truncated-weights": lambda c: _truncate(c / "compressor.safetensors"),
    "garbage-config": lambda c: (c / "compressor_config.json").write_text("{not json"),
    "truncated-rng-state": lambda c: _truncate(next(c.glob("rng_state*.pth"))),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_resume_skips_a_corrupt_newest_checkpoint(setup, straight, tmp_path, corruption):
    """What a kill mid-save left behind before the fix (a checkpoint-N folder with missing or cut
    files), or a disk error: resume warns, takes checkpoint-2 and ends equal to the straight run."""
    root, model = setup
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    shutil.rmtree(out / "compressor")
    (out / "metrics.json").unlink()
    CORRUPTIONS[corruption](out / "checkpoint-4")
    with pytest.warns(RuntimeWarning, match="skipped checkpoint-4"):
        m = run_training(config(*overrides(root, model, out)))
    assert m["train"]["resumed_from"].endswith("checkpoint-2") and m["train"]["global_step"] == 4
    assert_same_compressor(straight / "compressor", out / "compressor")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not list(out.glob("staging-checkpoint-*")) and not list(out.glob(".trash-*"))
    # the re-written checkpoint-4 is complete: a second restart resumes from it
    shutil.rmtree(out / "compressor")
    again = run_training(config(*overrides(root, model, out)))
    assert again["train"]["resumed_from"].endswith("checkpoint-4")


def test_an_explicit_corrupt_resume_path_is_a_clear_error(setup, straight, tmp_path):
    root, model = setup
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    _truncate(out / "checkpoint-4" / "optimizer.pt")
    with pytest.raises(ValueError, match="trainer.resume=.*checkpoint-4 cannot be resumed from: optimizer.pt is truncated"):
        run_training(config(*overrides(root, model, out, f"trainer.resume={out / 'checkpoint-4'}")))


def test_a_save_leaves_no_temporary_files(setup, straight):
    names = {p.name for p in straight.iterdir()}
    assert {"checkpoint-2", "checkpoint-4", "compressor", "metrics.json"} <= names
    assert not [n for n in names if "staging" in n or "trash" in n or n.startswith(".")], names
    for d in [straight / "compressor", straight / "checkpoint-4"]:
        assert not [p.name for p in d.iterdir() if p.name.startswith(".") or "tmp" in p.name]


def _kill_points(setup, tmp_path, seed: int, points: int) -> dict:
    root, model = setup
    spec = {"root": str(root), "model": str(model), "work": str(tmp_path / "work"), "points": points, "seed": seed,
            "result": str(tmp_path / "result.json")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    driver = Path(__file__).with_name("kill_save_driver.py")
    proc = subprocess.run([sys.executable, str(driver), str(tmp_path / "spec.json")], capture_output=True, text=True,
                          timeout=1800, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "result.json").read_text())


def _check_kill_runs(result: dict) -> None:
    runs = result["runs"]
    assert runs and all(r["killed"] for r in runs), [r for r in runs if not r["killed"]]
    failed = [f"kill at point {r['k']} ({r['op']}, cut to {r['trunc']}): restart exit {r['restart_rc']}\n{r['log']}"
              for r in runs if r["restart_rc"] != 0]
    assert not failed, "\n\n".join(failed)
    differ = [(r["k"], r["op"], r["max_abs_diff"]) for r in runs if r["max_abs_diff"] is None or r["max_abs_diff"] > 1e-4]
    assert not differ, f"restarted runs whose final compressor differs from the uninterrupted run: {differ}"


def test_a_save_that_fails_half_way_leaves_the_previous_checkpoint(setup, straight, tmp_path, monkeypatch):
    """In-process guard of the kill test below: the save of checkpoint-4 dies after the weights were
    written (disk full while writing optimizer.pt). No checkpoint-4 may look complete; the restart
    resumes from checkpoint-2 and ends equal to the uninterrupted run."""
    root, model = setup
    out = tmp_path / "run"
    real_save = torch.save

    def save(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt") and "-4" in Path(str(f)).parent.name:
            Path(f).write_bytes(b"PK\x03\x04 half an optimizer")
            raise OSError(28, "No space left on device (simulated)")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError, match="No space left"):
        run_training(config(*overrides(root, model, out)))
    monkeypatch.setattr(torch, "save", real_save)
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()
    m = run_training(config(*overrides(root, model, out)))
    assert m["train"]["resumed_from"].endswith("checkpoint-2")
    assert_same_compressor(straight / "compressor", out / "compressor")
    assert not list(out.glob("staging-checkpoint-*"))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_during_save_every_restart_resumes(setup, tmp_path, seed):
    """8 random kill points per seed, 24 in all (of ~50 per run): SIGKILL before / after each file
    operation of the saves, files cut to a random fraction; every restart must finish and give the
    uninterrupted run's compressor."""
    result = _kill_points(setup, tmp_path, seed=seed, points=8)
    assert len(result["runs"]) == 8 and result["total_points"] >= 20
    _check_kill_runs(result)


# ------------------------------------------------------------------------------------------------ 6
def test_save_steps_zero_is_refused(setup, tmp_path):
    root, model = setup
    with pytest.raises(ValueError, match=r"trainer.save_steps=0: save a checkpoint every N >= 1 steps"):
        config(*overrides(root, model, tmp_path, "trainer.save_steps=0"))
    with pytest.raises(ValueError, match=r"trainer.max_steps='abc' \(str\) is not a valid int"):
        config(*overrides(root, model, tmp_path, "trainer.max_steps=abc"))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_compressor_safetensors_is_a_clear_error(tmp_path, damage):
    from deltakv.compressor import CompressorConfig, DeltaKVCompressor

    comp = DeltaKVCompressor(CompressorConfig(model_type="llama", num_hidden_layers=2, num_kv_heads=2, head_dim=8,
                                              layers=[1], full_attn_layers=[0], kv_compressed_size=8, down="linear"))
    save_compressor(tmp_path, comp)
    weights = tmp_path / "compressor.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00junk" * 40, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=r"compressor.safetensors \(\d+ bytes\) cannot be read: .* truncated or corrupt"):
        load_compressor(tmp_path)


def test_corrupt_compressor_config_is_a_clear_error(tmp_path):
    from deltakv.compressor import CompressorConfig, DeltaKVCompressor

    comp = DeltaKVCompressor(CompressorConfig(model_type="llama", num_hidden_layers=2, num_kv_heads=2, head_dim=8,
                                              layers=[1], full_attn_layers=[0], kv_compressed_size=8, down="linear"))
    save_compressor(tmp_path, comp)
    (tmp_path / "compressor_config.json").write_text('{"format_version": 1, "compr')
    with pytest.raises(CheckpointError, match="compressor_config.json is not valid JSON"):
        load_compressor(tmp_path)


@pytest.mark.parametrize("data", ["text", "jsonl", "hf_disk"])
def test_pack_without_a_data_path_is_one_clear_sentence(tmp_path, data):
    # what the `deltakv-pack` console script runs
    proc = subprocess.run([sys.executable, "-c", "from data_prepare.pack import main; main()", f"data={data}"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert err.startswith("deltakv-pack: error: data.sources.0.path is required") and "data.sources.0.path=" in err, err
    assert "Traceback" not in proc.stderr and "???" not in proc.stderr
