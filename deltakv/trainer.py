"""HF ``Trainer`` glue: only compressor weights are saved, resumed and optimised.

``DeltaKVTrainer`` logs the CE and MSE parts of the loss, writes checkpoints in the compressor
format (``deltakv.checkpoint``) instead of the whole model, reloads them on resume, and under
DeepSpeed excludes the frozen base model from its engine checkpoints.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from deltakv.checkpoint import fsync_path, load_compressor, save_compressor
from deltakv.config import TrainConfig


STAGING_PREFIX = "staging-checkpoint"  # a checkpoint being written; renamed to checkpoint-N when complete


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    ids = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)
    return {"input_ids": ids, "labels": ids.clone()}


def use_bf16(flag) -> bool:
    if flag == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(flag)


def training_arguments(cfg: TrainConfig) -> TrainingArguments:
    """Map the validated config onto ``TrainingArguments`` (DeepSpeed dict passed through as is)."""
    t = cfg.trainer
    stage = ((cfg.deepspeed or {}).get("zero_optimization") or {}).get("stage")
    if stage == 3:
        raise ValueError("deepspeed zero_optimization.stage=3 is not supported by deltakv-train: after training, "
                         "rank 0 alone saves the compressor and evaluates the frozen model, which ZeRO-3 partitions "
                         "over the ranks. Use deepspeed=zero2 (the compressor's optimizer state and gradients "
                         "partitioned; the frozen model, 15 GB in bf16 for a 7B, replicated) or zero1.")
    report_to = "none" if cfg.logger.report_to == "none" else [cfg.logger.report_to]
    modules = {"wandb": ["wandb"], "tensorboard": ["tensorboard", "tensorboardX"]}.get(cfg.logger.report_to, [])
    if modules and not any(importlib.util.find_spec(m) for m in modules):
        raise ValueError(f"logger={cfg.logger.report_to} needs the `{modules[0]}` package: pip install "
                         f"{modules[0]} (or use logger=none, the default)")
    if cfg.logger.report_to == "wandb":
        os.environ.setdefault("WANDB_PROJECT", cfg.logger.project)
    return TrainingArguments(
        output_dir=cfg.output_dir,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=warmup_steps(t.max_steps, t.warmup_ratio),
        lr_scheduler_type=t.lr_scheduler_type,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        # under DeepSpeed: no bf16 mode, which would cast the compressor to bf16 (its input is the fp32
        # K/V: a dtype error) - the frozen model runs in model.dtype (bf16 on GPU), the compressor in fp32
        bf16=use_bf16(t.bf16) and not cfg.deepspeed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=t.dataloader_num_workers,
        remove_unused_columns=False,
        report_to=report_to,
        run_name=cfg.logger.run_name,
        seed=cfg.seed,
        deepspeed=cfg.deepspeed,
        disable_tqdm=t.disable_tqdm,
        ddp_find_unused_parameters=False,
    )


def warmup_steps(max_steps: int, warmup_ratio: float) -> int:
    """Warmup as a whole number of optimizer steps, ``ceil(max_steps * warmup_ratio)`` (HF's rule for a
    ratio). Passed to ``TrainingArguments.warmup_steps`` as an int: a float there is a ratio only
    below 1 on transformers >= 5.2 (``warmup_ratio=1.0`` became ONE step), and older versions read
    it as a step count or reject it; an int means the same steps on every version. The product is
    rounded to 1e-6 first: 100 * 0.07 is 7.000000000000001 in floats, and 7% of 100 steps is 7."""
    return math.ceil(round(max_steps * warmup_ratio, 6)) if max_steps > 0 else 0


class DeltaKVTrainer(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # compute_loss returns the batch mean and ignores num_items_in_batch; HF takes a forward with
        # **kwargs as "normalises over the accumulated batch itself" and would then skip the division
        # by gradient_accumulation_steps (logged loss and gradients N times too large with N steps)
        self.model_accepts_loss_kwargs = False
        self._parts = {"ce": 0.0, "mse": 0.0, "n": 0}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs)
        self._parts["ce"] += float(out["ce"])
        self._parts["mse"] += float(out["mse"])
        self._parts["n"] += 1
        return (out["loss"], out) if return_outputs else out["loss"]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._parts["n"]:
            ce, mse, n = self._parts_over_processes()
            logs["ce"], logs["mse"] = round(ce / n, 5), round(mse / n, 6)
            self._parts = {"ce": 0.0, "mse": 0.0, "n": 0}
        super().log(logs, start_time)

    def _parts_over_processes(self) -> tuple[float, float, int]:
        """CE / MSE sums and batch count of every process (data parallel: each saw its own shard), so
        the logged parts average the global batch like the logged loss; every rank calls log()."""
        p = self._parts
        if self.accelerator.num_processes == 1:
            return p["ce"], p["mse"], p["n"]
        local = torch.tensor([p["ce"], p["mse"], float(p["n"])], dtype=torch.float64, device=self.args.device)
        ce, mse, n = self.accelerator.reduce(local, reduction="sum").tolist()
        return ce, mse, int(n)

    def _compressor(self):
        return self.accelerator.unwrap_model(self.model).compressor

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        sd = None
        if state_dict:
            sd = {k[len("compressor."):]: v for k, v in state_dict.items() if k.startswith("compressor.")} or None
        save_compressor(output_dir, self._compressor(), state_dict=sd, extra={"global_step": self.state.global_step})
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_checkpoint(self, model, trial) -> None:
        """HF's checkpoint save, made atomic: everything is written into ``staging-checkpoint-N``,
        flushed, and only then renamed to ``checkpoint-N`` (a kill mid-save leaves no ``checkpoint-N``
        that looks complete); older checkpoints are rotated out after the rename, never before."""
        import transformers.trainer as hf_trainer
        from transformers.trainer_utils import rotate_checkpoints

        run_dir = Path(self._get_output_dir(trial=trial))
        step = self.state.global_step
        staging, final = run_dir / f"{STAGING_PREFIX}-{step}", run_dir / f"{hf_trainer.PREFIX_CHECKPOINT_DIR}-{step}"
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging)  # left by a run killed mid-save
        # other ranks write their rng_state_<rank>.pth into staging: not before the removal above
        self.accelerator.wait_for_everyone()
        limit, prefix = self.args.save_total_limit, hf_trainer.PREFIX_CHECKPOINT_DIR
        hf_trainer.PREFIX_CHECKPOINT_DIR, self.args.save_total_limit = STAGING_PREFIX, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            hf_trainer.PREFIX_CHECKPOINT_DIR, self.args.save_total_limit = prefix, limit
        self.accelerator.wait_for_everyone()  # every rank's part (DeepSpeed shards) is in staging
        if not self.args.should_save:
            return
        for f in staging.rglob("*"):
            if f.is_file():
                fsync_path(f)
        if final.exists():  # e.g. a corrupt checkpoint-N skipped on resume, now written again
            trash = run_dir / f".trash-{final.name}-{os.getpid()}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(staging, final)
        fsync_path(run_dir)
        rotate_checkpoints(output_dir=str(run_dir), save_total_limit=limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        loaded = load_compressor(resume_from_checkpoint)
        target = self.accelerator.unwrap_model(model or self.model).compressor
        target.load_state_dict(loaded.state_dict())

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_deepspeed_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        from accelerate.utils import DeepSpeedSchedulerWrapper

        # engine checkpoint (ZeRO optimizer shards of every rank) without the frozen base model
        self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
        # HF's own scheduler (the DeepSpeed configs here define none) is not in the engine checkpoint,
        # and HF reloads it from scheduler.pt on resume, as its DeepSpeed save does
        if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

    def train(self, *args, **kwargs):
        if not self.is_deepspeed_enabled and self.args.deepspeed is None:
            return super().train(*args, **kwargs)
        import transformers.trainer as hf_trainer

        original = hf_trainer.deepspeed_load_checkpoint
        # the engine checkpoint excludes frozen params, so it must load non-strictly
        hf_trainer.deepspeed_load_checkpoint = functools.wraps(original)(
            lambda *a, **k: original(*a, **{**k, "load_module_strict": False})
        )
        try:
            return super().train(*args, **kwargs)
        finally:
            hf_trainer.deepspeed_load_checkpoint = original
