"""One decoder for the Llama / Qwen2 / Qwen3 / Mistral family (flags from `ModelSpec`).

Parameter names follow HF checkpoints (`model.layers.0.self_attn.q_proj.weight` ...) except two
packed projections, as in nano-vllm: `qkv_proj` (q, k, v rows stacked) and `gate_up_proj` (gate, up);
the loader fills their shards (`PACKED`). Tokens of all scheduled sequences are flattened into one
[N] batch; each attention layer makes ONE call into the cache method for the whole step
(`CacheMethod.forward_layer`: one K/V write, one attention call per row group).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.linear import Linear
from ..layers.norm import RMSNorm
from ..layers.rotary import apply_rope, apply_rope_fast
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


# HF parameter -> (packed parameter, shard index): the loader copies each shard into its rows.
PACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        h, d = spec.hidden_size, spec.head_dim
        self.q_size, self.kv_size = spec.num_heads * d, spec.num_kv_heads * d
        self.qkv_proj = Linear(h, self.q_size + 2 * self.kv_size, bias=spec.qkv_bias)
        self.qkv_proj.shard_sizes = [self.q_size, self.kv_size, self.kv_size]
        self.o_proj = Linear(spec.num_heads * d, h, bias=False)
        if spec.qk_norm:
            self.q_norm = RMSNorm(d, spec.rms_norm_eps)
            self.k_norm = RMSNorm(d, spec.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, plan) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv_proj(x)
        qs, ks = self.q_size, self.kv_size
        v = qkv[:, qs + ks :].view(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is None:
            qk = qkv[:, : qs + ks].view(n, self.num_heads + self.num_kv_heads, self.head_dim)
            k_pre = qk[:, self.num_heads :]  # pre-RoPE keys: DeltaKV compresses these
            qk = apply_rope_fast(qk, plan.rope)  # q and k rotated in one go
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        else:
            q = self.q_norm(qkv[:, :qs].view(n, self.num_heads, self.head_dim))
            k_pre = self.k_norm(qkv[:, qs : qs + ks].view(n, self.num_kv_heads, self.head_dim))
            q, k = apply_rope_fast(q, plan.rope), apply_rope_fast(k_pre, plan.rope)
        if plan.batched:
            out = plan.method.forward_layer(plan, self.layer_idx, q, k, v, k_pre)
        else:
            out = self._per_sequence(plan.ctx, q, k, v, k_pre)
        return self.o_proj(out.reshape(n, -1))

    def _per_sequence(self, ctx: ForwardContext, q, k, v, k_pre) -> torch.Tensor:
        """Methods still on the per-sequence hooks: one write / attend per sequence."""
        method, layer, pos = ctx.method, self.layer_idx, ctx.positions
        for s in ctx.slices:
            r = slice(s.start, s.end)
            method.write(s.seq, layer, k[r], v[r], pos[r], k_pre[r])
        if ctx.all_decode:
            return method.attend_decode_batch([s.seq for s in ctx.slices], layer, q, pos)
        return torch.cat([method.attend(s.seq, layer, q[s.start : s.end], pos[s.start : s.end])
                          for s in ctx.slices])


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.gate_up_proj = Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=False)
        self.gate_up_proj.shard_sizes = [spec.intermediate_size, spec.intermediate_size]
        self.down_proj = Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(spec, layer_idx)
        self.mlp = MLP(spec)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, x, plan):
        x = x + self.self_attn(self.input_layernorm(x), plan)
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
        self.lm_head = Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def enable_mkldnn_decode(self) -> int:
        """Give every linear a oneDNN weight copy for small-row calls (decode); returns how many."""
        mods = [m for m in self.modules() if isinstance(m, Linear)]
        for m in mods:
            m.enable_mkldnn()
        return len(mods)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, plan) -> torch.Tensor:
        """Run every layer on the step `plan`; return logits (float32) only for `plan.logit_rows`."""
        x = self.model.embed_tokens(input_ids)
        plan.set_rope(plan.cos, plan.sin, x.dtype)
        logit_rows = plan.logit_rows
        for i, layer in enumerate(self.model.layers):
            if not plan.batched:  # per-sequence methods may drop rows before a layer (SparseX)
                ctx = plan.ctx
                keep = ctx.method.rows_for_layer(ctx, i)  # None: every row goes on
                if keep is not None:
                    remap = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
                    remap[keep] = torch.arange(len(keep), device=x.device)
                    logit_rows = remap[logit_rows]
                    if bool((logit_rows < 0).any()):
                        raise RuntimeError(f"{ctx.method.name}: rows_for_layer({i}) dropped a row whose logits are needed")
                    x, plan.ctx = x[keep], ctx.narrow(keep)
                    plan.set_rope(plan.ctx.cos, plan.ctx.sin, x.dtype)
            x = layer(x, plan)
        x = self.model.norm(x[logit_rows])
        return self.lm_head(x).float()
