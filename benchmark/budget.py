"""`deltakv-bench --workload budget`: many long NIAH requests under ONE fixed KV memory budget.

`--num_requests` needle-in-a-haystack prompts of `--lengths` tokens (built by `benchmark/niah`: a haystack
of the shipped news corpus, a needle "One of the special magic numbers for <key> is: <7 digits>." at depth
i / (n - 1) of request i, seeded like the harness, and the question asking for it) are submitted together
to ONE engine per method, all under the same `kv_cache_bytes`. Every request generates `--decode_tokens`
greedy tokens (EOS ignored for the timing; the answer is scored up to the first EOS).

The budget (unless `--kv_cache_bytes` is given) lets vanilla hold `--vanilla_fit` sequences of prompt +
output tokens at once:

    kv_cache_bytes = vanilla_fit x (longest prompt + decode_tokens) x layers x kv_heads x head_dim x 2 x dtype bytes

so vanilla runs its requests one by one, and a method that keeps fewer bytes per sequence fits more of
them at once. The engine's budget covers pool slots AND DeltaKV's latent rows (DeltaKV claims its
`latent_share` for a latent arena; the scheduler admits / preempts on both).

Per method (a method may appear several times as named variants, `deltakv:int8,deltakv:int4`, with
`--method_knobs` keyed by the variant name, merged over knobs keyed by the plain method name):

* wall_s (submit -> last token), requests_per_min, output_tok_s;
* peak_concurrent: most sequences past prefill (`num_computed >= num_prompt_tokens`) in
  `llm.scheduler.running` after any `llm.step()`;
* preemptions (recompute preemptions of the scheduler);
* kv_bytes_per_seq: mean over requests of `method.kv_bytes(seq)` right after the step that sampled its
  first token, and kv_ratio_vs_vanilla = that / vanilla's bytes for the same prompts (prompt tokens x layers
  x kv_heads x bytes_per_slot: the first sampled token is not cached yet);
* slots_total / slots_peak, latent_rows_capacity / latent_rows_peak (`LLM.kv_stats()`);
* cache_hits / caches_dropped: DeltaKV `reuse_reconstructed` tokens read from its caches, caches reclaimed for room;
* niah_score: fraction of needles found in those same requests (`benchmark.niah.score`: the 7 digits
  verbatim in the answer).

`--match_bytes [VARIANT]`: snapkv / pyramidkv / adakv variants get the `budget` knob that gives them about
the bytes per sequence of the DeltaKV variant VARIANT (default: the first deltakv variant of `--methods`),
which then runs first: budget (tokens per layer and KV head; pyramidkv: the mean over layers) =
round(kv_bytes_per_seq(deltakv) / (layers x kv_heads x bytes_per_slot)), at least sink_size + window_size.
A `budget` given in a variant's knobs wins.

`--chunk_prefill_size` (deltakv-bench's default 4096) matters here: a prefill chunk is held at full
precision until the method compresses it (DeltaKV after every chunk, snapkv / pyramidkv after the prompt's
last chunk). With the engine's default `admission='prompt'` a request starts beside running ones only
when its whole prompt fits at the method's footprint (DeltaKV: compressed, plus its chunk peak), so
nothing is prefilled only to be preempted; `"admission": "chunk"` in a variant's knobs starts it as soon
as its next chunk fits (vLLM V1's rule), and a request whose later chunk does not fit is then preempted
and its chunks recomputed, which shows in `preemptions`.

Results: `results_budget.md` / `results_budget.csv` in `--out`, first line the command; rewritten after
every method.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from sparse_engine import LLM, SamplingParams
from sparse_engine.engine.sequence import Status

from .throughput import (BenchConfigError, _free, _make_llm, _sync, check_methods, environment_line, print_table,
                         real_text_prompts, run_engine, write_table)

BUDGET_COLUMNS = ["method", "knobs", "prompt_len", "num_requests", "kv_budget_bytes", "wall_s", "requests_per_min",
                  "output_tok_s", "peak_concurrent", "preemptions", "kv_bytes_per_seq", "kv_ratio_vs_vanilla",
                  "slots_total", "slots_peak", "latent_rows_capacity", "latent_rows_peak", "cache_hits", "caches_dropped",
                  "niah_score"]
MATCHED = ("snapkv", "pyramidkv", "adakv")  # methods whose `budget` knob --match_bytes sets

HOW_TO_READ = (
    "How to read: every method ran the same {n} NIAH requests per prompt length ({decode} greedy tokens each, "
    "all submitted at t0) under the same KV budget (kv_budget_bytes; by default vanilla fits {fit} sequences of "
    "prompt + output tokens in it, so vanilla runs them one by one). A method that keeps fewer KV bytes per "
    "sequence (kv_bytes_per_seq, measured right after each request's first output token; kv_ratio_vs_vanilla "
    "< 1) fits more requests at once past prefill (peak_concurrent) and so should finish the batch sooner "
    "(higher requests_per_min and output_tok_s) with fewer preemptions (a preempted request drops its KV and "
    "recomputes it later). slots_* are full-precision pool slots (one token x KV head x layer) and "
    "latent_rows_* DeltaKV's compressed rows (one token x sparse layer): capacity and high-water mark, both "
    "carved from the one budget. niah_score is the fraction of these same requests whose answer (up to the "
    "first EOS) contains the needle's 7 digits: what the speed costs in retrieval. peak_concurrent also depends "
    "on chunk_prefill_size: each prefill chunk is held at full precision until the method compresses it "
    "(DeltaKV after every chunk, snapkv / pyramidkv after the prompt's last one). The scheduler starts a "
    "request beside running ones when its whole prompt fits at the method's footprint (admission='prompt', "
    "the default) or, with admission='chunk', when its next chunk fits: a request can then be partially "
    "prefilled, preempted and recomputed (counted in preemptions). Wall times are only comparable on a quiet "
    "machine."
)


# ---------------------------------------------------------------------------------------------- sizing
def dtype_bytes(engine_knobs: dict, spec) -> int:
    """Bytes per KV element of the engine's dtype, resolved as `LLM` does (auto: float32 on CPU, the
    checkpoint's dtype - bf16 if it is float32 - on CUDA)."""
    dtype = engine_knobs.get("dtype", "auto")
    if dtype != "auto":
        return {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 4)
    device = str(engine_knobs.get("device", "auto"))
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if not on_cuda:
        return 4
    return 2 if spec.torch_dtype == torch.float32 else torch.empty((), dtype=spec.torch_dtype).element_size()


