"""Budget helpers shared by the sparse methods: per-layer schedules and per-head (AdaKV) splits.

A "budget" is a number of tokens kept per KV head of one layer. Layer schedules return a list with
one budget per layer; `format_budgets` prints them for inspection (`python -m
sparse_engine.cache.budgets pyramid 512 30`).
"""

from __future__ import annotations

import math

import torch


def uniform_budgets(budget: int, num_layers: int) -> list[int]:
    return [int(budget)] * num_layers


def pyramid_budgets(avg_budget: int, num_layers: int, min_budget: int, beta: float = 20.0) -> list[int]:
    """PyramidKV: budgets fall linearly from the bottom layer to the top layer.

    As in PyramidKV, the top layer gets `avg_budget / beta` (raised to `min_budget`, the sink + window
    a layer cannot go below) and the bottom layer `2 * avg_budget - top`, so the mean is `avg_budget`.
    Rounding is repaired so that the TOTAL equals `avg_budget * num_layers` exactly: PyramidKV and
    SnapKV then hold the same KV bytes at the same average budget.
    """
    if num_layers == 1:
        return [int(avg_budget)]
    top = max(int(min_budget), int(avg_budget / beta))
    top = min(top, int(avg_budget))
    bottom = 2 * avg_budget - top
    raw = [bottom + (top - bottom) * l / (num_layers - 1) for l in range(num_layers)]
    out = [int(math.floor(x)) for x in raw]
    # hand out the rounding remainder to the layers that lost the most (keeps monotonicity)
    missing = avg_budget * num_layers - sum(out)
    order = sorted(range(num_layers), key=lambda l: out[l] - raw[l])
    for l in order[:missing]:
        out[l] += 1
    return out


def ratio_budget(prompt_len: int, compression_ratio: float) -> int:
    """kvpress's budget for a compression ratio r: each KV head keeps int(T * (1 - r)) of a T-token
    prompt, window (and sinks) included (`ScorerPress`: n_kept = int(k_len * (1 - compression_ratio)))."""
    return int(prompt_len * (1 - compression_ratio))


def kvpress_pyramid_budgets(prompt_len: int, compression_ratio: float, window_size: int, beta: float,
                            num_layers: int) -> list[int]:
    """kvpress `PyramidKVPress.get_layer_budget` (after PyramidKV's pyramidkv_utils): per layer, a
    line from max_num (bottom) to min_num (top) whose mean is T * (1 - r), clipped so the bottom keeps
    at most T - window; UNIFORM round(T * (1 - r)) when not T >= max_num >= min_num >= window (the
    smallest layer would fall below the window)."""
    T, L = prompt_len, num_layers
    cap = window_size + T * (1 - compression_ratio)
    min_num = (cap - window_size) / beta
    max_num = (cap - window_size) * 2 - min_num
    if max_num >= T - window_size:
        max_num = T - window_size
        min_num = (cap - window_size) * 2 - max_num
    if not (T >= max_num >= min_num >= window_size) or L == 1:
        return [round(T * (1 - compression_ratio))] * L
    steps = (max_num - min_num) / (L - 1)
    return [round(max_num - l * steps) for l in range(L)]


def exp_decay_budgets(budget0: int, num_layers: int, decay: float, min_budget: int) -> list[int]:
    """`budget_l = max(min_budget, floor(budget0 * decay**l))` (streaming / snapkv layer decay)."""
    return [max(int(min_budget), int(math.floor(budget0 * decay**l))) for l in range(num_layers)]


def adakv_select(scores: torch.Tensor, per_head_budget: int, floor_alpha: float,
                 n_safe: int | None = None) -> list[torch.Tensor]:
    """AdaKV: split a layer's `H * per_head_budget` tokens across heads by score.

    scores [H, T] (comparable across heads: each row comes from a softmax). Each head first secures
    its own top `floor(alpha * per_head_budget)` tokens (AdaKV's safeguard against starving a head),
    then the remaining picks are the globally highest scores of the flattened [H*T] matrix.
    `n_safe` overrides that floor (kvpress counts it over the whole budget, window included).
    Returns, per head, the sorted indices it keeps (lengths differ per head; they sum to H*budget).
    """
    h, t = scores.shape
    k = min(per_head_budget, t)
    s = scores.clone().float()
    n_safe = int(floor_alpha * k) if n_safe is None else min(max(0, int(n_safe)), k)
    if n_safe > 0:
        s.scatter_(1, s.topk(n_safe, dim=1).indices, float("inf"))
    flat = s.reshape(-1).topk(h * k).indices
    keep = torch.zeros(h * t, dtype=torch.bool)
    keep[flat] = True
    keep = keep.view(h, t)
    return [keep[i].nonzero().squeeze(1) for i in range(h)]


def format_budgets(budgets: list[int], title: str = "") -> str:
    """A small text table `layer: budget ####` for logs and notebooks."""
    top = max(budgets) if budgets else 1
    lines = [title] if title else []
    for l, b in enumerate(budgets):
        lines.append(f"layer {l:3d}: {b:6d} " + "#" * max(1, round(40 * b / top)))
    lines.append(f"total {sum(budgets)}  mean {sum(budgets) / max(1, len(budgets)):.1f}")
    return "\n".join(lines)


def log_budgets(budgets: list[int], title: str = "", level: int = 20) -> None:  # 20 = logging.INFO
    """Log the table (logger ``sparse_engine.cache.budgets``, INFO by default)."""
    import logging

    logging.getLogger(__name__).log(level, "%s", format_budgets(budgets, title))


if __name__ == "__main__":  # python -m sparse_engine.cache.budgets pyramid 512 30 [window+sink]
    import sys

    kind, b, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    extra = int(sys.argv[4]) if len(sys.argv) > 4 else 36
    if kind == "pyramid":
        print(format_budgets(pyramid_budgets(b, n, extra), f"pyramid avg={b} layers={n}"))  # the CLI's output
    else:
        print(format_budgets(exp_decay_budgets(b, n, float(kind), extra), f"exp decay={kind} budget0={b}"))
