"""`deltakv-bench` on tiny models: rows, files, KV accounting, the per-step HF timer, the mixed workload,
the torch-op counter, option errors and `--help`."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

import torch

from benchmark.hf_timing import StepTimer, hf_decode_step, pad_left, run_hf_mixed, timed_generate
from benchmark.mixed import mixed_lengths, mixed_prompts
from benchmark.throughput import (BenchConfigError, bench, count_top_level_ops, engine_decode_ops, main,
                                  read_results_csv,
                                  real_text_prompts)

REPO = Path(__file__).resolve().parents[1]


_csv_rows = read_results_csv  # the CSV reader users get (the first line is the command)


@pytest.fixture(scope="module")
def tiny_hf(tiny_model_factory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama"), dtype=torch.float32).eval()


def test_bench_tiny_model_with_hf(tiny_model_factory, tmp_path):
    path = tiny_model_factory("llama")
    rows = bench(model=str(path), methods="vanilla", lengths="40,80", batch_sizes="1,2", decode_tokens=4,
                 hf=True, out=str(tmp_path), dtype="float32")
    assert [(r["prompt_len"], r["batch"]) for r in rows] == [(40, 1), (40, 2), (80, 1), (80, 2)]
    for r in rows:
        # measured right after prefill (the first sampled token is not cached yet): prompt tokens x 4 layers x 2 KV heads x 2 x 16 x 4 bytes
        assert r["kv_bytes_per_seq"] == r["prompt_len"] * 4 * 2 * 2 * 16 * 4
        assert r["decode_tok_s"] > 0 and r["hf_decode_tok_s"] > 0 and r["ttft_s"] > 0
        assert abs(r["decode_speedup_vs_hf"] - r["decode_tok_s"] / r["hf_decode_tok_s"]) < 1e-9
        # one prefill step for the whole batch, then decode_tokens - 1 steps of `batch` tokens each
        assert r["decode_tok_s"] == pytest.approx(r["batch"] * 1000 / r["decode_step_ms"], rel=1e-9)
        assert r["hf_decode_tok_s"] == pytest.approx(r["batch"] * 1000 / r["hf_decode_step_ms"], rel=1e-9)
        assert r["ttft_speedup_vs_hf"] == pytest.approx(r["hf_ttft_s"] / r["ttft_batch_s"], rel=1e-9)
    first, table = _csv_rows(tmp_path / "results.csv")
    assert first.startswith("# deltakv-bench ") and "--hf" in first and "--lengths 40,80" in first
    assert len(table) == 4 and float(table[0]["hf_decode_step_ms"]) > 0
    md = (tmp_path / "results.md").read_text()
    assert md.splitlines()[0] == f"Command: `{first[2:].strip()}`"
    assert "| method |" in md and "hf_decode_step_ms" in md


def test_fixed_workload_runs_variants_with_their_knobs(tiny_model_factory, tmp_path):
    """`snapkv,snapkv:b8`: the variant runs snapkv with its own knobs on top of the method's; its KV after
    a 60-token prompt is its budget x 4 layers x 2 KV heads slots (hand-counted), the method's 32."""
    path = tiny_model_factory("llama")
    rows = bench(model=str(path), methods="snapkv,snapkv:b8", lengths="60", batch_sizes="1", decode_tokens=3,
                 method_knobs={"snapkv": {"budget": 32, "window_size": 4}, "snapkv:b8": {"budget": 8}},
                 out=str(tmp_path), dtype="float32", warmup=False)
    slot = 2 * 16 * 4  # K and V of one head, float32
    assert [r["method"] for r in rows] == ["snapkv", "snapkv:b8"]
    assert [r["kv_bytes_per_seq"] for r in rows] == [32 * 4 * 2 * slot, 8 * 4 * 2 * slot]


def test_prompts_are_real_text_windows(shipped_model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shipped_model_path)
    prompts = real_text_prompts(tok, 300, 3, tok.vocab_size)
    assert all(len(p) == 300 for p in prompts)
    assert len({tuple(p) for p in prompts}) == 3
    assert all(len(set(p)) > 100 for p in prompts)  # not one repeated token


