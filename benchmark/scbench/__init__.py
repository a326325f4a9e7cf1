"""SCBench (SharedContextBench): shared-context sessions from the official JSONL files.

Data: ``<data_dir>/<task>.jsonl`` as published in microsoft/SCBench: one session per line with
``context`` (or ``input``), ``multi_turns`` = [{``input``, ``answer``, optional ``options``, ``task``,
``name``}], and for RepoQA ``lang`` / ``repo``.

Modes (official ``run_scbench.py``):

* ``multi_turn``: turn 1 = context + first query; turn k > 1 appends the golden answer of turn k-1
  and query k to the conversation (the model's own earlier outputs are not kept). The session
  goes through ``backend.generate_session(context, turns, accumulate=True)``, so an engine with
  session KV reuse never prefills the shared context twice.
* ``scdq`` (same context, different queries, "multi-request"): every query sees only the shared
  context (``accumulate=False``). The context is prefilled before any query: query-agnostic by
  construction.

With ``query_mode=agnostic`` in ``multi_turn`` mode, the first query is split off the context too,
so the context is compressed before any question is seen.

Truncation: the first prompt (multi_turn) or the context prompt (scdq) is middle-truncated to
``max_seq_length - turns x max_new_tokens`` tokens (minus 1000 more in scdq), as the official code.

Defaults are the official runner's: its 12 tasks (``tasks: official``) and ``max_turns: 5``.

Prompts: byte-identical to ``scbench/eval_utils.py``, including math_find's: the scdq context starts
with the first turn's raw input, and the chat follow-ups of a multi-turn session all carry the
"What is ...?" question of the LAST turn (the official loop variable leaks into the comprehension).

Scoring (``scoring``, also ``scbench.scoring=...`` on the command line):

* ``official`` (default; the published numbers): the official scorers with their quirks. Labels of
  qa_chn, many_shot (and vt when a string) are iterated ``for item in label``, i.e. per character:
  qa_chn takes the best F1 against single characters ("张无忌" vs "张无忌" = 0.5), many_shot counts
  any shared character; passkey compares the label as stored to the first integer string; in scdq
  mode the kv half of repoqa_and_kv gets whole records instead of predictions and scores 0.
* ``corrected``: whole labels (a string label is one answer), kv scored in scdq mode.

RepoQA (both): the best BLEU match among the repository's needle functions must be the asked
function with similarity >= 0.8 (the reported pass@1). The model's code is cut as the official
sanitiser does: the first function definition tree-sitter finds in the fenced code blocks
(``repoqa_sanitizer: tree_sitter``, needs ``tree-sitter==0.21.3`` + ``tree_sitter_languages``);
``first_block`` (the whole first fenced block, no tree-sitter) is a named approximation.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from benchmark.backends import GenParams, Request, chat_followup, chat_split, chat_wrap, encode, \
    has_chat_template, middle_truncate_ids
from benchmark.metrics import repoqa_score, scbench_sample_score
from benchmark.scbench.spec import CHAT_QUERY, FIRST_TURN, FOLLOW_UP, MAX_NEW_TOKENS, OFFICIAL_TASKS, SCDQ_CONTEXT, \
    SOURCE_HINT, TASKS

SCORINGS = ("official", "corrected")
SANITIZERS = ("tree_sitter", "first_block")

NAME = "scbench"
_DELIM = "[SEPSEPSEP]"


def resolve_tasks(tasks) -> list[str]:
    if tasks in (None, "official", ["official"]):
        return list(OFFICIAL_TASKS)
    if tasks in ("all", ["all"]):
        return list(TASKS)
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    tasks = [t if t.startswith("scbench_") else f"scbench_{t}" for t in tasks]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"Unknown SCBench task(s) {unknown}. Known tasks: {', '.join(TASKS)}")
    return list(tasks)


def check_data(bcfg) -> list[str]:
    tasks = resolve_tasks(bcfg.get("tasks"))
    mode = bcfg.get("mode", "multi_turn")
    if mode not in ("multi_turn", "scdq"):
        raise ValueError(f"benchmark.mode must be 'multi_turn' or 'scdq', got {mode!r}")
    scoring = bcfg.get("scoring", "official")
    if scoring not in SCORINGS:
        raise ValueError(f"scbench.scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")
    sanitizer = bcfg.get("repoqa_sanitizer", "tree_sitter")
    if sanitizer not in SANITIZERS:
        raise ValueError(f"benchmark.repoqa_sanitizer must be one of {', '.join(SANITIZERS)}, got {sanitizer!r}")
    data_dir = bcfg.get("data_dir")
    expected = [f"{t}.jsonl" for t in tasks]
    if not data_dir or not Path(data_dir).is_dir():
        raise FileNotFoundError(f"SCBench data directory {data_dir!r} does not exist. It must contain the official "
                                f"JSONL files: {', '.join(expected)}. {SOURCE_HINT}")
    missing = [e for e in expected if not (Path(data_dir) / e).is_file()]
    if missing:
        raise FileNotFoundError(f"SCBench data directory {data_dir} lacks {', '.join(missing)}. {SOURCE_HINT}")
    if sanitizer == "tree_sitter" and any("repoqa" in t for t in tasks):
        from benchmark.metrics import tree_sitter_error

        err = tree_sitter_error()
        if err:
            raise ImportError(
                f"SCBench RepoQA is scored as the official code does, with tree-sitter, which does not import "
                f"({err}). Install it: pip install 'tree-sitter==0.21.3' tree_sitter_languages (or the project's "
                f"[eval] extra); or pass benchmark.repoqa_sanitizer=first_block (not the official scorer), or "
                f"leave the RepoQA tasks out of benchmark.tasks.")
    return tasks


def load_sessions(data_dir, task: str, limit=None, max_turns=None) -> list[dict]:
    path = Path(data_dir) / f"{task}.jsonl"
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "multi_turns" not in row or not row["multi_turns"]:
                raise ValueError(f"{path}:{lineno}: missing 'multi_turns' of the official SCBench format")
            if "context" not in row and "input" not in row:
                raise ValueError(f"{path}:{lineno}: missing 'context' of the official SCBench format")
            if max_turns:
                row = {**row, "multi_turns": row["multi_turns"][: int(max_turns)]}
            rows.append(row)
            if limit and len(rows) >= limit:
                break
    return rows


def _mf_prefix(query: str) -> str:
    found = re.findall(r"The .+ is", query)
    if not found:
        raise ValueError(f"scbench_mf query {query!r} has no 'The ... is' phrase")
    return f"What is {found[0].lower()[:-3]}?"


def _fields(task: str, turn: dict, context: str | None = None, first_input: str | None = None) -> dict:
    f = {"input": turn["input"], "question": turn["input"]}
    if context is not None:
        f["context"] = context
    if first_input is not None:
        f["first_input"] = first_input
    if task == "scbench_choice_eng":
        opts = list(turn["options"]) + [""] * 4
        f.update(OPTION_A=opts[0], OPTION_B=opts[1], OPTION_C=opts[2], OPTION_D=opts[3])
    if task == "scbench_mf":
        f["prefix"] = _mf_prefix(turn["input"])
    return f


def ground_truth(task: str, turn: dict):
    """The official label of a turn (``get_ground_truth``)."""
    if task == "scbench_choice_eng":
        return [turn["answer"], "ABCD"[list(turn["options"]).index(turn["answer"])]]
    if task == "scbench_qa_eng":
        return [turn["answer"]]
    return turn["answer"]


def _max_new(task: str, turn: dict) -> int:
    m = MAX_NEW_TOKENS[task]
    return int(m[turn["task"]]) if isinstance(m, dict) else int(m)


def build_requests(bcfg, tokenizer, max_model_len: int, query_mode: str = "aware") -> list[Request]:
    tasks = check_data(bcfg)
    mode = bcfg.get("mode", "multi_turn")
    use_chat = bool(bcfg.get("chat_template", True)) and has_chat_template(tokenizer)
    gen_cap = bcfg.get("gen_cap")
    max_seq = int(bcfg.get("max_seq_length") or max_model_len)
    reqs = []
    for task in tasks:
        for i, eg in enumerate(load_sessions(bcfg.data_dir, task, bcfg.get("limit"), bcfg.get("max_turns"))):
            turns = eg["multi_turns"]
            context = eg["context"] if "context" in eg else eg["input"]
            maxes = [_max_new(task, t) for t in turns]
            if gen_cap:
                maxes = [min(m, int(gen_cap)) for m in maxes]
            params = [GenParams(max_tokens=m, temperature=0.0) for m in maxes]
            # official input budget: max_seq_length - (per-turn max new tokens) x turns
            m = MAX_NEW_TOKENS[task]
            reserve = (sum(m.values()) * len(turns) // 2) if isinstance(m, dict) else m * len(turns)
            if gen_cap:
                reserve = min(reserve, sum(maxes))
            budget = max_seq - reserve - (1000 if mode == "scdq" else 0)
            budget = min(budget, max_model_len - sum(maxes) - 8)
            turn_meta = []
            for t in turns:
                tm = {"label": ground_truth(task, t)}
                if "task" in t:
                    tm["subtask"] = t["task"]
                if task in ("scbench_repoqa", "scbench_repoqa_and_kv") and "name" in t:
                    tm["func_name"] = t["name"]
                turn_meta.append(tm)
            meta = {"session": i}
            if "lang" in eg:
                meta["lang"] = eg["lang"]
            if "repo" in eg:
                meta["repo"] = eg["repo"]
            uid = f"{task}/{i}"

            if mode == "scdq":
                ctx_text = SCDQ_CONTEXT[task].format(**_fields(task, turns[0], context, first_input=turns[0]["input"]))
                queries = [CHAT_QUERY[task].format(**_fields(task, t)) for t in turns]
                if use_chat:
                    ctx_text = chat_wrap(tokenizer, ctx_text + _DELIM).split(_DELIM)[0]
                    queries = [tokenizer.apply_chat_template(
                        [{"role": "system", "content": ""}, {"role": "user", "content": _DELIM + q}],
                        add_generation_prompt=True, tokenize=False).split(_DELIM)[1] for q in queries]
                ctx_ids = middle_truncate_ids(encode(tokenizer, ctx_text), max(1, budget))
                q_ids = [encode(tokenizer, q, add_special_tokens=False) for q in queries]
                reqs.append(Request(uid=uid, task=task, kind="session", context_ids=ctx_ids, turns=q_ids,
                                    accumulate=False, params=params, meta=meta, turn_meta=turn_meta))
                continue

            # multi_turn
            follow = []
            for k in range(1, len(turns)):
                f = _fields(task, turns[k])
                if use_chat and task == "scbench_mf":
                    # official: every chat follow-up gets the LAST turn's question (leaked loop variable)
                    f["prefix"] = _mf_prefix(turns[-1]["input"])
                if use_chat:
                    text = chat_followup(tokenizer, str(turns[k - 1]["answer"]), CHAT_QUERY[task].format(**f))
                    if task == "scbench_summary":
                        text += "This paper"
                else:
                    text = FOLLOW_UP[task].format(pre_ans=turns[k - 1]["answer"], **f)
                follow.append(encode(tokenizer, text, add_special_tokens=False))
            first = FIRST_TURN[task]
            f0 = _fields(task, turns[0], context)
            if query_mode == "aware":
                text = first.format(**f0)
                if use_chat:
                    text = chat_wrap(tokenizer, text)
                ctx_ids = middle_truncate_ids(encode(tokenizer, text), max(1, budget))
                turn_ids = [[]] + follow  # the first query is part of the context prefill
            else:
                cut = first.index("{context}") + len("{context}")
                head, tail = first[:cut].format(**f0), first[cut:].format(**f0)
                ctx_text, q_text = chat_split(tokenizer, head, tail, use_chat)
                q0 = encode(tokenizer, q_text, add_special_tokens=False)
                ctx_ids = middle_truncate_ids(encode(tokenizer, ctx_text), max(1, budget - len(q0)))
                turn_ids = [q0] + follow
            reqs.append(Request(uid=uid, task=task, kind="session", context_ids=ctx_ids, turns=turn_ids,
                                accumulate=True, params=params, meta=meta, turn_meta=turn_meta))
    return reqs


def _subtask_key(task: str, sub: str | None) -> str:
    return f"{task}/{sub.replace('scbench_', '')}" if sub and sub != task else task


def score(records: list[dict], bcfg) -> dict:
    scoring = bcfg.get("scoring", "official")
    mode = bcfg.get("mode", "multi_turn")
    sanitizer = bcfg.get("repoqa_sanitizer", "tree_sitter")
    needles: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if r.get("func_name") and r.get("repo") is not None:
            needles[f"{r['task']}::{r['repo']}"].append({"name": r["func_name"], "needle": r["label"]})
    per_key: dict[str, list[float]] = defaultdict(list)
    per_turn: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        sub = r.get("subtask") or r["task"]
        if sub == "scbench_repoqa":
            s = repoqa_score(r["pred"], r["func_name"], needles[f"{r['task']}::{r['repo']}"], lang=r.get("lang"),
                             sanitizer=sanitizer)
        elif (scoring == "official" and mode == "scdq" and r["task"] == "scbench_repoqa_and_kv"
              and sub == "scbench_kv"):
            s = 0.0  # official scdq: the kv scorer gets whole records (`label in dict`): always 0
        else:
            s = scbench_sample_score(sub, r["pred"], r["label"], scoring=scoring)
        r["score"] = s
        key = _subtask_key(r["task"], r.get("subtask"))
        per_key[key].append(s)
        per_turn[key][int(r.get("turn", 0))].append(s)
    order = sorted(per_key, key=lambda k: (TASKS.index(k.split("/")[0]), k))
    scores = {k: round(100 * sum(per_key[k]) / len(per_key[k]), 2) for k in order}
    header = [f"SCBench scoring: {scoring}" + (" (official scorers, quirks included: the published numbers)"
                                               if scoring == "official" else " (whole labels; not the published scorer)"),
              f"RepoQA sanitiser: {sanitizer}" + (" (official)" if sanitizer == "tree_sitter" else " (NOT official)"),
              f"mode: {mode}, max_turns: {bcfg.get('max_turns')}"]
    return {
        "metric": f"SCBench per-turn scorers ({scoring}) (%), averaged over turns",
        "mode": mode,
        "scoring": scoring,
        "scores": scores,
        "n": {k: len(per_key[k]) for k in order},
        "average": round(sum(scores.values()) / len(scores), 2) if scores else None,
        "per_turn": {k: {str(t): round(100 * sum(v) / len(v), 2) for t, v in sorted(per_turn[k].items())}
                     for k in order},
        "header": header,
    }
