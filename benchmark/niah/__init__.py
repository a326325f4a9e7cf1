"""Needle in a haystack over real text: the shipped news articles (gensim's Lee corpus).

For each context length L (prompt tokens) x depth d (percent) x sample, a haystack of consecutive
articles (starting at a seeded article, cycling through the corpus as often as L needs) is sized so
that the whole prompt has L tokens (within 1%, asserted; the actual lengths are in the records and
the summary), a needle sentence
"One of the special magic numbers for <key> is: <7 digits>." is inserted at the sentence boundary
nearest before d% of the haystack, and the model is asked for the number. Scoring is exact
retrieval: 1 when the 7 digits appear verbatim in the answer. ``artifacts`` draws the depth x
length heatmap (``niah_heatmap.png``).

Presets (``benchmark.preset``; the summary / table header names it):

* ``default``: the above; depths [0, 25, 50, 75, 100], 16 new tokens.
* ``ruler``: RULER's single-needle task (niah_single_2: words key, 7-digit number value): its
  template with the singular wording the single-needle case gets ("A special magic number is hidden
  ... What is the special magic number for {key} ...", answer prefix "... is"), its needle, the
  needle inserted between sentences at ``int(n_sentences * depth / 100)``, its depth grid
  (``round(linspace(0, 100, 40))``), 128 new tokens, and its length accounting: L = prompt tokens +
  the tokens to generate. The haystack is the shipped news text (RULER uses Paul Graham essays).
* ``gkamradt``: LLMTest_NeedleInAHaystack's construction: system prompt, the document as one user
  message and the question as another, the haystack trimmed by tokens to L - 200 (its
  ``final_context_length_buffer``) including the needle, the needle inserted at the token position
  ``int(n_tokens * depth / 100)`` moved back to just after a "." token (the end at 100%), its depth grid
  (``round(linspace(0, 100, 35))``), 300 new tokens. The needle is the magic-number sentence scored by
  exact retrieval (the original asks about San Francisco and grades with an LLM judge).

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
# RULER (scripts/data/synthetic/constants.py + niah.py): the niah template after the single-needle
# replacements ('Some' -> 'A', 'are all' -> 'is', 'are' -> 'is', 'numbers' -> 'number'); the needle keeps
# the plural. The answer prefix ends the prompt.
RULER_TEMPLATE = ("A special magic number is hidden within the following text. Make sure to memorize it. I will quiz "
                  "you about the number afterwards.\n{context}\nWhat is the special magic number for {query} "
                  "mentioned in the provided text?")
RULER_ANSWER_PREFIX = " The special magic number for {query} mentioned in the provided text is"
RULER_NEEDLE = "One of the special magic numbers for {key} is: {value}."
RULER_DEPTHS = [int(round(100 * i / 39)) for i in range(40)]  # np.round(np.linspace(0, 100, num=40))
# gkamradt/LLMTest_NeedleInAHaystack (llm_needle_haystack_tester.py, providers/openai.py)
GK_SYSTEM = "You are a helpful AI bot that answers questions for a user. Keep your response short and direct"
GK_QUESTION_SUFFIX = " Don't give information outside the document or repeat your findings"
GK_NEEDLE = "\nOne of the special magic numbers for {key} is: {value}.\n"
GK_QUESTION = "What is the special magic number for {key}?"
GK_BUFFER = 200  # final_context_length_buffer
GK_DEPTHS = [int(round(100 * i / 34)) for i in range(35)]  # np.round(np.linspace(0, 100, num=35))
PRESETS = {
    "default": {"depths": [0, 25, 50, 75, 100], "max_tokens": 16},
    "ruler": {"depths": RULER_DEPTHS, "max_tokens": 128},
    "gkamradt": {"depths": GK_DEPTHS, "max_tokens": 300},
}

KEYS = ("amber-lighthouse", "quiet-harbor", "silver-orchard", "crimson-falcon", "paper-meadow", "iron-canyon",
        "velvet-river", "copper-summit", "misty-garden", "golden-anchor", "frozen-tulip", "hollow-cedar")


def preset_of(bcfg) -> str:
    preset = (bcfg.get("preset") if bcfg is not None else None) or "default"
    if preset not in PRESETS:
        from benchmark.eval_runner import unknown_name

        raise unknown_name("NIAH preset", preset, PRESETS, hint="benchmark.preset=")
    return preset


def depths_of(bcfg) -> list[float]:
    """``benchmark.depths``, or the preset's depth grid when it is null."""
    d = bcfg.get("depths") if bcfg is not None else None
    return [float(x) for x in (PRESETS[preset_of(bcfg)]["depths"] if d is None else d)]


