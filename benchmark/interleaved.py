"""Decode steps of several engines INTERLEAVED in one process: a ratio that machine noise cannot bias.

    python -m benchmark.interleaved --length 4096 --batch 1 --steps 32 --threads 2 \
        --variants '{"vanilla": ["vanilla", {}], "deltakv": ["deltakv", {"deltakv_path": "runs/smoke/compressor"}]}'

`deltakv-bench` times one method after another; on a shared or throttled machine (this 2-core VM
varies by 10-20% from minute to minute) the ratio of two such runs moves more than the effect being
measured. Here every engine prefills the same real-text prompts, runs `--warm` decode steps, then
the engines take turns, one decode step each, `--steps` rounds: a slow minute slows every engine in
it. Printed per variant: median and mean step (ms), tokens/s, and the median's ratio to the first
variant (`first/this`: > 1 = faster than the first). The mean includes DeltaKV's compression steps
(one every `decode_compress_block` tokens); the first decode steps (first-use costs, a cache filling)
are the `--warm` ones.

`--prefill N`: time PREFILL instead: N rounds, in each every engine prefills `--batch` fresh prompts
(to their first token, chunked by the engine's `chunk_prefill_size`) and finishes them; one row per
variant with the median seconds per round. Prefill is what a budget workload with short outputs
spends its time on (a 4K prompt costs ~130 decode steps of a 135M model on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from .throughput import environment_line, real_text_prompts


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", required=True, help='JSON: name -> [method, {knobs}] (the first is the baseline)')
    ap.add_argument("--model", default=None, help="HF model dir (default: the shipped SmolLM2-135M)")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv_cache_bytes", type=int, default=4 * 2**30)
    ap.add_argument("--prefill", type=int, default=0, help="time N interleaved prefill rounds instead of decode steps")
    ap.add_argument("--chunk_prefill_size", type=int, default=None)
    a = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from sparse_engine import LLM, SamplingParams
    from sparse_engine.shipped import shipped_model_dir

    torch.set_num_threads(a.threads)
    variants = json.loads(a.variants)
    model = a.model or str(shipped_model_dir())
    tok = AutoTokenizer.from_pretrained(model)
    extra = {} if a.chunk_prefill_size is None else {"chunk_prefill_size": a.chunk_prefill_size}
    if a.prefill:
        return _prefill_rounds(a, variants, model, tok, extra)
    prompts = real_text_prompts(tok, a.length, a.batch, tok.vocab_size)
    sp = SamplingParams(temperature=0.0, max_tokens=a.warm + a.steps + 2, ignore_eos=True)
    llms = {}
    for name, (method, knobs) in variants.items():
        llm = LLM(model, method=method, tokenizer=tok, kv_cache_bytes=a.kv_cache_bytes, **extra, **knobs)
        seqs = [llm.add_request(p, sp) for p in prompts]
        while not all(s.output_token_ids for s in seqs):
            llm.step()
        for _ in range(a.warm):
            llm.step()
        llms[name] = llm
    times = {n: [] for n in llms}
    for _ in range(a.steps):
        for n, llm in llms.items():
            t = time.perf_counter()
            llm.step()
            times[n].append(1000 * (time.perf_counter() - t))
    _report(f"| {a.length} tokens x batch {a.batch}, {a.steps} interleaved decode steps", "step ms", 1,
            "tok/s", 1000 * a.batch, 2, times)


def _report(title: str, unit: str, digits: int, rate: str, work: float, rate_digits: int, times: dict) -> None:
    """One row per variant: median and mean time, `work` / median as a rate, first variant's median / this one's."""
    print(environment_line(), title, flush=True)
    print(f"| variant | median {unit} | mean {unit} | {rate} (median) | first/this |")
    print("|---|---|---|---|---|")
    base = None
    for n, v in times.items():
        med = statistics.median(v)
        base = base or med
        print(f"| {n} | {med:.{digits}f} | {statistics.mean(v):.{digits}f} | {work / med:.{rate_digits}f} | {base / med:.3f} |")


def _prefill_rounds(a, variants, model, tok, extra) -> None:
    from sparse_engine import LLM, SamplingParams

    prompts = real_text_prompts(tok, a.length, a.batch * a.prefill, tok.vocab_size)
    sp = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    llms = {n: LLM(model, method=m, tokenizer=tok, kv_cache_bytes=a.kv_cache_bytes, **extra, **knobs)
            for n, (m, knobs) in variants.items()}
    times = {n: [] for n in llms}
    for r in range(a.prefill):
        batch = prompts[r * a.batch : (r + 1) * a.batch]
        for n, llm in llms.items():
            t = time.perf_counter()
            seqs = [llm.add_request(p, sp) for p in batch]
            while not all(s.output_token_ids for s in seqs):
                llm.step()
            times[n].append(time.perf_counter() - t)
            while llm.scheduler.has_work():
                llm.step()
    _report(f"| prefill of {a.batch} x {a.length} tokens, {a.prefill} interleaved rounds", "round s", 3,
            "prompt tok/s", a.batch * a.length, 0, times)


if __name__ == "__main__":
    main()
