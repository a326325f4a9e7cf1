"""Validated training configuration (what the Hydra groups under ``conf/`` compose into).

``TrainConfig.from_omegaconf(cfg)`` turns the composed Hydra config into these dataclasses, rejecting
unknown keys and missing required values with messages that name the fix.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass, field, fields

from data_prepare.config import PackConfig
from deltakv.reference import ReferenceSpec

COMPRESSOR_KINDS = ("deltakv", "pca")
INIT_KINDS = ("pca", "random")
REPORT_TO = ("none", "wandb", "tensorboard")


def _strict(cls, data: dict | None, where: str):
    data = dict(data or {})
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"Unknown key(s) {unknown} in `{where}`; valid keys: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        _check_type(f"{where}.{key}", value, hints[key])
    return cls(**data)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _matches(value, tp) -> bool:
    """Whether a config value (as Hydra / OmegaConf gives it) fits a dataclass annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    if origin is list or tp is list:
        args = typing.get_args(tp)
        return isinstance(value, (list, tuple)) and (not args or all(_matches(v, args[0]) for v in value))
    if origin is dict or tp is dict:
        args = typing.get_args(tp)
        return isinstance(value, dict) and (not args or all(_matches(k, args[0]) and _matches(v, args[1])
                                                             for k, v in value.items()))
    return True  # nested specs (ReferenceSpec) check themselves


def _check_type(name: str, value, tp) -> None:
    if not _matches(value, tp):
        raise ValueError(f"{name}={value!r} ({type(value).__name__}) is not a valid {_type_name(tp)}; "
                         f"give e.g. `{name}=<{_type_name(tp)}>` on the command line or in the YAML")


def _at_least(where: str, obj, minimum, *names: str) -> None:
    for n in names:
        value = getattr(obj, n)
        if value is not None and not isinstance(value, bool) and isinstance(value, (int, float)) and value < minimum:
            raise ValueError(f"{where}.{n} must be >= {minimum}, got {value}")


@dataclass
class ModelConfig:
    """The frozen base model.

    Attributes:
        path: local HF folder, or ``smollm2-135m`` (the shipped model). Nothing is downloaded.
        dtype: ``auto`` (bf16 on GPU, float32 on CPU) | ``float32`` | ``bfloat16`` | ``float16``.
        attn_implementation: HF attention backend (``sdpa`` | ``eager`` | ``flash_attention_2``).
        gradient_checkpointing: recompute decoder layers in backward (big models).
        full_attn_layers: layers never compressed (kept at full precision).
        longbench_max_len: LongBench truncation length of this model (read by ``deltakv-eval``; the
            ``model`` group is shared with it); training ignores it.
    """

    path: str | None = "smollm2-135m"
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    full_attn_layers: list[int] = field(default_factory=lambda: [0, 1, 2])
    longbench_max_len: int | None = None


@dataclass
class CompressorOptions:
    """The compressor to train (``conf/compressor``).

    Attributes:
        kind: ``deltakv`` (trained end to end) or ``pca`` (closed-form, no training: a baseline).
        kv_compressed_size: latent width (must be < joined KV width ``2*num_kv_heads*head_dim``).
        down: ``linear`` | ``mlp_gelu`` | ``mlp_swiglu``; up: ``linear`` | ``mlp_gelu`` (the reference's up
            for a type left on ``auto``; see ``deltakv.compressor``).
        down_hidden: hidden width of an MLP down (0 = 2 x joined KV width).
        up_hidden: hidden width of an MLP up (0 = ``(latent + joined KV width) // 2``, the reference's
            fallback in ``create_compressor``).
        bias: biases in the linear maps.
        init: ``pca`` (linear parts from closed-form PCA; MLP downs get a PCA linear skip) | ``random``.
        pca_batches: calibration sequences for PCA.
        layers: compressed layers (null = every layer not in full_attn_layers).
        full_attn_layers: null = ``model.full_attn_layers``.
        reference: ``ReferenceSpec`` fields (kind, num_sinks, cluster_ratio, metric, top_k, weighting, temperature).
    """

    kind: str = "deltakv"
    kv_compressed_size: int = 128
    down: str = "mlp_swiglu"
    up: str = "linear"
    down_hidden: int = 0
    up_hidden: int = 0
    bias: bool = True
    init: str = "pca"
    pca_batches: int = 8
    layers: list[int] | None = None
    full_attn_layers: list[int] | None = None
    reference: ReferenceSpec = field(default_factory=ReferenceSpec)

    def __post_init__(self) -> None:
        if isinstance(self.reference, dict):
            self.reference = ReferenceSpec.from_dict(self.reference)
        if self.kind not in COMPRESSOR_KINDS:
            raise ValueError(f"compressor.kind={self.kind!r}; choose one of {COMPRESSOR_KINDS}")
        if self.init not in INIT_KINDS:
            raise ValueError(f"compressor.init={self.init!r}; choose one of {INIT_KINDS}")
        if self.kind == "pca" and (self.down != "linear" or self.up != "linear"):
            raise ValueError("compressor.kind=pca is closed-form and needs compressor.down=linear, compressor.up=linear")
        if self.init == "pca" and self.up != "linear":
            raise ValueError(f"compressor.init=pca sets a linear up from PCA; compressor.up={self.up} needs "
                             "compressor.init=random (as the reference trains)")


