"""The method list of a paper table, with the methods that need their own inputs (issue 15.8).

``benchmark.eval_runner.run_table`` gives every method the same overrides; DeltaKV also needs its
compressor (``method.deltakv_path``), and a method may need its own knobs (e.g. KIVI's bits). Here
each method gets its own extra Hydra overrides, the runs go through ``run_eval`` exactly as
``run_table`` runs them, and the markdown is the same layout: one comparison table (methods x score
x KV %), the KV-bytes table, the regenerate command, the setup lines (preset / scoring / truncation)
and the methods skipped with the reason.

    table_methods("vanilla,snapkv,deltakv", deltakv_path="runs/smoke/compressor", extra=["kivi:method.bits=4"])
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from benchmark import eval_runner as er

log = logging.getLogger("deltakv.eval.table")

# the default method list of experiments/table_*.py: vanilla, DeltaKV (needs --deltakv_path) and KIVI
# (quantization, no token budget) first, then every registered method a table runs with one shared
# kv_budget (a table cut short on a slow machine still has the rows it is about)
DEFAULT_METHODS = ("vanilla", "deltakv", "kivi", *(m for m in er.TABLE_METHODS if m != "vanilla"))


def table_methods(methods, deltakv_path: str | None = None, extra=()) -> tuple[list[str], dict, list[str]]:
    """``(methods to run, {method: [extra overrides]}, [skip notes])``. ``deltakv`` without a
    compressor path is skipped with a note (printed); ``extra`` items are ``"method:key=value"``."""
    methods = er.list_arg(methods)
    per_method: dict[str, list[str]] = {}
    notes = []
    for item in er.list_arg(extra) if extra else []:
        m, sep, ov = item.partition(":")
        if not sep or "=" not in ov:
            raise ValueError(f"--method_overrides item {item!r}: expected 'method:key=value' (e.g. kivi:method.bits=2)")
        per_method.setdefault(m.strip(), []).append(ov.strip())
    if "deltakv" in methods:
        if deltakv_path:
            if not (Path(deltakv_path) / "compressor_config.json").is_file():
                raise FileNotFoundError(f"--deltakv_path {deltakv_path}: no compressor_config.json there "
                                        "(deltakv-train writes <output_dir>/compressor)")
            per_method.setdefault("deltakv", []).append(f"method.deltakv_path={deltakv_path}")
        else:
            methods = [m for m in methods if m != "deltakv"]
            notes.append("deltakv skipped: no compressor given (--deltakv_path, e.g. runs/smoke/compressor from "
                         "`deltakv-train +experiment=smoke output_dir=runs/smoke`).")
            print(notes[-1])
    return methods, per_method, notes


def has_budget_knob(method: str) -> bool:
    """Whether ``kv_budget`` maps onto one of the method's knobs (vanilla and KIVI have none)."""
    if method == "vanilla":
        return False
    fields = er._method_fields(method) or er._conf_method_fields(method) or {}
    return any(k in fields for k in er._BUDGET_KNOBS)


