"""Writers of tiny evaluation fixtures in the official file formats (LongBench, SCBench, AIME).

The tests write them into tmp dirs and ``experiments/table_* --fixtures`` into runs/ (a pipeline
check, not benchmark numbers); no dataset is committed. Contexts are a few sentences so that the
end-to-end tests stay fast on 2 CPU cores."""

from __future__ import annotations

import json
from pathlib import Path

PASSAGES = [
    "Passage 1:\nMarie Curie was a physicist and chemist who conducted pioneering research on radioactivity. "
    "She was born in Warsaw in 1867.",
    "Passage 2:\nThe Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was completed in 1889.",
]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def _lb_row(task, context, question, answers, length, classes=None, i=0):
    return {"input": question, "context": context, "answers": answers, "length": length, "dataset": task,
            "language": "en", "all_classes": classes, "_id": f"{task}-{i:04d}"}


def write_longbench(root: Path, e: bool = False) -> Path:
    """hotpotqa (qa F1), trec (classification, few-shot: no chat template), lcc (edit similarity)."""
    sfx = "_e" if e else ""
    ctx = "\n\n".join(PASSAGES)
    _write_jsonl(root / f"hotpotqa{sfx}.jsonl", [
        _lb_row("hotpotqa", ctx, "In which city was Marie Curie born?", ["Warsaw"], 1200 if not e else 1200, i=0),
        _lb_row("hotpotqa", ctx, "When was the Eiffel Tower completed?", ["1889"], 5200 if e else 900, i=1),
        _lb_row("hotpotqa", ctx, "Where is the Eiffel Tower?", ["Paris", "Paris, France"], 9100 if e else 800, i=2),
    ])
    classes = ["Description", "Entity", "Abbreviation", "Human being", "Location", "Numeric value"]
    trec_ctx = ("Question: Who wrote Hamlet ?\nType: Human being\nQuestion: What is the capital of Peru ?\n"
                "Type: Location\nQuestion: How many legs does a spider have ?\nType: Numeric value")
    _write_jsonl(root / f"trec{sfx}.jsonl", [
        _lb_row("trec", trec_ctx, "Question: Who painted the Mona Lisa ?\nType:", ["Human being"], 300, classes, 0),
    ])
    code = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n"
    _write_jsonl(root / f"lcc{sfx}.jsonl", [
        _lb_row("lcc", code, "", ["    return a * b"], 400, i=0),
    ])
    return root


def write_scbench(root: Path) -> Path:
    kv = {"3f1a-77c2": "9b0e-12aa", "c0de-4444": "beef-1234", "aa11-bb22": "cc33-dd44"}
    _write_jsonl(root / "scbench_kv.jsonl", [{
        "id": 0, "context": "JSON data:\n" + json.dumps(kv),
        "multi_turns": [
            {"input": 'Key: "c0de-4444"\nThe value associated with the specified key is: ', "answer": "beef-1234"},
            {"input": 'Key: "aa11-bb22"\nThe value associated with the specified key is: ', "answer": "cc33-dd44"},
        ]}])
    _write_jsonl(root / "scbench_qa_eng.jsonl", [{
        "id": 0, "context": " ".join(p.split("\n", 1)[1] for p in PASSAGES),
        "multi_turns": [
            {"input": "Where was Marie Curie born?", "answer": "Warsaw"},
            {"input": "In which year was the Eiffel Tower completed?", "answer": "1889"},
        ]}])
    _write_jsonl(root / "scbench_choice_eng.jsonl", [{
        "id": 0, "context": PASSAGES[1],
        "multi_turns": [
            {"input": "In which city is the tower?", "options": ["Rome", "Paris", "Berlin", "Madrid"],
             "answer": "Paris"},
        ]}])
    return root


def write_aime(path: Path) -> Path:
    return _write_jsonl(path, [
        {"id": "2024-I-1", "problem": "What is $2+3$?", "answer": "5"},
        {"id": "2024-I-2", "problem": "What is $10 \\times 4$?", "answer": "040"},
    ])