# ------------------------------------------------------------------ HF per-step timer
@pytest.mark.parametrize("lengths", [[24, 24], [30, 11, 19]])
def test_step_timer_one_stamp_per_generated_token(tiny_hf, lengths):
    """Inside ONE generate call the timer gets exactly decode_tokens stamps: as many as generated tokens and
    as forward passes (hand-counted with a hook), between the start stamp and the call's return."""
    decode_tokens = 7
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in lengths]
    forwards = []
    hook = tiny_hf.register_forward_hook(lambda *a: forwards.append(time.perf_counter()))
    try:
        timer = timed_generate(tiny_hf, prompts, decode_tokens, pad_id=0)
        after = time.perf_counter()
        ids, mask = pad_left(prompts, 0, "cpu")
        t2 = StepTimer()
        t2.start()
        out = tiny_hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=decode_tokens,
                               min_new_tokens=decode_tokens, pad_token_id=0, stopping_criteria=[t2])
    finally:
        hook.remove()
    generated = out.shape[1] - ids.shape[1]
    assert len(timer.stamps) == decode_tokens == generated == len(t2.stamps)
    assert len(forwards) == 2 * decode_tokens  # one forward per generated token, in each of the two calls
    # each stamp follows the forward of its token and precedes the next one
    for fwd, stamp, nxt in zip(forwards, timer.stamps, forwards[1:decode_tokens] + [after]):
        assert fwd <= stamp <= nxt
    assert timer.t0 < timer.stamps[0] and timer.stamps == sorted(timer.stamps)
    assert timer.ttft_s == timer.stamps[0] - timer.t0
    gaps = [b - a for a, b in zip(timer.stamps, timer.stamps[1:])]
    assert timer.step_s == pytest.approx(sum(gaps) / len(gaps))


