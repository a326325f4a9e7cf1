"""Token scoring shared by the selecting methods (OmniKV, DeltaKV; kvpress's `ScorerPress` idea):
a method asks for one score per history column of a row group and a top-k pick under its budget.

* `group_scores` (batched path) / `sequence_scores` (per-sequence path): one score per key column,
  by `score_mode` (`SCORE_MODES`), the same rule on both paths:

  - ``softmax_all`` (ours, the default): softmaxed float32 attention over every visible key (masked
    as attention masks it), max over query heads and queries;
  - ``raw_qk`` (the reference engine as the paper ran it): raw q.k, MEAN over the step's queries
    (keys a query cannot see count 0 and the mean divides by the chunk length, as the reference's
    prefill kernel does), then max over query heads; at decode (one query) that is raw q.k, max over
    heads. Reference: CURRENTF/Sparse-vLLM@0975d3f:src/sparsevllm/triton_kernel/context_flashattention_nopad.py
    (`_fwd_kernel_with_score`: raw `tl.dot(q, k)`, masked 0, summed over queries) and
    :src/sparsevllm/engine/sparse_controller.py (`on_layer_end`: `/= chunk_lens`, `max(dim=1)` over heads);
  - ``softmax_candidates`` (the reference's HF path and its latest engine at decode): softmax of the
    scaled logits restricted to the CANDIDATE columns (the history a method may pick from), max over
    heads (and queries). Reference: CURRENTF/Sparse-vLLM@18d3104:src/sparsevllm/engine/sparse_controller.py
    (`_decode_softmax_token_scores`, called from `on_layer_end`).

  A positive scale does not change which columns win (raw_qk keeps the attention scale).
* `pick_top`: each sequence's top-k history columns as a boolean mask, with the group's largest k
  as the one host-known shape (no device sync).
"""

from __future__ import annotations

import torch

from ..layers.attention_ops import attention_probs

# Scoring works in float32 on bounded blocks: sequences whose keys [b, Hkv, T, D] fit _KEY_ELEMS,
# query rows whose probabilities [b, Hq, rows, T] fit _SCORE_ELEMS.
_KEY_ELEMS = 1 << 27
_SCORE_ELEMS = 1 << 25

SCORE_MODES = ("softmax_all", "raw_qk", "softmax_candidates")


def check_score_mode(method: str, mode: str) -> None:
    if mode not in SCORE_MODES:
        raise ValueError(f"{method}.score_mode must be one of {SCORE_MODES}, got {mode!r} (softmax_all: ours; "
                         "raw_qk: the reference engine as the paper ran it; softmax_candidates: its HF path / latest engine)")


PREFILL_SELECT = ("budget", "always", "long_prompt", "never")


def check_prefill_select(method: str, mode: str) -> None:
    if mode not in PREFILL_SELECT:
        raise ValueError(f"{method}.prefill_select must be one of {PREFILL_SELECT}, got {mode!r} (budget: ours; "
                         "always / long_prompt: the reference engine as the paper ran it, DeltaKV / OmniKV; "
                         "never: its latest engine)")


def step_budget(cfg, decode: bool, prompt_len: int, sinks: int, chunk: int | None):
    """The top-k knob of one sequence's step (None: this step reads the whole history), by
    `cfg.prefill_select`:

    * decode: `num_top_tokens`;
    * ``budget`` (ours): prefill chunks select with `num_top_tokens_in_prefill` (None: they do not);
    * ``always`` (the paper's engine for DeltaKV, which its long-text gate skips: `sparse_controller.py`
      `on_layer_end` runs for 'deltakv' whatever the length): every prefill chunk selects, with
      `num_top_tokens_in_prefill`, which defaults to `num_top_tokens` there;
    * ``long_prompt`` (the reference engine as the paper ran it): prefill chunks select only for
      prompts longer than sinks + recent + num_top_tokens + chunk size (its `is_long_text` gate), with
      `num_top_tokens_in_prefill`, which defaults to `num_top_tokens` there. Reference:
      CURRENTF/Sparse-vLLM@0975d3f:src/sparsevllm/engine/model_runner.py (`_long_text_threshold`),
      :src/sparsevllm/config.py (`num_top_tokens_in_prefill = num_top_tokens` when None);
    * ``never`` (its latest engine): prefill chunks never select. Reference:
      CURRENTF/Sparse-vLLM@18d3104:src/sparsevllm/engine/sparse_controller.py (`on_layer_end`:
      `skipped="prefill_full_attention"`)."""
    if decode:
        return cfg.num_top_tokens
    mode = getattr(cfg, "prefill_select", "budget")
    if mode == "never":
        return None
    default = cfg.num_top_tokens_in_prefill if cfg.num_top_tokens_in_prefill is not None else cfg.num_top_tokens
    if mode == "always":
        return default
    if mode == "long_prompt":
        top = cfg.num_top_tokens
        if isinstance(top, float):  # a fraction of the history: the gate counts it against the whole prompt
            top = top_tokens_of(top, prompt_len)
        if prompt_len <= sinks + cfg.recent_size + top + (chunk or 0):
            return None
        return default
    return cfg.num_top_tokens_in_prefill


def top_tokens_of(value: int | float, history: int) -> int:
    """Tokens to keep out of `history`: an int as is, a fraction rounded up (at least one)."""
    import math

    k = value if isinstance(value, int) else max(1, math.ceil(value * history))
    return min(k, history)


