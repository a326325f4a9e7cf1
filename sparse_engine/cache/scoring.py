"""Token scoring shared by the selecting methods (OmniKV, DeltaKV; kvpress's `ScorerPress` idea):
a method asks for one score per history column of a row group and a top-k pick under its budget.

* `group_scores`: softmaxed float32 attention of the group's queries over its keys, max over query
  heads and queries ([G, T]) - the score the OmniKV / DeltaKV references use;
* `pick_top`: each sequence's top-k history columns as a boolean mask, with the group's largest k
  as the one host-known shape (no device sync).
"""

from __future__ import annotations

import torch

# Scoring works in float32 on bounded blocks: sequences whose keys [b, Hkv, T, D] fit _KEY_ELEMS,
# query rows whose probabilities [b, Hq, rows, T] fit _SCORE_ELEMS.
_KEY_ELEMS = 1 << 27
_SCORE_ELEMS = 1 << 25


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


def group_scores(pool, scale: float, group, q, view, kv) -> torch.Tensor:
    """Per column [G, T]: softmaxed float32 attention (masked as attention masks it, as
    `attention_probs`), max over query heads and over the group's queries. Padded query rows
    repeat a sequence's last row (same query, same position): they change no maximum.

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
        qh = qg[g0:g1].float().view(g1 - g0, n, hkv, hq // hkv, d).permute(0, 2, 3, 1, 4)  # [b, Hkv, g, n, D]
        kt = k.float().transpose(-1, -2)[:, :, None]  # [b, Hkv, 1, D, T]
        base = valid[:, :, None, None, :]
        score = None
        for lo in range(0, n, qb):
            s = torch.matmul(qh[:, :, :, lo : lo + qb], kt) * scale  # [b, Hkv, g, rows, T]
            mask = base
            if kpos is not None:  # (no kpos: decode rows, which see every valid key)
                mask = base & (kpos[:, :, None, None, :] <= group.q_pos[g0:g1, None, None, lo : lo + qb, None])
            p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
            a = p.amax(dim=(1, 2, 3))
            score = a if score is None else torch.maximum(score, a)
        parts.append(score)
    return parts[0] if len(parts) == 1 else torch.cat(parts)
