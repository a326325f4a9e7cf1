"""LongBench v1 (16 English tasks) and LongBench-E, from the official JSONL files.

Data: the official ``data.zip`` of the Hugging Face dataset THUDM/LongBench, unpacked into a local
directory: ``<data_dir>/<task>.jsonl`` (LongBench) and ``<data_dir>/<task>_e.jsonl`` (LongBench-E).
One JSON object per line with ``input``, ``context``, ``answers``, ``length``, ``all_classes``,
``dataset``, ``language``, ``_id``.

Prediction follows the official ``pred.py``: ``template.format(**sample)``, middle truncation of
the prompt to ``max_input_tokens`` (first/last half decoded and re-joined; by default the model
config's ``longbench_max_len``, the official ``model2maxlen.json`` value), the chat template for
all tasks but the few-shot and code ones, greedy decoding with the per-task maximum length
(samsum also stops at a newline token and generates at least one token). Scoring follows
``eval.py`` (first-line post-processing for trec/triviaqa/samsum, max over answers, 100 x mean,
rounded to 2 decimals); LongBench-E reports the 0-4k / 4-8k / 8k+ buckets of the ``length`` field.

Query-agnostic mode splits the formatted prompt right after ``{context}``: the context part is
prefilled (and compressed) first, the rest (question, answer cue) comes as the only session turn;
the context alone is middle-truncated so that the whole prompt fits ``max_input_tokens``.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

from benchmark.backends import GenParams, Request, chat_split, chat_wrap, encode, encode_prompt, has_chat_template, \
    middle_truncate_ids, middle_truncate_text
from benchmark.longbench.spec import CATEGORIES, LENGTH_BUCKETS, MAX_NEW_TOKENS, NO_CHAT_TASKS, PROMPTS, TASKS, \
    TASKS_E, length_bucket
from benchmark.metrics import longbench_sample_score

NAME = "longbench"
log = logging.getLogger(__name__)
SOURCE_HINT = (
    "Get them from the Hugging Face dataset THUDM/LongBench: download its data.zip "
    "(huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip) and unzip it, or, with hub access, "
    "`datasets.load_dataset('THUDM/LongBench', TASK, split='test').to_json('TASK.jsonl')` "
    "(config 'TASK_e' for LongBench-E); then set benchmark.data_dir to that folder."
)


def known_tasks(longbench_e: bool) -> tuple[str, ...]:
    return TASKS_E if longbench_e else TASKS


def resolve_tasks(tasks, longbench_e: bool) -> list[str]:
    known = known_tasks(longbench_e)
    if tasks in (None, "all", ["all"]):
        return list(known)
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in known]
    if unknown:
        which = "LongBench-E" if longbench_e else "LongBench (English)"
        raise ValueError(f"Unknown {which} task(s) {unknown}. Known tasks: {', '.join(known)}")
    return list(tasks)


def task_file(data_dir: Path, task: str, longbench_e: bool) -> Path:
    return Path(data_dir) / (f"{task}_e.jsonl" if longbench_e else f"{task}.jsonl")


def check_data(bcfg) -> list[str]:
    """Validate tasks and files before any model is loaded; return the task list."""
    longbench_e = bool(bcfg.get("longbench_e", False))
    tasks = resolve_tasks(bcfg.get("tasks"), longbench_e)
    data_dir = bcfg.get("data_dir")
    expected = [task_file(Path(data_dir or "<data_dir>"), t, longbench_e).name for t in tasks]
    if not data_dir or not Path(data_dir).is_dir():
        raise FileNotFoundError(
            f"LongBench data directory {data_dir!r} does not exist. It must contain the official JSONL files: "
            f"{', '.join(expected)}. {SOURCE_HINT}"
        )
    missing = [name for name in expected if not (Path(data_dir) / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"LongBench data directory {data_dir} lacks {', '.join(missing)} (expected one official JSONL file per "
            f"task). {SOURCE_HINT}"
        )
    return tasks


def load_samples(data_dir, task: str, longbench_e: bool, limit: int | None = None) -> list[dict]:
    path = task_file(Path(data_dir), task, longbench_e)
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc})") from exc
            for key in ("context", "input", "answers"):
                if key not in row:
                    raise ValueError(f"{path}:{lineno}: missing field {key!r} of the official format")
            rows.append(row)
            if limit and len(rows) >= limit:
                break
    return rows


def truncation_length(bcfg, max_model_len: int, max_new: int = 0) -> int:
    """Middle-truncation length of the prompts: ``max_input_tokens`` (by default the model config's
    ``longbench_max_len``, the official model2maxlen value), else ``max_model_len - 500``; never more
    than the backend can take with the task's new tokens (``max_model_len - max_new``; logged)."""
    want = bcfg.get("max_input_tokens")
    if want is None:
        want = max_model_len - 500
    want = int(want)
    if want > max_model_len - max_new:
        log.warning("LongBench truncation length %d does not fit max_model_len %d with %d new tokens: using %d",
                    want, max_model_len, max_new, max_model_len - max_new)
        return max_model_len - max_new
    return want