def vanilla_fit_bytes(spec, dtype_size: int, tokens_per_seq: int, vanilla_fit: float = 1.5) -> int:
    """KV budget holding `vanilla_fit` full-precision sequences of `tokens_per_seq` tokens:
    vanilla_fit x tokens x layers x kv_heads x head_dim x 2 (K and V) x dtype bytes."""
    per_token = spec.num_layers * spec.num_kv_heads * spec.head_dim * 2 * dtype_size
    return int(vanilla_fit * tokens_per_seq * per_token)


def matched_budget(kv_bytes_per_seq: float, spec, bytes_per_slot: int, floor: int = 1) -> int:
    """snapkv / pyramidkv `budget` (tokens per layer and KV head) holding about `kv_bytes_per_seq` bytes:
    bytes / (layers x kv_heads x bytes_per_slot), rounded, at least `floor` (sink_size + window_size)."""
    return max(int(floor), int(round(kv_bytes_per_seq / (spec.num_layers * spec.num_kv_heads * bytes_per_slot))))


# ---------------------------------------------------------------------------------------------- prompts
def needle_depths(n: int) -> list[float]:
    """n depths (percent) spread evenly over [0, 100]: request i gets 100 i / (n - 1) (one request: 50)."""
    return [50.0] if n == 1 else [round(100.0 * i / (n - 1), 2) for i in range(n)]