@dataclass
class LossConfig:
    """loss = CE + mse_weight * sum_l layer_weights.get(l, 1) * MSE_l (see ``deltakv.model``).

    Attributes:
        mse_weight / layer_weights: 1 and 1 per layer in ours and in the reference (its loss is
            ``ntp_loss + sum_l mse_l``, CURRENTF/DeltaKV ``deltakv/modeling/*_training.py``).
        mse_target: ``same_pass`` (ours: the K/V layer l computes in the compressed pass, detached) |
            ``separate_pass`` (the reference: layer l's K/V in an extra uncompressed no-grad forward).
        mse_tokens: ``compressed`` (ours: the non-prototype tokens) | ``all`` (the reference: every
            token, sinks included, in the mean).
        reconstruct_prototypes: False (ours: prototypes exact in training, as at inference) | True (the
            reference: prototypes after the sinks are reconstructed too, each may be its own reference).
    """

    mse_weight: float = 1.0
    layer_weights: dict[int, float] | None = None
    mse_target: str = "same_pass"
    mse_tokens: str = "compressed"
    reconstruct_prototypes: bool = False

    def __post_init__(self) -> None:
        from deltakv.model import MSE_TARGETS, MSE_TOKENS

        if self.mse_target not in MSE_TARGETS:
            raise ValueError(f"loss.mse_target={self.mse_target!r}; choose one of {MSE_TARGETS}")
        if self.mse_tokens not in MSE_TOKENS:
            raise ValueError(f"loss.mse_tokens={self.mse_tokens!r}; choose one of {MSE_TOKENS}")


@dataclass
class TrainerConfig:
    """HF ``Trainer`` knobs (see ``deltakv.trainer.training_arguments``).

    ``warmup_ratio``: fraction of ``max_steps`` warmed up, in [0, 1]; passed to HF as
    ``ceil(max_steps * warmup_ratio)`` whole steps (``deltakv.trainer.warmup_steps``).

    ``resume``: ``auto`` (continue from the newest ``checkpoint-*`` in the output dir, if any),
    ``never``, or a checkpoint path. ``bf16``: ``auto`` = on GPU only. ``torch_threads``: CPU threads (null = torch default).
    """

    max_steps: int = 100
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.02
    lr_scheduler_type: str = "cosine"
    max_grad_norm: float = 1.0
    logging_steps: int = 5
    save_steps: int = 500
    save_total_limit: int | None = 2
    bf16: str | bool = "auto"
    dataloader_num_workers: int = 0
    resume: str = "auto"
    torch_threads: int | None = None
    disable_tqdm: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.save_steps, int) and not isinstance(self.save_steps, bool) and self.save_steps < 1:
            raise ValueError(f"trainer.save_steps={self.save_steps}: save a checkpoint every N >= 1 steps (to save "
                             "rarely, give a number above trainer.max_steps)")
        _at_least("trainer", self, 0, "max_steps", "learning_rate", "weight_decay", "warmup_ratio", "max_grad_norm",
                  "dataloader_num_workers")
        _at_least("trainer", self, 1, "per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps",
                  "torch_threads")
        if isinstance(self.warmup_ratio, (int, float)) and not isinstance(self.warmup_ratio, bool) \
                and self.warmup_ratio > 1:
            raise ValueError(f"trainer.warmup_ratio={self.warmup_ratio} is a fraction of trainer.max_steps, in [0, 1] "
                             f"(e.g. 0.05 = the first 5% of the steps)")
        if isinstance(self.save_total_limit, int) and self.save_total_limit < 1:
            raise ValueError(f"trainer.save_total_limit={self.save_total_limit}: keep N >= 1 checkpoints, or null to "
                             "keep all")
        if not (self.bf16 == "auto" or isinstance(self.bf16, bool)):
            raise ValueError(f"trainer.bf16={self.bf16!r}; choose auto, true or false")
        try:
            from transformers.trainer_utils import SchedulerType
        except ImportError:  # pragma: no cover - transformers is a dependency
            return
        kinds = [k.value for k in SchedulerType]
        if self.lr_scheduler_type not in kinds:
            raise ValueError(f"trainer.lr_scheduler_type={self.lr_scheduler_type!r}; choose one of {kinds}")


