"""`deltakv-bench`: TTFT, prefill / decode throughput, decode step time, KV bytes, peak memory and torch ops.

Workloads (`--workload`):

* `fixed` (default): for each method x prompt length x batch size, `batch` equal-length real-text prompts
  (windows of the shipped news corpus, never one repeated token) arrive together and each generates
  `--decode_tokens` greedy tokens (EOS ignored). With `--hf` the same prompts run through HF transformers:
  ONE `model.generate` call per configuration, timed per step by a `StoppingCriteria` that records a time
  stamp at every token (`benchmark/hf_timing.py`): TTFT = first stamp - start, decode step = mean gap
  between stamps. Results: `results.md` / `results.csv` in `--out`.
* `mixed`: `--num_requests` requests with lengths drawn (seeded, uniform) from `--min_len..--max_len`
  arrive together; the engine runs them with continuous batching, HF (`--hf`) in padded batches of
  `--hf_batch` in arrival order (`benchmark/mixed.py`). Results: `results_mixed.md` / `.csv`.
* `budget`: `--num_requests` (16) long NIAH requests (`--lengths`, 4096 tokens; benchmark/niah haystacks, a
  needle at a different depth in each) arrive together under ONE `--kv_cache_bytes` (default: vanilla fits
  `--vanilla_fit` 1.5 sequences); per method: wall time, requests / min, output tok/s, peak concurrent
  sequences past prefill, preemptions, KV bytes per sequence (and / vanilla), peak slots and latent rows,
  NIAH score of the same requests. Variants `deltakv:int8,deltakv:int4` (knobs keyed by variant);
  `--match_bytes` gives snapkv / pyramidkv DeltaKV's bytes per sequence (`benchmark/budget.py`).
  Results: `results_budget.md` / `.csv`.

`--ops` counts the top-level torch ops (`torch.profiler`, CPU activity) of one pure decode step: one
`llm.step()` for the engine, one decode forward + greedy argmax for HF (with `--hf`), at batch 1 and every
`--batch_sizes`. Results: `results_ops.md` / `.csv` (and the ops columns of the fixed table).

Every results file starts with the exact command that produced it; files are rewritten after every
configuration (a killed run keeps what it measured). The engine and HF run in one process: same
threads (`--threads`), same dtype (the engine's: float32 on CPU), same device.

    deltakv-bench --methods vanilla,snapkv --lengths 512,2048 --batch_sizes 1,4 --decode_tokens 32 --hf --ops
    deltakv-bench --workload mixed --num_requests 32 --hf --hf_batch 8
    deltakv-bench --workload budget --methods vanilla,snapkv,deltakv --match_bytes \
        --method_knobs '{"deltakv": {"deltakv_path": "runs/smoke/compressor", "latent_dtype": "int4"}}'
    deltakv-bench --methods deltakv --method_knobs '{"deltakv": {"deltakv_path": "runs/smoke/compressor"}}'
    deltakv-bench --model benchmark/configs/qwen2_5_7b --random_weights --lengths 32768   # GPU
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import gc
import json
import os
import platform
import resource
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from sparse_engine import LLM, SamplingParams
from sparse_engine.shipped import resolve_model_path, shipped_articles

COLUMNS = ["method", "prompt_len", "batch", "ttft_s", "ttft_batch_s", "prefill_tok_s", "decode_step_ms",
           "decode_tok_s", "mean_itl_ms", "kv_bytes_per_seq", "kv_ratio_vs_full", "kv_peak_mb", "peak_mem_mb",
           "hf_ttft_s", "hf_decode_step_ms", "hf_decode_tok_s", "ttft_speedup_vs_hf", "decode_speedup_vs_hf",
           "ops_per_decode_step", "hf_ops_per_decode_step"]
OPS_COLUMNS = ["method", "prompt_len", "batch", "ops_per_decode_step", "hf_ops_per_decode_step", "ops_ratio_vs_hf"]

NOTES = {
    "fixed": "ttft_s: mean over the batch; ttft_batch_s: until every sequence has its first token (HF prefills "
             "the batch at once: hf_ttft_s is compared with it). decode_step_ms: wall time of one decode step "
             "once every sequence decodes; decode_tok_s: tokens of the whole batch per second in those steps "
             "(= batch / step time). HF: one `generate` per row, stamped per step by a StoppingCriteria. "
             "peak_mem_mb: CUDA max allocated, on CPU the process high-water mark so far (not per row).",
    "ops": "Top-level torch ops (profiler events without a parent op) in one pure decode step: one `llm.step()` "
           "(schedule, forward, cache method, greedy sampling) for the engine; one decode forward with a "
           "DynamicCache + greedy argmax for HF.",
}


class BenchConfigError(ValueError):
    """A bad option or method knob, reported as one line instead of a traceback."""


def _as_list(x, cast=str):
    if isinstance(x, (list, tuple)):
        return [cast(v) for v in x]
    return [cast(v) for v in str(x).split(",") if str(v).strip()]


def _corpus_ids(tokenizer, need: int) -> list[int]:
    ids = tokenizer.encode("\n\n".join(shipped_articles()))
    while len(ids) < need:
        ids = ids + ids
    return ids


def text_windows(tokenizer, lengths: list[int], vocab_size: int, stride: int = 211) -> list[list[int]]:
    """One window of real news text per length; window i starts at token i * stride (corpus repeated if needed)."""
    ids = _corpus_ids(tokenizer, max(lengths) + stride * len(lengths))
    return [[t % vocab_size for t in ids[i * stride : i * stride + n]] for i, n in enumerate(lengths)]


def real_text_prompts(tokenizer, length: int, batch: int, vocab_size: int) -> list[list[int]]:
    """`batch` different windows of `length` tokens of real news text (corpus repeated if needed)."""
    return text_windows(tokenizer, [length] * batch, vocab_size)


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process high-water mark (Linux KB)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_engine(llm: LLM, prompts: list[list[int]], decode_tokens: int) -> dict:
    """Time one batch through the engine step by step; per-token timestamps give TTFT, step time and ITL."""
    if llm.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(llm.device)
    llm.pool.peak_used = llm.pool.num_used
    params = SamplingParams(temperature=0.0, max_tokens=decode_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    seqs = [llm.add_request(p, params) for p in prompts]
    stamps: dict[int, list[float]] = {s.seq_id: [] for s in seqs}
    step_ends: list[float] = []
    kv_bytes = {}
    while llm.scheduler.has_work():
        llm.step()
        _sync(llm.device)
        now = time.perf_counter() - t0
        step_ends.append(now)
        for s in seqs:
            while len(stamps[s.seq_id]) < len(s.output_token_ids):
                stamps[s.seq_id].append(now)
            if s.seq_id not in kv_bytes and s.output_token_ids:
                kv_bytes[s.seq_id] = llm.method.kv_bytes(s)  # right after prefill
    first = [v[0] for v in stamps.values()]
    last = max(v[-1] for v in stamps.values())
    ttft_all = max(first)
    decode_steps = sum(1 for t in step_ends if t > ttft_all)  # steps where every sequence decodes
    decode_toks = sum(1 for v in stamps.values() for t in v if t > ttft_all)
    itls = [b - a for v in stamps.values() for a, b in zip(v, v[1:])]
    full = llm.spec.num_layers * llm.spec.num_kv_heads * llm.pool.bytes_per_slot * len(prompts[0])
    mean_kv = sum(kv_bytes.values()) / len(kv_bytes)
    span = last - ttft_all
    return {
        "ttft_s": sum(first) / len(first),
        "ttft_batch_s": ttft_all,
        "prefill_tok_s": sum(len(p) for p in prompts) / ttft_all,
        "decode_step_ms": 1000 * span / decode_steps if decode_steps else float("nan"),
        "decode_tok_s": decode_toks / span if span > 0 else float("nan"),
        "mean_itl_ms": 1000 * sum(itls) / len(itls) if itls else float("nan"),
        "kv_bytes_per_seq": int(mean_kv),
        "kv_ratio_vs_full": mean_kv / full,
        "kv_peak_mb": llm.pool.peak_used * llm.pool.bytes_per_slot / 2**20,
        "peak_mem_mb": _peak_mem_mb(llm.device),
    }


# ---------------------------------------------------------------------------------------------- op counts
def count_top_level_ops(fn) -> tuple[int, Counter]:
    """Run `fn()` under `torch.profiler` (CPU activity); count the events with no parent op (the top-level
    torch ops it dispatched). User annotations (`record_function` ranges) are looked through, not counted."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names: Counter = Counter()
    for evt in prof.profiler.function_events:
        if getattr(evt, "is_user_annotation", False):
            continue
        parent = evt.cpu_parent
        while parent is not None and getattr(parent, "is_user_annotation", False):
            parent = parent.cpu_parent
        if parent is None:
            names[evt.name] += 1
    return sum(names.values()), names


