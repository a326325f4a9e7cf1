"""`deltakv-bench --workload budget` on tiny models: the default budget formula, NIAH prompts, peak
concurrency under a 1.5-sequence budget, the NIAH score column, named variants, --match_bytes and the
results files."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmark.budget import (matched_budget, needle_depths, niah_prompts, parse_variants, vanilla_fit_bytes)
from benchmark.metrics import niah_score
from benchmark.throughput import BenchConfigError, bench, main, read_results_csv
from deltakv.checkpoint import save_compressor
from deltakv.testing import tiny_compressor

LEN, N, DECODE = 160, 3, 4
BYTES_PER_TOKEN = 4 * 2 * 16 * 2 * 4  # tiny llama: layers x kv_heads x head_dim x (K, V) x float32


_csv = read_results_csv  # the CSV reader users get (the first line is the command)


@pytest.fixture(scope="module")
def tiny(tiny_model_factory):
    return str(tiny_model_factory("llama"))


@pytest.fixture(scope="module")
def compressor_dir(tmp_path_factory):
    return str(save_compressor(tmp_path_factory.mktemp("budget_comp"), tiny_compressor(latent=16)))


@pytest.fixture(scope="module")
def tok(shipped_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shipped_model_path)


def _rows(rows):
    return {r["method"]: r for r in rows}


# ------------------------------------------------------------------ sizing
def test_default_budget_is_the_hand_computation():
    smol = SimpleNamespace(num_layers=30, num_kv_heads=3, head_dim=64)  # SmolLM2-135M
    assert vanilla_fit_bytes(smol, 4, 4096 + 32, 1.5) == 1.5 * 4128 * 30 * 3 * 64 * 2 * 4 == 285_327_360
    assert vanilla_fit_bytes(smol, 2, 1000, 2.0) == 2 * 1000 * 30 * 3 * 64 * 2 * 2
    # snapkv / pyramidkv budget at DeltaKV's bytes: bytes / (layers x kv_heads x bytes_per_slot)
    assert matched_budget(7_172_480, smol, 512, floor=36) == round(7_172_480 / (30 * 3 * 512)) == 156
    assert matched_budget(1000, smol, 512, floor=36) == 36


def test_niah_prompts_hold_their_needles(tok):
    reqs = niah_prompts(tok, 300, 4, tok.vocab_size, seed=3)
    assert [r["depth"] for r in reqs] == needle_depths(4) == [0.0, 33.33, 66.67, 100.0]
    assert len({r["needle"] for r in reqs}) == 4
    for r in reqs:
        assert abs(len(r["prompt_ids"]) - 300) <= 8
        text = tok.decode(r["prompt_ids"])
        assert r["needle"] in text and f"special magic number for {r['key']}" in text  # needle and question
    assert niah_prompts(tok, 300, 4, tok.vocab_size, seed=3) == reqs  # seeded
    assert niah_prompts(tok, 300, 4, tok.vocab_size, seed=4) != reqs


def test_variants_merge_knobs():
    knobs = {"deltakv": {"num_top_tokens": 8, "latent_dtype": "bf16"}, "deltakv:b": {"latent_dtype": "int4"}}
    v = parse_variants(["vanilla", "deltakv:a", "deltakv:b"], knobs)
    assert v == [("vanilla", "vanilla", {}), ("deltakv:a", "deltakv", {"num_top_tokens": 8, "latent_dtype": "bf16"}),
                 ("deltakv:b", "deltakv", {"num_top_tokens": 8, "latent_dtype": "int4"})]
    with pytest.raises(BenchConfigError, match="twice"):
        parse_variants(["deltakv", "deltakv"], {})
    with pytest.raises(BenchConfigError, match="not in --methods"):
        parse_variants(["deltakv:a"], {"deltakv:c": {}})


# ------------------------------------------------------------------ real runs
def test_budget_workload_end_to_end(tiny, compressor_dir, tok, tmp_path):
    """vanilla + deltakv, 3 requests, through the CLI: both files start with the exact command; the budget is
    the hand computation; vanilla never holds two sequences past prefill under 1.5 sequences of budget."""
    knobs = {"deltakv": {"deltakv_path": compressor_dir, "latent_dtype": "int4", "recent_size": 8}}
    argv = ["--workload", "budget", "--model", tiny, "--methods", "vanilla,deltakv", "--lengths", str(LEN),
            "--num_requests", str(N), "--decode_tokens", str(DECODE), "--method_knobs", json.dumps(knobs),
            "--out", str(tmp_path), "--no-warmup"]
    main(argv)
    first, table = _csv(tmp_path / "results_budget.csv")
    assert first.startswith("# python -m benchmark.throughput --workload budget") and "--num_requests 3" in first
    assert first.strip().endswith("--no-warmup")
    md = (tmp_path / "results_budget.md").read_text()
    assert md.splitlines()[0] == f"Command: `{first[2:].strip()}`" and "How to read" in md
    rows = _rows(table)
    assert list(rows) == ["vanilla", "deltakv"]
    van, dkv = rows["vanilla"], rows["deltakv"]
    longest = max(len(r["prompt_ids"]) for r in niah_prompts(tok, LEN, N, 256))  # the tiny model: the shipped tokenizer
    assert abs(longest - LEN) <= 8 and f"..{longest} tokens" in md
    budget = int(1.5 * (longest + DECODE) * BYTES_PER_TOKEN)
    assert int(van["kv_budget_bytes"]) == int(dkv["kv_budget_bytes"]) == budget
    assert int(van["peak_concurrent"]) == 1
    assert 1 <= int(dkv["peak_concurrent"]) <= N
    assert float(van["kv_ratio_vs_vanilla"]) == 1.0 and 0 < float(dkv["kv_ratio_vs_vanilla"]) < 1
    assert int(dkv["latent_rows_peak"]) > 0 and van["latent_rows_peak"] == "-"
    assert int(dkv["slots_peak"]) <= int(dkv["slots_total"]) and int(van["slots_peak"]) <= int(van["slots_total"])
    for r in rows.values():
        assert 0.0 <= float(r["niah_score"]) <= 1.0 and int(r["preemptions"]) >= 0
        assert float(r["requests_per_min"]) == pytest.approx(60 * N / float(r["wall_s"]), rel=1e-6)
        assert float(r["output_tok_s"]) == pytest.approx(N * DECODE / float(r["wall_s"]), rel=1e-6)


def test_peak_concurrency_and_niah_score_from_real_runs(tiny, tmp_path):
    """The same requests under 1.5 vs 3.5 sequences of vanilla budget: 1 vs all 3 past prefill at once;
    the score is the harness's scorer over those requests' answers."""
    common = dict(model=tiny, methods="vanilla", lengths=str(LEN), num_requests=N, decode_tokens=DECODE,
                  workload="budget", warmup=False)
    tight = bench(**common, out=str(tmp_path / "tight"), vanilla_fit=1.5)[0]
    roomy = bench(**common, out=str(tmp_path / "roomy"), vanilla_fit=3.5)[0]
    assert tight["peak_concurrent"] == 1 and roomy["peak_concurrent"] == N
    assert roomy["preemptions"] == 0 and roomy["kv_budget_bytes"] > tight["kv_budget_bytes"]
    for r in (tight, roomy):
        recs = r["_records"]
        assert len(recs) == N and all(len(x["needle"]) == 7 for x in recs)
        assert r["niah_score"] == sum(niah_score(x["pred"], x["needle"]) for x in recs) / N
        assert 0.0 <= r["niah_score"] <= 1.0
    assert [x["pred"] for x in tight["_records"]] == [x["pred"] for x in roomy["_records"]]  # greedy, same answers


def test_variants_and_match_bytes(tiny, compressor_dir, tmp_path):
    """deltakv twice (knobs keyed by variant); --match_bytes runs the named variant first and gives snapkv
    the budget of its bytes per sequence."""
    knobs = {"deltakv": {"deltakv_path": compressor_dir, "recent_size": 8}, "deltakv:int8": {"latent_dtype": "int8"},
             "deltakv:int4": {"latent_dtype": "int4"}}
    rows = _rows(bench(model=tiny, methods="snapkv,deltakv:int8,deltakv:int4", lengths=str(LEN), num_requests=2,
                       decode_tokens=DECODE, workload="budget", warmup=False, method_knobs=knobs,
                       match_bytes="deltakv:int4", out=str(tmp_path)))
    snap, d8, d4 = rows["snapkv"], rows["deltakv:int8"], rows["deltakv:int4"]
    assert d8["kv_bytes_per_seq"] > d4["kv_bytes_per_seq"] > 0
    b = round(d4["kv_bytes_per_seq"] / (4 * 2 * 128))
    assert snap["knobs"] == f"budget={b}" and snap["kv_bytes_per_seq"] == b * 4 * 2 * 128
    assert abs(snap["kv_bytes_per_seq"] / d4["kv_bytes_per_seq"] - 1) < 0.05
    _, table = _csv(tmp_path / "results_budget.csv")
    assert [t["method"] for t in table] == ["snapkv", "deltakv:int8", "deltakv:int4"]  # --methods order
    assert "--match_bytes deltakv:int4" in (tmp_path / "results_budget.md").read_text()
    with pytest.raises(BenchConfigError, match="deltakv variant"):
        bench(model=tiny, methods="vanilla,snapkv", lengths=str(LEN), workload="budget", match_bytes="auto",
              out=str(tmp_path))


def test_budget_options_and_errors(tiny, tmp_path):
    from benchmark.throughput import build_parser

    text = build_parser().format_help()
    for opt in ("--vanilla_fit", "--match_bytes", "--niah_seed", "budget"):
        assert opt in text, opt
    with pytest.raises(BenchConfigError, match="deltakv:int4: .*deltakv_path"):
        bench(model=tiny, methods="vanilla,deltakv:int4", workload="budget", out=str(tmp_path))
    with pytest.raises(BenchConfigError, match="drop --hf"):
        bench(model=tiny, methods="vanilla", workload="budget", hf=True, out=str(tmp_path))