@dataclass
class EvalConfig:
    """Held-out evaluation after training: perplexity on true vs reconstructed KV, MSE per layer.

    ``ood_tokens``: tokens of Python stdlib source (another domain than the training data) on which
    the mean KL(true || reconstructed) of the next-token distributions and the top-1 agreement are
    measured (``deltakv.evaluate.ood_fidelity``, issue 15.7); 0 turns it off. 4096 = 8 sequences of 512
    on the smoke config, about half the work of the held-out evaluation's 14 sequences."""

    enabled: bool = True
    max_sequences: int = 16
    batch_size: int = 1
    ood_tokens: int = 4096

    def __post_init__(self) -> None:
        _at_least("eval", self, 1, "max_sequences", "batch_size")
        if self.ood_tokens != 0 and self.ood_tokens < 2:
            raise ValueError(f"eval.ood_tokens={self.ood_tokens}: use 0 (off) or >= 2 tokens (e.g. 4096)")


@dataclass
class LoggerConfig:
    """``report_to``: none (default) | wandb | tensorboard."""

    report_to: str = "none"
    project: str = "deltakv"
    run_name: str | None = None

    def __post_init__(self) -> None:
        if self.report_to not in REPORT_TO:
            raise ValueError(f"logger.report_to={self.report_to!r}; choose one of {REPORT_TO}")


@dataclass
class TrainConfig:
    model: ModelConfig
    data: PackConfig
    compressor: CompressorOptions
    loss: LossConfig
    trainer: TrainerConfig
    eval: EvalConfig
    logger: LoggerConfig
    output_dir: str
    seed: int = 0
    deepspeed: dict | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {"model", "data", "compressor", "loss", "trainer", "eval", "logger", "output_dir", "seed", "deepspeed"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown top-level key(s) {unknown}; valid: {sorted(known)}")
        if not d.get("output_dir"):
            raise ValueError("output_dir is required (deltakv-train sets it to the Hydra run folder)")
        ds = d.get("deepspeed") or None
        _check_type("seed", d.get("seed", 0), int)
        return cls(
            model=_strict(ModelConfig, d.get("model"), "model"),
            data=PackConfig.from_dict(dict(d.get("data") or {})),
            compressor=_strict(CompressorOptions, d.get("compressor"), "compressor"),
            loss=_strict(LossConfig, d.get("loss"), "loss"),
            trainer=_strict(TrainerConfig, d.get("trainer"), "trainer"),
            eval=_strict(EvalConfig, d.get("eval"), "eval"),
            logger=_strict(LoggerConfig, d.get("logger"), "logger"),
            output_dir=str(d["output_dir"]),
            seed=d.get("seed", 0),
            deepspeed=dict(ds) if ds else None,
        )

    @classmethod
    def from_omegaconf(cls, cfg) -> "TrainConfig":
        from omegaconf import OmegaConf
        from omegaconf.errors import MissingMandatoryValue

        try:
            d = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except MissingMandatoryValue as e:
            key = getattr(e, "full_key", None) or str(e)
            hint = ""
            if str(key).startswith("model.path"):
                hint = " This experiment needs a local model folder: add model.path=/path/to/the/hf/model/folder."
            elif str(key).startswith("data."):
                hint = f" Give the local dataset: add {key}=/path/to/your/data (nothing is downloaded)."
            raise ValueError(f"Missing required config value `{key}`.{hint}") from None
        return cls.from_dict(d)
