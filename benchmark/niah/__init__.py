"""Needle in a haystack over real text: the shipped news articles (gensim's Lee corpus).

For each context length L (prompt tokens) x depth d (percent) x sample, a haystack of consecutive
articles (starting at a seeded article, cycling through the corpus as often as L needs) is sized so
that the whole prompt has L tokens (within 1%, asserted; the actual lengths are in the records and
the summary), a needle sentence
"One of the special magic numbers for <key> is: <7 digits>." is inserted at the sentence boundary
nearest before d% of the haystack, and the model is asked for the number. Scoring is exact
retrieval: 1 when the 7 digits appear verbatim in the answer. ``artifacts`` draws the depth x
length heatmap (``niah_heatmap.png``).

Query-agnostic mode: the instruction + haystack is the context, the question is the only turn.
"""

from __future__ import annotations

import random
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

from benchmark.backends import GenParams, Request, chat_split, chat_wrap, encode, encode_prompt, has_chat_template
from benchmark.metrics import niah_score

NAME = "niah"
INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
               "I will quiz you about the numbers afterwards.\n\n")
QUESTION = "\n\nWhat is the special magic number for {key} mentioned in the provided text?"
ANSWER_PREFIX = " The special magic number for {key} mentioned in the provided text is"
NEEDLE = " One of the special magic numbers for {key} is: {value}. "
KEYS = ("amber-lighthouse", "quiet-harbor", "silver-orchard", "crimson-falcon", "paper-meadow", "iron-canyon",
        "velvet-river", "copper-summit", "misty-garden", "golden-anchor", "frozen-tulip", "hollow-cedar")


def check_data(bcfg) -> None:
    from data_prepare.resources import shipped_text_path

    shipped_text_path()  # raises with the pip command when gensim's corpus is missing
    for L in bcfg.context_lengths:
        if int(L) < 64:
            raise ValueError(f"NIAH context length {L} is too small (>= 64 tokens)")
    for d in bcfg.depths:
        if not 0 <= float(d) <= 100:
            raise ValueError(f"NIAH depth {d} must be a percentage in [0, 100]")


@lru_cache(maxsize=4)
def _haystack_tokens(tokenizer_id: int, tokenizer) -> tuple[list[int], list[int]]:
    from data_prepare.resources import shipped_articles

    arts = shipped_articles()
    ids, starts = [], []
    for a in arts:
        starts.append(len(ids))
        ids.extend(encode(tokenizer, a.strip() + " ", add_special_tokens=False))
    return ids, starts


def _insert_needle(text: str, needle: str, depth: float) -> str:
    if depth >= 100:
        return text.rstrip() + needle
    pos = int(len(text) * depth / 100)
    if pos > 0:
        cut = text.rfind(". ", 0, pos)
        pos = cut + 1 if cut >= 0 else 0
    return text[:pos].rstrip() + needle + text[pos:].lstrip()


def _cycle(ids: list[int], start: int, n: int) -> list[int]:
    """``n`` tokens of ``ids`` from ``start`` on, wrapping around as often as needed."""
    if not ids:
        raise ValueError("the NIAH corpus is empty")
    out: list[int] = []
    pos = start % len(ids)
    while len(out) < n:
        take = ids[pos: pos + n - len(out)]
        out.extend(take)
        pos = 0
    return out


