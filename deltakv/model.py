"""The training wrapper: a frozen HF causal LM running on compressed-then-reconstructed K/V.

For every compressed layer the joined pre-RoPE KV ``kv`` is replaced by::

    ref    = select_references(spec, kv)                # strictly causal
    recon  = up(down(kv) - down(ref)) + ref
    kv_hat = where(prototype, kv, recon)                # sinks + strided prototypes stay exact

and the model continues on ``kv_hat``. The loss is::

    loss = CE(next token) + mse_weight * sum_l w_l * MSE_l

Only compressor parameters require grad. Two recipes, chosen by the ``loss`` config (the default
is ours):

* ours (``mse_target=same_pass``, ``mse_tokens=compressed``, ``reconstruct_prototypes=False``):
  ``MSE_l = mean((recon - kv.detach())^2)`` over the non-prototype tokens, ``kv`` being what layer l
  computes in this same (compressed) pass; prototypes stay exact as at inference.
* the reference's (``separate_pass``, ``all``, ``True``; CURRENTF/DeltaKV
  ``deltakv/modeling/*_training.py``: ``comp_then_reconstruct`` and the training model's forward,
  which first runs the model once under ``torch.no_grad()`` in ``raw`` mode to fill ``buffer_raw_kv``):
  every token after the sinks, prototypes included, is replaced by its reconstruction, a prototype
  may be its own reference (mask ``centers <= rows``), and ``MSE_l = F.mse_loss(cat(sinks, recon),
  raw_kv_l)``: the mean over ALL tokens (sinks included) against layer l's K/V in a separate
  uncompressed forward of the same batch.

In evaluation mode (``wrapper.eval()``) the engine's rules hold whatever the recipe: prototypes exact,
MSE on the non-prototype tokens against the same pass, so recipes are compared on equal terms.
"""

from __future__ import annotations

import torch
from torch import nn

from deltakv.compressor import DeltaKVCompressor
from deltakv.kv_tap import KVTap
from deltakv.reference import prototype_mask, select_references


MSE_TARGETS = ("same_pass", "separate_pass")
MSE_TOKENS = ("compressed", "all")


def exact_mask(spec, seq_len: int, reconstruct_prototypes: bool, device=None) -> torch.Tensor:
    """``[T]`` bool: tokens kept exact (prototypes; only the sinks when prototypes are reconstructed)."""
    if reconstruct_prototypes:
        return torch.arange(seq_len, device=device) < spec.num_sinks
    return prototype_mask(spec, seq_len, device=device)


def reconstruct(compressor: DeltaKVCompressor, layer: int, kv: torch.Tensor,
                reconstruct_prototypes: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(kv_hat, recon)`` for a full sequence ``kv [B, T, D]`` (float32 inside).

    ``reconstruct_prototypes``: prototypes after the sinks are reconstructed too, each allowed to be
    its own reference (the reference recipe's training)."""
    spec = compressor.reference
    kv32 = kv.float()
    ref = None if spec.kind == "none" else select_references(spec, kv32, inclusive=reconstruct_prototypes)
    recon = compressor[layer](kv32, ref)
    keep = exact_mask(spec, kv.shape[-2], reconstruct_prototypes, device=kv.device).unsqueeze(-1)
    return torch.where(keep, kv32, recon), recon


class DeltaKVForTraining(nn.Module):
    """Frozen ``lm`` + trainable ``compressor``; ``forward`` returns ``{"loss", "ce", "mse"}``.

    Args:
        lm: a supported HF causal LM (its params are frozen here).
        compressor: the per-layer compressors (``compressor.config.layers`` are tapped).
        mse_weight: weight of the summed per-layer MSE term.
        layer_weights: optional ``{layer: weight}`` (default 1 for every layer).
        mse_target: ``same_pass`` (ours) | ``separate_pass`` (the reference: an extra no-grad forward
            on the true K/V gives each layer's target).
        mse_tokens: ``compressed`` (ours: non-prototype tokens) | ``all`` (the reference: every token).
        reconstruct_prototypes: training replaces prototypes after the sinks by their reconstruction
            too (the reference); ``False`` keeps them exact (ours, and the engine).
    """

    def __init__(self, lm: nn.Module, compressor: DeltaKVCompressor, mse_weight: float = 1.0,
                 layer_weights: dict[int, float] | None = None, mse_target: str = "same_pass",
                 mse_tokens: str = "compressed", reconstruct_prototypes: bool = False):
        super().__init__()
        if mse_target not in MSE_TARGETS:
            raise ValueError(f"loss.mse_target={mse_target!r}; choose one of {MSE_TARGETS}")
        if mse_tokens not in MSE_TOKENS:
            raise ValueError(f"loss.mse_tokens={mse_tokens!r}; choose one of {MSE_TOKENS}")
        self.lm = lm
        self.compressor = compressor
        self.mse_target, self.mse_tokens = mse_target, mse_tokens
        self.reconstruct_prototypes = bool(reconstruct_prototypes)
        self._capturing = False
        self._targets: dict[int, torch.Tensor] = {}
        self.mse_weight = float(mse_weight)
        self.layer_weights = {int(k): float(v) for k, v in (layer_weights or {}).items()}
        for p in self.lm.parameters():
            p.requires_grad_(False)
        self.config = lm.config  # lets HF Trainer read model config fields
        self._mse: dict[int, torch.Tensor] = {}
        self._var: dict[int, torch.Tensor] = {}
        self.tap = KVTap(lm, compressor.compressed_layers(), self._on_kv)

    def _on_kv(self, layer: int, kv: torch.Tensor) -> torch.Tensor | None:
        if self._capturing:  # the reference recipe's uncompressed pass: keep the target, change nothing
            self._targets[layer] = kv.detach().float()
            return None
        recipe = self.training  # evaluation keeps the engine's rules (module docstring)
        rec_protos = recipe and self.reconstruct_prototypes
        kv_hat, recon = reconstruct(self.compressor, layer, kv, rec_protos)
        keep = exact_mask(self.compressor.reference, kv.shape[-2], rec_protos, device=kv.device)
        target = self._targets[layer] if recipe and self.mse_target == "separate_pass" else kv.detach().float()
        if recipe and self.mse_tokens == "all":
            diff = kv_hat - target  # exact tokens count too (as zeros when the target is this pass's)
        else:
            diff = (recon - target)[..., ~keep, :]
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
        self._mse, self._var, self._targets = {}, {}, {}
        if self.training and self.mse_target == "separate_pass":
            self._capturing = True
            try:
                with torch.no_grad():
                    self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            finally:
                self._capturing = False
        # the targets stay until the next forward: gradient checkpointing re-runs the taps in backward
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
