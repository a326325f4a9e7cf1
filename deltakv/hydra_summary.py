"""Hydra callback: after a ``-m`` sweep, gather each run's ``metrics.json`` into one table.

Writes ``<sweep dir>/summary.md`` and ``summary.csv`` and prints the table. Columns: the overrides
that differ between runs, then train loss first/last, perplexity true / reconstructed / ratio.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from hydra.experimental.callback import Callback


def collect(sweep_dir: Path) -> list[dict]:
    rows = []
    for mfile in sorted(sweep_dir.glob("*/metrics.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
        m = json.loads(mfile.read_text())
        ov_file = mfile.parent / ".hydra" / "overrides.yaml"
        overrides = []
        if ov_file.exists():
            import yaml

            overrides = yaml.safe_load(ov_file.read_text()) or []
        e, t = m.get("eval", {}), m.get("train", {})
        rows.append({
            "run": mfile.parent.name, "overrides": overrides,
            "loss_first": t.get("loss_first"), "loss_last": t.get("loss_last"),
            "ppl_true": e.get("ppl_true"), "ppl_recon": e.get("ppl_recon"), "ppl_ratio": e.get("ppl_ratio"),
            "rel_err_mean": e.get("rel_err_mean"),
        })
    return rows


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def write_summary(sweep_dir: Path) -> str:
    rows = collect(sweep_dir)
    if not rows:
        return ""
    common = set(rows[0]["overrides"]).intersection(*[set(r["overrides"]) for r in rows])
    cols = ["loss_first", "loss_last", "ppl_true", "ppl_recon", "ppl_ratio", "rel_err_mean"]
    lines = ["| run | overrides | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for r in rows:
        ov = " ".join(o for o in r["overrides"] if o not in common)
        lines.append(f"| {r['run']} | {ov} | " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    table = "\n".join(lines)
    (sweep_dir / "summary.md").write_text(f"# Sweep summary\n\nCommon overrides: {' '.join(sorted(common))}\n\n{table}\n")
    with (sweep_dir / "summary.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["run", "overrides"] + cols)
        w.writeheader()
        for r in rows:
            w.writerow({**r, "overrides": " ".join(r["overrides"])})
    return table


class MultirunSummary(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        table = write_summary(Path(config.hydra.sweep.dir))
        if table:
            print(f"\nSweep summary ({config.hydra.sweep.dir}/summary.md)\n{table}")
