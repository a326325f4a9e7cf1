"""AIME: reasoning-length generation, ``\\boxed{}`` answer extraction, pass@1 over n samples.

Data: a local JSONL / JSON / parquet file (``benchmark.data_path``), one problem per row with a
problem field (``problem`` | ``question`` | ``Problem``) and an answer field (``answer`` |
``Answer``), e.g. the Hugging Face datasets HuggingFaceH4/aime_2024 or opencompass/AIME2025 saved
with ``to_json``. AIME answers are integers 0..999.

Each problem is sampled ``n_samples`` times (temperature / top_p from the config, seed
``seed + sample``); a sample is correct when its answer is the gold answer by ``math-verify`` (the
verifier of lighteval and open-r1: ``\\boxed{m+n=33}``, ``\\boxed{\\dfrac{66}{2}}``,
``\\boxed{33 \\text{ ways}}`` and an unboxed "The final answer is 33." all count as 33;
``pip install 'math-verify[antlr4_9_3]'``, in the [eval] extra). Without math-verify (or with
``benchmark.answer_checker=string``) the last ``\\boxed{...}`` must equal the gold after
normalisation; the summary header says which checker scored the run. pass@1 = mean over problems
of (correct samples / n), i.e. the unbiased pass@1 estimator averaged over n samples; pass@n (any
sample correct) is reported too.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from benchmark.backends import GenParams, Request, chat_wrap, encode_prompt, has_chat_template
from benchmark import metrics
from benchmark.metrics import extract_boxed, math_answers_equal, normalize_math_answer, pass_at_k

NAME = "aime"
PROBLEM_KEYS = ("problem", "question", "Problem", "Question")
ANSWER_KEYS = ("answer", "Answer", "expected_answer")
SOURCE_HINT = (
    "Save the problems as JSONL/JSON/parquet with 'problem' and 'answer' fields, e.g. with hub access "
    "`datasets.load_dataset('HuggingFaceH4/aime_2024', split='train').to_json('aime_2024.jsonl')`, then set "
    "benchmark.data_path to that file."
)


def check_data(bcfg) -> Path:
    answer_checker(bcfg)
    path = bcfg.get("data_path")
    if not path or not Path(path).is_file():
        raise FileNotFoundError(f"AIME data file {path!r} does not exist. {SOURCE_HINT}")
    if Path(path).suffix not in (".jsonl", ".json", ".parquet"):
        raise ValueError(f"AIME data file {path} must be .jsonl, .json or .parquet")
    if int(bcfg.get("n_samples", 1)) < 1:
        raise ValueError("benchmark.n_samples must be >= 1")
    return Path(path)


def load_problems(path: Path, limit=None) -> list[dict]:
    if path.suffix == ".parquet":
        import pandas as pd

        rows = pd.read_parquet(path).to_dict(orient="records")
    elif path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = data if isinstance(data, list) else data.get("data", [])
    else:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for i, row in enumerate(rows):
        pk = next((k for k in PROBLEM_KEYS if k in row), None)
        ak = next((k for k in ANSWER_KEYS if k in row), None)
        if pk is None or ak is None:
            raise ValueError(f"{path} row {i}: needs a problem field ({'/'.join(PROBLEM_KEYS)}) and an answer field "
                             f"({'/'.join(ANSWER_KEYS)}); has {sorted(row)}")
        out.append({"id": str(row.get("id", row.get("ID", i))), "problem": str(row[pk]), "answer": str(row[ak])})
        if limit and len(out) >= limit:
            break
    return out


def build_requests(bcfg, tokenizer, max_model_len: int, query_mode: str = "aware") -> list[Request]:
    path = check_data(bcfg)
    use_chat = bool(bcfg.get("chat_template", True)) and has_chat_template(tokenizer)
    n = int(bcfg.get("n_samples", 1))
    reqs = []
    for p in load_problems(path, bcfg.get("limit")):
        text = str(bcfg.prompt).replace("{problem}", p["problem"])
        if use_chat:
            text = chat_wrap(tokenizer, text)
        ids = encode_prompt(tokenizer, text, use_chat)
        max_tokens = min(int(bcfg.max_tokens), max_model_len - len(ids))
        if max_tokens < 1:
            raise ValueError(f"AIME problem {p['id']} ({len(ids)} tokens) leaves no room to generate")
        for s in range(n):
            params = GenParams(max_tokens=max_tokens, temperature=float(bcfg.get("temperature", 0.6)),
                               top_p=float(bcfg.get("top_p", 0.95)), seed=int(bcfg.get("seed", 0)) + s)
            reqs.append(Request(uid=f"aime/{p['id']}/s{s}", task="aime", prompt_ids=ids, params=params,
                                meta={"problem_id": p["id"], "sample": s, "answer": p["answer"]}))
    return reqs


def answer_checker(bcfg) -> str:
    """``benchmark.answer_checker``: auto (math-verify when installed, else string) | math_verify | string."""
    want = bcfg.get("answer_checker") or "auto"
    if want not in ("auto", "math_verify", "string"):
        raise ValueError(f"benchmark.answer_checker must be auto, math_verify or string, got {want!r}")
    if want == "auto":
        return "math_verify" if metrics.math_verify_error() is None else "string"
    if want == "math_verify" and metrics.math_verify_error():
        raise ImportError(f"benchmark.answer_checker=math_verify but math-verify does not import "
                          f"({metrics.math_verify_error()}); pip install 'math-verify[antlr4_9_3]'")
    return want


def score(records: list[dict], bcfg) -> dict:
    checker = answer_checker(bcfg)
    by_problem: dict[str, list[int]] = defaultdict(list)
    for r in records:
        r["extracted"] = normalize_math_answer(extract_boxed(r["pred"]))
        r["score"] = float(math_answers_equal(r["pred"], r["answer"], checker=checker))
        by_problem[r["problem_id"]].append(int(r["score"]))
    n_min = min((len(v) for v in by_problem.values()), default=0)
    p1 = [pass_at_k(len(v), sum(v), 1) for v in by_problem.values()]
    pn = [float(any(v)) for v in by_problem.values()]
    boxed = sum(1 for r in records if r["extracted"] is not None)
    scores = {"pass@1": round(100 * sum(p1) / len(p1), 2) if p1 else None,
              f"pass@{n_min}": round(100 * sum(pn) / len(pn), 2) if pn else None,
              "boxed_rate": round(100 * boxed / len(records), 2) if records else None}
    how = ("math-verify (parsed answer mathematically equal to the gold)" if checker == "math_verify"
           else "string match of the last \\boxed{} answer after normalisation"
           + ("" if bcfg.get("answer_checker") == "string" else " (math-verify not installed)"))
    return {"metric": f"AIME: pass@1 averaged over n samples (%), answer check: {how}",
            "scores": scores, "n": {"pass@1": len(by_problem)}, "average": scores["pass@1"],
            "n_samples": n_min, "per_problem": {k: sum(v) / len(v) for k, v in by_problem.items()},
            "answer_checker": checker, "header": [f"answer check: {how}"]}