def max_tokens_of(bcfg) -> int:
    m = bcfg.get("max_tokens")
    return int(PRESETS[preset_of(bcfg)]["max_tokens"] if m is None else m)


def target_tokens(preset: str, length: int, max_tokens: int) -> int:
    """What a sample of nominal length L is sized to: default: prompt tokens = L; ruler: prompt tokens =
    L - tokens to generate (RULER's max_seq_length counts them); gkamradt: document (haystack + needle)
    tokens = L - 200 (its buffer for the system prompt, the question and the answer)."""
    return {"default": length, "ruler": length - max_tokens, "gkamradt": length - GK_BUFFER}[preset]


def check_data(bcfg) -> None:
    from data_prepare.resources import shipped_text_path

    shipped_text_path()  # raises with the pip command when gensim's corpus is missing
    preset = preset_of(bcfg)
    for L in bcfg.context_lengths:
        if target_tokens(preset, int(L), max_tokens_of(bcfg)) < 64:
            raise ValueError(f"NIAH context length {L} is too small for preset {preset} (>= 64 tokens of "
                             f"{'prompt' if preset != 'gkamradt' else 'document'} needed)")
    for d in depths_of(bcfg):
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


def _sentences(text: str) -> list[str]:
    import re

    return [x for x in re.split(r"(?<=[.!?])\s+", text.strip()) if x]


def make_sample_ruler(tokenizer, target: int, depth: float, rng: random.Random, use_chat: bool) -> dict:
    """RULER niah_single_2 on the shipped text, sized to ``target`` prompt tokens (within 1%)."""
    key = rng.choice(KEYS)
    value = str(rng.randint(1_000_000, 9_999_999))
    hay_ids, starts = _haystack_tokens(id(tokenizer), tokenizer)
    needle = RULER_NEEDLE.format(key=key, value=value)
    head_t, tail_t = RULER_TEMPLATE.split("{context}")
    answer_prefix = RULER_ANSWER_PREFIX.format(query=key)

    def render(haystack: str) -> tuple[str, str]:
        ctx, q = chat_split(tokenizer, head_t + haystack, tail_t.format(query=key), use_chat)
        return ctx, (q + answer_prefix.strip() if use_chat else q + answer_prefix)

    def build(budget: int):
        sents = _sentences(tokenizer.decode(_cycle(hay_ids, start, budget), skip_special_tokens=True))
        pos = int(len(sents) * depth / 100)
        haystack = " ".join([" ".join(sents[:pos]), needle, " ".join(sents[pos:])]).strip()
        ctx, q = render(haystack)
        ctx_ids = encode_prompt(tokenizer, ctx, use_chat)
        q_ids = encode(tokenizer, q, add_special_tokens=False)
        return {"key": key, "value": value, "context": ctx, "query": q, "context_ids": ctx_ids, "query_ids": q_ids,
                "actual_tokens": len(ctx_ids) + len(q_ids), "measured": len(ctx_ids) + len(q_ids)}

    start = starts[rng.randrange(len(starts))]
    return _fit(build, target, target - 64)  # the template takes ~60 tokens; _fit corrects the rest