def length_tolerance(length: int) -> int:
    """Allowed distance of a prompt from its asked length: 1% (at least one token)."""
    return max(1, length // 100)


def make_sample(tokenizer, length: int, depth: float, rng: random.Random, use_chat: bool) -> dict:
    """One haystack of ``length`` prompt tokens (within ``length_tolerance``; the corpus is cycled as
    often as the length needs) with the needle at ``depth`` percent."""
    key = rng.choice(KEYS)
    value = str(rng.randint(1_000_000, 9_999_999))
    hay_ids, starts = _haystack_tokens(id(tokenizer), tokenizer)
    question = QUESTION.format(key=key)
    answer_prefix = ANSWER_PREFIX.format(key=key)
    needle = NEEDLE.format(key=key, value=value)

    def render(haystack: str) -> tuple[str, str]:
        head, tail = INSTRUCTION + haystack, question
        ctx, q = chat_split(tokenizer, head, tail, use_chat)
        return ctx, (q + answer_prefix.strip() if use_chat else q + answer_prefix)

    def tokens(ctx: str, q: str) -> tuple[list[int], list[int]]:
        return encode_prompt(tokenizer, ctx, use_chat), encode(tokenizer, q, add_special_tokens=False)

    overhead = sum(map(len, tokens(*render("")))) + len(encode(tokenizer, needle, add_special_tokens=False))
    budget = length - overhead
    if budget < 16:
        raise ValueError(f"NIAH context length {length} leaves no room for a haystack (overhead {overhead} tokens)")
    start = starts[rng.randrange(len(starts))]
    best = None
    for _ in range(8):  # decoding + re-encoding merges a few tokens at joins: correct the budget and retry
        haystack = tokenizer.decode(_cycle(hay_ids, start, budget), skip_special_tokens=True)
        ctx, q = render(_insert_needle(haystack, needle, depth))
        ctx_ids, q_ids = tokens(ctx, q)
        n = len(ctx_ids) + len(q_ids)
        if best is None or abs(n - length) < abs(best["actual_tokens"] - length):
            best = {"key": key, "value": value, "context": ctx, "query": q, "context_ids": ctx_ids,
                    "query_ids": q_ids, "actual_tokens": n}
        if n == length:
            break
        budget += length - n
        if budget < 16:
            break
    if abs(best["actual_tokens"] - length) > length_tolerance(length):
        raise ValueError(f"NIAH prompt came out at {best['actual_tokens']} tokens for the asked {length} "
                         f"(tolerance {length_tolerance(length)})")
    return best


def build_requests(bcfg, tokenizer, max_model_len: int, query_mode: str = "aware") -> list[Request]:
    check_data(bcfg)
    use_chat = bool(bcfg.get("chat_template", True)) and has_chat_template(tokenizer)
    params = GenParams(max_tokens=int(bcfg.get("max_tokens", 16)), temperature=0.0)
    reqs = []
    for L in bcfg.context_lengths:
        L = int(L)
        if L + params.max_tokens > max_model_len:
            raise ValueError(f"NIAH context length {L} + {params.max_tokens} new tokens exceeds max_model_len "
                             f"{max_model_len}")
        for d in bcfg.depths:
            for s in range(int(bcfg.get("samples_per_cell", 1))):
                rng = random.Random(f"{bcfg.get('seed', 0)}/{L}/{d}/{s}")
                smp = make_sample(tokenizer, L, float(d), rng, use_chat)
                ctx_ids, q_ids = smp["context_ids"], smp["query_ids"]
                assert abs(len(ctx_ids) + len(q_ids) - L) <= length_tolerance(L)
                meta = {"length": L, "depth": float(d), "sample": s, "needle": smp["value"], "key": smp["key"],
                        "actual_tokens": len(ctx_ids) + len(q_ids)}
                uid = f"niah/L{L}/d{d}/s{s}"
                if query_mode == "aware":
                    reqs.append(Request(uid=uid, task="niah", prompt_ids=ctx_ids + q_ids, params=params, meta=meta))
                else:
                    reqs.append(Request(uid=uid, task="niah", kind="session", context_ids=ctx_ids, turns=[q_ids],
                                        accumulate=False, params=[params], meta=meta, turn_meta=[{}]))
    return reqs


def actual_lengths(records: list[dict]) -> dict:
    """Per asked length, the prompt tokens the requests really had: {"L=N": {"min", "max", "mean"}}."""
    by_len: dict[int, list[int]] = defaultdict(list)
    for r in records:
        if r.get("actual_tokens") is not None:
            by_len[int(r["length"])].append(int(r["actual_tokens"]))
    return {f"L={L}": {"min": min(v), "max": max(v), "mean": round(sum(v) / len(v), 1)}
            for L, v in sorted(by_len.items())}


def score(records: list[dict], bcfg) -> dict:
    cells: dict[tuple[int, float], list[float]] = defaultdict(list)
    for r in records:
        r["score"] = niah_score(r["pred"], r["needle"])
        cells[(int(r["length"]), float(r["depth"]))].append(r["score"])
    lengths = sorted({k[0] for k in cells})
    depths = sorted({k[1] for k in cells})
    grid = {f"{d:g}": {str(L): round(100 * sum(cells[(L, d)]) / len(cells[(L, d)]), 2) if cells.get((L, d)) else None
                       for L in lengths} for d in depths}
    per_len = {}
    for L in lengths:
        vals = [v for (l2, _), vs in cells.items() if l2 == L for v in vs]
        per_len[f"L={L}"] = round(100 * sum(vals) / len(vals), 2)
    allv = [v for vs in cells.values() for v in vs]
    actual = actual_lengths(records)
    header = ["actual prompt tokens per asked length: " + ", ".join(
        f"{k}: {v['min']}" + (f"-{v['max']}" if v["max"] != v["min"] else "") for k, v in actual.items())]
    return {"metric": "exact retrieval of the needle's 7-digit value (%)", "scores": per_len,
            "n": {f"L={L}": sum(len(cells[(L, d)]) for d in depths if (L, d) in cells) for L in lengths},
            "average": round(100 * sum(allv) / len(allv), 2) if allv else None, "grid": grid,
            "actual_tokens": actual, "header": header}


def plot_heatmap(grid: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    depths = list(grid.keys())
    lengths = list(next(iter(grid.values())).keys()) if grid else []
    data = np.array([[np.nan if grid[d][L] is None else grid[d][L] for L in lengths] for d in depths], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * max(1, len(lengths)), 1.2 + 0.6 * max(1, len(depths))))
    im = ax.imshow(data, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if not np.isnan(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.0f}", ha="center", va="center", fontsize=9)
    fig.colorbar(im, ax=ax, label="retrieval accuracy (%)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def artifacts(records, bcfg, out_dir: Path, summary: dict) -> dict:
    png = plot_heatmap(summary["result"]["grid"], Path(out_dir) / "niah_heatmap.png",
                       f"NIAH {summary['label']} (avg {summary['result']['average']})")
    return {"heatmap": str(png)}
