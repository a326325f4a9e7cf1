"""logger=tensorboard / logger=wandb (offline) on a tiny training run (issue 18): the tracker's run
folder, inside the run's output dir, holds the logged loss curve (equal to the trainer's log history)
and the effective config. Read back with TensorBoard's event reader and a wandb run-file reader written
for the test (tests/wandb_offline.py)."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from deltakv.config import TrainConfig
from deltakv.testing import tiny_training_setup
from deltakv.train import CONF_DIR, run_training



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_training_setup(tmp_path_factory.mktemp("loggers"))


def train(root: Path, model: Path, out: Path, logger: str) -> dict:
    ovr = [
        f"model.path={model}", "model.full_attn_layers=[0]", "data=text", f"data.sources.0.path={root / 'corpus.txt'}",
        "data.seq_len=32", "data.eval_fraction=0.2", f"data.cache_dir={root / 'packed'}",
        "compressor.kv_compressed_size=8", "compressor.down_hidden=16", "compressor.pca_batches=2",
        "compressor.reference.num_sinks=2", "trainer.max_steps=3", "trainer.save_steps=10",
        "trainer.logging_steps=1", "trainer.disable_tqdm=true", "trainer.learning_rate=5e-2",
        "eval.enabled=false", f"logger={logger}", "logger.run_name=tiny-run", f"output_dir={out}",
    ]
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return run_training(TrainConfig.from_omegaconf(compose("train", overrides=ovr)))


def trained_curve(metrics: dict) -> dict[int, float]:
    curve = {h["step"]: h["loss"] for h in metrics["train"]["log_history"]}
    assert sorted(curve) == [1, 2, 3] and len(set(curve.values())) == 3
    return curve


def assert_effective_config(config: dict, model: Path) -> None:
    assert config["model"]["path"] == str(model)
    assert config["compressor"]["kv_compressed_size"] == 8 and config["data"]["seq_len"] == 32
    assert config["trainer"]["max_steps"] == 3 and config["logger"]["run_name"] == "tiny-run"


def test_tensorboard_run_folder_holds_loss_curve_and_config(setup, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, model = setup
    metrics = train(root, model, tmp_path, "tensorboard")
    (run,) = [p.parent for p in (tmp_path / "runs").rglob("events.out.tfevents.*")]
    events = EventAccumulator(str(run), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert logged == pytest.approx(trained_curve(metrics), rel=1e-6)
    assert {e.step for e in events.Scalars("train/mse")} == {1, 2, 3}
    (text,) = events.Tensors("deltakv_config/text_summary")
    assert_effective_config(json.loads(text.tensor_proto.string_val[0].decode()), model)


def test_wandb_offline_run_folder_holds_loss_curve_and_config(setup, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from tests.wandb_offline import history_and_config

    for key in ("WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    root, model = setup
    for out in (tmp_path / "a", tmp_path / "b"):  # the second run gets its own wandb run (the first was finished)
        metrics = train(root, model, out, "wandb")
        (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
        rows, config = history_and_config(run_file)
        logged = {r["train/global_step"]: r["train/loss"] for r in rows if "train/loss" in r}
        assert logged == pytest.approx(trained_curve(metrics), rel=1e-6)
        assert_effective_config(config["deltakv"], model)
        assert config["max_steps"] == 3  # HF's TrainingArguments, logged next to it
