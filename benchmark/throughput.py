"""`deltakv-bench`: TTFT, prefill / decode throughput, inter-token latency, KV bytes and peak memory.

For each method x prompt length x batch size, the same real-text prompts (windows of the shipped news
corpus, never one repeated token) run through `sparse_engine`; with `--hf` the workload also runs
through HF transformers `generate` and the ratios are printed. Results: a rich table on stdout, plus
`results.csv` and `results.md` in `--out`, written after every configuration (a killed run keeps
what it measured).

    deltakv-bench --methods vanilla,snapkv --lengths 512,2048 --batch_sizes 1,4 --decode_tokens 32 --hf
    deltakv-bench --model benchmark/configs/qwen2_5_7b --random_weights --lengths 32768   # GPU
"""

from __future__ import annotations

import csv
import gc
import json
import resource
import time
from pathlib import Path

import torch

from sparse_engine import LLM, SamplingParams
from sparse_engine.shipped import resolve_model_path, shipped_articles

COLUMNS = ["method", "prompt_len", "batch", "ttft_s", "prefill_tok_s", "decode_tok_s", "mean_itl_ms",
           "kv_bytes_per_seq", "kv_ratio_vs_full", "kv_peak_mb", "peak_mem_mb", "hf_ttft_s", "hf_decode_tok_s",
           "ttft_speedup_vs_hf", "decode_speedup_vs_hf"]


def _as_list(x, cast=str):
    if isinstance(x, (list, tuple)):
        return [cast(v) for v in x]
    return [cast(v) for v in str(x).split(",") if str(v).strip()]


def real_text_prompts(tokenizer, length: int, batch: int, vocab_size: int) -> list[list[int]]:
    """`batch` different windows of `length` tokens of real news text (corpus repeated if needed)."""
    ids = tokenizer.encode("\n\n".join(shipped_articles()))
    need = length + 211 * batch
    while len(ids) < need:
        ids = ids + ids
    return [[t % vocab_size for t in ids[i * 211 : i * 211 + length]] for i in range(batch)]


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process high-water mark (Linux KB)


def run_engine(llm: LLM, prompts: list[list[int]], decode_tokens: int) -> dict:
    """Time one batch through the engine step by step; per-token timestamps give TTFT and ITL."""
    if llm.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(llm.device)
    llm.pool.peak_used = llm.pool.num_used
    params = SamplingParams(temperature=0.0, max_tokens=decode_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    seqs = [llm.add_request(p, params) for p in prompts]
    stamps: dict[int, list[float]] = {s.seq_id: [] for s in seqs}
    kv_bytes = {}
    while llm.scheduler.has_work():
        llm.step()
        if llm.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter() - t0
        for s in seqs:
            while len(stamps[s.seq_id]) < len(s.output_token_ids):
                stamps[s.seq_id].append(now)
            if s.seq_id not in kv_bytes and s.output_token_ids:
                kv_bytes[s.seq_id] = llm.method.kv_bytes(s)  # right after prefill
    first = [v[0] for v in stamps.values()]
    last = max(v[-1] for v in stamps.values())
    ttft_all = max(first)
    n_decode = sum(len(v) - 1 for v in stamps.values())
    itls = [b - a for v in stamps.values() for a, b in zip(v, v[1:])]
    full = llm.spec.num_layers * llm.spec.num_kv_heads * llm.pool.bytes_per_slot * len(prompts[0])
    mean_kv = sum(kv_bytes.values()) / len(kv_bytes)
    return {
        "ttft_s": sum(first) / len(first),
        "prefill_tok_s": sum(len(p) for p in prompts) / ttft_all,
        "decode_tok_s": n_decode / (last - ttft_all) if last > ttft_all else float("nan"),
        "mean_itl_ms": 1000 * sum(itls) / len(itls) if itls else float("nan"),
        "kv_bytes_per_seq": int(mean_kv),
        "kv_ratio_vs_full": mean_kv / full,
        "kv_peak_mb": llm.pool.peak_used * llm.pool.bytes_per_slot / 2**20,
        "peak_mem_mb": _peak_mem_mb(llm.device),
    }


@torch.no_grad()
def run_hf(model, prompts: list[list[int]], decode_tokens: int, device: torch.device) -> dict:
    """The same workload through HF `generate` (equal-length prompts: no padding needed)."""
    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None)

    def timed(n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    ttft = timed(1)
    total = timed(decode_tokens)
    return {"hf_ttft_s": ttft,
            "hf_decode_tok_s": len(prompts) * (decode_tokens - 1) / max(total - ttft, 1e-9)}


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_results(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in COLUMNS})
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    table = Table(title="deltakv-bench")
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*[_fmt(r.get(c, "")) for c in cols])
    Console(width=max(160, 11 * len(cols))).print(table)


