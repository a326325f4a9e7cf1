"""Closed-form PCA: the ``compressor.init=pca`` initialisation and the PCA compressor baseline.

For each compressed layer we accumulate the residual ``r = kv - ref`` of the non-prototype tokens
(true K/V of the frozen model, references from ``deltakv.reference``), take its mean ``mu`` and the
top-``r`` eigenvectors ``U`` of its covariance, and set::

    down(x) = U^T x            (linear down, or the linear skip path of an MLP down; MLP output zeroed)
    up(z)   = U z + (mu - U U^T mu)

so that ``up(down(kv) - down(ref)) + ref = ref + mu + U U^T (r - mu)``: the best rank-r affine
reconstruction of the residual. With ``reference.kind=none`` this is plain low-rank KV (Palu/xKV-like).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from deltakv.compressor import DeltaKVCompressor, LinearDown, ResidualCompressor, _MLPDown
from deltakv.kv_tap import KVTap
from deltakv.reference import prototype_mask, select_references


class CovarianceAccumulator:
    """Running mean / second moment in float64."""

    def __init__(self, dim: int):
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to("cpu", torch.float64)
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.outer += x.T @ x

    def fit(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mean [D], components [D, rank], explained_energy_ratio [D])`` (energy sorted descending)."""
        if self.n < 2:
            raise ValueError("PCA needs at least 2 samples; give more calibration data (compressor.pca_batches)")
        mean = self.sum / self.n
        cov = self.outer / self.n - torch.outer(mean, mean)
        evals, evecs = torch.linalg.eigh(cov)
        evals, evecs = evals.flip(0).clamp(min=0), evecs.flip(1)
        energy = torch.cumsum(evals, 0) / evals.sum().clamp(min=1e-12)
        return mean.float(), evecs[:, :rank].float().contiguous(), energy.float()


@torch.no_grad()
def pca_init_(pair: ResidualCompressor, mean: torch.Tensor, comps: torch.Tensor) -> None:
    """Set the linear parts of one layer's pair from PCA (see module docstring)."""
    up = pair.up.proj
    if isinstance(pair.down, LinearDown):
        lin = pair.down.proj
    elif isinstance(pair.down, _MLPDown) and pair.down.skip is not None:
        lin = pair.down.skip
        last = pair.down.fc2 if hasattr(pair.down, "fc2") else pair.down.w3
        last.weight.zero_()
        if last.bias is not None:
            last.bias.zero_()
    else:
        raise ValueError("init=pca needs a linear down or an MLP down with linear_skip=True")
    lin.weight.copy_(comps.T)
    if lin.bias is not None:
        lin.bias.copy_(-(comps.T @ mean))
    up.weight.copy_(comps)
    if up.bias is not None:
        up.bias.copy_(mean - comps @ (comps.T @ mean))
    elif mean.abs().max() > 0:
        pass  # without a bias the affine offset cannot be represented; U U^T r is still the best linear fit


@torch.no_grad()
def fit_pca_(lm: nn.Module, compressor: DeltaKVCompressor, batches, desc: str = "PCA calibration") -> dict[int, float]:
    """Fit every compressed layer from the true K/V over ``batches`` (iterable of ``input_ids``).

    Returns ``{layer: fraction of residual energy captured by the rank-r subspace}``.
    """
    spec = compressor.reference
    accs = {i: CovarianceAccumulator(compressor.config.kv_width) for i in compressor.compressed_layers()}

    def on_kv(layer: int, kv: torch.Tensor):
        kv32 = kv.float()
        ref = select_references(spec, kv32)
        keep = prototype_mask(spec, kv.shape[-2], device=kv.device)
        accs[layer].add((kv32 - ref)[..., ~keep, :])
        return None

    tap = KVTap(lm, compressor.compressed_layers(), on_kv)
    try:
        for input_ids in tqdm(batches, desc=desc, leave=False):
            lm(input_ids=input_ids.to(next(lm.parameters()).device), use_cache=False)
    finally:
        tap.remove()
    captured = {}
    rank = compressor.config.kv_compressed_size
    for i, acc in accs.items():
        mean, comps, energy = acc.fit(rank)
        pair = compressor[i]
        pca_init_(pair, mean.to(pair.up.proj.weight.device), comps.to(pair.up.proj.weight.device))
        captured[i] = float(energy[rank - 1])
    return captured