def engine_decode_ops(llm: LLM, prompts: list[list[int]], warm_steps: int = 2) -> tuple[int, Counter]:
    """Prefill `prompts`, run `warm_steps` decode steps, then profile exactly one `llm.step()` that is a pure
    decode step (every sequence gains one token, one new cached token, no prefill work)."""
    params = SamplingParams(temperature=0.0, max_tokens=warm_steps + 3, ignore_eos=True)
    seqs = [llm.add_request(p, params) for p in prompts]
    while llm.scheduler.has_work() and any(not s.output_token_ids for s in seqs):
        llm.step()
    for _ in range(warm_steps):
        llm.step()
    out_before = [len(s.output_token_ids) for s in seqs]
    computed_before = [s.num_computed for s in seqs]
    n, names = count_top_level_ops(llm.step)
    pure = all(len(s.output_token_ids) == b + 1 and s.num_computed == c + 1
               for s, b, c in zip(seqs, out_before, computed_before))
    while llm.scheduler.has_work():
        llm.step()
    if not pure:
        raise RuntimeError("the profiled engine step was not a pure decode step of every sequence")
    return n, names


def hf_decode_ops(model, prompts: list[list[int]]) -> tuple[int, Counter]:
    from .hf_timing import hf_decode_step

    return count_top_level_ops(hf_decode_step(model, prompts))


