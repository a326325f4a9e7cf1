"""One decoder for the Llama / Qwen2 / Qwen3 / Mistral family (flags from `ModelSpec`).

Parameter names follow HF checkpoints (`model.layers.0.self_attn.q_proj.weight` ...) so weights load
straight from safetensors. Tokens of all scheduled sequences are flattened into one [N] batch; the
attention layer hands each sequence's slice to the cache method, which owns storage and reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.norm import RMSNorm
from ..layers.rotary import apply_rope
from .spec import ModelSpec


@dataclass
class SeqSlice:
    """One sequence's tokens inside the flattened batch: rows [start, end)."""

    seq: object
    start: int
    end: int

    @property
    def n(self) -> int:
        return self.end - self.start


@dataclass
class ForwardContext:
    """Everything a forward pass needs besides the hidden states."""

    slices: list[SeqSlice]
    positions: torch.Tensor  # [N]
    cos: torch.Tensor  # [N, head_dim]
    sin: torch.Tensor
    method: object  # CacheMethod
    all_decode: bool  # every slice is a single decode token -> batched decode kernel may run

    def narrow(self, keep: torch.Tensor) -> "ForwardContext":
        """The context of rows `keep` (sorted row indices) of this batch: positions, RoPE tables and
        each sequence's slice shrink to the kept rows (a method's `rows_for_layer` asked for them)."""
        bounds = torch.tensor([s.start for s in self.slices] + [self.slices[-1].end if self.slices else 0])
        cut = torch.searchsorted(keep.cpu(), bounds).tolist()
        slices = [SeqSlice(s.seq, cut[i], cut[i + 1]) for i, s in enumerate(self.slices)]
        return ForwardContext(slices, self.positions[keep], self.cos[keep], self.sin[keep], self.method,
                              self.all_decode)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        h, d = spec.hidden_size, spec.head_dim
        self.q_proj = nn.Linear(h, spec.num_heads * d, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(h, spec.num_kv_heads * d, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(h, spec.num_kv_heads * d, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(spec.num_heads * d, h, bias=False)
        if spec.qk_norm:
            self.q_norm = RMSNorm(d, spec.rms_norm_eps)
            self.k_norm = RMSNorm(d, spec.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        k_pre = k  # pre-RoPE keys: DeltaKV compresses these
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        method, layer, pos = ctx.method, self.layer_idx, ctx.positions
        for s in ctx.slices:
            r = slice(s.start, s.end)
            method.write(s.seq, layer, k[r], v[r], pos[r], k_pre[r])
        if ctx.all_decode:
            out = method.attend_decode_batch([s.seq for s in ctx.slices], layer, q, pos)
        else:
            out = torch.cat([method.attend(s.seq, layer, q[s.start : s.end], pos[s.start : s.end])
                             for s in ctx.slices])
        return self.o_proj(out.reshape(n, -1))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(spec, layer_idx)
        self.mlp = MLP(spec)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, x, ctx):
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(spec, i) for i in range(spec.num_layers)])
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.model = DecoderModel(spec)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext, logit_rows: torch.Tensor) -> torch.Tensor:
        """Run every layer; return logits (float32) only for `logit_rows` of the flattened batch."""
        x = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            keep = ctx.method.rows_for_layer(ctx, i)  # None: every row goes on (all methods but SparseX)
            if keep is not None:
                remap = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
                remap[keep] = torch.arange(len(keep), device=x.device)
                logit_rows = remap[logit_rows]
                if bool((logit_rows < 0).any()):
                    raise RuntimeError(f"{ctx.method.name}: rows_for_layer({i}) dropped a row whose logits are needed")
                x, ctx = x[keep], ctx.narrow(keep)
            x = layer(x, ctx)
        x = self.model.norm(x[logit_rows])
        return self.lm_head(x).float()