def sequence_scores(q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, kpos: torch.Tensor, valid: torch.Tensor,
                    scale: float, mode: str = "softmax_all", cand: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sequence path: one score per key column [T] (float32, k's device), by `mode`.

    q [n, Hq, D], q_pos [n]; k [Hkv, T, D], kpos / valid [Hkv, T]; cand [T] (candidate columns;
    needed by softmax_candidates)."""
    hq, hkv = q.shape[1], k.shape[0]
    valid = valid.to(kpos.device)
    if mode == "softmax_candidates":
        valid = valid & cand.to(kpos.device)[None, :]
    if mode != "raw_qk":
        return attention_probs(q, q_pos, k, kpos, valid, scale).amax(dim=(0, 1))
    kk = k.repeat_interleave(hq // hkv, dim=0).float()
    s = torch.einsum("nhd,htd->hnt", q.float(), kk) * scale  # [Hq, n, T]
    mask = (valid[:, None, :] & (kpos[:, None, :] <= q_pos.to(kpos.device)[None, :, None]))
    s = s.masked_fill(~mask.repeat_interleave(hq // hkv, dim=0), 0.0)
    return s.mean(dim=1).amax(dim=0)


def pick_top(score: torch.Tensor, hist: torch.Tensor, k: torch.Tensor, k_max: int) -> torch.Tensor:
    """score [G, T], hist [G, T] (candidate columns), k [G] (device) picks per sequence, k_max =
    max(k) (host). Returns the picked columns as a bool mask [G, T]."""
    G, T = score.shape
    picked = torch.zeros(G, T, dtype=torch.bool, device=score.device)
    if k_max == 0:
        return picked
    top = score.masked_fill(~hist, float("-inf")).topk(k_max, dim=1).indices  # [G, k_max], best first
    ok = torch.arange(k_max, device=score.device)[None, :] < k[:, None]  # each sequence's k
    return picked.scatter_(1, top, ok)


def group_scores(pool, scale: float, group, q, view, kv, mode: str = "softmax_all",
                 cand: torch.Tensor | None = None) -> torch.Tensor:
    """Per column [G, T] by `mode` (see the module doc; cand [G, T]: candidate columns, needed by
    softmax_candidates). Masked as attention masks it (as `attention_probs`). Padded query rows
    repeat a sequence's last row (same query, same position): they change no maximum, and raw_qk's
    mean leaves them out (`group.valid`).

    Memory stays bounded for big batches / long histories: sequences in blocks whose float32 keys
    fit `_KEY_ELEMS`, query rows in blocks whose probabilities fit `_SCORE_ELEMS` (block counts are
    host-known shapes: no sync, and no loop per sequence unless one sequence alone fills a block)."""
    G, n = group.rows.shape
    hq, d = q.shape[1], q.shape[2]
    table = view.table
    hkv, T = table.shape[1], table.shape[2]
    qg = q[group.rows]  # [G, n, Hq, D]
    gb = max(1, _KEY_ELEMS // max(1, hkv * T * d))
    qb = max(1, _SCORE_ELEMS // max(1, min(gb, G) * hq * T))
    raw = mode == "raw_qk"
    qvalid = getattr(group, "valid", None)
    parts = []
    for g0 in range(0, G, gb):
        g1 = min(G, g0 + gb)
        if kv is None:  # the decode kernel read the pool: gather the keys here
            k = pool.k.index_select(0, table[g0:g1].reshape(-1)).view(g1 - g0, hkv, T, d)
            kpos = None
            valid = (view.valid[g0:g1] if view.valid is not None else
                     torch.arange(T, device=table.device)[None, None, :] < view.lens[g0:g1, :, None])
        else:
            k, kpos, valid = (None if x is None else x[g0:g1] for x in kv)
        if kpos is None and not group.decode:  # attention took a causal fast path: fetch positions
            kpos = pool.pos[table[g0:g1]]
        if mode == "softmax_candidates":
            valid = valid & cand[g0:g1, None, :]
        b, g = g1 - g0, hq // hkv
        qh = qg[g0:g1].float().view(b, n, hkv, g, d).permute(0, 2, 3, 1, 4)  # [b, Hkv, g, n, D]
        kt = k.float().transpose(-1, -2)  # [b, Hkv, D, T]
        base = valid[:, :, None, None, :]
        score = None
        for lo in range(0, n, qb):
            # (g, rows) folded into one matrix: one bmm per KV head (a broadcast over g would copy K)
            qr = qh[:, :, :, lo : lo + qb]
            rows = qr.shape[3]
            s = torch.matmul(qr.reshape(b, hkv, g * rows, d), kt).view(b, hkv, g, rows, T) * scale
            mask = base
            if kpos is not None:  # (no kpos: decode rows, which see every valid key)
                mask = base & (kpos[:, :, None, None, :] <= group.q_pos[g0:g1, None, None, lo : lo + qb, None])
            if raw:  # sum of raw logits over the real query rows (invisible keys count 0)
                if qvalid is not None:
                    mask = mask & qvalid[g0:g1, None, None, lo : lo + qb, None]
                a = s.masked_fill(~mask, 0.0).sum(dim=3)  # [b, Hkv, g, T]
                score = a if score is None else score + a
                continue
            p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
            a = p.amax(dim=(1, 2, 3))
            score = a if score is None else torch.maximum(score, a)
        if raw:  # mean over the chunk's queries, then max over query heads
            nq = (qvalid[g0:g1].sum(1) if qvalid is not None else torch.full((g1 - g0,), n, device=score.device))
            score = (score / nq.to(score.dtype)[:, None, None, None]).amax(dim=(1, 2))
        parts.append(score)
    return parts[0] if len(parts) == 1 else torch.cat(parts)