def run_methods_table(benchmark: str, overrides: list[str], methods, kv_budget: int | None = None,
                      method_overrides: dict | None = None, results_root: str = "runs/eval_tables",
                      out_md: str | Path | None = None, title: str = "", command: str = "", notes: str = "",
                      skip_notes=(), backend: str = "engine") -> str:
    """``run_table`` with extra overrides per method (``method_overrides[m]``). Methods the engine's
    registry lacks are listed as skipped, a method whose run raises is listed with its error (the
    other rows are still written). Returns the markdown (also written to ``out_md``)."""
    method_overrides = method_overrides or {}
    known = set(er.available_methods())
    ran, skipped, failed = [], [], []
    for m in er.list_arg(methods):
        if backend == "engine" and known and m not in known:
            skipped.append(m)
            continue
        pick = f"method={m}" if (er.CONF_DIR / "method" / f"{m}.yaml").is_file() else f"method.name={m}"
        ov = [f"benchmark={benchmark}", f"backend={backend}", pick, f"results_root={results_root}",
              "print_table=false", *overrides, *method_overrides.get(m, [])]
        if kv_budget is not None and has_budget_knob(m):
            ov.append(f"kv_budget={kv_budget}")
        t0 = time.time()
        try:
            s = er.run_eval(er.compose(ov))
        except Exception as exc:  # noqa: BLE001 - one method's failure is a line of the table, not a lost table
            log.exception("%s/%s failed", benchmark, m)
            failed.append(f"{m} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            continue
        log.info("%s/%s: average %s (%.0fs)", benchmark, m, s["result"].get("average"), time.time() - t0)
        ran.append(s)
    unbudgeted = [m for m in er.list_arg(methods) if m in known and m != "vanilla" and not has_budget_knob(m)]
    if kv_budget is not None and unbudgeted:  # e.g. kivi: its bytes come from its bit width, not a token count
        skip_notes = [*skip_notes, f"kv_budget not applied to {', '.join(unbudgeted)} (no token-budget knob: "
                      "its KV bytes come from its own knobs, see the KV bytes table)."]
    text = table_markdown(ran, benchmark, kv_budget, results_root, out_md, title, command, notes,
                          [f"{', '.join(skipped)} skipped: not in the engine's method registry "
                           "(sparse_engine/cache/registry.py) yet."] if skipped else [], [*skip_notes, *failed], backend)
    if out_md:
        Path(out_md).parent.mkdir(parents=True, exist_ok=True)
        Path(out_md).write_text(text)
    return text


def table_markdown(rows: list[dict], benchmark: str, kv_budget, results_root: str, out_md, title: str,
                   command: str, notes: str, skipped: list[str], skip_notes, backend: str) -> str:
    """The table file: command, model / budget / git line, comparison table (with the harnesses'
    setup lines above it), KV bytes per run, skipped methods, notes, heatmaps."""
    tmp = Path(results_root) / f".table_{benchmark}"  # comparison_table reads one folder of summaries
    if tmp.exists():
        shutil.rmtree(tmp)
    for i, s in enumerate(rows):  # numbered: keeps the table in the order the methods were given
        (tmp / f"{i:02d}").mkdir(parents=True, exist_ok=True)
        (tmp / f"{i:02d}" / "summary.json").write_text(json.dumps(s, default=str))
    table = er.comparison_table(tmp, None)
    kv = "\n".join(f"| {s['label']} | {s['method']} | {s['result'].get('kv', {}).get('kv_bytes_mean', '-')} | "
                   f"{s['kv_stats'].get('bytes_per_token', '-')} | {s['n_records']} | {s.get('n_generated_now', '-')} | "
                   f"{s['wall_s']:.0f} |" for s in rows)
    md = [f"# {title or benchmark}", ""]
    if command:
        md += ["Regenerate with:", "", "```bash", command, "```", ""]
    md += [f"Model: {rows[0]['model'] if rows else '-'}; backend: {backend}; kv_budget: {kv_budget}; "
           f"generated {time.strftime('%Y-%m-%d %H:%M')} (git {er._git_commit()}).", ""]
    md += [table, ""]
    # a resumed run's wall time is that of its last invocation, which only generated what was missing
    md += ["| run | method | mean KV bytes per request (at its end) | full-KV bytes per token | records | "
           "generated in the last invocation | its wall s |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |", kv, ""]
    for line in [*skipped, *skip_notes]:
        md += [line, ""]
    if notes:
        md += [notes, ""]
    if out_md:  # keep the run's pictures (NIAH heatmaps) beside the table
        for s in rows:
            for key, path in (s.get("artifacts") or {}).items():
                if Path(path).is_file():
                    dest = Path(out_md).parent / f"{Path(out_md).stem}_{s['method']}{Path(path).suffix}"
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, dest)
                    md.append(f"![{s['label']} {key}]({dest.name})")
        md.append("")
    er.print_markdown_table(table, title or benchmark)
    return "\n".join(md)


def command_flags(methods, deltakv_path: str | None, method_overrides) -> str:
    """The ``--methods / --deltakv_path / --method_overrides`` part of a table's regenerate command."""
    flags = f" --methods {','.join(er.list_arg(methods))}"
    if deltakv_path:
        flags += f" --deltakv_path {deltakv_path}"
    if method_overrides:
        flags += f" --method_overrides '{','.join(er.list_arg(method_overrides))}'"
    return flags