def bench(
    model: str | None = None,
    methods: str = "vanilla",
    lengths: str = "256,1024",
    batch_sizes: str = "1,4",
    decode_tokens: int = 32,
    hf: bool = False,
    random_weights: bool = False,
    knobs: str | dict = "{}",
    out: str = "runs/bench",
    warmup: bool = True,
    tokenizer: str | None = None,
    **engine_knobs,
) -> list[dict]:
    """Run the grid and return one row per (method, prompt length, batch size).

    Args:
        model: local HF folder or short name (default: the shipped SmolLM2-135M).
        methods: comma list of cache methods (any registered name).
        lengths / batch_sizes: comma lists of prompt lengths (tokens) and batch sizes.
        decode_tokens: tokens generated per sequence (greedy, EOS ignored).
        hf: also run HF transformers `generate` on the same prompts and print speed ratios.
        random_weights: random weights of the folder's config.json shapes (no weights needed).
        knobs: JSON dict {method: {knob: value}} of method knobs, e.g. '{"snapkv": {"budget": 256}}'.
        out: folder for results.csv / results.md (rewritten after every configuration).
        tokenizer: folder of the tokenizer used to make prompts (default: the model's, else the shipped one).
        engine_knobs: any EngineConfig field (kv_cache_bytes, chunk_prefill_size, dtype, device ...).
    """
    knobs = json.loads(knobs) if isinstance(knobs, str) else dict(knobs)
    methods_l, lengths_l, batches_l = _as_list(methods), _as_list(lengths, int), _as_list(batch_sizes, int)
    if "random_weights" in engine_knobs:
        random_weights = engine_knobs.pop("random_weights")
    if random_weights:
        engine_knobs["load_format"] = "random"
    path = resolve_model_path(model)
    tokenizer = _tokenizer_for(Path(tokenizer) if tokenizer else path)
    max_len = max(lengths_l) + decode_tokens + 1
    engine_knobs.setdefault("max_model_len", max_len)
    engine_knobs.setdefault("chunk_prefill_size", 4096)
    engine_knobs.setdefault("max_num_batched_tokens", max(8192, max(batches_l)))
    rows: list[dict] = []
    out_dir = Path(out)
    for method in methods_l:
        llm = LLM(path, method=method, tokenizer=tokenizer, **knobs.get(method, {}), **engine_knobs)
        if warmup:  # first-call costs (allocator, kernels' compilation) are not part of the figures
            run_engine(llm, real_text_prompts(tokenizer, min(lengths_l), 1, llm.spec.vocab_size), 2)
        for length in lengths_l:
            for b in batches_l:
                prompts = real_text_prompts(tokenizer, length, b, llm.spec.vocab_size)
                row = {"method": method, "prompt_len": length, "batch": b, **run_engine(llm, prompts, decode_tokens)}
                rows.append(row)
                write_results(rows, out_dir)
        device = llm.device
        llm.close()
        del llm
        gc.collect()
    if hf:
        hf_model = _hf_model(path, random_weights, device)
        hf_cache = {}
        for row in rows:
            key = (row["prompt_len"], row["batch"])
            if key not in hf_cache:
                prompts = real_text_prompts(tokenizer, key[0], key[1], hf_model.config.vocab_size)
                hf_cache[key] = run_hf(hf_model, prompts, decode_tokens, device)
            row.update(hf_cache[key])
            row["ttft_speedup_vs_hf"] = row["hf_ttft_s"] / row["ttft_s"]
            row["decode_speedup_vs_hf"] = row["decode_tok_s"] / row["hf_decode_tok_s"]
            write_results(rows, out_dir)
    print_table(rows)
    print(f"results: {out_dir / 'results.md'} and {out_dir / 'results.csv'}")
    return rows


def _tokenizer_for(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):  # config-only folders: prompts from the shipped tokenizer
        return AutoTokenizer.from_pretrained(resolve_model_path(None))


def _hf_model(path: Path, random_weights: bool, device: torch.device):
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if random_weights:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval()


def main():
    import fire

    fire.Fire(_cli_wrapper)  # a wrapper returning None: Fire would print the returned rows again


def _cli_wrapper(model=None, methods="vanilla", lengths="256,1024", batch_sizes="1,4", decode_tokens=32,
                 hf=False, random_weights=False, knobs="{}", out="runs/bench", warmup=True, tokenizer=None,
                 **engine_knobs):
    """See `bench` (same arguments); prints the table and writes results.csv / results.md."""
    bench(model, methods, lengths, batch_sizes, decode_tokens, hf, random_weights, knobs, out, warmup, tokenizer,
          **engine_knobs)


if __name__ == "__main__":
    main()