def niah_prompts(tokenizer, length: int, num_requests: int, vocab_size: int, seed: int = 0,
                 use_chat: bool | None = None) -> list[dict]:
    """`num_requests` NIAH requests of about `length` tokens (the harness's `make_sample`), needle of request i
    at depth `needle_depths(n)[i]`, each seeded like the harness (`f"{seed}/{length}/{depth}/{i}"`).
    Returns dicts: prompt_ids (context + question, ids mod vocab_size), needle, key, depth, length."""
    from benchmark.backends import encode, has_chat_template
    from benchmark.niah import make_sample

    if use_chat is None:
        use_chat = has_chat_template(tokenizer)
    out = []
    for i, depth in enumerate(needle_depths(num_requests)):
        rng = random.Random(f"{seed}/{length}/{depth}/{i}")
        try:
            smp = make_sample(tokenizer, length, depth, rng, use_chat)
        except ValueError as e:
            raise BenchConfigError(f"--lengths {length}: {e}") from None
        ids = encode(tokenizer, smp["context"]) + encode(tokenizer, smp["query"], add_special_tokens=False)
        out.append({"prompt_ids": [t % vocab_size for t in ids], "needle": smp["value"], "key": smp["key"],
                    "depth": depth, "length": length})
    return out


# ---------------------------------------------------------------------------------------------- variants
def parse_variants(methods: list[str], knobs: dict) -> list[tuple[str, str, dict]]:
    """`deltakv:int8` -> (variant, base method, knobs): the base method's knobs, then the variant's."""
    out, seen = [], set()
    for v in methods:
        if v in seen:
            raise BenchConfigError(f"--methods lists '{v}' twice: name the variants, e.g. deltakv:int8,deltakv:int4")
        seen.add(v)
        base = v.split(":", 1)[0]
        merged = dict(knobs.get(base, {}))
        if v != base:
            merged.update(knobs.get(v, {}))
        out.append((v, base, merged))
    unknown = [k for k in knobs if k not in seen and k not in {b for _, b, _ in out}]
    if unknown:
        raise BenchConfigError(f"--method_knobs names {unknown}, not in --methods {methods} (knobs are keyed by the "
                               "method or the variant name, e.g. 'deltakv:int4')")
    return out


def _knob_text(knobs: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in knobs.items() if not k.endswith("_path"))


