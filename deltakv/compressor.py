"""Compressor modules: one residual down/up pair per compressed layer.

A token's joined KV vector ``kv = cat([k_proj(x), v_proj(x)], -1)`` (width ``2 * num_kv_heads *
head_dim``, taken BEFORE RoPE and before any k-norm) is stored as a latent residual against its
reference ``ref`` (see ``deltakv.reference``)::

    latent = down(kv) - down(ref)          # ResidualCompressor.encode
    kv_hat = up(latent) + ref              # ResidualCompressor.decode

``down``: ``linear`` | ``mlp_gelu`` | ``mlp_swiglu`` (``w3(silu(x1) * x2)`` with
``x1, x2 = w12(x).chunk(2)``), optionally plus a linear skip path (used by ``init=pca`` for the MLP
kinds so the PCA projection is the starting point). ``up``: ``linear`` (ours) | ``mlp_gelu``
(``fc2(gelu(fc1(z)))``, hidden ``up_hidden``: what the reference builds for an up left on ``auto`` with
``use_nonlinear_compressor=True``, CURRENTF/Sparse-vLLM ``src/sparsevllm/utils/compressor.py``
``create_compressor``; its ``nn.Sequential`` keys ``0`` / ``2`` are our ``fc1`` / ``fc2``). New kinds
register in ``DOWN_KINDS`` / ``UP_KINDS``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from deltakv.reference import ReferenceSpec


class LinearDown(nn.Module):
    def __init__(self, width: int, latent: int, hidden: int, bias: bool, skip: bool):
        super().__init__()
        self.proj = nn.Linear(width, latent, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class _MLPDown(nn.Module):
    """Base of the MLP downs: ``mlp(x)`` plus an optional linear ``skip(x)``."""

    def __init__(self, width: int, latent: int, hidden: int, bias: bool, skip: bool):
        super().__init__()
        self.skip = nn.Linear(width, latent, bias=False) if skip else None

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(x)
        return y if self.skip is None else y + self.skip(x)


class GeluDown(_MLPDown):
    def __init__(self, width: int, latent: int, hidden: int, bias: bool, skip: bool):
        super().__init__(width, latent, hidden, bias, skip)
        self.fc1 = nn.Linear(width, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, latent, bias=bias)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class SwiGLUDown(_MLPDown):
    def __init__(self, width: int, latent: int, hidden: int, bias: bool, skip: bool):
        super().__init__(width, latent, hidden, bias, skip)
        self.w12 = nn.Linear(width, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, latent, bias=bias)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(nn.functional.silu(x1) * x2)


class LinearUp(nn.Module):
    def __init__(self, latent: int, width: int, hidden: int, bias: bool):
        super().__init__()
        self.proj = nn.Linear(latent, width, bias=bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.proj(z)


class GeluUp(nn.Module):
    """``fc2(gelu(fc1(z)))``: the reference's ``mlp_gelu`` up (``Linear, GELU, Linear``)."""

    def __init__(self, latent: int, width: int, hidden: int, bias: bool):
        super().__init__()
        self.fc1 = nn.Linear(latent, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, width, bias=bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(z)))


DOWN_KINDS: dict[str, type[nn.Module]] = {"linear": LinearDown, "mlp_gelu": GeluDown, "mlp_swiglu": SwiGLUDown}
UP_KINDS: dict[str, type[nn.Module]] = {"linear": LinearUp, "mlp_gelu": GeluUp}


