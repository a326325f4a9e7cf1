"""`deltakv-bench` end to end on a tiny model: rows, files, KV accounting and the HF comparison."""

from __future__ import annotations

import csv

from benchmark.throughput import bench, real_text_prompts


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
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert "| method |" in (tmp_path / "results.md").read_text()


def test_prompts_are_real_text_windows(shipped_model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shipped_model_path)
    prompts = real_text_prompts(tok, 300, 3, tok.vocab_size)
    assert all(len(p) == 300 for p in prompts)
    assert len({tuple(p) for p in prompts}) == 3
    assert all(len(set(p)) > 100 for p in prompts)  # not one repeated token
