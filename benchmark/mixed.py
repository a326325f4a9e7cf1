"""`deltakv-bench --workload mixed`: requests of mixed prompt lengths arriving together.

`num_requests` prompt lengths are drawn uniformly (seeded, `random.Random(seed)`) from `min_len..max_len`;
request i is a window of real news text of that length (`text_windows`). Every request generates
`decode_tokens` greedy tokens with EOS ignored.

* engine: every request is submitted at t0, then `llm.step()` runs until no work is left (chunked prefill +
  continuous batching decide the order);
* HF (`--hf`): the requests in arrival order, `hf_batch` at a time, left-padded (attention mask, pad token),
  one `model.generate(min_new_tokens = max_new_tokens = decode_tokens)` per batch, batches back to back.

Reported per system: wall time from t0 to the last token, output tok/s, total (prompt + output) tok/s
(padding is not counted as work), mean TTFT (from t0), and the engine / HF ratio of total tok/s.
Results: `results_mixed.md` / `results_mixed.csv` in `--out` (first line: the command).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from sparse_engine import LLM, SamplingParams

from .throughput import (BenchConfigError, _default_kv_bytes, _free, _hf_warmup, _make_llm, _peak_mem_mb, _sync,
                         environment_line, print_table, real_text_prompts, run_engine, text_windows, write_table)

MIXED_COLUMNS = ["system", "method", "num_requests", "max_batch", "prompt_tokens", "output_tokens", "pad_tokens",
                 "wall_s", "output_tok_s", "total_tok_s", "mean_ttft_s", "preemptions", "peak_mem_mb",
                 "total_speedup_vs_hf"]


def mixed_lengths(num_requests: int, min_len: int = 64, max_len: int = 2048, seed: int = 0) -> list[int]:
    """`num_requests` prompt lengths, uniform on [min_len, max_len] (both included), the same for a seed."""
    if num_requests < 1:
        raise BenchConfigError(f"--num_requests must be >= 1, got {num_requests}")
    if not 1 <= min_len <= max_len:
        raise BenchConfigError(f"need 1 <= --min_len <= --max_len, got {min_len} and {max_len}")
    rng = random.Random(seed)
    return [rng.randint(min_len, max_len) for _ in range(num_requests)]


def mixed_prompts(tokenizer, lengths: list[int], vocab_size: int) -> list[list[int]]:
    return text_windows(tokenizer, lengths, vocab_size)


def run_engine_mixed(llm: LLM, prompts: list[list[int]], decode_tokens: int) -> dict:
    """Submit every request at t0, step until done; wall time, throughput and TTFT from per-step stamps."""
    if llm.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(llm.device)
    preempt0 = llm.scheduler.num_preemptions
    params = SamplingParams(temperature=0.0, max_tokens=decode_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    seqs = [llm.add_request(p, params) for p in prompts]
    first: dict[int, float] = {}
    while llm.scheduler.has_work():
        llm.step()
        _sync(llm.device)
        now = time.perf_counter() - t0
        for s in seqs:
            if s.seq_id not in first and s.output_token_ids:
                first[s.seq_id] = now
    wall = time.perf_counter() - t0
    prompt_tokens = sum(len(p) for p in prompts)
    output_tokens = sum(len(s.output_token_ids) for s in seqs)
    if output_tokens != len(prompts) * decode_tokens:
        raise RuntimeError(f"engine produced {output_tokens} tokens, expected {len(prompts) * decode_tokens}")
    return {"prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "pad_tokens": 0, "wall_s": wall,
            "output_tok_s": output_tokens / wall, "total_tok_s": (prompt_tokens + output_tokens) / wall,
            "mean_ttft_s": sum(first.values()) / len(first),
            "preemptions": llm.scheduler.num_preemptions - preempt0, "peak_mem_mb": _peak_mem_mb(llm.device)}


def bench_mixed(path: Path, tok, spec, methods: list[str], knobs: dict, engine_knobs: dict, *, decode_tokens: int,
                num_requests: int, min_len: int, max_len: int, seed: int, hf: bool, hf_batch: int,
                random_weights: bool, warmup: bool, out: Path, command: str) -> list[dict]:
    if hf_batch < 1:
        raise BenchConfigError(f"--hf_batch must be >= 1, got {hf_batch}")
    lengths = mixed_lengths(num_requests, min_len, max_len, seed)
    engine_knobs.setdefault("max_model_len", max(lengths) + decode_tokens + 1)
    engine_knobs.setdefault("max_num_batched_tokens", 8192)
    _default_kv_bytes(engine_knobs, spec, sum(n + decode_tokens + 8 for n in lengths))
    note = (f"{num_requests} requests, prompt lengths uniform on [{min_len}, {max_len}] (seed {seed}): "
            f"{sum(lengths)} prompt tokens, min {min(lengths)}, mean {sum(lengths) / len(lengths):.0f}, "
            f"max {max(lengths)}; {decode_tokens} greedy tokens each (EOS ignored); all arrive at t0. "
            "Engine: continuous batching (max_batch = max_num_seqs). HF: batches of max_batch in arrival order, "
            "left padding, one `generate` each; pad_tokens are computed but not counted as work. "
            "total_tok_s = (prompt + output tokens) / wall_s. peak_mem_mb: CUDA max allocated, on CPU the process "
            "high-water mark so far (not per system).")
    rows: list[dict] = []
    env = ""

    def save():
        write_table(rows, MIXED_COLUMNS, out, "results_mixed", command, env, note)

    device = dtype = None
    for method in methods:
        llm = _make_llm(path, method, tok, knobs, engine_knobs)
        device, dtype = llm.device, llm.dtype
        env = environment_line(device, dtype)
        if warmup:
            run_engine(llm, real_text_prompts(tok, min(lengths), 1, llm.spec.vocab_size), 2)
        prompts = mixed_prompts(tok, lengths, llm.spec.vocab_size)
        rows.append({"system": "engine", "method": method, "num_requests": num_requests,
                     "max_batch": llm.config.max_num_seqs, **run_engine_mixed(llm, prompts, decode_tokens)})
        save()
        _free(llm)
    if hf:
        from .hf_timing import hf_pad_id, load_hf_model, run_hf_mixed

        model = load_hf_model(path, random_weights, device, dtype, seed=engine_knobs.get("seed", 0))
        pad_id = hf_pad_id(tok, model)
        if warmup:
            _hf_warmup(model, model.config.vocab_size, pad_id)
        prompts = mixed_prompts(tok, lengths, model.config.vocab_size)
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        res = run_hf_mixed(model, prompts, decode_tokens, hf_batch, pad_id)
        hf_row = {"system": "hf", "method": "-", "num_requests": num_requests, "max_batch": hf_batch, **res,
                  "peak_mem_mb": _peak_mem_mb(device)}
        for r in rows:
            r["total_speedup_vs_hf"] = r["total_tok_s"] / hf_row["total_tok_s"]
        rows.append(hf_row)
        save()
        del model
    print_table(rows, MIXED_COLUMNS, title="deltakv-bench --workload mixed")
    if hf:
        for r in rows[:-1]:
            print(f"engine ({r['method']}) / HF total throughput: {r['total_speedup_vs_hf']:.3g}x "
                  f"({r['total_tok_s']:.4g} vs {rows[-1]['total_tok_s']:.4g} tok/s)")
    print(f"results: {out / 'results_mixed.md'} and {out / 'results_mixed.csv'}")
    return rows
