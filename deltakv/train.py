"""``deltakv-train``: train (or fit) a DeltaKV compressor for a frozen HF model.

    deltakv-train +experiment=smoke                                  # shipped model, CPU, minutes
    deltakv-train +experiment=qwen7b_c512 model.path=/models/Qwen2.5-7B-Instruct-1M deepspeed=zero2
    deltakv-train -m +experiment=smoke compressor.kv_compressed_size=64,128   # one folder per run + summary

Steps: load the frozen model -> pack the data (cached by content hash) -> build the compressor ->
PCA init / closed-form PCA -> HF Trainer (resumes from the newest checkpoint in the output dir) ->
save ``<output_dir>/compressor`` -> evaluate perplexity on true vs reconstructed KV ->
``<output_dir>/metrics.json`` + a printed table.

Logs through ``logging`` (logger ``deltakv.train``; one INFO line with the effective config per run).
Data parallel: ``torchrun --nproc_per_node N -m deltakv.train ...`` (DDP; gloo on CPU) or DeepSpeed
ZeRO (``deepspeed=zero2``); rank 0 packs the data first, writes the checkpoints and the compressor.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

from deltakv.config import TrainConfig

# "../conf" of this file, as an absolute path so Hydra finds it whether run as a module or a script
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

log = logging.getLogger("deltakv.train")


def _strip_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends ``--local_rank=N``; Hydra would reject it, so move it to the env."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ["LOCAL_RANK"] = arg.split("=", 1)[1]
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ["LOCAL_RANK"] = argv[i + 1]
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


def build_compressor_config(cfg: TrainConfig, model_config):
    from deltakv.compressor import CompressorConfig
    from deltakv.hf_model import model_dims

    dims = model_dims(model_config)
    c = cfg.compressor
    full = c.full_attn_layers if c.full_attn_layers is not None else cfg.model.full_attn_layers
    full = sorted(int(i) for i in full)
    layers = c.layers if c.layers is not None else [i for i in range(dims.num_hidden_layers) if i not in full]
    down_hidden = c.down_hidden or (2 * dims.kv_width if c.down != "linear" else 0)
    up_hidden = c.up_hidden or ((c.kv_compressed_size + dims.kv_width) // 2 if c.up != "linear" else 0)
    return CompressorConfig(
        model_type=dims.model_type, num_hidden_layers=dims.num_hidden_layers, num_kv_heads=dims.num_kv_heads,
        head_dim=dims.head_dim, layers=sorted(int(i) for i in layers), full_attn_layers=full,
        kv_compressed_size=c.kv_compressed_size, down=c.down, up=c.up, down_hidden=down_hidden, bias=c.bias,
        linear_skip=c.init == "pca" and c.down != "linear", reference=c.reference, method=c.kind,
        k_after_norm=dims.qk_norm, up_hidden=up_hidden,
    )


def _resume_path(cfg: TrainConfig) -> str | None:
    """The checkpoint to resume from: ``trainer.resume=auto`` takes the newest complete one in the
    output dir, skipping (with a warning) any that is incomplete or corrupt, e.g. one whose save was
    killed by a pre-atomic version; an explicit path must be complete."""
    from deltakv.checkpoint import training_checkpoint_problem

    r = cfg.trainer.resume
    if r == "never":
        return None
    if r == "auto":
        out = Path(cfg.output_dir)
        if not out.is_dir():
            return None
        found = []
        for p in out.iterdir():
            m = _CHECKPOINT_RE.fullmatch(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
        skipped = []
        for _, path in sorted(found, reverse=True):
            problem = training_checkpoint_problem(path)
            if problem is None:
                if skipped:
                    _warn(f"resuming from {path.name} instead: skipped " + "; ".join(skipped))
                return str(path)
            skipped.append(f"{path.name} ({problem})")
        if skipped:
            _warn("no complete checkpoint to resume from, starting from scratch: skipped " + "; ".join(skipped))
        return None
    if not Path(r).exists():
        raise FileNotFoundError(f"trainer.resume={r} does not exist; use auto, never, or a checkpoint-* folder")
    problem = training_checkpoint_problem(r)
    if problem is not None:
        raise ValueError(f"trainer.resume={r} cannot be resumed from: {problem}. Use trainer.resume=auto (the "
                         "newest complete checkpoint) or another checkpoint-* folder.")
    return r


_CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")


def _warn(message: str) -> None:
    warnings.warn(f"deltakv-train: {message}", RuntimeWarning, stacklevel=3)
    log.warning(message)


def _remove_stale_saves(out_dir: Path) -> None:
    """Staging folders of saves that were killed before their rename (only the main process)."""
    from deltakv.trainer import STAGING_PREFIX

    if int(os.environ.get("RANK", "0")) != 0:
        return
    for p in list(out_dir.glob(f"{STAGING_PREFIX}-*")) + list(out_dir.glob(".trash-checkpoint-*")):
        shutil.rmtree(p, ignore_errors=True)


def run_training(cfg: TrainConfig, callbacks: list | None = None) -> dict:
    """Run one training job end to end; returns the metrics written to ``metrics.json``."""
    from transformers import set_seed

    from data_prepare.pack import pack_dataset
    from deltakv.checkpoint import atomic_write, save_compressor
    from deltakv.compressor import DeltaKVCompressor
    from deltakv.evaluate import evaluate_ood, evaluate_reconstruction, format_ood, format_table
    from deltakv.hf_model import load_frozen_lm
    from deltakv.model import DeltaKVForTraining
    from deltakv.pca import fit_pca_
    from deltakv.run_logging import RunConfigCallback, config_dict, config_line, is_main_process, start_wandb_run
    from deltakv.trainer import DeltaKVTrainer, collate, training_arguments

    t0 = time.time()
    if cfg.trainer.torch_threads:
        torch.set_num_threads(cfg.trainer.torch_threads)
    set_seed(cfg.seed)
    args = training_arguments(cfg)  # checks the logger; under torchrun / accelerate it joins the process group
    cfg = _output_dir_of_rank0(cfg, args)
    rank0 = is_main_process()
    if rank0:
        log.info("deltakv-train config %s", config_line(cfg))
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lm, tokenizer = load_frozen_lm(cfg.model.path, cfg.model.dtype, cfg.model.attn_implementation)
    comp_cfg = build_compressor_config(cfg, lm.config)
    # rank 0 packs (and caches) first, the other ranks then load its cache instead of racing it
    with args.main_process_first(local=False, desc="pack the data"):
        data, data_dir = pack_dataset(cfg.data, tokenizer)
    if len(data["train"]) == 0:
        raise ValueError(f"The packed train split at {data_dir} is empty; add documents or lower data.seq_len")
    if rank0:
        log.info("data %s: train %d x %d, validation %d sequences", data_dir, len(data["train"]),
                 cfg.data.seq_len, len(data.get("validation", [])))
    device = next(lm.parameters()).device
    compressor = DeltaKVCompressor(comp_cfg).to(device)
    _remove_stale_saves(out_dir)
    resume = _resume_path(cfg) if cfg.compressor.kind == "deltakv" else None
    timings, train_info = {}, {}

    if (cfg.compressor.init == "pca" or cfg.compressor.kind == "pca") and resume is None:
        t = time.time()
        n = min(cfg.compressor.pca_batches, len(data["train"]))
        batches = [torch.tensor([data["train"][i]["input_ids"]]) for i in range(n)]
        energy = fit_pca_(lm, compressor, batches)
        timings["pca_s"] = round(time.time() - t, 2)
        train_info["pca_energy_captured"] = {str(k): round(v, 4) for k, v in energy.items()}

    wrapper = DeltaKVForTraining(lm, compressor, cfg.loss.mse_weight, cfg.loss.layer_weights, cfg.loss.mse_target,
                                 cfg.loss.mse_tokens, cfg.loss.reconstruct_prototypes)
    if cfg.model.gradient_checkpointing:
        wrapper.gradient_checkpointing_enable()

    if cfg.compressor.kind == "deltakv" and cfg.trainer.max_steps > 0:
        t = time.time()
        start_wandb_run(cfg)
        trainer = DeltaKVTrainer(model=wrapper, args=args, train_dataset=data["train"],
                                 data_collator=collate, callbacks=callbacks)
        trainer.add_callback(RunConfigCallback(config_dict(cfg), trainer.callback_handler.callbacks))
        if resume and rank0:
            log.info("resuming from %s", resume)
        result = trainer.train(resume_from_checkpoint=resume)
        timings["train_s"] = round(time.time() - t, 2)
        losses = [h for h in trainer.state.log_history if "loss" in h]
        train_info.update({
            "global_step": trainer.state.global_step, "resumed_from": resume,
            "train_loss": round(result.training_loss, 5),
            "loss_first": losses[0]["loss"] if losses else None, "loss_last": losses[-1]["loss"] if losses else None,
            "ce_first": losses[0].get("ce") if losses else None, "ce_last": losses[-1].get("ce") if losses else None,
            "mse_first": losses[0].get("mse") if losses else None, "mse_last": losses[-1].get("mse") if losses else None,
            "log_history": losses,
        })
        if not trainer.args.should_save:
            return {}
    ckpt = save_compressor(out_dir / "compressor", compressor,
                           extra={"train": {k: v for k, v in train_info.items() if k != "log_history"},
                                  "data": str(data_dir)})
    metrics = {"compressor": str(ckpt), "kv_width": comp_cfg.kv_width,
               "kv_compressed_size": comp_cfg.kv_compressed_size, "method": comp_cfg.method,
               "reference": comp_cfg.reference.kind, "train": train_info}
    if cfg.eval.enabled and "validation" in data and len(data["validation"]):
        t = time.time()
        metrics["eval"] = evaluate_reconstruction(wrapper, data["validation"], cfg.eval.max_sequences,
                                                  cfg.eval.batch_size)
        timings["eval_s"] = round(time.time() - t, 2)
        print(format_table(metrics["eval"]))
    if cfg.eval.enabled and cfg.eval.ood_tokens:  # fidelity that adapting to the domain cannot win (issue 15.7)
        t = time.time()
        metrics["eval_ood"] = evaluate_ood(wrapper, tokenizer, cfg.eval.ood_tokens, cfg.data.seq_len)
        timings["eval_ood_s"] = round(time.time() - t, 2)
        print(format_ood(metrics["eval_ood"]))
    timings["total_s"] = round(time.time() - t0, 2)
    metrics["timings"] = timings
    atomic_write(out_dir / "metrics.json", lambda tmp: tmp.write_text(json.dumps(metrics, indent=2, default=str)))
    _print_summary(metrics)
    return metrics


def _output_dir_of_rank0(cfg: TrainConfig, args) -> TrainConfig:
    """Every rank of a multi-process run uses rank 0's output dir: Hydra's default one is stamped with
    each process's own start time (and clock, across nodes), which can differ by a second."""
    import dataclasses

    import torch.distributed as dist

    if args.world_size == 1 or not dist.is_initialized():  # world_size sets up the process group
        return cfg
    shared = [cfg.output_dir]
    dist.broadcast_object_list(shared, src=0)
    if shared[0] != cfg.output_dir:
        log.debug("rank %d: output_dir %s -> rank 0's %s", dist.get_rank(), cfg.output_dir, shared[0])
        args.output_dir = shared[0]
        cfg = dataclasses.replace(cfg, output_dir=shared[0])
    return cfg


