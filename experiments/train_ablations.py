"""Training ablations for the shipped SmolLM2-135M: PCA vs trained, with vs without reference.

    python experiments/train_ablations.py                 # all runs (~30 min on 2 CPU cores)
    python experiments/train_ablations.py --only pca_noref,pca_ref
    python experiments/train_ablations.py --only "" --ood smoke=runs/smoke/compressor   # OOD fidelity only

Each run is one ``deltakv-train +experiment=smoke ...`` command (printed and recorded); the held-out
perplexities on true vs reconstructed KV are collected into
``experiments/results/train_ablations.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RUNS: dict[str, tuple[str, list[str]]] = {
    "pca_noref": ("closed-form PCA, no reference (low-rank KV)", ["compressor=pca", "compressor.reference.kind=none"]),
    "pca_ref": ("closed-form PCA of the residual to the cluster_e2e reference", ["compressor=pca"]),
    "trained_noref": ("PCA init + end-to-end training, no reference", ["compressor.reference.kind=none"]),
    "trained_ref": ("PCA init + end-to-end training, cluster_e2e reference (= smoke)", []),
    "trained_swiglu_ref": ("SwiGLU down (PCA skip) + training, cluster_e2e reference", ["compressor=deltakv"]),
    # issue 15.2: the reference's recipe on the smoke geometry (same data, steps, lr, latent, stride)
    "reference_recipe": ("the reference's recipe: every layer compressed, random init, prototypes rebuilt in "
                         "training, MSE over all tokens vs a separate uncompressed pass",
                         ["model.full_attn_layers=[]", "compressor.init=random", "compressor.reference.stride_rounding=floor",
                          "loss.mse_target=separate_pass", "loss.mse_tokens=all", "loss.reconstruct_prototypes=true"]),
    "reference_loss_pca": ("the reference's loss only (prototypes rebuilt, all-token MSE vs a separate pass) with our "
                           "PCA init and full layers", ["loss.mse_target=separate_pass", "loss.mse_tokens=all",
                                                        "loss.reconstruct_prototypes=true"]),
}


def run(name: str, extra: list[str], out_root: Path, common: list[str] = ()) -> dict:
    out = out_root / name
    shown = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    cmd = ["deltakv-train", "+experiment=smoke", *extra, *common, f"hydra.run.dir={shown}", "trainer.disable_tqdm=true"]
    print("$", " ".join(cmd), flush=True)
    t = time.time()
    proc = subprocess.run([sys.executable, "-m", "deltakv.train", *cmd[1:]], cwd=ROOT, text=True,
                          capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["wall_s"] = round(time.time() - t, 1)
    metrics["load_avg_15min_at_end"] = round(os.getloadavg()[2], 1)  # the CPU is shared: wall times need context
    metrics["command"] = " ".join(cmd)
    return metrics


def table(results: dict[str, dict]) -> str:
    lines = ["| run | what | ppl true | ppl recon | ratio | rel. KV error | OOD KL (nats) | OOD top-1 | loss first -> last "
             "| wall s (15-min load avg) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in results.items():
        e, t, o = m["eval"], m["train"], m.get("eval_ood")
        loss = f"{t['loss_first']:.3f} -> {t['loss_last']:.3f}" if t.get("loss_first") is not None else "-"
        ood = f"{o['kl_mean']:.4f} | {o['top1_agree']:.3f}" if o else "- | -"
        lines.append(f"| {name} | {RUNS[name][0]} | {e['ppl_true']:.2f} | {e['ppl_recon']:.2f} | "
                     f"x{e['ppl_ratio']:.3f} | {e['rel_err_mean']:.3f} | {ood} | {loss} | {m['wall_s']} "
                     f"({m.get('load_avg_15min_at_end', '?')}) |")
    return "\n".join(lines)


def ood_table(ood: dict[str, dict]) -> str:
    """Out-of-domain fidelity (``deltakv.evaluate.ood_fidelity_of_checkpoint``) of saved compressors."""
    lines = ["| compressor | checkpoint | OOD KL(true \\|\\| recon) nats/token | OOD top-1 agreement | OOD ppl true | "
             "OOD ppl recon | tokens |", "|---|---|---|---|---|---|---|"]
    for name, o in ood.items():
        lines.append(f"| {name} | `{o['checkpoint']}` | {o['kl_mean']:.4f} | {o['top1_agree']:.3f} | {o['ppl_true']:.2f} | "
                     f"{o['ppl_recon']:.2f} | {o['tokens']} |")
    return "\n".join(lines)


def measure_ood(specs: str) -> dict[str, dict]:
    """``name=checkpoint,...`` -> out-of-domain KL / top-1 of each (the metric of ``deltakv.evaluate``)."""
    from deltakv.evaluate import ood_fidelity_of_checkpoint

    out = {}
    for spec in filter(None, specs.split(",")):
        name, _, path = spec.partition("=")
        print(f"[ood] {name}: {path}", flush=True)
        m = ood_fidelity_of_checkpoint(ROOT / path)
        out[name] = {**{k: v for k, v in m.items() if k != "sources"}, "checkpoint": path}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(RUNS))
    ap.add_argument("--out-root", default=str(ROOT / "outputs" / "ablations"))
    ap.add_argument("--results", default=str(ROOT / "experiments" / "results" / "train_ablations"))
    ap.add_argument("--merge", default="", help="comma-separated result .json files (from parallel invocations) to "
                    "fold into --results before writing the table")
    ap.add_argument("--extra", default="", help="overrides added to every run's command, space-separated (e.g. "
                    "'trainer.max_steps=12 eval.max_sequences=4' on a loaded machine); recorded in each command")
    ap.add_argument("--ood", default="", help="name=checkpoint,... : also measure the out-of-domain KL / top-1 of "
                    "these saved compressors (paths relative to the repo)")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; choose from {list(RUNS)}")
    results_json = Path(args.results).with_suffix(".json")
    results = json.loads(results_json.read_text()) if results_json.exists() else {}
    for extra in filter(None, args.merge.split(",")):
        results.update(json.loads(Path(extra).read_text()))
    ood = {**results.get("_ood", {}), **measure_ood(args.ood)}
    results = {n: results[n] for n in RUNS if n in results}
    for name in names:
        results[name] = run(name, RUNS[name][1], Path(args.out_root), args.extra.split())
        results = {n: results[n] for n in RUNS if n in results}
        results_json.write_text(json.dumps(results, indent=2, default=str))
        print(table({name: results[name]}).splitlines()[-1], flush=True)
    results_json.write_text(json.dumps({**results, "_ood": ood} if ood else results, indent=2, default=str))
    md = ["# DeltaKV training ablations (SmolLM2-135M, shipped news text, CPU)", "",
          "The current smoke config (`conf/experiment/smoke.yaml`): latent 128 of the joined KV width 384 (1/3); "
          "layers 0, 1, 2, 8, 18 full, 25 compressed; 16 sinks + every 32nd token exact; 512-token sequences; "
          "held-out perplexity over the validation split (articles never trained on). The same table for the "
          "earlier config (layers 0-2 full, every 10th token exact) is `train_ablations_stride10.md`. "
          "`reference_recipe` (issue 15.2) is the reference's training recipe (`conf/experiment/qwen7b_c512.yaml`'s "
          "loss and compressor rules) on this same geometry, data, step count and learning rate, so the two recipes "
          "sit side by side; rows measured at different times on a shared machine: compare wall times with the load "
          "column. Produced by `python experiments/train_ablations.py`; commands:", ""]
    md += [f"- `{name}`: `{m['command']}`" for name, m in results.items()]
    md += ["", table(results), ""]
    if ood:
        md += ["## Out-of-domain fidelity (Python stdlib source, `deltakv.evaluate.ood_fidelity`)", "",
               "KL(p_true || p_recon) of the next-token distributions and top-1 agreement on text of another domain "
               "than the training data (4096 tokens in 512-token sequences), per saved compressor. Regenerate: "
               "`python experiments/train_ablations.py --only \"\" --ood " +
               ",".join(f"{n}={o['checkpoint']}" for n, o in ood.items()) + "`", "", ood_table(ood), ""]
    Path(args.results).with_suffix(".md").write_text("\n".join(md))
    print("\n" + table(results))


if __name__ == "__main__":
    main()
