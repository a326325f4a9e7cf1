"""Run-level logging of ``deltakv-train``: one INFO line with the effective config, and the same config
handed to the experiment tracker (``logger=wandb``: the run's config; ``logger=tensorboard``: a text
entry ``deltakv_config``) so the tracker's run folder holds the loss curve *and* what produced it.

Named loggers: ``deltakv.train`` (this job). Under the CLI Hydra sends INFO to the console and to
``<run dir>/train.log``; used as a library, configure ``logging`` as usual. Progress bars are tqdm's:
``TQDM_DISABLE=1`` turns them all off, ``trainer.disable_tqdm=true`` only the training loop's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

from transformers import TrainerCallback

log = logging.getLogger("deltakv.train")


def is_main_process() -> bool:
    """Rank 0 of a ``torchrun`` / ``accelerate launch`` / ``deepspeed`` job (or a single process)."""
    return int(os.environ.get("RANK", "0")) == 0


def config_dict(cfg) -> dict:
    """The effective (validated, composed) config as plain data."""
    return dataclasses.asdict(cfg)


def config_line(cfg) -> str:
    """The effective config on one line (compact JSON), for the one INFO line per run."""
    return json.dumps(config_dict(cfg), separators=(",", ":"), default=str)


_wandb_run = None  # the wandb run start_wandb_run opened last; finished at train end (or by the next run)


def start_wandb_run(cfg):
    """Open the wandb run of ``logger=wandb`` on rank 0, with the effective config as ``config.deltakv``,
    in the run folder (``<output_dir>/wandb``; ``WANDB_DIR`` overrides). HF's ``WandbCallback`` then
    logs into it instead of opening a run in the current directory. A run the caller opened is reused."""
    global _wandb_run
    if cfg.logger.report_to != "wandb" or not is_main_process():
        return None
    import wandb

    if _wandb_run is not None and wandb.run is _wandb_run:
        wandb.finish()  # left open by a training that raised in this process (a multirun job, a test)
    _wandb_run = None
    if wandb.run is not None:
        wandb.run.config.update({"deltakv": config_dict(cfg)}, allow_val_change=True)
        return wandb.run
    _wandb_run = wandb.init(project=cfg.logger.project, name=cfg.logger.run_name,
                            dir=os.environ.get("WANDB_DIR") or cfg.output_dir, config={"deltakv": config_dict(cfg)})
    return _wandb_run


class RunConfigCallback(TrainerCallback):
    """Puts the effective config next to the loss curve in TensorBoard (text ``deltakv_config``) and
    finishes the wandb run ``start_wandb_run`` opened (flushes it; the next run gets its own).

    Must come after HF's reporting callbacks (the Trainer puts ``report_to`` callbacks first, added
    ones after them), which open the writer in their ``on_train_begin``; ``callbacks`` is the
    trainer's ``callback_handler.callbacks`` list.
    """

    def __init__(self, config: dict, callbacks: list):
        self.config = config
        self.callbacks = callbacks

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from transformers.integrations import TensorBoardCallback

        for cb in self.callbacks:
            if isinstance(cb, TensorBoardCallback) and cb.tb_writer is not None:
                cb.tb_writer.add_text("deltakv_config", json.dumps(self.config, indent=2, default=str))
                cb.tb_writer.flush()

    def on_train_end(self, args, state, control, **kwargs):
        global _wandb_run
        if _wandb_run is None:
            return
        import wandb

        if wandb.run is _wandb_run:
            wandb.finish()
        _wandb_run = None