@dataclass
class CompressorConfig:
    """Everything needed to rebuild a compressor (stored as ``compressor_config.json``).

    Attributes:
        model_type: HF ``model_type`` of the base model (e.g. ``llama``, ``qwen2``).
        num_hidden_layers / num_kv_heads / head_dim: base-model dims; ``kv_width = 2*num_kv_heads*head_dim``.
        layers: indices of the compressed layers (each has its own down/up pair).
        full_attn_layers: layers kept at full precision (never compressed).
        kv_compressed_size: latent width; must be < ``kv_width``.
        down / up: module kinds (``DOWN_KINDS`` / ``UP_KINDS``).
        down_hidden: hidden width of an MLP down (ignored by ``linear``).
        up_hidden: hidden width of an MLP up (ignored by ``linear``; absent from older checkpoints).
        bias: whether the linear maps have biases.
        linear_skip: MLP downs get an extra linear skip path (set by ``init=pca``).
        reference: the shared ``ReferenceSpec`` (sinks, prototype stride, metric, top-k, weighting).
        method: ``deltakv`` (trained) or ``pca`` (closed-form baseline); informational.
        k_after_norm: K was tapped after the model's ``k_norm`` (qk-norm models such as Qwen3; see
            ``deltakv.kv_tap``), i.e. the K the engine caches. The engine refuses a qk-norm checkpoint
            without it (trained on K before the norm by an older version).
    """

    model_type: str
    num_hidden_layers: int
    num_kv_heads: int
    head_dim: int
    layers: list[int]
    full_attn_layers: list[int]
    kv_compressed_size: int
    down: str = "mlp_swiglu"
    up: str = "linear"
    down_hidden: int = 0
    bias: bool = True
    linear_skip: bool = False
    reference: ReferenceSpec = field(default_factory=ReferenceSpec)
    method: str = "deltakv"
    k_after_norm: bool = False
    up_hidden: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.reference, dict):
            self.reference = ReferenceSpec.from_dict(self.reference)
        self.layers = [int(i) for i in self.layers]
        self.full_attn_layers = [int(i) for i in self.full_attn_layers]
        if self.down not in DOWN_KINDS:
            raise ValueError(f"compressor.down={self.down!r} is unknown; choose one of {sorted(DOWN_KINDS)}")
        if self.up not in UP_KINDS:
            raise ValueError(f"compressor.up={self.up!r} is unknown; choose one of {sorted(UP_KINDS)}")
        if not 0 < self.kv_compressed_size < self.kv_width:
            raise ValueError(
                f"compressor.kv_compressed_size={self.kv_compressed_size} must be in [1, {self.kv_width - 1}]: the "
                f"joined KV width of this model is 2*num_kv_heads*head_dim = 2*{self.num_kv_heads}*{self.head_dim} "
                f"= {self.kv_width}, and a latent that wide does not compress. Pick e.g. "
                f"compressor.kv_compressed_size={self.kv_width // 3}."
            )
        if self.down != "linear" and self.down_hidden <= 0:
            raise ValueError(f"compressor.down={self.down} needs compressor.down_hidden > 0 (e.g. {2 * self.kv_width})")
        if self.up != "linear" and self.up_hidden <= 0:
            raise ValueError(f"compressor.up={self.up} needs compressor.up_hidden > 0 (e.g. "
                             f"{(self.kv_compressed_size + self.kv_width) // 2}, the reference's fallback)")
        bad = [i for i in self.layers + self.full_attn_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"Layer indices {bad} are outside the model's {self.num_hidden_layers} layers")
        both = sorted(set(self.layers) & set(self.full_attn_layers))
        if both:
            raise ValueError(f"Layers {both} are both compressed and in full_attn_layers")

    @property
    def kv_width(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reference"] = self.reference.to_dict()
        d["kv_width"] = self.kv_width
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "CompressorConfig":
        data = {k: v for k, v in data.items() if k != "kv_width"}
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"Unknown compressor config fields {sorted(unknown)}")
        return cls(**data)


class ResidualCompressor(nn.Module):
    """One layer's down/up pair with the latent-space residual against a reference."""

    def __init__(self, width: int, latent: int, down: str = "mlp_swiglu", up: str = "linear",
                 down_hidden: int = 0, bias: bool = True, linear_skip: bool = False, up_hidden: int = 0):
        super().__init__()
        self.width, self.latent = width, latent
        self.down = DOWN_KINDS[down](width, latent, down_hidden, bias, linear_skip)
        self.up = UP_KINDS[up](latent, width, up_hidden, bias)

    def encode(self, kv: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
        """``down(kv) - down(ref)``; ``ref=None`` means a zero reference."""
        if ref is None:
            ref = kv.new_zeros(1, kv.shape[-1])
        return self.down(kv) - self.down(ref)

    def decode(self, latent: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
        """``up(latent) + ref``."""
        out = self.up(latent)
        return out if ref is None else out + ref

    def forward(self, kv: torch.Tensor, ref: torch.Tensor | None) -> torch.Tensor:
        return self.decode(self.encode(kv, ref), ref)


class DeltaKVCompressor(nn.Module):
    """All compressed layers' ``ResidualCompressor`` s, keyed by layer index (``self.layers["7"]``)."""

    def __init__(self, config: CompressorConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleDict({
            str(i): ResidualCompressor(config.kv_width, config.kv_compressed_size, config.down, config.up,
                                       config.down_hidden, config.bias, config.linear_skip, config.up_hidden)
            for i in config.layers
        })

    @property
    def reference(self) -> ReferenceSpec:
        return self.config.reference

    def __getitem__(self, layer: int) -> ResidualCompressor:
        return self.layers[str(layer)]

    def compressed_layers(self) -> list[int]:
        return list(self.config.layers)