def _print_summary(m: dict) -> None:
    t, e = m.get("train", {}), m.get("eval")
    log.info("compressor saved to %s  (%s, latent %s/%s, reference %s)", m["compressor"], m["method"],
             m["kv_compressed_size"], m["kv_width"], m["reference"])
    if t.get("loss_first") is not None:
        log.info("loss %.4f -> %.4f over %d steps", t["loss_first"], t["loss_last"], t["global_step"])
    if e:
        log.info("held-out perplexity: true %.3f, reconstructed %.3f (x%.3f)", e["ppl_true"], e["ppl_recon"],
                 e["ppl_ratio"])
    log.info("timings %s", m["timings"])


def _hydra_entry():
    import hydra

    @hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
    def _run(cfg):
        from deltakv.checkpoint import CheckpointError
        from deltakv.hf_model import UnsupportedModelError

        try:
            tc = TrainConfig.from_omegaconf(cfg)
            metrics = run_training(tc)
        except (ValueError, FileNotFoundError, KeyError, CheckpointError, UnsupportedModelError) as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"deltakv-train: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        return metrics.get("eval", {}).get("ppl_ratio")

    return _run


def main() -> None:
    sys.argv = _strip_local_rank(sys.argv)
    _hydra_entry()()


if __name__ == "__main__":
    main()