# ---------------------------------------------------------------------------------------------- results
def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def environment_line(device=None, dtype=None) -> str:
    import transformers

    parts = [f"torch {torch.__version__}", f"transformers {transformers.__version__}",
             f"{torch.get_num_threads()} torch threads", f"{platform.machine()} {os.cpu_count()} CPUs"]
    if device is not None:
        parts.append(f"device {device}")
    if dtype is not None:
        parts.append(f"dtype {str(dtype).replace('torch.', '')}")
    parts.append(time.strftime("%Y-%m-%d %H:%M"))
    return ", ".join(parts)


def write_table(rows: list[dict], columns: list[str], out: Path, stem: str, command: str,
                env: str = "", note: str = "") -> None:
    """`<stem>.csv` (first line `# <command>`) and `<stem>.md` (first line `Command: ...`)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{stem}.csv", "w", newline="") as f:
        f.write(f"# {command}\n")
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in columns})
    cols = [c for c in columns if any(c in r for r in rows)]
    lines = [f"Command: `{command}`", ""]
    if env:
        lines += [env, ""]
    if note:
        lines += [note, ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


def read_results_csv(path: str | Path) -> tuple[str, list[dict]]:
    """A results CSV written here: (its first line, the `# command` comment; the rows as dicts)."""
    with open(path) as f:
        first = f.readline()
        return first, list(csv.DictReader(f))


def write_results(rows: list[dict], out: Path, command: str = "deltakv-bench", env: str = "") -> None:
    write_table(rows, COLUMNS, out, "results", command, env, NOTES["fixed"])


def print_table(rows: list[dict], columns: list[str] = COLUMNS, title: str = "deltakv-bench") -> None:
    from rich.console import Console
    from rich.table import Table

    cols = [c for c in columns if any(c in r for r in rows)]
    table = Table(title=title)
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*[_fmt(r.get(c, "")) for c in cols])
    Console(width=max(160, sum(max(len(c), 9) + 3 for c in cols) + 1)).print(table)


# ---------------------------------------------------------------------------------------------- setup
def _parse_knobs(knobs) -> dict:
    if knobs is None:
        return {}
    if isinstance(knobs, str):
        try:
            knobs = json.loads(knobs)
        except json.JSONDecodeError:
            try:
                knobs = ast.literal_eval(knobs)
            except (ValueError, SyntaxError) as e:
                raise BenchConfigError(f"--method_knobs is not JSON ({e}); e.g. "
                                       "'{\"snapkv\": {\"budget\": 256}}'") from None
    if not isinstance(knobs, dict) or not all(isinstance(v, dict) for v in knobs.values()):
        raise BenchConfigError("--method_knobs must map method names to dicts of knobs, e.g. "
                               "'{\"snapkv\": {\"budget\": 256}}'")
    return {str(k): dict(v) for k, v in knobs.items()}


def _model_spec(path: Path):
    try:
        from sparse_engine.models.spec import ModelSpec

        return ModelSpec.from_pretrained(path)
    except Exception:  # the cheap up-front checks are best effort; LLM() reports the real error
        return None


def check_methods(methods: list[str], knobs: dict, spec=None) -> None:
    """Fail before any measurement, with one clear line, on unknown methods, unknown / invalid knobs, and
    knobs a method cannot run without (a `*_path` knob left unset, e.g. deltakv's `deltakv_path`)."""
    from sparse_engine.cache.registry import METHODS, get_method
    from sparse_engine.config import engine_field_names

    if not methods:
        raise BenchConfigError("--methods is empty")
    for name in methods:
        try:
            get_method(name)
        except ValueError as e:
            raise BenchConfigError(f"--methods: {e}") from None
    for name in knobs:
        if name not in METHODS:
            raise BenchConfigError(f"--method_knobs names unknown method '{name}'. Known: {sorted(METHODS)}")
    engine_fields = engine_field_names()
    for name in methods:
        cls = METHODS[name]
        given = {k: v for k, v in knobs.get(name, {}).items() if k not in engine_fields}
        try:
            cfg = cls.make_config(**given)
        except TypeError as e:
            raise BenchConfigError(f"--method_knobs: {e}") from None
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if f.name.endswith("_path") and value is None:
                raise BenchConfigError(
                    f"method '{name}' needs the knob '{f.name}' (missing): pass it with --method_knobs "
                    f"'{{\"{name}\": {{\"{f.name}\": \"<path>\"}}}}'")
            if f.name.endswith("_path") and isinstance(value, (str, Path)) and not Path(value).expanduser().exists():
                raise BenchConfigError(f"method '{name}': {f.name}={str(value)!r} does not exist")
        if spec is not None:
            try:
                cfg.validate(spec)
            except (ValueError, TypeError) as e:
                raise BenchConfigError(f"method '{name}': {e} (knobs are set with --method_knobs)") from None


def _make_llm(path, method: str, tokenizer, knobs: dict, engine_knobs: dict) -> LLM:
    from sparse_engine.cache.registry import METHODS

    try:
        return LLM(path, method=method, tokenizer=tokenizer, **knobs.get(method, {}), **engine_knobs)
    except (ValueError, TypeError, OSError) as e:
        fields = sorted(f.name for f in dataclasses.fields(METHODS[method].Config)) if method in METHODS else []
        raise BenchConfigError(f"method '{method}' could not start ({type(e).__name__}): {e}. "
                               f"Its knobs: {fields}, set with --method_knobs") from None


def _default_kv_bytes(engine_knobs: dict, spec, tokens: int) -> None:
    """On CPU, size the KV pool for `tokens` cached tokens (at least the engine's 1 GiB default) so a
    workload runs without preemption; CUDA keeps `gpu_memory_utilization`."""
    if "kv_cache_bytes" in engine_knobs or spec is None:
        return
    device = engine_knobs.get("device", "auto")
    if str(device).startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return
    elsize = {"bfloat16": 2, "float16": 2}.get(engine_knobs.get("dtype", "auto"), 4)
    need = int(1.1 * tokens * spec.num_layers * spec.num_kv_heads * 2 * spec.head_dim * elsize)
    engine_knobs["kv_cache_bytes"] = max(1 << 30, need)


def _tokenizer_for(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):  # config-only folders: prompts from the shipped tokenizer
        return AutoTokenizer.from_pretrained(resolve_model_path(None))


def _hf_warmup(model, vocab: int, pad_id: int) -> None:
    from .hf_timing import timed_generate

    timed_generate(model, [[(7 * i + 3) % vocab for i in range(16)]], 2, pad_id)


def _free(llm) -> None:
    llm.close()
    del llm
    gc.collect()


# ---------------------------------------------------------------------------------------------- bench
def bench(
    model: str | None = None,
    methods: str = "vanilla",
    lengths: str | None = None,
    batch_sizes: str = "1,4",
    decode_tokens: int = 32,
    hf: bool = False,
    random_weights: bool = False,
    knobs: str | dict = "{}",
    out: str = "runs/bench",
    warmup: bool = True,
    tokenizer: str | None = None,
    *,
    workload: str = "fixed",
    num_requests: int | None = None,
    min_len: int = 64,
    max_len: int = 2048,
    mixed_seed: int = 0,
    hf_batch: int = 8,
    ops: bool = False,
    ops_len: int | None = None,
    threads: int | None = None,
    vanilla_fit: float = 1.5,
    match_bytes: str | None = None,
    niah_seed: int = 0,
    method_knobs: str | dict | None = None,
    command: str | None = None,
    **engine_knobs,
) -> list[dict]:
    """Run a workload and return its rows (fixed: one per method x prompt length x batch size; mixed: one
    per method + one HF row; budget: one per prompt length x method variant). See `deltakv-bench --help`
    for every argument.

    Args:
        model: local HF folder or short name (default: the shipped SmolLM2-135M).
        methods: comma list of cache methods (any name of `sparse_engine.cache.registry.METHODS`); the
            fixed and budget workloads also take variants `method:tag` (knobs keyed by the variant name,
            on top of the method's).
        lengths / batch_sizes: comma lists of prompt lengths (tokens) and batch sizes (fixed workload;
            lengths default 256,1024; budget workload: 4096).
        decode_tokens: tokens generated per sequence (greedy, EOS ignored), at least 2.
        hf: also run HF transformers on the same prompts and report the ratios.
        random_weights: random weights of the folder's config.json shapes (no weights needed).
        knobs / method_knobs: {method: {knob: value}} (dict or JSON), e.g. '{"snapkv": {"budget": 256}}'.
        out: folder of the results files (rewritten after every configuration).
        warmup: one short untimed run first (allocator, compilation).
        tokenizer: folder of the tokenizer used to make prompts (default: the model's, else the shipped one).
        workload: "fixed", "mixed" (num_requests (32), min_len, max_len, mixed_seed, hf_batch) or "budget"
            (num_requests (16), lengths, vanilla_fit, match_bytes, niah_seed; methods may be variants
            `deltakv:int4` with knobs keyed by the variant name; see benchmark/budget.py).
        ops: count top-level torch ops of one decode step (batch 1 and batch_sizes, at ops_len tokens:
            default the smallest of lengths).
        threads: torch threads for the engine and HF (default: torch's).
        command: the command line written at the top of every results file (default: an equivalent
            `deltakv-bench` command built from these arguments).
        engine_knobs: any EngineConfig field (kv_cache_bytes, chunk_prefill_size, dtype, device ...).
    """
    if threads:
        torch.set_num_threads(int(threads))
    knobs = _parse_knobs(knobs)
    for m, kv in _parse_knobs(method_knobs).items():
        knobs.setdefault(m, {}).update(kv)
    if workload not in ("fixed", "mixed", "budget"):
        raise BenchConfigError(f"--workload must be 'fixed', 'mixed' or 'budget', got {workload!r}")
    lengths_arg, num_requests_arg = lengths, num_requests  # the command line shows what was given
    if lengths is None:
        lengths = "4096" if workload == "budget" else "256,1024"
    if num_requests is None:
        num_requests = 16 if workload == "budget" else 32
    methods_l, lengths_l, batches_l = _as_list(methods), _as_list(lengths, int), _as_list(batch_sizes, int)
    if ops and workload != "fixed":
        raise BenchConfigError(f"--ops counts decode-step ops with the fixed workload: drop --workload {workload}")
    if workload == "budget" and hf:
        raise BenchConfigError("--workload budget runs the engine only: drop --hf")
    if workload == "budget" and len(set(lengths_l)) != len(lengths_l):
        raise BenchConfigError(f"--lengths lists a length twice: {lengths}")
    if int(decode_tokens) < 2:
        raise BenchConfigError(f"--decode_tokens must be >= 2 (one prefill token + decode steps), got {decode_tokens}")
    if any(v <= 0 for v in lengths_l + batches_l) or not lengths_l or not batches_l:
        raise BenchConfigError("--lengths and --batch_sizes must be non-empty lists of positive integers")
    if "random_weights" in engine_knobs:
        random_weights = engine_knobs.pop("random_weights")
    if engine_knobs.get("load_format") == "random":
        random_weights = True
    engine_knobs.pop("load_format", None)
    if command is None:
        command = equivalent_command(dict(model=model, methods=methods, lengths=lengths_arg, batch_sizes=batch_sizes,
                                          decode_tokens=decode_tokens, hf=hf, random_weights=random_weights,
                                          method_knobs=knobs, out=out, warmup=warmup, tokenizer=tokenizer,
                                          workload=workload, num_requests=num_requests_arg, min_len=min_len,
                                          max_len=max_len, mixed_seed=mixed_seed, hf_batch=hf_batch, ops=ops,
                                          ops_len=ops_len, threads=threads, vanilla_fit=vanilla_fit,
                                          match_bytes=match_bytes, niah_seed=niah_seed, **engine_knobs))
    if random_weights:
        engine_knobs["load_format"] = "random"
    path = resolve_model_path(model)
    spec = _model_spec(path)
    if workload == "budget":  # variants (deltakv:int4) are checked there, knobs keyed by variant
        from .budget import bench_budget, parse_variants

        parse_variants(methods_l, knobs)
    elif workload == "fixed":  # variants (deltakv:reuse) too: each row runs its variant's merged knobs
        from .budget import parse_variants

        variants = parse_variants(methods_l, knobs)
        for _, base, merged in variants:
            check_methods([base], {base: merged}, spec)
        knobs = {v: merged for v, _, merged in variants}
    else:
        check_methods(methods_l, knobs, spec)
    tok = _tokenizer_for(Path(tokenizer) if tokenizer else path)
    engine_knobs.setdefault("chunk_prefill_size", 4096)
    if workload == "budget":
        return bench_budget(path, tok, spec, methods_l, knobs, engine_knobs, lengths=lengths_l,
                            decode_tokens=int(decode_tokens), num_requests=int(num_requests),
                            vanilla_fit=float(vanilla_fit), match_bytes=match_bytes, niah_seed=int(niah_seed),
                            warmup=warmup, out=Path(out), command=command)
    if workload == "mixed":
        from .mixed import bench_mixed

        return bench_mixed(path, tok, spec, methods_l, knobs, engine_knobs, decode_tokens=int(decode_tokens),
                           num_requests=int(num_requests), min_len=int(min_len), max_len=int(max_len),
                           seed=int(mixed_seed), hf=hf, hf_batch=int(hf_batch), random_weights=random_weights,
                           warmup=warmup, out=Path(out), command=command)
    return _bench_fixed(path, tok, spec, methods_l, lengths_l, batches_l, int(decode_tokens), hf, random_weights,
                        knobs, Path(out), warmup, ops, ops_len, command, engine_knobs)


def _bench_fixed(path, tok, spec, methods_l, lengths_l, batches_l, decode_tokens, hf, random_weights, knobs,
                 out_dir: Path, warmup, ops, ops_len, command, engine_knobs) -> list[dict]:
    ops_len = int(ops_len) if ops_len else min(lengths_l)
    ops_batches = sorted({1, *batches_l})
    longest = max(lengths_l + ([ops_len] if ops else []))
    engine_knobs.setdefault("max_model_len", longest + decode_tokens + 1)
    engine_knobs.setdefault("max_num_batched_tokens", max(8192, max(batches_l)))
    _default_kv_bytes(engine_knobs, spec, max(batches_l) * (longest + decode_tokens + 8))
    rows: list[dict] = []
    ops_rows: list[dict] = []
    env = ""

    def save():
        write_results(rows, out_dir, command, env)
        if ops:
            write_table(ops_rows, OPS_COLUMNS, out_dir, "results_ops", command, env, NOTES["ops"])

    device = dtype = None
    for method in methods_l:
        base = method.split(":", 1)[0]
        llm = _make_llm(path, base, tok, {base: knobs.get(method, {})}, engine_knobs)
        device, dtype = llm.device, llm.dtype
        env = environment_line(device, dtype)
        if warmup:  # first-call costs (allocator, kernels' compilation) are not part of the figures
            run_engine(llm, real_text_prompts(tok, min(lengths_l), 1, llm.spec.vocab_size), 2)
        for length in lengths_l:
            for b in batches_l:
                prompts = real_text_prompts(tok, length, b, llm.spec.vocab_size)
                rows.append({"method": method, "prompt_len": length, "batch": b,
                             **run_engine(llm, prompts, decode_tokens)})
                save()
        if ops:
            for b in ops_batches:
                n, _ = engine_decode_ops(llm, real_text_prompts(tok, ops_len, b, llm.spec.vocab_size))
                ops_rows.append({"method": method, "prompt_len": ops_len, "batch": b, "ops_per_decode_step": n})
                save()
        _free(llm)
    if hf:
        from .hf_timing import hf_pad_id, load_hf_model, run_hf

        hf_model = load_hf_model(path, random_weights, device, dtype, seed=engine_knobs.get("seed", 0))
        pad_id = hf_pad_id(tok, hf_model)
        vocab = hf_model.config.vocab_size
        if warmup:
            _hf_warmup(hf_model, vocab, pad_id)
        hf_cache = {}
        for row in rows:
            key = (row["prompt_len"], row["batch"])
            if key not in hf_cache:
                hf_cache[key] = run_hf(hf_model, real_text_prompts(tok, key[0], key[1], vocab), decode_tokens, pad_id)
            row.update(hf_cache[key])
            row["ttft_speedup_vs_hf"] = row["hf_ttft_s"] / row["ttft_batch_s"]
            row["decode_speedup_vs_hf"] = row["decode_tok_s"] / row["hf_decode_tok_s"]
            save()
        if ops:
            hf_ops = {b: hf_decode_ops(hf_model, real_text_prompts(tok, ops_len, b, vocab))[0] for b in ops_batches}
            for r in ops_rows:
                r["hf_ops_per_decode_step"] = hf_ops[r["batch"]]
                r["ops_ratio_vs_hf"] = r["ops_per_decode_step"] / hf_ops[r["batch"]]
            save()
        del hf_model
        gc.collect()
    for r in rows:  # the ops columns of the main table, where an ops row has the same configuration
        for o in ops_rows:
            if (o["method"], o["prompt_len"], o["batch"]) == (r["method"], r["prompt_len"], r["batch"]):
                r.update({k: o[k] for k in ("ops_per_decode_step", "hf_ops_per_decode_step") if k in o})
    save()
    print_table(rows)
    if ops:
        print_table(ops_rows, OPS_COLUMNS, title=f"deltakv-bench: top-level torch ops per decode step ({ops_len}-token prompts)")
    print(f"results: {out_dir / 'results.md'} and {out_dir / 'results.csv'}"
          + (f"; ops: {out_dir / 'results_ops.md'}" if ops else ""))
    return rows


# ---------------------------------------------------------------------------------------------- CLI
_DEFAULTS = dict(model=None, methods="vanilla", lengths=None, batch_sizes="1,4", decode_tokens=32, hf=False,
                 random_weights=False, method_knobs={}, out="runs/bench", warmup=True, tokenizer=None,
                 workload="fixed", num_requests=None, min_len=64, max_len=2048, mixed_seed=0, hf_batch=8, ops=False,
                 ops_len=None, threads=None, vanilla_fit=1.5, match_bytes=None, niah_seed=0)


def _env_prefix() -> str:
    return f"DELTAKV_TEXT={shlex.quote(os.environ['DELTAKV_TEXT'])} " if os.environ.get("DELTAKV_TEXT") else ""


def equivalent_command(args: dict) -> str:
    """A `deltakv-bench` command line giving these arguments (options left at their default are omitted)."""
    parts = ["deltakv-bench"]
    for k, v in args.items():
        if k in _DEFAULTS and v == _DEFAULTS[k]:
            continue
        if isinstance(v, bool):
            parts.append(f"--{k}" if v else f"--no-{k}")
            continue
        if v is None or (k == "method_knobs" and not v):
            continue
        if isinstance(v, (list, tuple)):
            v = ",".join(map(str, v))
        elif isinstance(v, dict):
            v = json.dumps(v)
        parts += [f"--{k}", str(v)]
    return _env_prefix() + shlex.join(parts)


def _literal(text: str):
    """Engine knob values as Python literals where they parse (1024, 0.5, True, None), else strings."""
    low = text.lower()
    if low in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[low]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _attribute_docs(doc: str) -> dict[str, str]:
    """`name: text` entries of a Google-style `Attributes:` docstring section (continuation lines joined)."""
    docs, name = {}, None
    for line in doc.split("Attributes:", 1)[-1].splitlines():
        head, sep, rest = line.strip().partition(": ")
        if sep and head.isidentifier() and line.startswith(" " * 8) and not line.startswith(" " * 12):
            name, docs[head] = head, rest.strip()
        elif name and line.strip():
            docs[name] += " " + line.strip()
    return {k: v.replace("%", "%%") for k, v in docs.items()}


def build_parser() -> argparse.ArgumentParser:
    from sparse_engine.cache.registry import METHODS
    from sparse_engine.config import EngineConfig

    p = argparse.ArgumentParser(
        prog="deltakv-bench",
        description="Engine vs HF transformers: TTFT, decode step time and tok/s, KV bytes, peak memory, "
                    "torch ops per decode step. Every results file starts with the command that wrote it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and methods")
    g.add_argument("--model", default=None, help="local HF folder or short name; None = the shipped SmolLM2-135M")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder for the prompts; None = the model's")
    g.add_argument("--random_weights", action=argparse.BooleanOptionalAction, default=False,
                   help="random weights of the config's shapes (speed / memory only)")
    g.add_argument("--methods", default="vanilla", help=f"comma list of cache methods: {','.join(METHODS)}; fixed and budget workloads also take "
                        "variants NAME:TAG whose knobs are keyed by the variant (e.g. deltakv:reuse)")
    g.add_argument("--method_knobs", "--knobs", dest="method_knobs", default="{}", metavar="JSON",
                   help='method knobs, e.g. \'{"deltakv": {"deltakv_path": "runs/smoke/compressor"}, '
                        '"snapkv": {"budget": 256}}\'')
    g = p.add_argument_group("workload")
    g.add_argument("--workload", choices=["fixed", "mixed", "budget"], default="fixed",
                   help="fixed: equal-length batches over --lengths x --batch_sizes; mixed: --num_requests "
                        "requests of seeded random lengths arriving together; budget: --num_requests long NIAH "
                        "requests arriving together under one --kv_cache_bytes (benchmark/budget.py)")
    g.add_argument("--lengths", default=None,
                   help="fixed: comma list of prompt lengths (tokens), default 256,1024; budget: NIAH prompt "
                        "length(s), default 4096 (one table block per length)")
    g.add_argument("--batch_sizes", default="1,4", help="fixed: comma list of batch sizes")
    g.add_argument("--decode_tokens", type=int, default=32, help="greedy tokens per request (EOS ignored)")
    g.add_argument("--num_requests", type=int, default=None,
                   help="mixed: number of requests (default 32); budget: NIAH requests per length (default 16)")
    g.add_argument("--min_len", type=int, default=64, help="mixed: shortest prompt (tokens)")
    g.add_argument("--max_len", type=int, default=2048, help="mixed: longest prompt (tokens)")
    g.add_argument("--mixed_seed", type=int, default=0, help="mixed: seed of the prompt lengths")
    g.add_argument("--vanilla_fit", type=float, default=1.5,
                   help="budget: without --kv_cache_bytes the budget holds this many vanilla sequences of prompt + "
                        "output tokens: fit x tokens x layers x kv_heads x head_dim x 2 x dtype bytes")
    g.add_argument("--match_bytes", nargs="?", const="auto", default=None, metavar="VARIANT",
                   help="budget: give snapkv / pyramidkv / adakv the `budget` knob (tokens per layer and KV head) "
                        "= VARIANT's KV bytes per sequence / (layers x kv_heads x bytes_per_slot); VARIANT: a "
                        "deltakv entry of --methods (run first), default the first one")
    g.add_argument("--niah_seed", type=int, default=0, help="budget: seed of the NIAH needles and haystacks")
    g = p.add_argument_group("comparison and measurement")
    g.add_argument("--hf", action=argparse.BooleanOptionalAction, default=False,
                   help="also run HF transformers (one timed generate per batch) and report the ratios")
    g.add_argument("--hf_batch", type=int, default=8, help="mixed: HF batch size (left padding, arrival order)")
    g.add_argument("--ops", action=argparse.BooleanOptionalAction, default=False,
                   help="fixed: count top-level torch ops of one decode step (batch 1 and --batch_sizes)")
    g.add_argument("--ops_len", type=int, default=None, help="prompt length of the op count; None = the smallest of --lengths")
    g.add_argument("--threads", type=int, default=None, help="torch threads for engine and HF; None = torch's default")
    g.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True, help="one untimed short run first")
    g.add_argument("--out", default="runs/bench", help="folder of results*.md / results*.csv")
    g = p.add_argument_group("engine knobs (EngineConfig; default: the engine's, except chunk_prefill_size=4096, "
                             "max_num_batched_tokens=max(8192, batch), max_model_len and, on CPU, kv_cache_bytes "
                             "sized to the workload)")
    docs = _attribute_docs(EngineConfig.__doc__ or "")
    for f in dataclasses.fields(EngineConfig):
        if f.name == "load_format":
            continue  # --random_weights
        g.add_argument(f"--{f.name}", type=_literal, default=argparse.SUPPRESS, metavar=f.name.upper(),
                       help=docs.get(f.name, ""))
    return p


def _invocation(argv: list[str]) -> str:
    prog = "deltakv-bench" if Path(sys.argv[0]).name == "deltakv-bench" else "python -m benchmark.throughput"
    return _env_prefix() + " ".join([prog, *map(shlex.quote, argv)])


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = vars(parser.parse_args(argv))
    try:
        bench(**args, command=_invocation(argv))
    except BenchConfigError as e:
        parser.exit(2, f"deltakv-bench: error: {e}\n")


if __name__ == "__main__":
    main()
