"""SCBench table: shared-context sessions by method (multi-turn and scdq modes).

    python -m experiments.table_scbench --data_dir /data/SCBench
    python -m experiments.table_scbench --fixtures          # pipeline check on CPU (not SCBench numbers)
"""

from __future__ import annotations

from pathlib import Path

import fire

from benchmark.eval_runner import list_arg as _list
from experiments.method_table import DEFAULT_METHODS, command_flags, run_methods_table, table_methods


def main(data_dir: str | None = None, fixtures: bool = False, tasks: str | None = None, mode: str = "multi_turn",
         kv_budget: int = 64, methods: str = ",".join(DEFAULT_METHODS), deltakv_path: str | None = None,
         method_overrides: str | None = None, limit: int | None = None,
         gen_cap: int | None = None, max_turns: int | None = None, model: str | None = None,
         results_root: str = "runs/eval_tables", out: str | None = None, scoring: str = "official"):
    """``--scoring official`` (the published scorers, quirks included) or ``corrected``; the default task set
    and max_turns are the official runner's (benchmark/scbench); ``--deltakv_path`` the DeltaKV compressor
    (without it deltakv is skipped, with a note); ``--method_overrides 'kivi:method.bits=2'``."""
    run_methods, per_method, skip_notes = table_methods(methods, deltakv_path, method_overrides)
    tasks = ",".join(_list(tasks)) if tasks else tasks
    if fixtures:
        from benchmark.fixtures import write_scbench

        data_dir = str(write_scbench(Path(results_root) / "scbench_fixture_data"))
        tasks = tasks or "scbench_kv,scbench_qa_eng,scbench_choice_eng"
        gen_cap = gen_cap or 12
    if not data_dir:
        raise SystemExit("give --data_dir (official SCBench JSONL folder) or --fixtures")
    ov = [f"benchmark.data_dir={data_dir}", f"benchmark.mode={mode}", f"scbench.scoring={scoring}"]
    if tasks:
        ov.append(f"benchmark.tasks=[{tasks}]")
    for k, v in (("limit", limit), ("gen_cap", gen_cap), ("max_turns", max_turns)):
        if v:
            ov.append(f"benchmark.{k}={v}")
    if model:
        ov.append(f"model.path={model}")
    cmd = ("python -m experiments.table_scbench " + ("--fixtures" if fixtures else f"--data_dir {data_dir}")
           + f" --mode {mode} --scoring {scoring} --kv_budget {kv_budget}"
           + command_flags(methods, deltakv_path, method_overrides)
           + (f" --tasks {tasks}" if tasks else "") + (f" --gen_cap {gen_cap}" if gen_cap else "")
           + (f" --limit {limit}" if limit else "") + (f" --max_turns {max_turns}" if max_turns else "")
           + (f" --model {model}" if model else "") + (f" --out {out}" if out else ""))
    notes = ("Scores averaged over turns (per-turn scores in each run's summary.json). Sessions go through "
             "backend.generate_session: with an engine that lacks session KV reuse the shared context is "
             "re-prefilled each turn (session_mode=reprefill in run.json). "
             + ("Fixture data: a pipeline check, not SCBench numbers." if fixtures else ""))
    run_methods_table("scbench", ov, run_methods, kv_budget=kv_budget, method_overrides=per_method,
                      results_root=f"{results_root}/{mode}", out_md=out or f"experiments/results/eval_scbench_{mode}.md",
                      title=f"SCBench ({mode}, {scoring} scoring) by method", command=cmd, notes=notes,
                      skip_notes=skip_notes)


if __name__ == "__main__":
    fire.Fire(main)
