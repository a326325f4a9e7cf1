"""Naive, independent references for the sparse cache methods, built on HF transformers.

The HF model keeps its ordinary full DynamicCache; a method is emulated by MASKING keys inside a
hand-written eager attention (registered as the attention implementation "deltakv_method_ref"):
a key evicted by SnapKV, outside StreamingLLM's window, or not selected by OmniKV gets -inf. Masking
a key is exactly equivalent to evicting it, so the greedy tokens must match the engine's.
Scores come from the eager softmax probabilities of the HF layers themselves (fp32, the
output_attentions path), computed here with plain loops rather than the engine's helpers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_ACTIVE = None  # the controller of the reference run in progress


def _ref_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention: query [1, Hq, n, D], key/value [1, Hkv, T, D]. Masks by controller rules."""
    ctl, layer = _ACTIVE, module.layer_idx
    g = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(g, dim=1).float()
    v = value.repeat_interleave(g, dim=1).float()
    scores = torch.matmul(query.float(), k.transpose(2, 3)) * scaling  # [1, Hq, n, T]
    qpos = ctl.qpos
    kpos = torch.arange(key.shape[2])
    mask = (kpos[None, :] <= qpos[:, None])[None]  # [1, n, T]
    extra = ctl.allowed(layer, qpos, kpos)  # None, [n, T] or [Hkv, n, T]
    if extra is not None:
        extra = extra if extra.dim() == 3 else extra[None]
        mask = mask & extra.repeat_interleave(g, dim=0) if extra.shape[0] > 1 else mask & extra
    scores = scores.masked_fill(~mask[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    ctl.record(layer, probs[0], qpos)
    out = torch.matmul(probs, v).to(query.dtype)
    return out.transpose(1, 2).contiguous(), probs


def load_ref_model(path):
    from transformers import AttentionInterface, AutoModelForCausalLM

    AttentionInterface.register("deltakv_method_ref", _ref_attention)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                attn_implementation="deltakv_method_ref").eval()


class Controller:
    """Full attention (vanilla). Subclasses restrict keys in `allowed` and learn in `record`."""

    qpos: torch.Tensor
    prompt_len: int = 0

    def allowed(self, layer, qpos, kpos):
        return None

    def record(self, layer, probs, qpos):
        pass

    def after_prefill(self):
        pass

    def after_step(self):
        pass


@torch.no_grad()
def ref_generate(model, prompt_ids: list[int], steps: int, ctl: Controller, chunk: int | None = None):
    """Greedy tokens and their logits under `ctl`, prefilling in chunks of `chunk` tokens."""
    global _ACTIVE
    from transformers import DynamicCache

    _ACTIVE = ctl
    try:
        cache = DynamicCache(config=model.config)
        p = len(prompt_ids)
        ctl.prompt_len = p
        chunk = chunk or p
        for s in range(0, p, chunk):
            e = min(p, s + chunk)
            ctl.qpos = torch.arange(s, e)
            out = model(torch.tensor([prompt_ids[s:e]]), position_ids=ctl.qpos[None], past_key_values=cache, use_cache=True)
        ctl.after_prefill()
        toks, logits = [], []
        for i in range(steps):
            lg = out.logits[0, -1].float()
            toks.append(int(lg.argmax()))
            logits.append(lg)
            if i == steps - 1:
                break
            ctl.qpos = torch.tensor([p + i])
            out = model(torch.tensor([[toks[-1]]]), position_ids=ctl.qpos[None], past_key_values=cache, use_cache=True)
            ctl.after_step()
        return toks, logits
    finally:
        _ACTIVE = None


# ---------------------------------------------------------------------------------------- SnapKV
class SnapKVRef(Controller):
    """SnapKV / PyramidKV / AdaKV: after prefill each (layer, KV head) sees only its kept positions
    (and every generated token). Needs an unchunked prefill (the window rows see the whole prompt)."""

    def __init__(self, budgets, num_kv_heads, window=32, sink=4, kernel=5, pooling="avg", mode="head", floor=0.2):
        self.budgets, self.hkv, self.window, self.sink = budgets, num_kv_heads, window, sink
        self.kernel, self.pooling, self.mode, self.floor = kernel, pooling, mode, floor
        self.rows = {}  # layer -> window probs [Hq, w, P]
        self.kept = None  # layer -> list per KV head of sorted kept positions

    def record(self, layer, probs, qpos):
        if self.kept is None:
            self.rows[layer] = probs[:, -self.window :, :].clone()

    def allowed(self, layer, qpos, kpos):
        if self.kept is None:
            return None
        m = torch.zeros(self.hkv, len(qpos), len(kpos), dtype=torch.bool)
        for h, pos in enumerate(self.kept[layer]):
            m[h][:, pos] = True
        m[:, :, self.prompt_len :] = True
        return m

    def after_prefill(self):
        self.kept = {l: self._select(l, rows) for l, rows in self.rows.items()}

    def _select(self, layer, rows):
        p, b, w, s = rows.shape[-1], self.budgets[layer], self.window, self.sink
        if p <= b:
            return [list(range(p))] * self.hkv
        hq = rows.shape[0]
        g = hq // self.hkv
        votes = rows.sum(dim=1)[:, : p - w]  # [Hq, P - w]  (sum = mean up to a constant)
        smoothed = torch.zeros_like(votes)
        r = self.kernel // 2
        for i in range(p - w):  # naive window smoothing; padding counts as zeros (avg) / ignored (max)
            lo, hi = max(0, i - r), min(p - w, i + r + 1)
            if self.pooling == "avg":
                smoothed[:, i] = votes[:, lo:hi].sum(dim=1) / self.kernel
            else:
                smoothed[:, i] = votes[:, lo:hi].max(dim=1).values
        per_kv = torch.stack([smoothed[h * g : (h + 1) * g].mean(dim=0) for h in range(self.hkv)])
        cand = per_kv[:, s:]  # positions s .. P-w-1
        n = b - s - w
        if self.mode == "layer":
            picks = [torch.topk(cand.mean(dim=0), n).indices] * self.hkv
        elif self.mode == "head":
            picks = [torch.topk(cand[h], n).indices for h in range(self.hkv)]
        else:  # AdaKV: each head secures floor(alpha * n), the rest goes to the best scores overall
            c = cand.clone()
            for h in range(self.hkv):
                c[h, torch.topk(c[h], int(self.floor * n)).indices] = float("inf")
            flat = torch.topk(c.flatten(), n * self.hkv).indices
            picks = [flat[flat // c.shape[1] == h] % c.shape[1] for h in range(self.hkv)]
        return [sorted(set(range(s)) | {int(i) + s for i in pk} | set(range(p - w, p))) for pk in picks]


# ---------------------------------------------------------------------------------------- Streaming
class StreamingRef(Controller):
    """Query at position q sees keys {k < sink} U (q - (budget_l - sink), q]."""

    def __init__(self, budgets, sink=4):
        self.budgets, self.sink = budgets, sink

    def allowed(self, layer, qpos, kpos):
        ring = self.budgets[layer] - self.sink
        return (kpos[None, :] < self.sink) | (kpos[None, :] > qpos[:, None] - ring)

    def kept_after_prefill(self, layer):
        q = torch.tensor([self.prompt_len - 1])
        m = self.allowed(layer, q, torch.arange(self.prompt_len))[0]
        return m.nonzero().squeeze(1).tolist()


# ---------------------------------------------------------------------------------------- OmniKV
class OmniKVRef(Controller):
    """Observation layers choose top-k history keys (max over heads and queries); sparse layers read
    sink + top-k + recent (+ the current chunk). Records the chosen positions of each step."""

    def __init__(self, num_layers, full_layers, top, top_prefill=None, sink=4, recent=32):
        self.full = sorted(full_layers)
        self.source = {l: max(f for f in self.full if f < l) for l in range(num_layers) if l not in self.full}
        self.top, self.top_prefill, self.sink, self.recent = top, top_prefill, sink, recent
        self.sel = {}
        self.history = []  # per decode step: {observation layer: sorted selected positions or None}

    def _k(self, value, n):
        k = value if isinstance(value, int) else max(1, math.ceil(value * n))
        return min(k, n)

    def record(self, layer, probs, qpos):
        if layer not in self.source.values():
            return
        self.sel[layer] = None
        start = int(qpos[0])
        value = self.top if start >= self.prompt_len else self.top_prefill
        if value is None:
            return
        t = probs.shape[-1]
        hist = [i for i in range(t) if self.sink <= i < start - self.recent]
        k = self._k(value, len(hist)) if hist else 0
        if k >= len(hist):
            return
        score = probs.amax(dim=(0, 1))  # [T]
        ranked = sorted(hist, key=lambda i: -float(score[i]))[:k]
        keep = set(range(t)) - set(hist) | set(ranked)
        self.sel[layer] = sorted(keep)

    def allowed(self, layer, qpos, kpos):
        if layer in self.full or self.sel.get(self.source[layer]) is None:
            return None
        m = torch.zeros(len(kpos), dtype=torch.bool)
        m[self.sel[self.source[layer]]] = True
        return m[None, :].expand(len(qpos), -1)

    def after_step(self):
        self.history.append(dict(self.sel))

    def after_prefill(self):
        self.history.append(dict(self.sel))


# ---------------------------------------------------------------------------------------- engine side
def engine_run(llm, prompt_ids: list[int], steps: int, on_step=None):
    """Run one greedy request step by step. Returns tokens, logits, kept positions after prefill
    ({layer: [per KV head sorted positions]}), kv bytes after prefill, and on_step(seq) results."""
    from sparse_engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True, return_logits=True)
    seq = llm.add_request(prompt_ids, params)
    kept, kv_after, trace = None, None, []
    while not seq.finished:
        llm.step()
        if seq.finished:
            break
        if kept is None and seq.num_computed >= seq.num_prompt_tokens:
            kept = {l: [sorted(llm.pool.pos[t.head(h)].tolist()) for h in range(t.num_kv_heads)]
                    for l, t in enumerate(seq.kv.tables)}
            kv_after = llm.method.kv_bytes(seq)
        if on_step is not None and kept is not None:  # one entry per step from the end of prefill on
            trace.append(on_step(seq))
    return seq.output_token_ids, seq.logits, kept, kv_after, trace
