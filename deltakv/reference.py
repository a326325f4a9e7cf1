"""Reference selection: the ONE definition of sinks, prototypes and references, for training and the engine.

DeltaKV stores a token's joined KV vector (``cat([k_proj(x), v_proj(x)], -1)``, before RoPE) as a
latent residual against a *reference* built from earlier tokens that are kept at full precision.
Everything about which tokens are kept and how a reference is formed lives here, so that the
trainer (``deltakv.model``) and the inference engine (its ``deltakv`` cache method) cannot drift
apart (the reference implementation trained with one sink count / stride and served with another).

Positions are absolute token positions in the sequence (0-based).

* **Sinks**: positions ``0 .. num_sinks-1``.
* **Prototypes** (a.k.a. centers): the sinks plus every ``stride``-th token after them, i.e. position
  ``p >= num_sinks`` with ``(p - num_sinks) % stride == 0``, where ``stride = round(1 / cluster_ratio)``
  (``cluster_ratio == 0`` means sinks only). Prototypes are always kept exact, in every reference kind.
* **References** (``ReferenceSpec.kind``):

  - ``cluster_e2e``: score the token against every prototype at a strictly earlier position with
    ``metric`` (``l2``: ``-||x - p||^2``, ``dot``: ``x . p``, ``cosine``), keep the ``top_k`` best, and
    average them (``weighting="mean"``) or weight them by ``softmax(score / temperature)``. With
    ``l2`` the softmax score is ``-||x - p||^2`` (``l2_softmax_score="sq_distance"``, ours) or the
    reference's ``-||x - p||`` (``"distance"``: ``-torch.cdist`` then ``softmax(topk_scores /
    cluster_temp)`` in CURRENTF/DeltaKV ``deltakv/modeling/*_training.py`` ``_scores`` / ``_refs``); the
    top-k choice is the same either way. The score is taken on the joined K|V vector
    (``cluster_on="kv"``) or on its K half only (``"k"``, the reference's ``cluster_on_kv=False``:
    ``feat = kv_flat if self.cluster_on_kv else key_states``); the reference is always the (weighted)
    mean of the prototypes' joined K|V.
  - ``e2e``: causal sliding average of the ``top_k`` tokens just before the token (positions
    ``t-top_k .. t-1``), whatever they are.
  - ``none``: zero reference (a plain autoencoder; the ablation baseline).

  A token with no earlier candidate gets a zero reference. ``inclusive=True`` (training under the
  reference recipe, where prototypes are reconstructed too) also lets a prototype at the token's own
  position be a candidate, as the reference's mask ``centers <= rows`` does.

Engine API (pure torch, any leading batch/head dims, tensors ``[..., T, D]``):

* ``spec.stride``, ``spec.is_prototype(positions)`` / ``prototype_mask(spec, seq_len)`` /
  ``prototype_positions(spec, seq_len)``: which positions stay exact.
* ``select_references_from(spec, kv, positions, proto_kv, proto_positions)``: references for arbitrary
  query tokens against a given set of prototypes (what a decode step needs).
* ``select_references(spec, kv)``: references for a whole contiguous sequence starting at position 0
  (or ``offset``), as used in training and prefill.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

REFERENCE_KINDS = ("cluster_e2e", "e2e", "none")
METRICS = ("l2", "dot", "cosine")
WEIGHTINGS = ("mean", "softmax")
STRIDE_ROUNDINGS = ("round", "floor")  # ours | the reference's int(1 / cluster_ratio)
L2_SOFTMAX_SCORES = ("sq_distance", "distance")  # ours | the reference's -cdist
CLUSTER_ON = ("kv", "k")  # joined K|V (ours and the reference's default) | K half (cluster_on_kv=False)


@dataclass(frozen=True)
class ReferenceSpec:
    """How references are chosen and which tokens stay exact.

    Attributes:
        kind: ``cluster_e2e`` | ``e2e`` | ``none`` (see the module docstring).
        num_sinks: number of leading positions kept exact (attention sinks).
        cluster_ratio: fraction of later tokens that are prototypes; ``stride = round(1/cluster_ratio)``.
            0 disables strided prototypes (sinks only).
        metric: similarity used by ``cluster_e2e``: ``l2`` | ``dot`` | ``cosine``.
        top_k: number of prototypes averaged (``cluster_e2e``) or window length (``e2e``).
        weighting: ``mean`` or ``softmax`` (softmax of score / temperature over the top-k).
        temperature: softmax temperature (only for ``weighting="softmax"``; the reference trains
            with ``cluster_temp=10``).
        stride_rounding: ``round`` (ours) | ``floor`` (the reference's ``int(1 / cluster_ratio)``).
        l2_softmax_score: with ``metric=l2`` and softmax weighting, the softmax runs on
            ``-||x - p||^2`` (``sq_distance``, ours) or ``-||x - p||`` (``distance``, the reference).
        cluster_on: similarity on the joined ``kv`` (default) or on the ``k`` half only (the
            reference's ``cluster_on_kv=False``).

    Fields added after a checkpoint was saved take these defaults (today's behaviour) when loaded.
    """

    kind: str = "cluster_e2e"
    num_sinks: int = 16
    cluster_ratio: float = 0.1
    metric: str = "l2"
    top_k: int = 4
    weighting: str = "mean"
    temperature: float = 1.0
    stride_rounding: str = "round"
    l2_softmax_score: str = "sq_distance"
    cluster_on: str = "kv"

    def __post_init__(self) -> None:
        if self.kind not in REFERENCE_KINDS:
            raise ValueError(f"reference.kind={self.kind!r} is unknown; choose one of {REFERENCE_KINDS}")
        if self.metric not in METRICS:
            raise ValueError(f"reference.metric={self.metric!r} is unknown; choose one of {METRICS}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"reference.weighting={self.weighting!r} is unknown; choose one of {WEIGHTINGS}")
        if self.num_sinks < 0:
            raise ValueError(f"reference.num_sinks must be >= 0, got {self.num_sinks}")
        if not 0.0 <= self.cluster_ratio <= 1.0:
            raise ValueError(f"reference.cluster_ratio must be in [0, 1], got {self.cluster_ratio}")
        if self.top_k < 1:
            raise ValueError(f"reference.top_k must be >= 1, got {self.top_k}")
        if self.temperature <= 0:
            raise ValueError(f"reference.temperature must be > 0, got {self.temperature}")
        for name, choices in (("stride_rounding", STRIDE_ROUNDINGS), ("l2_softmax_score", L2_SOFTMAX_SCORES),
                              ("cluster_on", CLUSTER_ON)):
            if getattr(self, name) not in choices:
                raise ValueError(f"reference.{name}={getattr(self, name)!r} is unknown; choose one of {choices}")

    @property
    def stride(self) -> int:
        """Prototype stride ``round(1 / cluster_ratio)`` (or ``int(...)`` with ``stride_rounding=floor``);
        0 when ``cluster_ratio == 0`` (sinks only)."""
        if self.cluster_ratio == 0:
            return 0
        inv = 1.0 / self.cluster_ratio
        return max(1, int(inv) if self.stride_rounding == "floor" else round(inv))

    def is_prototype(self, positions: torch.Tensor) -> torch.Tensor:
        """Boolean tensor, True where an absolute position is a sink or a strided prototype."""
        positions = torch.as_tensor(positions)
        sink = positions < self.num_sinks
        if self.stride == 0:
            return sink
        return sink | ((positions - self.num_sinks) % self.stride == 0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ReferenceSpec":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"Unknown reference fields {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}")
        return cls(**data)


def prototype_mask(spec: ReferenceSpec, seq_len: int, offset: int = 0, device=None) -> torch.Tensor:
    """``[seq_len]`` bool mask of the positions ``offset .. offset+seq_len-1`` that stay exact."""
    return spec.is_prototype(torch.arange(offset, offset + seq_len, device=device))


def prototype_positions(spec: ReferenceSpec, seq_len: int, offset: int = 0, device=None) -> torch.Tensor:
    """Absolute positions (``long``, ascending) of the prototypes among ``offset .. offset+seq_len-1``."""
    pos = torch.arange(offset, offset + seq_len, device=device)
    return pos[spec.is_prototype(pos)]


def prototype_scores(spec: ReferenceSpec, kv: torch.Tensor, proto: torch.Tensor) -> torch.Tensor:
    """Similarity ``[..., T, P]`` of each token ``kv [..., T, D]`` to each prototype ``proto [..., P, D]``
    under ``spec.metric`` (higher = closer; no causal mask). Shared by the trainer's references and
    the engine's choice of fathers for a compressed token (its DeltaKV kernels). With
    ``spec.cluster_on == "k"`` only the first half of the last dim (K of the joined K|V) is compared."""
    if spec.cluster_on == "k":
        half = kv.shape[-1] // 2
        kv, proto = kv[..., :half], proto[..., :half]
    if spec.metric == "dot":
        return kv @ proto.transpose(-1, -2)
    if spec.metric == "cosine":
        kv_n = torch.nn.functional.normalize(kv, dim=-1)
        pr_n = torch.nn.functional.normalize(proto, dim=-1)
        return kv_n @ pr_n.transpose(-1, -2)
    # l2: -||x - p||^2 = 2 x.p - |p|^2 - |x|^2
    dot = kv @ proto.transpose(-1, -2)
    return 2 * dot - proto.pow(2).sum(-1).unsqueeze(-2) - kv.pow(2).sum(-1, keepdim=True)


def select_references_from(
    spec: ReferenceSpec,
    kv: torch.Tensor,
    positions: torch.Tensor,
    proto_kv: torch.Tensor,
    proto_positions: torch.Tensor,
    inclusive: bool = False,
) -> torch.Tensor:
    """``cluster_e2e`` references of query tokens against an explicit prototype set.

    Args:
        kv: ``[..., T, D]`` joined KV of the tokens to compress.
        positions: ``[T]`` absolute positions of those tokens.
        proto_kv: ``[..., P, D]`` joined KV of the (exact) prototypes; same leading dims as ``kv``.
        proto_positions: ``[P]`` absolute positions of the prototypes.
        inclusive: a prototype at the token's own position is eligible too (the reference recipe's
            training, where a prototype may be its own reference).

    Returns:
        ``[..., T, D]`` references; a prototype is only eligible for a token at a strictly larger
        position (causal; ``>=`` with ``inclusive``), and a token with no eligible prototype gets zeros.
    """
    if spec.kind != "cluster_e2e":
        raise ValueError(f"select_references_from only serves kind='cluster_e2e', got {spec.kind!r}")
    out_dtype = kv.dtype
    kv32, proto32 = kv.float(), proto_kv.float()
    if proto32.shape[-2] == 0:
        return torch.zeros_like(kv)
    scores = prototype_scores(spec, kv32, proto32)  # [..., T, P]
    pp, tp = proto_positions.view(1, -1), positions.view(-1, 1)
    causal = (pp <= tp) if inclusive else (pp < tp)  # [T, P]
    scores = scores.masked_fill(~causal, float("-inf"))
    k = min(spec.top_k, proto32.shape[-2])
    top, idx = scores.topk(k, dim=-1)  # [..., T, k]
    valid = torch.isfinite(top)
    if spec.weighting == "softmax":
        logits = top
        if spec.metric == "l2" and spec.l2_softmax_score == "distance":  # -||x-p||^2 -> -||x-p||
            # clamp: the expanded form can dip below 0 at distance 0 (a prototype scoring itself),
            # and a clamped value has zero gradient where sqrt's would be infinite (cdist's backward is 0 there)
            logits = -(-top.masked_fill(~valid, 0.0)).clamp(min=1e-30).sqrt()
        w = torch.softmax((logits / spec.temperature).masked_fill(~valid, float("-inf")), dim=-1)
        w = torch.nan_to_num(w, nan=0.0)  # rows with no valid prototype
    else:
        w = valid.float() / valid.sum(-1, keepdim=True).clamp(min=1)
    # scatter the top-k weights into a dense [..., T, P] matrix: ref = W @ prototypes (cheap backward)
    dense = torch.zeros_like(scores).scatter(-1, idx, w)
    ref = dense @ proto32
    return ref.to(out_dtype)


def sliding_average(kv: torch.Tensor, window: int) -> torch.Tensor:
    """Causal mean of the ``window`` tokens strictly before each token (``e2e``); zeros at t=0."""
    T = kv.shape[-2]
    kv32 = kv.float()
    csum = torch.cumsum(kv32, dim=-2)
    zero = torch.zeros_like(csum[..., :1, :])
    csum = torch.cat([zero, csum], dim=-2)  # csum[i] = sum of kv[:i]
    t = torch.arange(T, device=kv.device)
    lo = (t - window).clamp(min=0)
    total = csum[..., t, :] - csum[..., lo, :]
    count = (t - lo).clamp(min=1).to(kv32.dtype).view(-1, 1)
    return (total / count).to(kv.dtype)


def select_references(spec: ReferenceSpec, kv: torch.Tensor, offset: int = 0, inclusive: bool = False) -> torch.Tensor:
    """References ``[..., T, D]`` for a contiguous sequence of tokens at positions ``offset ..``.

    For ``cluster_e2e`` the prototypes are taken from this same sequence (so ``offset`` only matters
    for which positions are prototypes); every reference uses strictly earlier tokens only (or the
    token itself too, for a prototype, with ``inclusive``; ``cluster_e2e`` only).
    """
    if spec.kind == "none":
        return torch.zeros_like(kv)
    if spec.kind == "e2e":
        return sliding_average(kv, spec.top_k)
    T = kv.shape[-2]
    pos = torch.arange(offset, offset + T, device=kv.device)
    is_proto = spec.is_prototype(pos)
    return select_references_from(spec, kv, pos, kv[..., is_proto, :], pos[is_proto], inclusive=inclusive)