def test_pad_left_masks_padding():
    ids, mask = pad_left([[5, 6, 7], [8]], pad_id=2, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [2, 2, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


# ------------------------------------------------------------------ mixed workload
def test_mixed_lengths_deterministic_and_in_bounds():
    a = mixed_lengths(500, 64, 2048, seed=3)
    assert a == mixed_lengths(500, 64, 2048, seed=3)
    assert a != mixed_lengths(500, 64, 2048, seed=4)
    assert len(a) == 500 and min(a) >= 64 and max(a) <= 2048
    assert len(set(a)) > 300  # spread over the range, not a constant
    assert set(mixed_lengths(200, 5, 6, seed=0)) == {5, 6}  # both ends are drawn
    assert mixed_lengths(32) == mixed_lengths(32, 64, 2048, 0)
    with pytest.raises(BenchConfigError, match="min_len"):
        mixed_lengths(4, 100, 50)


def test_mixed_prompts_are_real_text_of_the_drawn_lengths(shipped_model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shipped_model_path)
    lengths = mixed_lengths(6, 64, 700, seed=1)
    prompts = mixed_prompts(tok, lengths, tok.vocab_size)
    assert [len(p) for p in prompts] == lengths
    assert len({tuple(p[:64]) for p in prompts}) == 6 and all(len(set(p)) > 30 for p in prompts)


def test_hf_mixed_batches_and_padding(tiny_hf):
    lengths = [9, 20, 14, 5, 30]
    prompts = [[(7 * i + j) % 250 + 3 for j in range(n)] for i, n in enumerate(lengths)]
    res = run_hf_mixed(tiny_hf, prompts, decode_tokens=3, hf_batch=2, pad_id=0)
    # batches (9, 20) (14, 5) (30): padding 11 + 9 + 0
    assert res["pad_tokens"] == 20 and res["prompt_tokens"] == 78 and res["output_tokens"] == 15
    assert res["total_tok_s"] == pytest.approx(93 / res["wall_s"]) and 0 < res["mean_ttft_s"] < res["wall_s"]


def test_bench_mixed_workload(tiny_model_factory, tmp_path):
    path = tiny_model_factory("llama")
    rows = bench(model=str(path), methods="vanilla", decode_tokens=3, hf=True, out=str(tmp_path), dtype="float32",
                 workload="mixed", num_requests=5, min_len=20, max_len=70, hf_batch=2, warmup=False)
    lengths = mixed_lengths(5, 20, 70, 0)
    eng, hf = rows
    assert (eng["system"], hf["system"]) == ("engine", "hf")
    for r in rows:
        assert r["prompt_tokens"] == sum(lengths) and r["output_tokens"] == 15
        assert r["total_tok_s"] == pytest.approx((sum(lengths) + 15) / r["wall_s"])
    pads = sum(len(b) * max(b) - sum(b) for b in (lengths[0:2], lengths[2:4], lengths[4:]))
    assert hf["pad_tokens"] == pads and eng["pad_tokens"] == 0
    assert eng["total_speedup_vs_hf"] == pytest.approx(eng["total_tok_s"] / hf["total_tok_s"])
    first, table = _csv_rows(tmp_path / "results_mixed.csv")
    assert first.startswith("# deltakv-bench ") and "--workload mixed" in first and "--num_requests 5" in first
    assert [t["system"] for t in table] == ["engine", "hf"]
    assert (tmp_path / "results_mixed.md").read_text().startswith("Command: `deltakv-bench ")


# ------------------------------------------------------------------ op counter
def test_count_top_level_ops_counts_only_outer_ops():
    a, b = torch.randn(8, 8), torch.randn(8, 8)

    def fn():
        c = torch.add(a, b)
        with torch.profiler.record_function("annotated_block"):  # looked through, not counted
            c = torch.mm(c, b)
        return torch.nn.functional.linear(c, b)  # one top-level op with child ops

    n, names = count_top_level_ops(fn)
    assert n == 3 and names == {"aten::add": 1, "aten::mm": 1, "aten::linear": 1}
    n2, _ = count_top_level_ops(lambda: [torch.add(a, b) for _ in range(5)])
    assert n2 == 5


def test_engine_and_hf_decode_ops(tiny_model_factory, tiny_hf):
    from sparse_engine import LLM

    path = tiny_model_factory("llama")
    prompts = [[(5 * i + j) % 250 + 3 for j in range(40)] for i in range(2)]
    llm = LLM(str(path), dtype="float32", max_model_len=128, kv_cache_bytes=1 << 22)
    n1, names1 = engine_decode_ops(llm, prompts[:1])
    n2, _ = engine_decode_ops(llm, prompts)
    assert n1 > 4 * 4 and n2 > 4 * 4  # at least a few ops per layer
    assert sum(names1.values()) == n1 and not llm.scheduler.has_work()  # the requests ran to the end
    h, hnames = count_top_level_ops(hf_decode_step(tiny_hf, prompts))
    assert h > 4 * 4 and hnames["aten::linear"] >= 4 * 7  # q k v o gate up down per layer (+ lm head)


# ------------------------------------------------------------------ CLI
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_exits_zero_and_lists_options(flag):
    script = Path(sys.executable).parent / "deltakv-bench"
    cmd = [str(script), flag] if script.exists() else [sys.executable, "-m", "benchmark.throughput", flag]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for opt in ("--methods", "--method_knobs", "--workload", "--num_requests", "--hf_batch", "--ops", "--hf",
                "--decode_tokens", "--lengths", "--batch_sizes", "--threads", "--kv_cache_bytes", "deltakv"):
        assert opt in res.stdout, opt
    assert "Traceback" not in res.stderr


def test_missing_method_knob_is_one_clear_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--methods", "vanilla,deltakv", "--lengths", "32", "--out", "/nonexistent/never_written"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "deltakv_path" in err and "--method_knobs" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["--methods", "snapkv", "--method_knobs", '{"snapkv": {"budgte": 3}}'])
    assert "budgte" in capsys.readouterr().err
    with pytest.raises(BenchConfigError, match="Did you mean 'snapkv'"):
        bench(methods="snapky")


def test_interleaved_prints_one_row_per_variant(shipped_model_path, capsys):
    """`benchmark.interleaved` takes turns between engines; the baseline's ratio is 1 and the rows keep
    the variants' order (the tokens/s column is batch / median step)."""
    import json

    from benchmark import interleaved

    variants = {"base": ["vanilla", {}], "omni": ["omnikv", {"num_top_tokens": 8, "full_attn_layers": [0]}]}
    interleaved.main(["--model", str(shipped_model_path), "--length", "48", "--batch", "2", "--steps", "3",
                      "--warm", "1", "--threads", "1", "--variants", json.dumps(variants)])
    rows = [l.split("|")[1:-1] for l in capsys.readouterr().out.splitlines() if l.startswith("| ") and "---" not in l]
    assert [r[0].strip() for r in rows[1:]] == ["base", "omni"]
    assert rows[1][4].strip() == "1.000"
    for r in rows[1:]:
        assert abs(float(r[3]) - 1000 * 2 / float(r[1])) < 0.02 * float(r[3])


def test_interleaved_prefill_rounds(shipped_model_path, capsys):
    """`--prefill N` times whole-prompt prefills taking turns: one row per variant, tok/s = batch x
    length / median round."""
    import json

    from benchmark import interleaved

    variants = {"base": ["vanilla", {}], "omni": ["omnikv", {"num_top_tokens": 8, "full_attn_layers": [0]}]}
    interleaved.main(["--model", str(shipped_model_path), "--length", "40", "--batch", "2", "--prefill", "2",
                      "--chunk_prefill_size", "16", "--threads", "1", "--variants", json.dumps(variants)])
    out = capsys.readouterr().out
    assert "prefill of 2 x 40 tokens, 2 interleaved rounds" in out
    rows = [l.split("|")[1:-1] for l in out.splitlines() if l.startswith("| ") and "---" not in l]
    assert [r[0].strip() for r in rows[1:]] == ["base", "omni"] and rows[1][4].strip() == "1.000"
    for r in rows[1:]:  # the printed median is rounded to 1 ms, the rate to 1 token/s
        t, rate = float(r[1]), float(r[3])
        assert 2 * 40 / (t + 0.0005) - 0.5 <= rate <= 2 * 40 / max(t - 0.0005, 1e-9) + 0.5
