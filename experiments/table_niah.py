"""NIAH table: retrieval heatmaps by method at a fixed KV budget, on the shipped model (CPU scale).

    python -m experiments.table_niah                       # small-scale (minutes on CPU)
    python -m experiments.table_niah --lengths 1024,2048,4096 --kv_budget 512 --model /models/Qwen2.5-7B-Instruct-1M
    python -m experiments.table_niah --preset ruler --lengths 4096,8192 --depths preset   # RULER's grid

Writes experiments/results/eval_niah.md (one row per method, per-length accuracy, KV %) and leaves
each run (predictions, summary, heatmap PNG) under runs/eval_tables/niah/.
"""

from __future__ import annotations

import fire

from benchmark.eval_runner import list_arg as _list
from experiments.method_table import DEFAULT_METHODS, command_flags, run_methods_table, table_methods


def main(lengths: str = "256,512,1024", depths: str = "0,25,50,75,100", kv_budget: int = 128,
         methods: str = ",".join(DEFAULT_METHODS), deltakv_path: str | None = None,
         method_overrides: str | None = None, model: str | None = None, results_root: str = "runs/eval_tables",
         out: str = "experiments/results/eval_niah.md", preset: str = "default"):
    """``--preset default|ruler|gkamradt`` (benchmark/niah); ``--depths preset`` takes the preset's grid;
    ``--deltakv_path`` the DeltaKV compressor (without it deltakv is skipped, with a note);
    ``--method_overrides 'kivi:method.bits=2,...'`` knobs of one method only."""
    run_methods, per_method, skip_notes = table_methods(methods, deltakv_path, method_overrides)
    lengths = _list(lengths, int)
    ov = [f"benchmark.preset={preset}", f"benchmark.context_lengths=[{','.join(map(str, lengths))}]"]
    if str(depths) != "preset":
        depths = ",".join(f"{d:g}" for d in _list(depths, float))
        ov.append(f"benchmark.depths=[{depths}]")
    if model:
        ov.append(f"model.path={model}")
    cmd = (f"python -m experiments.table_niah --preset {preset} --lengths {','.join(map(str, lengths))} "
           f"--depths {depths} --kv_budget {kv_budget}" + command_flags(methods, deltakv_path, method_overrides)
           + (f" --model {model}" if model else ""))
    notes = (f"NIAH preset: {preset}. Exact retrieval of a 7-digit needle from the shipped news text "
             "(benchmark/niah). KV % = bytes a "
             "request held at its end / full-cache bytes of the same tokens, averaged over requests. Heatmaps: "
             f"{results_root}/niah/<run>/niah_heatmap.png.")
    run_methods_table("niah", ov, run_methods, kv_budget=kv_budget, method_overrides=per_method,
                      results_root=results_root, out_md=out, title=f"NIAH ({preset} preset) by method",
                      command=cmd, notes=notes, skip_notes=skip_notes)


if __name__ == "__main__":
    fire.Fire(main)
