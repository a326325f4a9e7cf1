"""End-to-end training on a tiny random model: run, interrupt + resume, multirun sweep, bad inputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import TrainerCallback

from deltakv.checkpoint import load_compressor
from deltakv.config import TrainConfig
from deltakv.testing import tiny_training_setup
from deltakv.train import CONF_DIR, run_training



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_training_setup(tmp_path_factory.mktemp("train"))


def overrides(root: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.path={model}", "model.full_attn_layers=[0]", "data=text", f"data.sources.0.path={root / 'corpus.txt'}",
        "data.seq_len=32", "data.eval_fraction=0.2", f"data.cache_dir={root / 'packed'}",
        "compressor.kv_compressed_size=8", "compressor.down_hidden=16", "compressor.pca_batches=2",
        "compressor.reference.num_sinks=2", "compressor.reference.cluster_ratio=0.25",
        "trainer.max_steps=4", "trainer.save_steps=2", "trainer.logging_steps=1", "trainer.disable_tqdm=true",
        "trainer.learning_rate=1e-2", "eval.max_sequences=2", f"output_dir={out}", *extra,
    ]


def config(*ovr: str) -> TrainConfig:
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return TrainConfig.from_omegaconf(compose("train", overrides=list(ovr)))


class Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise KeyboardInterrupt("simulated kill")


def test_train_interrupt_and_resume(setup, tmp_path):
    root, model = setup
    straight = run_training(config(*overrides(root, model, tmp_path / "straight")))
    t = straight["train"]
    assert t["global_step"] == 4 and t["loss_first"] is not None and t["resumed_from"] is None
    assert straight["eval"]["ppl_true"] > 1 and set(straight["eval"]["layers"]) == {1, 2}
    saved = sorted(p.name for p in (tmp_path / "straight" / "compressor").iterdir())
    assert saved == ["compressor.safetensors", "compressor_config.json"]
    ckpt = tmp_path / "straight" / "checkpoint-2"
    assert (ckpt / "compressor.safetensors").exists() and (ckpt / "optimizer.pt").exists()
    assert not list(ckpt.glob("model.safetensors"))  # never the frozen base model

    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run_training(config(*overrides(root, model, out)), callbacks=[Interrupt()])
    assert (out / "checkpoint-2").exists() and not (out / "checkpoint-4").exists()
    resumed = run_training(config(*overrides(root, model, out)))
    assert resumed["train"]["resumed_from"].endswith("checkpoint-2") and resumed["train"]["global_step"] == 4
    # resuming restores weights, optimizer, scheduler and data order: same result as the straight run
    a, b = load_compressor(tmp_path / "straight" / "compressor"), load_compressor(out / "compressor")
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=k)


def test_pca_baseline_needs_no_training(setup, tmp_path):
    root, model = setup
    m = run_training(config(*overrides(root, model, tmp_path, "compressor=pca")))
    assert m["method"] == "pca" and "global_step" not in m["train"] and m["train"]["pca_energy_captured"]
    assert not list(tmp_path.glob("checkpoint-*"))
    # the standalone evaluation CLI reads the checkpoint back and writes the same kind of JSON
    from deltakv.evaluate import main as evaluate_main

    out = tmp_path / "eval" / "metrics.json"
    evaluate_main([str(tmp_path / "compressor"), "--model", str(model), "--text", str(root / "corpus.txt"),
                   "--seq-len", "32", "--max-sequences", "2", "--cache-dir", str(root / "packed"), "--json", str(out)])
    e = json.loads(out.read_text())
    assert e["sequences"] == 2 and e["ppl_recon"] > 1 and set(e["layers"]) == {"1", "2"}


def test_bad_inputs(setup, tmp_path):
    root, model = setup
    with pytest.raises(ValueError, match="joined KV width of this model is 2\\*num_kv_heads\\*head_dim = 2\\*2\\*8 = 32"):
        run_training(config(*overrides(root, model, tmp_path, "compressor.kv_compressed_size=32")))
    with pytest.raises(FileNotFoundError, match="Dataset path .*missing.txt does not exist"):
        run_training(config(*overrides(root, model, tmp_path, f"data.sources.0.path={root / 'missing.txt'}")))
    # the CLI in its own process: Hydra's in-process logging setup outlives pytest's capture of
    # earlier tests in the same xdist worker (it wrote to a closed capture file there)
    cmd = [sys.executable, "-m", "deltakv.train", *overrides(root, model, tmp_path, "compressor.kv_compressed_size=99")]
    env = {**os.environ, "PYTHONPATH": str(Path(CONF_DIR).parent)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=Path(CONF_DIR).parent)
    assert proc.returncode == 2 and "deltakv-train: error: compressor.kv_compressed_size=99" in proc.stderr, proc.stderr[-2000:]


def test_multirun_sweep_writes_one_folder_per_run_and_a_summary(setup, tmp_path):
    root, model = setup
    sweep = tmp_path / "sweep"
    args = [a for a in overrides(root, model, tmp_path) if not a.startswith(("output_dir", "compressor.kv_compressed_size"))]
    cmd = [sys.executable, "-m", "deltakv.train", "-m", *args, "trainer.max_steps=2", "eval.max_sequences=1",
           "compressor.kv_compressed_size=4,8", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "PYTHONPATH": str(Path(CONF_DIR).parent)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=Path(CONF_DIR).parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in range(2)]
    assert [r["kv_compressed_size"] for r in runs] == [4, 8]
    assert all((sweep / str(i) / "compressor" / "compressor.safetensors").exists() for i in range(2))
    summary = (sweep / "summary.md").read_text()
    assert "compressor.kv_compressed_size=4" in summary and "compressor.kv_compressed_size=8" in summary
    assert "Sweep summary" in proc.stdout
