"""LongBench table: the 16 English tasks by method at ~29% of the KV cache.

    python -m experiments.table_longbench --data_dir /data/LongBench          # official data (GPU scale)
    python -m experiments.table_longbench --fixtures                           # pipeline check on CPU

The KV budget is ``kv_ratio`` x the mean prompt length of the selected samples, built and
middle-truncated exactly as the runs build them (the model config's official truncation length,
the run's max_model_len); the engine's budget is one number per run. Both are printed with the table. ``--fixtures`` writes a few tiny
samples in the official format into runs/ (NOT LongBench numbers: a check that the whole path,
official templates and metrics included, runs for every method).
"""

from __future__ import annotations

from pathlib import Path

import fire

from benchmark.eval_runner import compose, list_arg as _list
from experiments.method_table import DEFAULT_METHODS, command_flags, run_methods_table, table_methods


def run_max_model_len(cfg) -> int:
    """The max_model_len the run's backend will have: ``engine.max_model_len`` when set, else the
    model's ``max_position_embeddings`` (what sparse_engine.LLM and the HF backend default to)."""
    from transformers import AutoConfig

    from data_prepare.resources import resolve_model_path

    if cfg.get("engine") and cfg.engine.get("max_model_len"):
        return int(cfg.engine.max_model_len)
    model = cfg.model.get("path") if cfg.get("model") else None
    return int(AutoConfig.from_pretrained(resolve_model_path(model)).max_position_embeddings)


def prompt_stats(overrides: list[str]) -> tuple[float, list[int]]:
    """Mean prompt tokens of the selected samples, built and truncated exactly as the run will build
    them (same model config, same max_model_len), and the truncation lengths used."""
    from transformers import AutoTokenizer

    from benchmark.longbench import build_requests
    from data_prepare.resources import resolve_model_path

    cfg = compose(["benchmark=longbench", *overrides])
    model = cfg.model.get("path") if cfg.get("model") else None
    tok = AutoTokenizer.from_pretrained(resolve_model_path(model))
    reqs = build_requests(cfg.benchmark, tok, run_max_model_len(cfg))
    return sum(r.n_prompt_tokens for r in reqs) / len(reqs), sorted({r.meta["max_input_tokens"] for r in reqs})


def main(data_dir: str | None = None, fixtures: bool = False, tasks: str = "all", limit: int | None = None,
         kv_ratio: float = 0.29, min_budget: int = 40, methods: str = ",".join(DEFAULT_METHODS), deltakv_path: str | None = None,
         method_overrides: str | None = None, gen_cap: int | None = None,
         model: str | None = None, model_config: str | None = None, results_root: str = "runs/eval_tables",
         out: str = "experiments/results/eval_longbench.md"):
    """``--model_config`` names conf/model/<name>.yaml (its official LongBench truncation length comes
    with it, e.g. llama3_1_8b), ``--model`` the local folder (model.path); ``--deltakv_path`` the DeltaKV
    compressor (without it deltakv is skipped, with a note); ``--method_overrides 'kivi:method.bits=2'``."""
    run_methods, per_method, skip_notes = table_methods(methods, deltakv_path, method_overrides)
    tasks = tasks if tasks in (None, "all") else ",".join(_list(tasks))
    if fixtures:
        from benchmark.fixtures import write_longbench

        data_dir = str(write_longbench(Path(results_root) / "longbench_fixture_data"))
        tasks = "hotpotqa,trec,lcc" if tasks == "all" else tasks
        gen_cap = gen_cap or 16
    if not data_dir:
        raise SystemExit("give --data_dir (official LongBench JSONL folder) or --fixtures")
    ov = [f"benchmark.data_dir={data_dir}", f"benchmark.tasks=[{tasks}]" if tasks != "all" else "benchmark.tasks=all"]
    if limit:
        ov.append(f"benchmark.limit={limit}")
    if gen_cap:
        ov.append(f"benchmark.gen_cap={gen_cap}")
    if model_config:
        ov.append(f"model={model_config}")
    if model:
        ov.append(f"model.path={model}")
    mean_len, trunc = prompt_stats(ov)
    budget = max(min_budget, int(round(kv_ratio * mean_len)))
    cmd = ("python -m experiments.table_longbench " + ("--fixtures" if fixtures else f"--data_dir {data_dir}")
           + f" --tasks {tasks} --kv_ratio {kv_ratio}" + command_flags(methods, deltakv_path, method_overrides) + (f" --limit {limit}" if limit else "")
           + (f" --gen_cap {gen_cap}" if gen_cap else "")
           + (f" --model_config {model_config}" if model_config else "") + (f" --model {model}" if model else ""))
    notes = (f"kv_budget = max({min_budget}, {kv_ratio} x mean prompt length ({mean_len:.0f} tokens, prompts "
             f"middle-truncated to {'/'.join(map(str, trunc))} tokens as in the runs)) = {budget} "
             "(the floor keeps SnapKV's sink + observation window inside the budget). "
             + ("Fixture data (tiny official-format samples written by benchmark/fixtures.py): a pipeline check, "
                "not LongBench numbers." if fixtures else "Official LongBench v1 data."))
    run_methods_table("longbench", ov, run_methods, kv_budget=budget, method_overrides=per_method,
                      results_root=results_root, out_md=out, command=cmd, notes=notes, skip_notes=skip_notes,
                      title=f"LongBench by method at ~{round(100 * kv_ratio)}% KV (prompts truncated to "
                            f"{'/'.join(map(str, trunc))} tokens)")


if __name__ == "__main__":
    fire.Fire(main)
