"""NIAH smoke of every sparse method at fixed KV budgets -> a markdown table (methods x budgets).

One needle in a ~4K-token haystack of real news text (the shipped corpus; prompts built by the
project's NIAH harness, `benchmark.niah.make_sample`), at several depths, greedy decoding through
`sparse_engine` on the shipped SmolLM2-135M-Instruct. Per (method, budget): retrieval accuracy per
depth, KV bytes per sequence right after prefill (what the method holds), and decode tok/s
(single sequence, wall clock after the first token).

    python -m experiments.niah_methods                      # 4K, budgets 256,512, 5 depths
    python -m experiments.niah_methods --budgets 512 --depths 0,50,100 --out experiments/results/x.md

Budget mapping: snapkv / adakv / pyramidkv / streaming: `budget` tokens per KV head and layer
(pyramidkv: the mean); omnikv: sparse layers read sink + `budget - sink - recent` top tokens + recent
(it keeps every token in memory: logical masking).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch

from sparse_engine import LLM, SamplingParams

METHODS = ["vanilla", "snapkv", "adakv", "pyramidkv", "omnikv", "streaming"]


def knobs_for(method: str, budget: int) -> dict:
    if method == "vanilla":
        return {}
    if method == "omnikv":
        return dict(full_attn_layers=[0, 1, 2, 8, 18], num_top_tokens=budget - 4 - 32, sink_size=4, recent_size=32)
    return dict(budget=budget)


def build_prompts(tokenizer, length: int, depths: list[float], seed: int = 0) -> list[dict]:
    from benchmark.niah import make_sample

    out = []
    for d in depths:
        rng = random.Random(f"{seed}/{length}/{d}/0")
        s = make_sample(tokenizer, length, d, rng, use_chat=True)
        ids = tokenizer.encode(s["context"]) + tokenizer.encode(s["query"], add_special_tokens=False)
        out.append({"depth": d, "ids": ids, "value": s["value"]})
    return out


def run_one(llm: LLM, ids: list[int], max_tokens: int) -> dict:
    seq = llm.add_request(ids, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    t0 = time.perf_counter()
    t_first = kv = None
    while not seq.finished:
        llm.step()
        if t_first is None and seq.num_computed >= seq.num_prompt_tokens:
            t_first = time.perf_counter()
            kv = llm.method.kv_bytes(seq) if seq.kv is not None else seq.kv_bytes_at_finish
    t1 = time.perf_counter()
    n = len(seq.output_token_ids)
    text = llm.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
    return {"text": text, "kv_bytes": kv, "ttft": t_first - t0, "decode_tok_s": (n - 1) / (t1 - t_first) if n > 1 else float("nan")}


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--budgets", default="256,512")
    ap.add_argument("--depths", default="0,25,50,75,100")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--max_tokens", type=int, default=12)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default="experiments/results/methods_niah_4k.md")
    ap.add_argument("--dtype", default="auto", help="auto: float32 on CPU, bf16 on CUDA")
    ap.add_argument("--save_prompts", default=None, help="write the prompts (token ids) to this JSON and exit")
    ap.add_argument("--prompts", default=None, help="read prompts from --save_prompts' JSON (machines without the corpus)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 is fastest on a shared, oversubscribed CPU (thread sync stalls)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    depths = [float(d) for d in a.depths.split(",")]
    budgets = [int(b) for b in a.budgets.split(",")]
    rows, prompts = [], None
    if a.prompts:
        prompts = json.loads(Path(a.prompts).read_text())
        depths = [p["depth"] for p in prompts]
    for method in a.methods.split(","):
        for budget in ([None] if method == "vanilla" else budgets):
            llm = LLM(a.model, method=method, dtype=a.dtype, chunk_prefill_size=1024, kv_cache_bytes=1 << 30,
                      **knobs_for(method, budget or 0))
            if prompts is None:
                prompts = build_prompts(llm.tokenizer, a.length, depths)
                if a.save_prompts:
                    Path(a.save_prompts).write_text(json.dumps(prompts))
                    return Path(a.save_prompts)
            res = [run_one(llm, p["ids"], a.max_tokens) for p in prompts]
            acc = {p["depth"]: float(p["value"] in r["text"]) for p, r in zip(prompts, res)}
            row = {"method": method, "budget": "full" if budget is None else budget, "acc": acc,
                   "mean": 100 * sum(acc.values()) / len(acc), "kv_mb": sum(r["kv_bytes"] for r in res) / len(res) / 2**20,
                   "tok_s": sum(r["decode_tok_s"] for r in res) / len(res), "answers": [r["text"] for r in res]}
            rows.append(row)
            print(f"{method:10s} budget={row['budget']!s:5s} acc/depth={acc} mean={row['mean']:.0f}% "
                  f"KV={row['kv_mb']:.2f} MiB decode={row['tok_s']:.1f} tok/s  {row['answers']}", flush=True)
            llm.close()
            out = write_table(rows, prompts, depths, a)  # after every row: a killed run keeps its rows
    return out


def _where() -> str:
    if torch.cuda.is_available():
        return f"bf16, {torch.cuda.get_device_name(0)}; decode tok/s is bound by the engine's per-layer host work"
    return (f"float32, CPU {platform.machine()}, {torch.get_num_threads()} torch thread(s) on a shared, loaded "
            "machine: tok/s is indicative only")


def write_table(rows, prompts, depths, a) -> Path:
    lens = [len(p["ids"]) for p in prompts]
    lines = [f"# NIAH smoke: sparse methods x KV budgets ({a.length}-token haystack of real text)", "",
             f"Command: `python -m experiments.niah_methods --length {a.length} --budgets {a.budgets} "
             f"--depths {a.depths} --methods {a.methods}" + (f" --prompts {a.prompts}" if a.prompts else "") + "`", "",
             f"Model: shipped SmolLM2-135M-Instruct ({_where()}). Prompts: {min(lens)}-{max(lens)} tokens, one needle "
             "(7-digit value) per prompt, chat template, greedy, exact-match retrieval. Budget = tokens kept per "
             "KV head and layer (pyramidkv: the mean; omnikv: tokens read by sparse layers, all kept in memory). "
             "KV = bytes per sequence right after prefill.", "",
             "| method | budget | " + " | ".join(f"depth {d:g}%" for d in depths) + " | accuracy | KV MiB | decode tok/s |",
             "|---|---|" + "---|" * len(depths) + "---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['budget']} | {depth_cells(r['acc'], depths)} | {r['mean']:.0f}% | "
                     f"{r['kv_mb']:.2f} | {r['tok_s']:.1f} |")
    return write_report(lines, rows, lambda r: f"{r['method']} {r['budget']}", a.out)


def depth_cells(acc: dict, depths) -> str:
    """One table cell per needle depth: ok / miss."""
    return " | ".join("ok" if acc[d] else "miss" for d in depths)


def write_report(lines: list[str], rows: list[dict], label, out) -> Path:
    """The table `lines`, then each row's answers per depth (named by `label(row)`), written to `out`."""
    lines = lines + ["", "Answers (per depth):", ""]
    lines += [f"- {label(r)}: " + " / ".join(repr(t.strip()) for t in r["answers"]) for r in rows]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    main()
