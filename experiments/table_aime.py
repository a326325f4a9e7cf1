"""AIME table: pass@1 over n samples by method (reasoning-length generation).

    python -m experiments.table_aime --data_path /data/aime_2024.jsonl --n_samples 8 --max_tokens 32768
    python -m experiments.table_aime --fixtures      # pipeline check on CPU (not AIME numbers)
"""

from __future__ import annotations

from pathlib import Path

import fire

from benchmark.eval_runner import TABLE_METHODS, list_arg as _list, run_table


def main(data_path: str | None = None, fixtures: bool = False, n_samples: int = 4, max_tokens: int = 32768,
         kv_budget: int = 2048, methods: str = ",".join(TABLE_METHODS), limit: int | None = None,
         model: str | None = None, results_root: str = "runs/eval_tables", out: str = "experiments/results/eval_aime.md"):
    if fixtures:
        from benchmark.fixtures import write_aime

        data_path = str(write_aime(Path(results_root) / "aime_fixture_data" / "aime.jsonl"))
        max_tokens = min(max_tokens, 48)
    if not data_path:
        raise SystemExit("give --data_path (AIME JSONL/parquet with problem + answer) or --fixtures")
    ov = [f"benchmark.data_path={data_path}", f"benchmark.n_samples={n_samples}", f"benchmark.max_tokens={max_tokens}"]
    if limit:
        ov.append(f"benchmark.limit={limit}")
    if model:
        ov.append(f"model.path={model}")
    cmd = ("python -m experiments.table_aime " + ("--fixtures" if fixtures else f"--data_path {data_path}")
           + f" --n_samples {n_samples} --max_tokens {max_tokens} --kv_budget {kv_budget} --methods {','.join(_list(methods))}")
    notes = ("pass@1 = mean over problems of correct/n (temperature 0.6, top_p 0.95, seeds 0..n-1); a sample is "
             "correct when its last \\boxed{} equals the answer after normalisation. "
             + ("Fixture data: a pipeline check, not AIME numbers." if fixtures else ""))
    run_table("aime", ov, methods=_list(methods), kv_budget=kv_budget, results_root=results_root, out_md=out,
              title="AIME by method", command=cmd, notes=notes)


if __name__ == "__main__":
    fire.Fire(main)