def make_sample_gkamradt(tokenizer, target: int, depth: float, rng: random.Random, use_chat: bool) -> dict:
    """LLMTest_NeedleInAHaystack's construction on the shipped text: a document of ``target`` tokens
    (haystack + needle, within 1%), the needle at the token depth moved back to a "." token."""
    key = rng.choice(KEYS)
    value = str(rng.randint(1_000_000, 9_999_999))
    hay_ids, starts = _haystack_tokens(id(tokenizer), tokenizer)
    needle_ids = encode(tokenizer, GK_NEEDLE.format(key=key, value=value), add_special_tokens=False)
    period = set(encode(tokenizer, ".", add_special_tokens=False))
    question = GK_QUESTION.format(key=key) + GK_QUESTION_SUFFIX
    start = starts[rng.randrange(len(starts))]

    def build(n_doc: int):
        hay = _cycle(hay_ids, start, max(1, n_doc - len(needle_ids)))
        if depth >= 100:
            doc_ids = hay + needle_ids
        else:
            cut = int(len(hay) * depth / 100)
            while cut > 0 and hay[cut - 1] not in period:
                cut -= 1
            doc_ids = hay[:cut] + needle_ids + hay[cut:]
        document = tokenizer.decode(doc_ids, skip_special_tokens=True)
        if use_chat:
            msgs = [{"role": "system", "content": GK_SYSTEM}, {"role": "user", "content": document},
                    {"role": "user", "content": _SPLIT}]
            try:
                rendered = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            except Exception:  # noqa: BLE001 - a template that refuses two user turns in a row: one message
                msgs = msgs[:1] + [{"role": "user", "content": document + "\n\n" + _SPLIT}]
                rendered = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            ctx, q = rendered.split(_SPLIT, 1)
            q = question + q
        else:
            ctx, q = GK_SYSTEM + "\n\n" + document + "\n\n", question
        ctx_ids = encode_prompt(tokenizer, ctx, use_chat)
        q_ids = encode(tokenizer, q, add_special_tokens=False)
        return {"key": key, "value": value, "context": ctx, "query": q, "context_ids": ctx_ids, "query_ids": q_ids,
                "actual_tokens": len(ctx_ids) + len(q_ids), "document_tokens": len(doc_ids),
                "measured": len(encode(tokenizer, document, add_special_tokens=False))}

    smp = build(target)  # exactly `target` document tokens, as the original builds them (no re-fitting)
    if abs(smp["measured"] - target) > length_tolerance(target):
        raise ValueError(f"NIAH gkamradt document re-encodes to {smp['measured']} tokens for {target} "
                         f"(tolerance {length_tolerance(target)})")
    return smp


_SPLIT = "[SEPSEPSEP]"


def _fit(build, target: int, budget: int) -> dict:
    """Call ``build(budget)`` and correct the budget by the measured miss until the sample measures
    ``target`` tokens (a few tokens merge or split where text is decoded and encoded again)."""
    best = None
    for _ in range(8):
        smp = build(max(16, budget))
        miss = target - smp["measured"]
        if best is None or abs(miss) < abs(target - best["measured"]):
            best = smp
        if miss == 0:
            break
        budget += miss
    if abs(target - best["measured"]) > length_tolerance(target):
        raise ValueError(f"NIAH sample came out at {best['measured']} tokens for {target} "
                         f"(tolerance {length_tolerance(target)})")
    return best


def build_requests(bcfg, tokenizer, max_model_len: int, query_mode: str = "aware") -> list[Request]:
    check_data(bcfg)
    preset = preset_of(bcfg)
    use_chat = bool(bcfg.get("chat_template", True)) and has_chat_template(tokenizer)
    params = GenParams(max_tokens=max_tokens_of(bcfg), temperature=0.0)
    reqs = []
    for L in bcfg.context_lengths:
        L = int(L)
        target = target_tokens(preset, L, params.max_tokens)
        if target + params.max_tokens > max_model_len:  # before any haystack is built
            raise ValueError(f"NIAH context length {L} ({target} tokens + {params.max_tokens} new tokens) exceeds "
                             f"max_model_len {max_model_len}")
        for d in depths_of(bcfg):
            for s in range(int(bcfg.get("samples_per_cell", 1))):
                rng = random.Random(f"{bcfg.get('seed', 0)}/{L}/{d:g}/{s}")
                if preset == "default":
                    smp = make_sample(tokenizer, L, float(d), rng, use_chat)
                    assert abs(smp["actual_tokens"] - L) <= length_tolerance(L)
                elif preset == "ruler":
                    smp = make_sample_ruler(tokenizer, target, float(d), rng, use_chat)
                else:
                    smp = make_sample_gkamradt(tokenizer, target, float(d), rng, use_chat)
                ctx_ids, q_ids = smp["context_ids"], smp["query_ids"]
                if len(ctx_ids) + len(q_ids) + params.max_tokens > max_model_len:
                    raise ValueError(f"NIAH context length {L}: {len(ctx_ids) + len(q_ids)} prompt tokens + "
                                     f"{params.max_tokens} new tokens exceed max_model_len {max_model_len}")
                meta = {"length": L, "depth": float(d), "sample": s, "needle": smp["value"], "key": smp["key"],
                        "actual_tokens": len(ctx_ids) + len(q_ids), "preset": preset}
                if "document_tokens" in smp:
                    meta["document_tokens"] = smp["document_tokens"]
                uid = f"niah/L{L}/d{d:g}/s{s}"
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
    preset = preset_of(bcfg)
    what = {"default": "prompt tokens = L", "ruler": "RULER: prompt + generated tokens = L",
            "gkamradt": "gkamradt: haystack + needle tokens = L - 200"}[preset]
    header = [f"NIAH preset: {preset} ({what}; depths {', '.join(f'{d:g}' for d in depths)})",
              "actual prompt tokens per asked length: " + ", ".join(
                  f"{k}: {v['min']}" + (f"-{v['max']}" if v["max"] != v["min"] else "") for k, v in actual.items())]
    return {"metric": f"exact retrieval of the needle's 7-digit value (%), preset {preset}", "scores": per_len,
            "preset": preset,
            "n": {f"L={L}": sum(len(cells[(L, d)]) for d in depths if (L, d) in cells) for L in lengths},
            "average": round(100 * sum(allv) / len(allv), 2) if allv else None, "grid": grid,
            "actual_tokens": actual, "header": header}


