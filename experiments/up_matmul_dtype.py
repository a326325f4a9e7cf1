"""Ablation of DeltaKV's `up_matmul_dtype` (float32 = the reference, bf16 = ours): decode speed and
how far bf16 moves the output, next to how far DeltaKV itself moves it from vanilla.

    python -m experiments.up_matmul_dtype --deltakv_path runs/smoke/compressor --length 4096 --prompts 4 \
        --tokens 32 --threads 2 --out experiments/results/up_matmul_dtype

Runs the shipped model (or `--model`) on `--prompts` real-text windows of `--length` tokens, greedy,
as ONE batch per variant: vanilla, deltakv (float32 up), deltakv (bf16 up), same compressor and knobs.
Per variant: the mean decode step (steps where every sequence decodes, first one excluded) and, against
the float32 DeltaKV run (and against vanilla), the share of greedy tokens identical before the first
divergence and the largest |log-prob difference| of the chosen token over the shared prefix.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmark.throughput import environment_line, real_text_prompts
from sparse_engine import LLM, SamplingParams
from sparse_engine.shipped import shipped_model_dir


def run(llm: LLM, prompts: list[list[int]], tokens: int) -> tuple[list[list[int]], list[list[float]], float]:
    """Greedy outputs, the chosen tokens' log-probs and the mean decode step (ms) of one batch."""
    sp = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, logprobs=0)
    seqs = [llm.add_request(p, sp) for p in prompts]
    steps = []
    while llm.scheduler.has_work():
        decoding = all(s.output_token_ids for s in seqs)
        t = time.perf_counter()
        llm.step()
        if decoding:
            steps.append(time.perf_counter() - t)
    steps = steps[1:] or steps  # the first decode step carries first-use costs
    outs = [llm.output(s).outputs[0] for s in seqs]
    lps = [[d[t].logprob for t, d in zip(o.token_ids, o.logprobs)] for o in outs]
    return [list(o.token_ids) for o in outs], lps, 1000 * sum(steps) / max(1, len(steps))


def agreement(a: list[list[int]], la, b: list[list[int]], lb) -> tuple[float, float]:
    """(identical tokens before the first divergence / all tokens, max |dlogprob| on those prefixes)."""
    same = total = 0
    worst = 0.0
    for x, y, lx, ly in zip(a, b, la, lb):
        n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        same += n
        total += len(x)
        worst = max([worst] + [abs(p - q) for p, q in zip(lx[:n], ly[:n])])
    return same / max(1, total), worst


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--deltakv_path", required=True)
    ap.add_argument("--model", default=None, help="HF model dir (default: the shipped SmolLM2-135M)")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--knobs", default='{"latent_dtype": "int4", "num_top_tokens": 1024}',
                    help="DeltaKV knobs (JSON) shared by both dtypes")
    ap.add_argument("--out", default=None, help="write results.md / results.json here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = a.model or str(shipped_model_dir())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    prompts = real_text_prompts(tok, a.length, a.prompts, tok.vocab_size)
    knobs = json.loads(a.knobs)
    common = dict(tokenizer=tok, dtype="float32", kv_cache_bytes=4 * 2**30)
    variants = {"vanilla": dict(method="vanilla"),
                "deltakv, float32 up": dict(method="deltakv", deltakv_path=a.deltakv_path, **knobs),
                "deltakv, bf16 up": dict(method="deltakv", deltakv_path=a.deltakv_path, up_matmul_dtype="bf16", **knobs)}
    res = {}
    for name, kw in variants.items():
        res[name] = run(LLM(model, **common, **kw), prompts, a.tokens)
        print(f"{name}: decode step {res[name][2]:.1f} ms", flush=True)
    f32, van = res["deltakv, float32 up"], res["vanilla"]
    rows = []
    for name, (toks, lps, ms) in res.items():
        s32, d32 = agreement(toks, lps, f32[0], f32[1])
        sv, dv = agreement(toks, lps, van[0], van[1])
        rows.append(dict(variant=name, decode_step_ms=round(ms, 1), same_as_f32=round(s32, 3), max_dlogprob_vs_f32=round(d32, 4),
                         same_as_vanilla=round(sv, 3), max_dlogprob_vs_vanilla=round(dv, 4)))
    cmd = "python -m experiments.up_matmul_dtype " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    lines = [f"Command: `{cmd}`", "", environment_line(dtype="float32"), "",
             f"{a.prompts} real-text windows of {a.length} tokens, {a.tokens} greedy tokens, one batch; DeltaKV knobs {knobs}.",
             "same_as_*: greedy tokens identical before the first divergence / all tokens; max_dlogprob_*: largest "
             "|log-prob difference| of the chosen token on those shared prefixes.", "",
             "| variant | decode step ms | same as f32 DeltaKV | max dlogprob vs f32 | same as vanilla | max dlogprob vs vanilla |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['decode_step_ms']} | {r['same_as_f32']} | {r['max_dlogprob_vs_f32']} | "
              f"{r['same_as_vanilla']} | {r['max_dlogprob_vs_vanilla']} |" for r in rows]
    print("\n".join(lines))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text("\n".join(lines) + "\n")
        (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
