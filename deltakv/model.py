"""The training wrapper: a frozen HF causal LM running on compressed-then-reconstructed K/V.

For every compressed layer the joined pre-RoPE KV ``kv`` is replaced by::

    ref    = select_references(spec, kv)                # strictly causal
    recon  = up(down(kv) - down(ref)) + ref
    kv_hat = where(prototype, kv, recon)                # sinks + strided prototypes stay exact

and the model continues on ``kv_hat``. The loss is::

    loss = CE(next token) + mse_weight * sum_l w_l * MSE_l(recon, kv)   over non-prototype tokens

(the MSE target ``kv`` is detached: the compressor of layer l is trained to reproduce what layer l
computes, not to move it). Only compressor parameters require grad.
"""

from __future__ import annotations

import torch
from torch import nn

from deltakv.compressor import DeltaKVCompressor
from deltakv.kv_tap import KVTap
from deltakv.reference import prototype_mask, select_references


def reconstruct(compressor: DeltaKVCompressor, layer: int, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(kv_hat, recon)`` for a full sequence ``kv [B, T, D]`` (float32 inside)."""
    spec = compressor.reference
    kv32 = kv.float()
    ref = None if spec.kind == "none" else select_references(spec, kv32)
    recon = compressor[layer](kv32, ref)
    keep = prototype_mask(spec, kv.shape[-2], device=kv.device).unsqueeze(-1)
    return torch.where(keep, kv32, recon), recon


class DeltaKVForTraining(nn.Module):
    """Frozen ``lm`` + trainable ``compressor``; ``forward`` returns ``{"loss", "ce", "mse"}``.

    Args:
        lm: a supported HF causal LM (its params are frozen here).
        compressor: the per-layer compressors (``compressor.config.layers`` are tapped).
        mse_weight: weight of the summed per-layer MSE term.
        layer_weights: optional ``{layer: weight}`` (default 1 for every layer).
    """

    def __init__(self, lm: nn.Module, compressor: DeltaKVCompressor, mse_weight: float = 1.0,
                 layer_weights: dict[int, float] | None = None):
        super().__init__()
        self.lm = lm
        self.compressor = compressor
        self.mse_weight = float(mse_weight)
        self.layer_weights = {int(k): float(v) for k, v in (layer_weights or {}).items()}
        for p in self.lm.parameters():
            p.requires_grad_(False)
        self.config = lm.config  # lets HF Trainer read model config fields
        self._mse: dict[int, torch.Tensor] = {}
        self._var: dict[int, torch.Tensor] = {}
        self.tap = KVTap(lm, compressor.compressed_layers(), self._on_kv)

    def _on_kv(self, layer: int, kv: torch.Tensor) -> torch.Tensor:
        kv_hat, recon = reconstruct(self.compressor, layer, kv)
        keep = prototype_mask(self.compressor.reference, kv.shape[-2], device=kv.device)
        diff = (recon - kv.detach().float())[..., ~keep, :]
        self._mse[layer] = diff.pow(2).mean() if diff.numel() else diff.sum()
        if not self.training:  # evaluation also records the KV variance on the same tokens
            x = kv.detach().float()[..., ~keep, :]
            self._var[layer] = (x - x.mean(dim=tuple(range(x.dim() - 1)), keepdim=True)).pow(2).mean()
        return kv_hat.to(kv.dtype)

    def reconstruction(self, enabled: bool = True) -> "_TapSwitch":
        """Context manager: ``with wrapper.reconstruction(False):`` runs the LM on its true K/V."""
        return _TapSwitch(self.tap, enabled)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **_unused) -> dict[str, torch.Tensor]:
        self._mse, self._var = {}, {}
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)
        mse = sum((self.layer_weights.get(i, 1.0) * m for i, m in self._mse.items()),
                  torch.zeros((), device=input_ids.device))
        ce = out.loss if out.loss is not None else torch.zeros((), device=input_ids.device)
        loss = ce + self.mse_weight * mse
        return {"loss": loss, "ce": ce.detach(), "mse": mse.detach(), "logits": out.logits}

    def layer_mse(self) -> dict[int, float]:
        """Per-layer MSE of the last forward."""
        return {i: float(m.detach()) for i, m in sorted(self._mse.items())}

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        kwargs = gradient_checkpointing_kwargs or {"use_reentrant": False}
        self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class _TapSwitch:
    def __init__(self, tap: KVTap, enabled: bool):
        self.tap, self.enabled = tap, enabled

    def __enter__(self):
        self.prev, self.tap.enabled = self.tap.enabled, self.enabled
        return self

    def __exit__(self, *exc):
        self.tap.enabled = self.prev
