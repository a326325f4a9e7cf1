"""Every Hydra config under the groups deltakv owns composes and validates."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from data_prepare.config import PackConfig
from deltakv.config import TrainConfig
from deltakv.train import CONF_DIR, _strip_local_rank
from deltakv.trainer import training_arguments

GROUPS = ["model", "data", "compressor", "trainer", "deepspeed", "logger"]
NEEDS_PATH = {"model": {"qwen2_5_7b_1m", "llama3_1_8b", "qwen3_8b"}, "data": {"text", "jsonl", "hf_disk"}}
FILL = ["model.path=/m", "data.sources.0.path=/d"]


def options(group):
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def test_every_group_option_composes_and_validates(tmp_path):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        for group in GROUPS:
            assert options(group), group
            for opt in options(group):
                cfg = compose("train", overrides=[f"{group}={opt}", f"output_dir={tmp_path}"])
                if opt in NEEDS_PATH.get(group, ()):
                    with pytest.raises(ValueError, match=f"Missing required config value `{group}"):
                        TrainConfig.from_omegaconf(cfg)
                    fill = FILL[0] if group == "model" else FILL[1]
                    cfg = compose("train", overrides=[f"{group}={opt}", f"output_dir={tmp_path}", fill])
                tc = TrainConfig.from_omegaconf(cfg)
                if group == "deepspeed":
                    assert tc.deepspeed["zero_optimization"]["stage"] == int(opt[-1])
                    assert training_arguments(tc).hf_deepspeed_config is not None  # accepted by HF
        for opt in options("data"):
            fill = [FILL[1]] if opt in NEEDS_PATH["data"] else []
            cfg = compose("pack", overrides=[f"data={opt}", *fill])
            PackConfig.from_dict(dict(cfg.data))


def test_every_experiment_composes(tmp_path):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        for exp in options("experiment"):
            cfg = compose("train", overrides=[f"+experiment={exp}", f"output_dir={tmp_path}"])
            if exp == "smoke":
                tc = TrainConfig.from_omegaconf(cfg)
                assert tc.model.path == "smollm2-135m" and tc.compressor.kv_compressed_size <= 384 // 3
                continue
            with pytest.raises(ValueError, match="model.path=/path/to/the/hf/model/folder"):
                TrainConfig.from_omegaconf(cfg)
            cfg = compose("train", overrides=[f"+experiment={exp}", f"output_dir={tmp_path}", *FILL])
            tc = TrainConfig.from_omegaconf(cfg)
            assert tc.compressor.kv_compressed_size == 512 and tc.compressor.down == "mlp_swiglu"
            assert tc.compressor.down_hidden == 3072 and tc.trainer.max_steps == 20000
            # the reference recipe (issue 15.2): its train script's lr / warmup, every layer, random init
            assert tc.trainer.learning_rate == 1e-4 and tc.trainer.warmup_ratio == 0.05
            assert tc.model.full_attn_layers == [] and tc.compressor.init == "random"
            assert (tc.loss.mse_target, tc.loss.mse_tokens, tc.loss.reconstruct_prototypes) == ("separate_pass", "all", True)
            assert tc.compressor.reference.stride == 10 and tc.compressor.reference.stride_rounding == "floor"


def test_unknown_keys_are_rejected(tmp_path):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"output_dir={tmp_path}", "+trainer.max_step=3"])
        with pytest.raises(ValueError, match=r"Unknown key\(s\) \['max_step'\] in `trainer`"):
            TrainConfig.from_omegaconf(cfg)


def test_deepspeed_local_rank_is_moved_out_of_argv(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "unset")  # registers the variable so it is restored after the test
    assert _strip_local_rank(["train", "--local_rank=3", "+experiment=smoke"]) == ["train", "+experiment=smoke"]
    import os

    assert os.environ["LOCAL_RANK"] == "3"
    assert _strip_local_rank(["train", "--local_rank", "1", "a=b"]) == ["train", "a=b"]