def _split_template(template: str) -> tuple[str, str]:
    i = template.index("{context}") + len("{context}")
    return template[:i], template[i:]


def build_requests(bcfg, tokenizer, max_model_len: int, query_mode: str = "aware") -> list[Request]:
    longbench_e = bool(bcfg.get("longbench_e", False))
    tasks = check_data(bcfg)
    use_chat = bool(bcfg.get("chat_template", True)) and has_chat_template(tokenizer)
    gen_cap = bcfg.get("gen_cap")
    requests: list[Request] = []
    for task in tasks:
        max_new = MAX_NEW_TOKENS[task] if not gen_cap else min(MAX_NEW_TOKENS[task], int(gen_cap))
        max_len = truncation_length(bcfg, max_model_len, max_new)
        if max_len <= 0:
            raise ValueError(f"max_input_tokens leaves no room for the prompt (max_model_len={max_model_len})")
        stop_ids = []
        if task == "samsum":  # pred.py: eos or a newline ends samsum's generation; at least one new token
            stop_ids = [encode(tokenizer, "\n", add_special_tokens=False)[-1]]
        params = GenParams(max_tokens=max_new, temperature=0.0, stop_token_ids=stop_ids,
                           min_tokens=1 if task == "samsum" else 0)
        chat_task = use_chat and task not in NO_CHAT_TASKS
        for idx, row in enumerate(load_samples(bcfg.data_dir, task, longbench_e, bcfg.get("limit"))):
            meta = {"answers": row["answers"], "all_classes": row.get("all_classes") or [],
                    "length": row.get("length"), "_id": row.get("_id", idx), "max_input_tokens": max_len}
            uid = f"{task}/{idx}"
            fields = {k: (v if v is not None else "") for k, v in row.items()}
            if query_mode == "aware":
                prompt = PROMPTS[task].format(**fields)
                prompt = middle_truncate_text(tokenizer, prompt, max_len)
                if chat_task:
                    prompt = chat_wrap(tokenizer, prompt)
                requests.append(Request(uid=uid, task=task, prompt_ids=encode_prompt(tokenizer, prompt, chat_task),
                                        params=params, meta=meta))
            else:
                head_t, tail_t = _split_template(PROMPTS[task])
                head, tail = head_t.format(**fields), tail_t.format(**fields)
                ctx_text, q_text = chat_split(tokenizer, head, tail, chat_task)
                ctx_ids = encode_prompt(tokenizer, ctx_text, chat_task)
                q_ids = encode(tokenizer, q_text, add_special_tokens=False)
                if not q_ids:
                    raise ValueError(f"{uid}: empty query part in query-agnostic mode")
                ctx_ids = middle_truncate_ids(ctx_ids, max(1, max_len - len(q_ids)))
                requests.append(Request(uid=uid, task=task, kind="session", context_ids=ctx_ids, turns=[q_ids],
                                        accumulate=False, params=[params], meta=meta, turn_meta=[{}]))
    return requests


def score(records: list[dict], bcfg) -> dict:
    """Official scores from the prediction records: per task, per category, average (and buckets)."""
    longbench_e = bool(bcfg.get("longbench_e", False))
    per_task: dict[str, list[float]] = defaultdict(list)
    buckets: dict[str, dict[str, list[float]]] = defaultdict(lambda: {b: [] for b in LENGTH_BUCKETS})
    for r in records:
        s = longbench_sample_score(r["task"], r["pred"], r["answers"], r.get("all_classes"))
        r["score"] = s
        per_task[r["task"]].append(s)
        if longbench_e and r.get("length") is not None:
            buckets[r["task"]][length_bucket(int(r["length"]))].append(s)
    order = [t for t in known_tasks(longbench_e) if t in per_task]
    scores = {t: round(100 * sum(per_task[t]) / len(per_task[t]), 2) for t in order}
    out = {"metric": "LongBench official (qa-F1 / ROUGE-L / classification / retrieval / count / edit sim)",
           "scores": scores, "n": {t: len(per_task[t]) for t in order},
           "average": round(sum(scores.values()) / len(scores), 2) if scores else None}
    cats = {}
    for cat, members in CATEGORIES.items():
        vals = [scores[t] for t in members if t in scores]
        if vals:
            cats[cat] = round(sum(vals) / len(vals), 2)
    out["categories"] = cats
    used = sorted({int(r["max_input_tokens"]) for r in records if r.get("max_input_tokens") is not None})
    conf = bcfg.get("max_input_tokens")
    out["header"] = [
        "truncation: prompts middle-truncated to "
        + (f"{used[0]}" if len(used) == 1 else f"{used[0]}-{used[-1]}" if used else "?") + " tokens"
        + (f" (max_input_tokens={conf}: the model config's longbench_max_len, official model2maxlen value, unless "
           "overridden)" if conf is not None else " (max_model_len - 500: no official value for this model)")
        + (" [clamped to max_model_len - new tokens]" if conf is not None and used and used[0] < int(conf) else "")]
    if longbench_e:
        out["buckets"] = {
            t: {b: (round(100 * sum(v) / len(v), 2) if v else None) for b, v in buckets[t].items()} for t in order
        }
    return out
