"""Tap the pre-RoPE joined K/V of a HF decoder and optionally replace it.

``KVTap`` registers forward hooks on ``self_attn.k_proj`` and ``self_attn.v_proj`` of the chosen
layers. When ``k_proj`` runs, the hook also runs ``v_proj`` on the same input (a module call, so
DeepSpeed ZeRO-3 gathers its weights), forms ``kv = cat([k, v], -1)`` of shape
``[B, T, 2*num_kv_heads*head_dim]`` and hands it to ``on_kv(layer, kv)``. If that returns a tensor,
its K half replaces ``k_proj``'s output and its V half replaces ``v_proj``'s output when the attention
calls it next, so the model runs on the returned K/V (RoPE is applied after, as usual).

qk-norm models (Qwen3, ``self_attn.k_norm``): K is tapped AFTER ``k_norm`` (the hook sits on
``k_norm``; ``k_proj``'s hook only keeps the attention input for ``v_proj``). That is the K the
inference engine caches (before RoPE), so a compressor trained on it can be served there.

Hooks stay registered while ``enabled``; gradient-checkpointing recomputation sees the same
replacement, so gradients are exact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from deltakv.hf_model import decoder_layers

OnKV = Callable[[int, torch.Tensor], "torch.Tensor | None"]


class KVTap:
    def __init__(self, model: torch.nn.Module, layers: list[int], on_kv: OnKV):
        self.on_kv = on_kv
        self.enabled = True
        self._stash: dict[int, torch.Tensor] = {}
        self._inner = False
        self._handles = []
        self._inputs: dict[int, torch.Tensor] = {}
        all_layers = decoder_layers(model)
        for i in layers:
            attn = all_layers[i].self_attn
            k_norm = getattr(attn, "k_norm", None)
            if k_norm is None:
                self._handles.append(attn.k_proj.register_forward_hook(self._k_hook(i, attn, after_norm=False)))
            else:
                self._handles.append(attn.k_proj.register_forward_hook(self._keep_input(i)))
                self._handles.append(k_norm.register_forward_hook(self._k_hook(i, attn, after_norm=True)))
            self._handles.append(attn.v_proj.register_forward_hook(self._v_hook(i)))

    def _keep_input(self, layer: int):
        def hook(module, args, k):
            if self.enabled:
                self._inputs[layer] = args[0]
            return None

        return hook

    def _k_hook(self, layer: int, attn, after_norm: bool):
        def hook(module, args, k):
            if not self.enabled:
                return None
            x = self._inputs.pop(layer) if after_norm else args[0]
            self._inner = True
            try:
                v = attn.v_proj(x)
            finally:
                self._inner = False
            k_flat = k.flatten(-2) if after_norm else k  # k_norm sees [..., Hkv, head_dim]
            kv = torch.cat([k_flat, v], dim=-1)
            out = self.on_kv(layer, kv)
            if out is None:
                return None
            k_hat, v_hat = out.split([k_flat.shape[-1], v.shape[-1]], dim=-1)
            self._stash[layer] = v_hat
            return k_hat.view_as(k) if after_norm else k_hat

        return hook

    def _v_hook(self, layer: int):
        def hook(module, args, v):
            if self._inner or not self.enabled:
                return None
            return self._stash.pop(layer, None)

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def capture_kv(model: torch.nn.Module, input_ids: torch.Tensor, layers: list[int] | None = None,
               **forward_kwargs) -> dict[int, torch.Tensor]:
    """Run the model once (no grad) and return ``{layer: kv [B, T, 2*Hkv*hd]}`` (pre-RoPE)."""
    if layers is None:
        layers = list(range(len(decoder_layers(model))))
    captured: dict[int, torch.Tensor] = {}

    def keep(layer, kv):
        captured[layer] = kv.detach()
        return None

    tap = KVTap(model, layers, keep)
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False, **forward_kwargs)
    finally:
        tap.remove()
    return captured
