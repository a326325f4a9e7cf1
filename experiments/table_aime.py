"""AIME table: pass@1 over n samples by method (reasoning-length generation).

    python -m experiments.table_aime --data_path /data/aime_2024.jsonl --n_samples 8 --max_tokens 32768
    python -m experiments.table_aime --fixtures      # pipeline check on CPU (not AIME numbers)
"""

from __future__ import annotations

from pathlib import Path

import fire

from benchmark.eval_runner import list_arg as _list
from experiments.method_table import DEFAULT_METHODS, command_flags, run_methods_table, table_methods


def main(data_path: str | None = None, fixtures: bool = False, n_samples: int = 4, max_tokens: int = 32768,
         kv_budget: int = 2048, methods: str = ",".join(DEFAULT_METHODS), deltakv_path: str | None = None,
         method_overrides: str | None = None, limit: int | None = None,
         model: str | None = None, results_root: str = "runs/eval_tables", out: str = "experiments/results/eval_aime.md"):
    """``--deltakv_path`` the DeltaKV compressor (without it deltakv is skipped, with a note);
    ``--method_overrides 'kivi:method.bits=2'`` knobs of one method only."""
    run_methods, per_method, skip_notes = table_methods(methods, deltakv_path, method_overrides)
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
           + f" --n_samples {n_samples} --max_tokens {max_tokens} --kv_budget {kv_budget}"
           + (f" --limit {limit}" if limit else "") + command_flags(methods, deltakv_path, method_overrides)
           + (f" --model {model}" if model else ""))
    notes = ("pass@1 = mean over problems of correct/n (temperature 0.6, top_p 0.95, seeds 0..n-1); a sample is "
             "correct when the answer checker named above the table (math-verify by default) finds the answer. "
             + ("Fixture data: a pipeline check, not AIME numbers." if fixtures else ""))
    run_methods_table("aime", ov, run_methods, kv_budget=kv_budget, method_overrides=per_method,
                      results_root=results_root, out_md=out, title="AIME by method", command=cmd, notes=notes,
                      skip_notes=skip_notes)


if __name__ == "__main__":
    fire.Fire(main)
