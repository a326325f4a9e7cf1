"""SCBench table: shared-context sessions by method (multi-turn and scdq modes).

    python -m experiments.table_scbench --data_dir /data/SCBench
    python -m experiments.table_scbench --fixtures          # pipeline check on CPU (not SCBench numbers)
"""

from __future__ import annotations

from pathlib import Path

import fire

from benchmark.eval_runner import TABLE_METHODS, list_arg as _list, run_table


def main(data_dir: str | None = None, fixtures: bool = False, tasks: str | None = None, mode: str = "multi_turn",
         kv_budget: int = 64, methods: str = ",".join(TABLE_METHODS), limit: int | None = None,
         gen_cap: int | None = None, max_turns: int | None = None, model: str | None = None,
         results_root: str = "runs/eval_tables", out: str | None = None, scoring: str = "official"):
    """``--scoring official`` (the published scorers, quirks included) or ``corrected``; the default task set
    and max_turns are the official runner's (benchmark/scbench)."""
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
           + f" --mode {mode} --scoring {scoring} --kv_budget {kv_budget} --methods {','.join(_list(methods))}"
           + (f" --tasks {tasks}" if tasks else "") + (f" --gen_cap {gen_cap}" if gen_cap else ""))
    notes = ("Scores averaged over turns (per-turn scores in each run's summary.json). Sessions go through "
             "backend.generate_session: with an engine that lacks session KV reuse the shared context is "
             "re-prefilled each turn (session_mode=reprefill in run.json). "
             + ("Fixture data: a pipeline check, not SCBench numbers." if fixtures else ""))
    run_table("scbench", ov, methods=_list(methods), kv_budget=kv_budget, results_root=f"{results_root}/{mode}",
              out_md=out or f"experiments/results/eval_scbench_{mode}.md", title=f"SCBench ({mode}) by method",
              command=cmd, notes=notes)


if __name__ == "__main__":
    fire.Fire(main)
