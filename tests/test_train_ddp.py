"""Data-parallel training (issue 18): 2 processes under torchrun (DDP, gloo on CPU) follow the same loss
curve as 1 process with the same global batch, and rank 0 alone writes the checkpoints and the
compressor; gradient accumulation gives that curve too."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from deltakv.checkpoint import load_compressor
from deltakv.config import TrainConfig
from deltakv.testing import tiny_training_setup
from deltakv.train import CONF_DIR, run_training

REPO = Path(CONF_DIR).parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_training_setup(tmp_path_factory.mktemp("ddp"))


def overrides(root: Path, model: Path, *extra: str) -> list[str]:
    # lr 5e-2: the 4 steps move the compressor far beyond float noise, so equal curves mean equal training
    return [
        f"model.path={model}", "model.full_attn_layers=[0]", "data=text", f"data.sources.0.path={root / 'corpus.txt'}",
        "data.seq_len=32", "data.eval_fraction=0.2", f"data.cache_dir={root / 'packed'}",
        "compressor.kv_compressed_size=8", "compressor.down_hidden=16", "compressor.pca_batches=2",
        "compressor.reference.num_sinks=2", "compressor.reference.cluster_ratio=0.25",
        "trainer.max_steps=4", "trainer.save_steps=2", "trainer.logging_steps=1", "trainer.disable_tqdm=true",
        "trainer.learning_rate=5e-2", "trainer.warmup_ratio=0", "eval.enabled=false", *extra,
    ]


def run_in_process(*ovr: str) -> dict:
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return run_training(TrainConfig.from_omegaconf(compose("train", overrides=list(ovr))))


def curve(metrics: dict) -> list[tuple[int, float, float, float]]:
    return [(h["step"], h["loss"], h["ce"], h["mse"]) for h in metrics["train"]["log_history"]]


def assert_same_curve(a: dict, b: dict) -> None:
    ca, cb = curve(a), curve(b)
    assert [s for s, *_ in ca] == [s for s, *_ in cb] == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor([c[1:] for c in cb], dtype=torch.float64),
                               torch.tensor([c[1:] for c in ca], dtype=torch.float64), rtol=1e-5, atol=2e-6)


def assert_same_compressor(a: Path, b: Path) -> None:
    sa, sb = load_compressor(a).state_dict(), load_compressor(b).state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def one_process(setup, tmp_path_factory):
    """The reference: 1 process, per-device batch 2 (the global batch of every test here)."""
    root, model = setup
    out = tmp_path_factory.mktemp("one")
    return run_in_process(*overrides(root, model, f"output_dir={out}", "trainer.per_device_train_batch_size=2")), out


def test_gradient_accumulation_follows_the_same_global_batch(setup, one_process, tmp_path):
    """batch 2 x 1 step == batch 1 x 2 accumulated steps (was: loss and gradients summed, x2)."""
    root, model = setup
    batch, batch_out = one_process
    accum = run_in_process(*overrides(root, model, f"output_dir={tmp_path / 'ga2'}",
                                      "trainer.per_device_train_batch_size=1", "trainer.gradient_accumulation_steps=2"))
    assert_same_curve(batch, accum)
    assert_same_compressor(batch_out / "compressor", tmp_path / "ga2" / "compressor")


def torchrun(nproc: int, *args: str) -> None:
    """``torchrun --standalone --nproc_per_node N -m deltakv.train ARGS`` (the README's CPU command)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "deltakv.train", *args]
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_two_processes_follow_the_one_process_curve_and_rank0_saves_once(setup, one_process, tmp_path):
    root, model = setup
    one, one_out = one_process
    # each rank asks for its own output dir: rank 1 must follow rank 0's (Hydra's default run dir is
    # stamped with each process's start time, which can differ between ranks)
    two = tmp_path / "two"
    torchrun(2, *overrides(root, model, "trainer.per_device_train_batch_size=1",
                           f"output_dir={two}/rank${{oc.env:RANK}}", f"hydra.run.dir={two}/hydra"))
    out = two / "rank0"
    assert not (two / "rank1").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert_same_curve(one, metrics)
    assert abs(curve(metrics)[-1][3] - curve(metrics)[0][3]) > 1e-3  # the MSE curve moved: a real training
    # exactly one compressor, rank 0's, equal to the 1-process one; the checkpoints hold both ranks' RNG state
    assert sorted(two.rglob("compressor/compressor.safetensors")) == [out / "compressor" / "compressor.safetensors"]
    assert_same_compressor(one_out / "compressor", out / "compressor")
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert {p.name for p in (out / "checkpoint-4").glob("rng_state*")} == {"rng_state_0.pth", "rng_state_1.pth"}
    # one config line per run (rank 0 only)
    log = (two / "hydra" / "train.log").read_text()
    assert log.count("deltakv-train config ") == 1, log[-2000:]


@pytest.mark.slow  # ~30 s on 2 cores; the first DeepSpeed run on a machine also JIT-builds its CPU shm op (~3 min)
def test_deepspeed_zero2_two_processes_follow_the_one_process_curve_and_resume(setup, one_process, tmp_path):
    pytest.importorskip("deepspeed")
    root, model = setup
    one, one_out = one_process
    out = tmp_path / "zero2"
    args = overrides(root, model, "trainer.per_device_train_batch_size=1", "deepspeed=zero2",
                     f"output_dir={out}", f"hydra.run.dir={out}")
    torchrun(2, *args)
    straight = json.loads((out / "metrics.json").read_text())
    assert_same_curve(one, straight)
    assert_same_compressor(one_out / "compressor", out / "compressor")
    # the engine checkpoint holds the compressor's optimizer shards, never the frozen base model
    shards = sorted(p.name for p in (out / "checkpoint-2" / "global_step2").iterdir())
    assert shards == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                      "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    model_states = torch.load(out / "checkpoint-2" / "global_step2" / "mp_rank_00_model_states.pt",
                              map_location="cpu", weights_only=False)["module"]
    assert model_states and all(k.startswith("compressor.") for k in model_states)
    # lose the end of the run: resume=auto continues from checkpoint-2 (ZeRO shards, both ranks' RNG)
    # and ends where the uninterrupted run ended
    final = load_compressor(out / "compressor").state_dict()
    shutil.rmtree(out / "checkpoint-4")
    shutil.rmtree(out / "compressor")
    torchrun(2, *args)
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["train"]["resumed_from"].endswith("checkpoint-2") and resumed["train"]["global_step"] == 4
    assert_same_curve(straight, resumed)  # steps 1-2 restored from trainer_state, 3-4 trained again
    for k, v in load_compressor(out / "compressor").state_dict().items():
        torch.testing.assert_close(v, final[k], rtol=1e-5, atol=1e-6, msg=k)


def config_of(*ovr: str) -> TrainConfig:
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return TrainConfig.from_omegaconf(compose("train", overrides=[*ovr, "output_dir=/tmp/unused"]))


def test_deepspeed_keeps_the_compressor_in_fp32_and_zero3_is_refused(setup):
    pytest.importorskip("deepspeed")
    from deltakv.trainer import training_arguments

    root, model = setup
    # DeepSpeed's bf16 mode would cast the compressor to bf16 while its input K/V is fp32 (a dtype error
    # on the first step, seen on an H200): under DeepSpeed trainer.bf16 leaves bf16 mode off
    args = training_arguments(config_of(*overrides(root, model, "deepspeed=zero2", "trainer.bf16=true")))
    assert args.bf16 is False and args.deepspeed["bf16"]["enabled"] is False
    cfg = config_of(*overrides(root, model, "deepspeed=zero2"))
    cfg.deepspeed["zero_optimization"]["stage"] = 3
    with pytest.raises(ValueError, match="stage=3 is not supported by deltakv-train.*deepspeed=zero2"):
        training_arguments(cfg)
