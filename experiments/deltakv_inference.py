"""DeltaKV inference on the shipped model: KV bytes at a 4K prompt and NIAH / greedy side by side.

One command -> `experiments/results/deltakv_inference.md` (+ `.json`):

    python -m experiments.deltakv_inference --deltakv_path outputs/deltakv_smoke/compressor

(the compressor of `deltakv-train +experiment=smoke output_dir=outputs/deltakv_smoke`).

1. KV bytes per sequence right after prefilling a 4096-token real-text prompt (the shipped news
   corpus): vanilla vs deltakv with bf16 / int8 / int4 latents, as a ratio to vanilla. The engine
   runs float32 on CPU; the table gives bytes for a bf16 pool (the paper's baseline: full-precision
   slots x 256 B + latent rows x row_bytes, counted from the same run) and as measured.
2. NIAH (one 7-digit needle in a ~4K haystack of real text, the project's `benchmark.niah`
   generator, chat template, greedy): accuracy per depth, greedy-output agreement with vanilla, for
   vanilla, snapkv and omnikv at the KV bytes of deltakv-int4 (snapkv: budget = those bytes / (layers
   x KV heads x slot bytes); omnikv: the same top-k read budget as deltakv - it evicts nothing, so its
   bytes stay vanilla's), and deltakv with each latent dtype.
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

BF16_SLOT = 2 * 64 * 2  # bytes of one (token, KV head, layer) slot in a bf16 pool at head_dim 64


def real_text(tokenizer, length: int) -> list[int]:
    from data_prepare.resources import shipped_articles

    ids = tokenizer.encode("\n\n".join(shipped_articles()[:120]))
    return ids[:length]


def niah_prompts(tokenizer, length: int, depths: list[float], seed: int = 0) -> list[dict]:
    from benchmark.niah import make_sample

    out = []
    for d in depths:
        s = make_sample(tokenizer, length, d, random.Random(f"{seed}/{length}/{d}/0"), use_chat=True)
        ids = tokenizer.encode(s["context"]) + tokenizer.encode(s["query"], add_special_tokens=False)
        out.append({"depth": d, "ids": ids, "value": s["value"]})
    return out


def prefill_bytes(llm: LLM, ids: list[int]) -> dict:
    """KV bytes of one sequence right after its prefill (measured, and for a bf16 pool)."""
    seq = llm.add_request(ids, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    while seq.num_computed < seq.num_prompt_tokens:
        llm.step()
    m = llm.method
    slots = sum(t.total() for t in seq.kv.tables)
    rows = m.latent_rows(seq) if hasattr(m, "latent_rows") else 0
    row_bytes = m.store.row_bytes if rows else 0
    out = {"measured": m.kv_bytes(seq), "bf16_pool": slots * BF16_SLOT + rows * row_bytes, "slots": slots,
           "latent_rows": rows, "row_bytes": row_bytes}
    while not seq.finished:
        llm.step()
    return out


def run_niah(llm: LLM, prompts: list[dict], max_tokens: int) -> list[dict]:
    res = []
    for p in prompts:
        seq = llm.add_request(p["ids"], SamplingParams(temperature=0.0, max_tokens=max_tokens))
        t0 = time.perf_counter()
        t1 = None
        while not seq.finished:
            llm.step()
            if t1 is None and seq.output_token_ids:
                t1 = time.perf_counter()
        n = len(seq.output_token_ids)
        text = llm.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
        res.append({"depth": p["depth"], "ok": p["value"] in text, "text": text, "tokens": list(seq.output_token_ids),
                    "ttft": t1 - t0, "tok_s": (n - 1) / (time.perf_counter() - t1) if n > 1 else float("nan")})
    return res


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--deltakv_path", default="outputs/deltakv_smoke/compressor")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--depths", default="0,25,50,75,100")
    ap.add_argument("--num_top_tokens", type=int, default=1024, help="deltakv / omnikv history tokens read")
    ap.add_argument("--recent_size", type=int, default=32)
    ap.add_argument("--dtypes", default="bf16,int8,int4")
    ap.add_argument("--max_tokens", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="experiments/results/deltakv_inference.md")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t_start = time.time()
    engine = dict(chunk_prefill_size=2048, kv_cache_bytes=1 << 30)
    dtypes = a.dtypes.split(",")
    depths = [float(d) for d in a.depths.split(",")]
    dkv = lambda dt: dict(deltakv_path=a.deltakv_path, latent_dtype=dt, num_top_tokens=a.num_top_tokens,  # noqa: E731
                          recent_size=a.recent_size)

    # ---- 1. KV bytes at a 4K prompt
    llm = LLM(None, **engine)
    tok = llm.tokenizer
    spec = llm.spec
    text_ids = real_text(tok, a.length)
    prompts = niah_prompts(tok, a.length, depths)
    bytes_rows = {"vanilla": prefill_bytes(llm, text_ids)}
    results = {"vanilla": run_niah(llm, prompts, a.max_tokens)}
    llm.close()
    ckpt_info = {}
    for dt in dtypes:
        llm = LLM(None, method="deltakv", **dkv(dt), **engine)
        comp = llm.method.compressor.config
        ckpt_info = {"layers": len(comp.layers), "full_attn_layers": sorted(llm.method.full),
                     "kv_compressed_size": comp.kv_compressed_size, "reference": comp.reference.to_dict()}
        bytes_rows[f"deltakv-{dt}"] = prefill_bytes(llm, text_ids)
        results[f"deltakv-{dt}"] = run_niah(llm, prompts, a.max_tokens)
        llm.close()
        print(f"deltakv-{dt}: {bytes_rows[f'deltakv-{dt}']} acc={[r['ok'] for r in results[f'deltakv-{dt}']]}", flush=True)

    # ---- 2. baselines at deltakv's bytes
    target = bytes_rows[f"deltakv-{dtypes[-1]}"]["bf16_pool"]
    budget = max(2 * a.recent_size, round(target / (spec.num_layers * spec.num_kv_heads * BF16_SLOT)))
    baselines = {
        f"snapkv (budget {budget})": ("snapkv", dict(budget=budget, window_size=a.recent_size, sink_size=4)),
        f"omnikv (top {a.num_top_tokens})": ("omnikv", dict(full_attn_layers=sorted(ckpt_info["full_attn_layers"]),
                                                           num_top_tokens=a.num_top_tokens, recent_size=a.recent_size,
                                                           sink_size=ckpt_info["reference"]["num_sinks"])),
    }
    for label, (method, knobs) in baselines.items():
        llm = LLM(None, method=method, **knobs, **engine)
        bytes_rows[label] = prefill_bytes(llm, text_ids)
        results[label] = run_niah(llm, prompts, a.max_tokens)
        llm.close()
        print(f"{label}: {bytes_rows[label]} acc={[r['ok'] for r in results[label]]}", flush=True)

    # ---- table
    van = bytes_rows["vanilla"]
    order = ["vanilla"] + list(baselines) + [f"deltakv-{dt}" for dt in dtypes]
    lines = [
        "# DeltaKV inference: KV bytes at a 4K prompt, NIAH and greedy output vs vanilla / snapkv / omnikv", "",
        "Regenerate with:", "", "```bash",
        # every parsed option, so the command rebuilds this file (and not the default --out) as it was run
        "python -m experiments.deltakv_inference " + " ".join(f"--{k} {v}" for k, v in vars(a).items()), "```", "",
        f"Model: shipped SmolLM2-135M-Instruct (30 layers, 3 KV heads, head_dim 64), float32 engine on CPU "
        f"({platform.machine()}, {torch.get_num_threads()} torch thread(s), shared loaded machine: times are indicative). "
        f"Compressor `{a.deltakv_path}`: {ckpt_info['layers']} compressed layers, full layers "
        f"{ckpt_info['full_attn_layers']}, latent {ckpt_info['kv_compressed_size']} of {spec.kv_width}, "
        f"reference {ckpt_info['reference']}. deltakv / omnikv read the top {a.num_top_tokens} history tokens "
        f"(selected by the observation layers, the last of each run of full layers) + sinks + the last {a.recent_size} tokens.", "",
        f"KV bytes = bytes per sequence right after prefilling a {len(text_ids)}-token real-text prompt. "
        "`bf16 pool` = full-precision slots x 256 B + latent rows x row bytes (the paper's bf16 baseline); "
        "`measured` = what this float32 run holds (slots x 512 B + rows). Row bytes = latent + per-token bf16 scale "
        "(int8/int4) + 4 int16 father-prototype ordinals. NIAH: exact 7-digit needle retrieval per depth; "
        "`= vanilla` = prompts whose greedy output equals vanilla's token for token.", "",
        "| method | KV bytes (bf16 pool) | ratio vs vanilla | KV bytes (measured, f32 pool) | ratio | latent row B | "
        + " | ".join(f"d{d:g}" for d in depths) + " | NIAH acc | = vanilla | decode tok/s |",
        "|---|---:|---:|---:|---:|---:|" + "---|" * len(depths) + "---:|---:|---:|",
    ]
    for name in order:
        b, res = bytes_rows[name], results[name]
        acc = 100 * sum(r["ok"] for r in res) / len(res)
        same = sum(r["tokens"] == v["tokens"] for r, v in zip(res, results["vanilla"]))
        cells = " | ".join("ok" if r["ok"] else "miss" for r in res)
        tps = sum(r["tok_s"] for r in res) / len(res)
        lines.append(f"| {name} | {b['bf16_pool']:,} | {b['bf16_pool'] / van['bf16_pool']:.1%} | {b['measured']:,} | "
                     f"{b['measured'] / van['measured']:.1%} | {b['row_bytes'] or '-'} | {cells} | {acc:.0f}% | "
                     f"{same}/{len(res)} | {tps:.1f} |")
    lines += ["", "omnikv keeps every token (logical masking): its bytes are vanilla's; it is matched on read budget.",
              "", "Greedy answers (per depth):", ""]
    for name in order:
        lines.append(f"- {name}: " + " / ".join(repr(r["text"].strip()) for r in results[name]))
    lines += ["", f"Wall time: {time.time() - t_start:.0f} s.", ""]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"bytes": bytes_rows, "niah": results, "args": vars(a)}, indent=1))
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main()