def title_inside(fig, ax) -> bool:
    """Whether the axes title's drawn box lies inside the figure (renderer coordinates)."""
    fig.canvas.draw()
    box = ax.title.get_window_extent(fig.canvas.get_renderer())
    return box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height


def fit_title(fig, ax, title: str, fontsize: float = 9) -> None:
    """Set ``title`` on ``ax`` and lay the figure out so that the title lies inside the figure (a long
    run name used to run off both sides of the small heatmap): wrap it on word boundaries down to
    lines of 40 characters, then widen the figure."""
    import textwrap

    text, width = title, len(title)
    while True:
        ax.set_title(text, fontsize=fontsize)
        fig.tight_layout()  # makes room above the axes for the (wrapped) title
        if title_inside(fig, ax) or fig.get_figwidth() > 40:
            return
        if width > 40:
            width = max(40, int(width * 0.85))
            text = "\n".join(textwrap.wrap(title, width=width, break_long_words=False, break_on_hyphens=False))
        else:
            fig.set_figwidth(fig.get_figwidth() * 1.15)


def heatmap_figure(grid: dict, title: str):
    """The depth x length accuracy heatmap as a matplotlib figure, title inside the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    depths = list(grid.keys())
    lengths = list(next(iter(grid.values())).keys()) if grid else []
    data = np.array([[np.nan if grid[d][L] is None else grid[d][L] for L in lengths] for d in depths], dtype=float)
    # 4 inches at least: room for the colorbar and a readable title with a single length
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 + 1.1 * max(1, len(lengths))), 1.2 + 0.6 * max(1, len(depths))))
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
    fit_title(fig, ax, title)
    return fig


def plot_heatmap(grid: dict, path: Path, title: str) -> Path:
    import matplotlib.pyplot as plt

    fig = heatmap_figure(grid, title)
    fig.savefig(path, dpi=120, bbox_inches="tight", pad_inches=0.1)  # nothing drawn is cut off
    plt.close(fig)
    return path


def heatmap_title(summary: dict) -> str:
    """What ran (method, the knobs it changed, backend, query mode), the run folder and the average."""
    from benchmark.eval_runner import changed_knobs

    chosen = changed_knobs(summary.get("method", ""), summary.get("knobs") or {})
    knobs = ", ".join(f"{k}={v}" for k, v in sorted(chosen.items()))
    return (f"NIAH {summary.get('method', '')}{f' ({knobs})' if knobs else ''}, {summary.get('backend', '')}, "
            f"{summary.get('query_mode', '')}: avg {summary['result']['average']} [{summary['label']}]")


def artifacts(records, bcfg, out_dir: Path, summary: dict) -> dict:
    png = plot_heatmap(summary["result"]["grid"], Path(out_dir) / "niah_heatmap.png", heatmap_title(summary))
    return {"heatmap": str(png)}
