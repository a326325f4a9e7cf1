"""KIVI next to DeltaKV at (about) the same KV bytes: a small NIAH on the shipped model (issue 15.5).

vanilla / kivi int4 / kivi int2 / deltakv int4 latents (a trained compressor, e.g. the smoke one),
one 7-digit needle in a haystack of real news text (`experiments.niah_methods.build_prompts`: the
project's NIAH generator, chat template), greedy, exact-match retrieval, at a few lengths and depths.
KV bytes per token: held right after prefill / prompt tokens, as measured (float32 pool on CPU) and
for a bf16 pool (full-precision slots x 256 B + KIVI blocks / latent rows at their stored bytes).

    python -m experiments.kivi_niah --deltakv_path runs/smoke/compressor
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from sparse_engine import LLM

from .niah_methods import build_prompts, run_one

BF16_SLOT = lambda llm: 2 * llm.spec.head_dim * 2  # noqa: E731 - bytes of one token of one KV head in bf16


def bf16_bytes(llm, seq) -> int:
    """What the sequence would hold in a bf16 pool (slot counts from this run)."""
    m, slot = llm.method, BF16_SLOT(llm)
    full = seq.kv.total() * slot
    if m.name == "kivi":
        st = seq.kv.state
        return full + st.blocks.shape[0] * st.blocks.shape[1] * -(-m.store.stored_bytes // slot) * slot
    if m.name == "deltakv":
        st = seq.kv.state.kivi  # full layers as KIVI blocks (full_layer_kv_quant_bits)
        blocks = 0 if st is None else st.blocks.shape[0] * st.blocks.shape[1] * \
            -(-m.full_kivi.store.stored_bytes // slot) * slot
        return full + m.latent_rows(seq) * m.store.row_bytes + blocks
    return full


def run(llm, ids, max_tokens):
    """run_one + the bf16-pool bytes right after prefill."""
    held = {}
    orig = llm.step

    def step():
        out = orig()
        for s in list(llm.scheduler.running):
            if "b" not in held and s.kv is not None and s.num_computed >= s.num_prompt_tokens:
                held["b"] = bf16_bytes(llm, s)
        return out

    llm.step = step
    try:
        r = run_one(llm, ids, max_tokens)
    finally:
        del llm.step
    r["bf16"] = held.get("b")
    return r


CONFIGS = {
    "vanilla": ("vanilla", {}),
    "kivi-int4": ("kivi", dict(bits=4, group_size=32, residual_length=32)),
    "kivi-int2": ("kivi", dict(bits=2, group_size=32, residual_length=32)),
    "deltakv-int4": ("deltakv", dict(latent_dtype="int4", num_top_tokens=1024, recent_size=32)),
    # + the full layers as KIVI int4 blocks (groups of 32, residual 32), the reference's latest engine
    "deltakv-int4-kivi4": ("deltakv", dict(latent_dtype="int4", num_top_tokens=1024, recent_size=32,
                                           full_layer_kv_quant_bits=4)),
}


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--deltakv_path", default="runs/smoke/compressor")
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument("--depths", default="0,50,100")
    ap.add_argument("--configs", default="vanilla,kivi-int4,kivi-int2,deltakv-int4")
    ap.add_argument("--max_tokens", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="experiments/results/kivi_niah.md")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    depths = [float(d) for d in a.depths.split(",")]
    rows = []
    for length in [int(x) for x in a.lengths.split(",")]:
        prompts = None
        for name in a.configs.split(","):
            method, knobs = CONFIGS[name]
            if method == "deltakv":
                knobs = dict(knobs, deltakv_path=a.deltakv_path)
            llm = LLM(None, method=method, dtype="float32", chunk_prefill_size=1024, kv_cache_bytes=1 << 30, **knobs)
            prompts = prompts or build_prompts(llm.tokenizer, length, depths)
            res = [run(llm, p["ids"], a.max_tokens) for p in prompts]
            toks = sum(len(p["ids"]) for p in prompts)
            row = dict(length=length, name=name, acc=[p["value"] in r["text"] for p, r in zip(prompts, res)],
                       bpt=sum(r["kv_bytes"] for r in res) / toks, bpt16=sum(r["bf16"] for r in res) / toks,
                       answers=[r["text"].strip() for r in res])
            rows.append(row)
            print(length, name, row["acc"], f"{row['bpt']:.0f} B/token (f32 pool), {row['bpt16']:.0f} B/token bf16",
                  row["answers"], flush=True)
            llm.close()
            write(rows, depths, a)
    return Path(a.out)


def write(rows, depths, a) -> None:
    van = {r["length"]: r for r in rows if r["name"] == "vanilla"}
    lines = ["# KIVI vs DeltaKV at about the same KV bytes: NIAH on the shipped model", "",
             f"Command: `python -m experiments.kivi_niah --deltakv_path {a.deltakv_path} --lengths {a.lengths} "
             f"--depths {a.depths} --configs {a.configs} --max_tokens {a.max_tokens}`", "",
             f"Model: shipped SmolLM2-135M-Instruct (30 layers, 3 KV heads x 64), float32 engine on CPU "
             f"({platform.machine()}, {a.threads} thread(s), shared machine), greedy, exact-match retrieval of a "
             "7-digit needle (`benchmark.niah`, chat template). KV bytes per prompt token, held right after prefill: "
             "as measured (float32 pool) and for a bf16 pool (full-precision slots x 256 B + KIVI blocks / DeltaKV "
             "latent rows at their stored bytes; vanilla bf16 = 23,040 B/token: 30 layers x 3 heads x 256 B). kivi: group 32, residual 32, no "
             "sinks (KIVI's defaults); deltakv: compressor `" + a.deltakv_path + "` (latent int4 + scale + father "
             "ids; full layers 0,1,2,8,18 at full precision), top 1024 history tokens read, recent 32.", "",
             "| length | config | " + " | ".join(f"depth {d:g}%" for d in depths)
             + " | accuracy | B/token (f32 pool) | B/token (bf16 pool) | vs vanilla bf16 |",
             "|---|---|" + "---|" * len(depths) + "---|---|---|---|"]
    for r in rows:
        v = van.get(r["length"])
        ratio = f"{100 * r['bpt16'] / v['bpt16']:.1f}%" if v else "-"
        cells = " | ".join("ok" if x else "miss" for x in r["acc"])
        lines.append(f"| {r['length']} | {r['name']} | {cells} | {sum(r['acc'])}/{len(r['acc'])} | {r['bpt']:,.0f} | "
                     f"{r['bpt16']:,.0f} | {ratio} |")
    lines += ["", "Answers:", ""] + [f"- {r['length']} {r['name']}: " + " / ".join(repr(t) for t in r["answers"])
                                     for r in rows]
    Path(a.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