# ---------------------------------------------------------------------------------------------- one run
def run_budget(llm: LLM, requests: list[dict], decode_tokens: int, tokenizer, desc: str = "") -> dict:
    """Submit every request at t0 and step until done; return the row's measurements and the answers."""
    from tqdm.auto import tqdm

    from benchmark import niah

    if llm.device.type == "cuda":
        torch.cuda.synchronize()
    llm.pool.peak_used = llm.pool.num_used
    store = getattr(llm.method, "store", None)
    if store is not None and hasattr(store, "mem"):
        store.mem.peak = store.mem.used
    preempt0 = llm.scheduler.num_preemptions
    params = SamplingParams(temperature=0.0, max_tokens=decode_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    try:
        seqs = [llm.add_request(r["prompt_ids"], params) for r in requests]
    except ValueError as e:
        raise BenchConfigError(f"{desc}: {e} (the budget is --kv_cache_bytes / --vanilla_fit; a smaller "
                               "--chunk_prefill_size lowers a DeltaKV request's peak slots)") from None
    kv_bytes: dict[int, int] = {}
    peak = 0
    bar = tqdm(total=len(seqs), desc=desc, unit="req", dynamic_ncols=True)
    try:
        while llm.scheduler.has_work():
            llm.step()
            _sync(llm.device)
            running = llm.scheduler.running
            peak = max(peak, sum(1 for s in running if s.num_computed >= s.num_prompt_tokens))
            for s in seqs:
                if s.seq_id not in kv_bytes and s.output_token_ids:
                    kv_bytes[s.seq_id] = llm.method.kv_bytes(s)  # right after its first output token
            done = sum(1 for s in seqs if s.status == Status.FINISHED)
            bar.update(done - bar.n)
            bar.set_postfix(running=len(running), peak=peak,
                            preempted=llm.scheduler.num_preemptions - preempt0, refresh=False)
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    outputs = sum(len(s.output_token_ids) for s in seqs)
    if outputs != len(seqs) * decode_tokens:
        raise RuntimeError(f"{desc}: the engine produced {outputs} tokens, expected {len(seqs) * decode_tokens}")
    eos = set(llm.spec.eos_token_ids or ())
    records = []
    for s, r in zip(seqs, requests):
        ids = list(s.output_token_ids)
        cut = next((i for i, t in enumerate(ids) if t in eos), len(ids))
        records.append({"pred": tokenizer.decode(ids[:cut], skip_special_tokens=True), "needle": r["needle"],
                        "length": r["length"], "depth": r["depth"]})
    niah.score(records, None)  # the harness's scorer: sets each record's "score" (1 = needle found)
    spec, bps = llm.spec, llm.pool.bytes_per_slot
    vanilla = [len(r["prompt_ids"]) * spec.num_layers * spec.num_kv_heads * bps for r in requests]
    st = llm.kv_stats()
    mean_kv = sum(kv_bytes.values()) / len(kv_bytes)
    return {
        "kv_budget_bytes": st["kv_budget_bytes"],
        "wall_s": wall,
        "requests_per_min": 60.0 * len(seqs) / wall,
        "output_tok_s": outputs / wall,
        "peak_concurrent": peak,
        "preemptions": llm.scheduler.num_preemptions - preempt0,
        "kv_bytes_per_seq": int(round(mean_kv)),
        "kv_ratio_vs_vanilla": mean_kv / (sum(vanilla) / len(vanilla)),
        "slots_total": st["slots_total"],
        "slots_peak": st["slots_peak"],
        "latent_rows_capacity": st.get("latent_rows_capacity", "-"),
        "latent_rows_peak": st.get("latent_rows_peak", "-"),
        # DeltaKV reuse_reconstructed: tokens read from the caches, and caches reclaimed for room
        "cache_hits": st.get("reconstruct_cache_hits", "-"),
        "caches_dropped": st.get("reconstruct_caches_dropped", "-"),
        "niah_score": sum(r["score"] for r in records) / len(records),
        "_records": records,
    }


# ---------------------------------------------------------------------------------------------- bench
def bench_budget(path: Path, tok, spec, methods: list[str], knobs: dict, engine_knobs: dict, *, lengths: list[int],
                 decode_tokens: int, num_requests: int, vanilla_fit: float, match_bytes: str | None,
                 niah_seed: int, warmup: bool, out: Path, command: str) -> list[dict]:
    if spec is None:
        raise BenchConfigError(f"--workload budget needs the model's config.json to size the budget: {path}")
    if num_requests < 1:
        raise BenchConfigError(f"--num_requests must be >= 1, got {num_requests}")
    if not vanilla_fit > 0:
        raise BenchConfigError(f"--vanilla_fit must be > 0, got {vanilla_fit}")
    variants = parse_variants(methods, knobs)
    for v, base, vk in variants:
        try:
            check_methods([base], {base: vk}, spec)
        except BenchConfigError as e:
            raise BenchConfigError(f"{v}: {e}") from None
    ref = None
    if match_bytes:
        names = [v for v, b, _ in variants if b == "deltakv"]
        ref = names[0] if match_bytes in ("auto", True) and names else match_bytes
        if ref not in [v for v, _, _ in variants] or dict((v, b) for v, b, _ in variants)[ref] != "deltakv":
            raise BenchConfigError(f"--match_bytes {match_bytes}: needs a deltakv variant of --methods "
                                   f"(got {methods})")
        variants = [x for x in variants if x[0] == ref] + [x for x in variants if x[0] != ref]
    order = {v: i for i, v in enumerate(methods)}
    user_budget = engine_knobs.get("kv_cache_bytes")
    esize = dtype_bytes(engine_knobs, spec)
    bps = 2 * spec.head_dim * esize
    engine_knobs.setdefault("max_num_batched_tokens", 8192)

    rows: list[dict] = []
    notes: dict[int, list[str]] = {}
    env = ""

    def save():
        rows.sort(key=lambda r: (lengths.index(r["prompt_len"]), order[r["method"]]))
        text = [HOW_TO_READ.format(n=num_requests, decode=decode_tokens, fit=f"{vanilla_fit:g}")]
        text += [line for L in lengths for line in notes.get(L, [])]
        write_table([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows], BUDGET_COLUMNS, out,
                    "results_budget", command, env, "\n\n".join(text))

    for length in lengths:
        requests = niah_prompts(tok, length, num_requests, spec.vocab_size, niah_seed)
        plens = [len(r["prompt_ids"]) for r in requests]
        per_seq = max(plens) + decode_tokens
        knobs_len = dict(engine_knobs)
        knobs_len.setdefault("max_model_len", per_seq + 1)
        if user_budget is None:
            knobs_len["kv_cache_bytes"] = vanilla_fit_bytes(spec, esize, per_seq, vanilla_fit)
            how = (f"--vanilla_fit {vanilla_fit:g} x ({max(plens)} prompt + {decode_tokens} output tokens) x "
                   f"{spec.num_layers} layers x {spec.num_kv_heads} kv_heads x {spec.head_dim} head_dim x 2 x "
                   f"{esize} bytes")
        else:
            how = "--kv_cache_bytes"
        budget = knobs_len["kv_cache_bytes"]
        fits = budget / (bps * spec.num_layers * spec.num_kv_heads * per_seq)
        line = (f"L={length}: {num_requests} NIAH requests of {min(plens)}..{max(plens)} tokens (needle depths "
                f"{needle_depths(num_requests)[0]:g}..{needle_depths(num_requests)[-1]:g}%, seed {niah_seed}); "
                f"kv_cache_bytes = {budget} ({budget / 2**20:.1f} MiB) = {how}: vanilla fits {fits:.2f} sequences; "
                f"chunk_prefill_size {knobs_len.get('chunk_prefill_size')}.")
        print(f"[budget] {line}")
        notes[length] = [line]
        ref_bytes: float | None = None
        for v, base, vk in variants:
            vk = dict(vk)
            if ref and base in MATCHED and "budget" not in vk:
                if ref_bytes is None:
                    raise BenchConfigError(f"--match_bytes: {ref} has not run before {v}")
                cfg = _method_config(base, vk)
                vk["budget"] = matched_budget(ref_bytes, spec, bps, cfg.sink_size + cfg.window_size)
                notes[length].append(
                    f"L={length}, {v}: --match_bytes {ref}: budget = round({ref_bytes:.0f} bytes per sequence / "
                    f"({spec.num_layers} layers x {spec.num_kv_heads} kv_heads x {bps} bytes per slot)) = "
                    f"{vk['budget']} tokens per layer and KV head (pyramidkv: the mean over layers), at least "
                    "sink_size + window_size.")
            llm = _make_llm(path, base, tok, {base: vk}, knobs_len)
            if llm.pool.bytes_per_slot != bps:
                raise RuntimeError(f"bytes per slot {llm.pool.bytes_per_slot} != the {bps} the budget assumed")
            env = environment_line(llm.device, llm.dtype)
            if warmup:  # allocator / first-call costs out of the timing
                run_engine(llm, real_text_prompts(tok, min(64, min(plens)), 1, llm.spec.vocab_size), 2)
            try:
                res = run_budget(llm, requests, decode_tokens, tok, desc=f"{v} L={length}")
            finally:
                _free(llm)
            rows.append({"method": v, "knobs": _knob_text(vk) or "-", "prompt_len": length,
                         "num_requests": num_requests, **res})
            if v == ref:
                ref_bytes = res["kv_bytes_per_seq"]
            save()
    print_table([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows], BUDGET_COLUMNS,
                title="deltakv-bench --workload budget")
    print(f"results: {out / 'results_budget.md'} and {out / 'results_budget.csv'}")
    return rows


def _method_config(base: str, knobs: dict):
    from sparse_engine.cache.registry import METHODS
    from sparse_engine.config import engine_field_names

    fields = engine_field_names()
    return METHODS[base].make_config(**{k: v for k, v in knobs.items() if k not in fields})
