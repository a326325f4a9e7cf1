"""SparseX quality and TTFT on multi-document QA built from real news text -> results/sparsex_quality.md.

Documents are articles of the shipped corpus, cut to `--doc-tokens` tokens, each labelled
("Report Alpha") and closed by a fact ("Report Alpha reference number: 4821."). Each question asks
for the reference numbers of TWO reports, so it needs facts from two documents; every request holds
`--docs-per-request` reports in a random order (the two asked about plus distractors), and the same
documents come back across requests at other positions and after other context. Segments (system
header, each report) are passed to the engine as `segments=`; the question is the new tail.

Per configuration, a fresh engine on the shipped SmolLM2-135M-Instruct (CPU, float32): priming
requests put every report into the segment store (in other groupings), then the QA requests run
one at a time with greedy decoding. Configurations:

- full: full recomputation (`vanilla`), the reference;
- naive: reuse without correction (`sparsex`, recompute_ratio=0, full_recompute_layers=0,
  num_first_tokens=0): reused K re-rotated to the new positions, nothing recomputed;
- sparsex-5/15/30: Sparse-Q selective recomputation of 5/15/30% of reused tokens (defaults:
  full_recompute_layers=2, num_first_tokens=2).

Reported against full: exact greedy match of all answer tokens, mean agreement prefix (tokens before
the first divergence / answer length), first-token match, mean KL(full || config) of the first
answer token's distribution, and answer accuracy (both reference numbers in the answer) for every
configuration including full. TTFT (time of the prefill step, first token out) per request; the
ratio full / config is the speed-up on repeated segments. `--ttft-docs/--ttft-doc-tokens` add a
longer-context TTFT measurement (vanilla vs sparsex-15) after the quality table.

    python -m experiments.sparsex_quality                       # ~5-10 min on 2 shared CPU cores
    python -m experiments.sparsex_quality --requests 4 --out /tmp/x.md   # quick look
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from sparse_engine import LLM, SamplingParams

NAMES = ["Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot", "Golf", "Hotel", "India", "Juliet", "Kilo", "Lima"]
SYSTEM = ("<|im_start|>system\nYou are a helpful assistant. Answer with the exact numbers from the reports."
          "<|im_end|>\n<|im_start|>user\n")

CONFIGS = {
    "full": ("vanilla", {}),
    "naive": ("sparsex", dict(recompute_ratio=0.0, full_recompute_layers=0, num_first_tokens=0)),
    "sparsex-5": ("sparsex", dict(recompute_ratio=0.05)),
    "sparsex-15": ("sparsex", dict(recompute_ratio=0.15)),
    "sparsex-30": ("sparsex", dict(recompute_ratio=0.30)),
}


def build_docs(tokenizer, articles: list[str], n_docs: int, doc_tokens: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for i, art in enumerate(a for a in articles if len(a) > 6 * doc_tokens):
        if i == n_docs:
            break
        body = tokenizer.decode(tokenizer.encode(art, add_special_tokens=False)[:doc_tokens])
        name, number = NAMES[i % len(NAMES)] + ("" if i < len(NAMES) else f" {i // len(NAMES) + 1}"), rng.randint(1000, 9999)
        text = f"Report {name}: {body.strip()}\nReport {name} reference number: {number}.\n\n"
        docs.append({"name": name, "number": str(number), "ids": tokenizer.encode(text, add_special_tokens=False)})
    return docs


def build_requests(docs: list[dict], n_requests: int, per_request: int, seed: int) -> tuple[list, list]:
    """(priming requests, QA requests): each a dict with segments (token-id lists) and the tail."""
    rng = random.Random(seed + 1)
    idx = list(range(len(docs)))
    rng.shuffle(idx)
    priming = [{"docs": idx[i : i + per_request]} for i in range(0, len(idx), per_request)]
    qa = []
    for _ in range(n_requests):
        chosen = rng.sample(range(len(docs)), per_request)  # random order; asked: the first two drawn
        a, b = chosen[0], chosen[1]
        rng.shuffle(chosen)
        qa.append({"docs": chosen, "ask": (a, b)})
    return priming, qa


def tail_for(tokenizer, docs, req) -> list[int]:
    if "ask" not in req:
        text = "Summarize the reports in one sentence.<|im_end|>\n<|im_start|>assistant\n"
    else:
        a, b = (docs[i]["name"] for i in req["ask"])
        text = (f"Question: What are the reference numbers of Report {a} and Report {b}?<|im_end|>\n"
                "<|im_start|>assistant\n")
    return tokenizer.encode(text, add_special_tokens=False)


def run_request(llm: LLM, segments: list[list[int]], tail: list[int], max_tokens: int) -> dict:
    seq = llm.add_request(tail, SamplingParams(temperature=0.0, max_tokens=max_tokens, return_logits=True),
                          segments=segments)
    t0 = time.perf_counter()
    llm.step()
    ttft = time.perf_counter() - t0
    while not seq.finished:
        llm.step()
    llm._seqs.pop(seq.seq_id, None)
    return {"tokens": list(seq.output_token_ids), "logits0": seq.logits[0], "ttft": ttft,
            "prompt_len": seq.num_prompt_tokens}


def run_config(name: str, model, tokenizer, docs, priming, qa, sys_ids, max_tokens, kv_bytes) -> dict:
    method, knobs = CONFIGS[name]
    llm = LLM(model, method=method, dtype="float32", device="cpu", kv_cache_bytes=kv_bytes,
              max_num_batched_tokens=8192, **knobs)
    for req in priming:
        run_request(llm, [sys_ids] + [docs[i]["ids"] for i in req["docs"]], tail_for(tokenizer, docs, req), 1)
    run_request(llm, [sys_ids] + [docs[i]["ids"] for i in qa[0]["docs"]], tail_for(tokenizer, docs, qa[0]), 1)  # warm-up
    stats0 = llm.kv_stats()
    outs = [run_request(llm, [sys_ids] + [docs[i]["ids"] for i in req["docs"]], tail_for(tokenizer, docs, req),
                        max_tokens) for req in qa]
    st = llm.kv_stats()
    reused = st.get("sparsex_reused_tokens", 0) - stats0.get("sparsex_reused_tokens", 0)
    recomputed = st.get("sparsex_recomputed_tokens", 0) - stats0.get("sparsex_recomputed_tokens", 0)
    prefix = st.get("sparsex_prefix_tokens", 0) - stats0.get("sparsex_prefix_tokens", 0)
    llm.close()
    return {"outs": outs, "reused": reused, "recomputed": recomputed, "prefix": prefix}


def agreement(a: list[int], ref: list[int]) -> float:
    n = 0
    for x, y in zip(a, ref):
        if x != y:
            break
        n += 1
    return n / max(1, len(ref))


def kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    p = torch.log_softmax(ref_logits.double(), -1)
    q = torch.log_softmax(logits.double(), -1)
    return float((p.exp() * (p - q)).sum())


def ttft_long(model, tokenizer, articles, n_docs: int, doc_tokens: int, reps: int, seed: int) -> list[dict]:
    """TTFT of prompts of `n_docs` repeated documents (reordered), vanilla vs sparsex-15 (and naive)."""
    docs = build_docs(tokenizer, articles[40:], n_docs, doc_tokens, seed + 7)
    sys_ids = tokenizer.encode(SYSTEM)
    rng = random.Random(seed + 3)
    orders = []
    for _ in range(reps):
        o = list(range(len(docs)))
        rng.shuffle(o)
        orders.append(o)
    rows = []
    for name in ("full", "sparsex-15", "naive"):
        method, knobs = CONFIGS[name]
        llm = LLM(model, method=method, dtype="float32", device="cpu", kv_cache_bytes=1 << 30,
                  max_num_batched_tokens=16384, **knobs)
        tail = tail_for(tokenizer, docs, {"ask": (0, 1)})
        run_request(llm, [sys_ids] + [d["ids"] for d in docs], tail, 1)  # primes the store / warms up
        times, plen = [], 0
        for o in orders:
            r = run_request(llm, [sys_ids] + [docs[i]["ids"] for i in o], tail, 1)
            times.append(r["ttft"])
            plen = r["prompt_len"]
        llm.close()
        rows.append({"config": name, "prompt_len": plen, "ttft": statistics.median(times)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the shipped SmolLM2-135M-Instruct)")
    ap.add_argument("--docs", type=int, default=8, help="distinct documents")
    ap.add_argument("--doc-tokens", type=int, default=160, help="article tokens per document")
    ap.add_argument("--docs-per-request", type=int, default=3)
    ap.add_argument("--requests", type=int, default=10, help="QA requests per configuration")
    ap.add_argument("--max-tokens", type=int, default=24, help="greedy answer tokens")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--ttft-docs", type=int, default=5, help="documents in the long-context TTFT prompts (0: skip)")
    ap.add_argument("--ttft-doc-tokens", type=int, default=300)
    ap.add_argument("--ttft-reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="experiments/results/sparsex_quality.md")
    args = ap.parse_args()

    from data_prepare.resources import resolve_model_path, shipped_articles
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    articles = shipped_articles()
    docs = build_docs(tokenizer, articles, args.docs, args.doc_tokens, args.seed)
    priming, qa = build_requests(docs, args.requests, args.docs_per_request, args.seed)
    sys_ids = tokenizer.encode(SYSTEM)
    names = args.configs.split(",")
    if names[0] != "full":
        names = ["full"] + [n for n in names if n != "full"]
    res = {}
    for name in names:
        t0 = time.perf_counter()
        res[name] = run_config(name, model, tokenizer, docs, priming, qa, sys_ids, args.max_tokens, 1 << 30)
        print(f"{name}: {time.perf_counter() - t0:.0f}s", flush=True)

    ref = res["full"]["outs"]
    lines = ["# SparseX: multi-document QA quality and TTFT vs full recomputation", "",
             f"Model: {Path(model).name} (float32, CPU, {args.threads} threads, {platform.processor() or platform.machine()}); "
             f"{len(docs)} news documents of {args.doc_tokens} article tokens + a labelled reference-number fact; "
             f"{len(qa)} questions, each on two documents, {args.docs_per_request} documents per request in random "
             f"orders (mean prompt {statistics.mean(o['prompt_len'] for o in ref):.0f} tokens); every document was "
             f"seen before in another grouping (priming). Greedy, {args.max_tokens} answer tokens.", "",
             "| config | recomputed / reused tokens | prefix-cached tokens | exact answer match vs full | "
             "agreement prefix | first-token match | first-token KL | answer accuracy | TTFT median (s) | "
             "TTFT full / config |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    ttft_full = statistics.median(o["ttft"] for o in ref)
    for name in names:
        r = res[name]
        outs = r["outs"]
        exact = sum(o["tokens"] == f["tokens"] for o, f in zip(outs, ref)) / len(outs)
        agree = statistics.mean(agreement(o["tokens"], f["tokens"]) for o, f in zip(outs, ref))
        first = sum(o["tokens"][:1] == f["tokens"][:1] for o, f in zip(outs, ref)) / len(outs)
        kls = statistics.mean(kl(f["logits0"], o["logits0"]) for o, f in zip(outs, ref))
        acc = 0
        for o, req in zip(outs, qa):
            text = tokenizer.decode(o["tokens"])
            acc += all(docs[i]["number"] in text for i in req["ask"])
        ttft = statistics.median(o["ttft"] for o in outs)
        frac = f"{r['recomputed']}/{r['reused']} ({r['recomputed'] / r['reused']:.0%})" if r["reused"] else "-"
        lines.append(f"| {name} | {frac} | {r['prefix']} | {exact:.0%} | {agree:.0%} | {first:.0%} | {kls:.3f} | "
                     f"{acc / len(qa):.0%} | {ttft:.3f} | {ttft_full / ttft:.2f}x |")
    lines += ["", "Answers (full recomputation, first 4 questions):", ""]
    for o, req in list(zip(ref, qa))[:4]:
        want = ", ".join(docs[i]["number"] for i in req["ask"])
        lines.append(f"- want {want}: `{tokenizer.decode(o['tokens']).strip()!r}`")
    if args.ttft_docs:
        rows = ttft_long(model, tokenizer, articles, args.ttft_docs, args.ttft_doc_tokens, args.ttft_reps, args.seed)
        full = rows[0]["ttft"]
        lines += ["", f"## TTFT on repeated segments ({args.ttft_docs} documents of {args.ttft_doc_tokens} tokens, "
                      f"reordered; median of {args.ttft_reps})", "",
                  "| config | prompt tokens | TTFT (s) | TTFT full / config |", "|---|---|---|---|"]
        lines += [f"| {r['config']} | {r['prompt_len']} | {r['ttft']:.3f} | {full / r['ttft']:.2f}x |" for r in rows]
    lines += ["", f"Command: `python -m experiments.sparsex_quality` ({time.perf_counter() - t_start:.0f} s wall). "
                  "CPU timings are on a machine shared with other jobs: ratios are indicative."]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
