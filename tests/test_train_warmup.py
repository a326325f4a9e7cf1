"""trainer.warmup_ratio reaches HF as whole warmup steps, ceil(max_steps * ratio), on every allowed
transformers (a float ``warmup_steps`` >= 1 is a step count there: ratio 1.0 used to warm up ONE step).
The schedule checked is the one HF's Trainer builds from our TrainingArguments."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import Trainer

from deltakv.config import TrainConfig
from deltakv.train import CONF_DIR
from deltakv.trainer import training_arguments


def _args(tmp_path, max_steps: int, ratio: float, scheduler: str = "linear"):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"output_dir={tmp_path}", f"trainer.max_steps={max_steps}",
                                          f"trainer.warmup_ratio={ratio}", f"trainer.lr_scheduler_type={scheduler}"])
    return training_arguments(TrainConfig.from_omegaconf(cfg))


# (max_steps, warmup_ratio, warmup steps by hand)
@pytest.mark.parametrize("steps,ratio,want", [(100, 0.02, 2), (100, 1.0, 100), (100, 0.07, 7), (50, 0.05, 3),
                                              (2000, 0.05, 100), (10, 0.0, 0), (3, 0.5, 2)])
def test_warmup_steps_are_ceil_of_the_ratio(tmp_path, steps, ratio, want):
    args = _args(tmp_path, steps, ratio)
    assert args.warmup_steps == want and isinstance(args.warmup_steps, int)
    assert args.get_warmup_steps(steps) == want
    trainer = Trainer(model=torch.nn.Linear(2, 2), args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    lrs = []
    for _ in range(steps):
        lrs.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    base = args.learning_rate
    # linear warmup: lr(k) = base * k / W for k < W, then the peak, then linear decay to 0 at `steps`
    for k in range(steps):
        hand = base * k / want if k < want else base * (steps - k) / max(1, steps - want)
        assert lrs[k] == pytest.approx(hand, rel=1e-6, abs=1e-12), (k, lrs[k], hand)


def test_warmup_ratio_above_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="trainer.warmup_ratio=1.5"):
        _args(tmp_path, 100, 1.5)
