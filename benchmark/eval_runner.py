"""``deltakv-eval``: run a benchmark through sparse_engine (or HF transformers) and score it.

    deltakv-eval benchmark=niah method=snapkv method.budget=128
    deltakv-eval benchmark=longbench benchmark.data_dir=/data/LongBench backend=hf
    deltakv-eval -m benchmark=niah method=vanilla,snapkv,pyramidkv,omnikv,streaming,deltakv

    deltakv-eval benchmark=niah method=snapkv shard=0/2 &  deltakv-eval benchmark=niah method=snapkv shard=1/2

Config: ``conf/eval.yaml`` with the groups ``benchmark`` / ``method`` / ``model``. A run's folder is
``<results_root>/<benchmark>/<method>-<8-hex hash of its settings>`` (``run_name`` / ``output_dir``
override it; a run started under the older ``<backend>-<method>[-knobs]-<query_mode>`` name is
resumed there). One run at a time per folder: a second one fails at once naming the holder
(``benchmark/eval_lock.py``). ``shard=i/n`` splits a run over processes (``benchmark/eval_shards.py``).
Each run writes, under its output directory:

* ``predictions.jsonl``: one record per generation, appended as requests finish (each append one
  ``os.write`` of whole lines); a killed run started again with the same command resumes after the
  last finished request (a torn last line is dropped);
* ``run.json``: what ran (benchmark settings, method and knobs, backend, model, query mode, session
  mode, versions; the settings hash, the Hydra overrides and the full config); a resume with
  different settings is refused unless ``overwrite=true``;
* ``summary.json`` + ``summary.md``: the scores; NIAH also writes ``niah_heatmap.png``;
* ``../comparison.md``: one table over every run of the same benchmark beside it (a multirun over
  methods thus yields one comparison table).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmark.backends import Backend, GenOutput, Request, make_backend
from benchmark.eval_lock import OutputDirLock, OutputDirLocked, append_lines, write_atomic

log = logging.getLogger("deltakv.eval")

HARNESSES = {
    "longbench": "benchmark.longbench",
    "scbench": "benchmark.scbench",
    "aime": "benchmark.aime",
    "niah": "benchmark.niah",
}
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


# ------------------------------------------------------------------------------------------------
# config helpers
# ------------------------------------------------------------------------------------------------
def _plain(x):
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(x, (DictConfig, ListConfig)):
            return OmegaConf.to_container(x, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return x


def harness_module(bcfg):
    kind = bcfg.get("harness") or bcfg.get("name")
    if kind not in HARNESSES:
        raise unknown_name("benchmark harness", kind, list(HARNESSES))
    return importlib.import_module(HARNESSES[kind])


# ------------------------------------------------------------------------------------------------
# validation: every name is checked before any work (no silent fallback to another method / model)
# ------------------------------------------------------------------------------------------------
class ConfigError(ValueError):
    """A name or value of the eval config that does not exist / is not allowed."""


def closest_name(value, valid) -> str | None:
    """The valid name most similar to ``value`` (difflib ratio), whatever the similarity."""
    import difflib

    valid = [str(v) for v in valid]
    if not valid:
        return None
    return max(valid, key=lambda v: (difflib.SequenceMatcher(None, str(value).lower(), v.lower()).ratio(), -len(v)))


def unknown_name(kind: str, value, valid, hint: str = "") -> ConfigError:
    valid = sorted({str(v) for v in valid})
    close = closest_name(value, valid)
    msg = f"unknown {kind} {value!r}. Valid: {', '.join(valid)}."
    if close is not None:
        msg += f" Closest: {close!r}{f' ({hint}{close})' if hint else ''}."
    return ConfigError(msg)


def group_options(group: str) -> list[str]:
    """Names of a config group: the ``conf/<group>/*.yaml`` files."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def config_groups() -> list[str]:
    return sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and any(p.glob("*.yaml")))


def known_methods(with_engine: bool = True) -> list[str]:
    """Method names: the method configs in conf/method plus the engine's registry (when it imports)."""
    names = set(group_options("method"))
    if with_engine:
        names |= set(available_methods())
    return sorted(names)


_KV_BUDGET_HELP = ("a positive whole number of tokens kept per layer and KV head (e.g. kv_budget=128), "
                   "or null for the method's own budget")


def check_kv_budget(value) -> int | None:
    """``kv_budget`` as an int, or None; anything else (0.2, 0, -5, 'abc', true) is refused."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"kv_budget must be {_KV_BUDGET_HELP}; got {value!r}")
    return int(value)


_CHOICES = {"backend": ("engine", "hf"), "query_mode": ("aware", "agnostic")}
_CLI_CHOICES = {**_CHOICES, "scbench.scoring": ("official", "corrected"),
                "benchmark.scoring": ("official", "corrected")}


def check_method_name(name) -> str:
    if name in group_options("method"):
        return name
    names = known_methods()
    if name not in names:
        raise unknown_name("method", name, names, hint="method=")
    return name


def _check_model(cfg) -> None:
    ref = model_ref(cfg)
    if ref is None or ref == "???":
        if ref == "???":
            raise ConfigError("model.path is not set: this model config needs model.path=/local/hf/folder")
        return
    from data_prepare.resources import MODEL_ALIASES

    if ref in MODEL_ALIASES:
        return
    path = Path(ref).expanduser()
    if not path.is_dir():
        raise ConfigError(f"model {ref!r} is neither a local folder nor a shipped model name "
                          f"({', '.join(sorted(MODEL_ALIASES))}); closest name: {closest_name(ref, MODEL_ALIASES)!r}")
    if not (path / "config.json").is_file():
        raise ConfigError(f"model folder {path} has no config.json; point model.path to a HF model folder")


def preflight(cfg, harness=None, check_model: bool = True) -> tuple[str, dict]:
    """Validate a composed eval config before any folder is made or model loaded: backend, query
    mode, method name (+ the HF backend runs vanilla only), kv_budget, benchmark data and task names,
    model folder. Returns (method, knobs)."""
    for key, allowed in _CHOICES.items():
        val = str(cfg.get(key, allowed[0]))
        if val not in allowed:
            raise unknown_name(key, val, allowed, hint=f"{key}=")
    check_kv_budget(cfg.get("kv_budget"))
    harness = harness or harness_module(cfg.benchmark)
    harness.check_data(cfg.benchmark)  # bad data or task names fail here, before any model is loaded
    method, knobs = method_and_knobs(cfg)
    if str(cfg.backend) == "hf" and (method != "vanilla" or knobs):
        raise ConfigError(
            f"backend=hf is the full-KV HF transformers baseline: it runs method=vanilla only "
            f"(got method={method!r}, knobs={knobs}). Use backend=engine for cache methods."
        )
    if check_model:
        _check_model(cfg)
    return method, knobs


_VALUE_FLAGS = {"-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir", "-p", "--package",
                "--experimental-rerun", "-c", "--cfg", "--info", "-i"}


def cli_overrides(argv: list[str]) -> list[str]:
    """The Hydra overrides among ``deltakv-eval``'s arguments (flags and their values left out)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a.startswith("-"):
            skip = a in _VALUE_FLAGS
            continue
        if "=" in a or a.startswith("~"):
            out.append(a)
    return out


def _override_values(ov) -> list:
    """The values an override takes (each choice of a sweep); [] for deletions and interval sweeps."""
    if ov.is_delete():
        return []
    if not ov.is_sweep_override():
        return [ov.value()]
    if ov.value_type is not None and ov.value_type.name == "GLOB_CHOICE_SWEEP":
        return list(ov.value().filter(group_options(ov.key_or_group)))
    if ov.is_discrete_sweep():
        return list(ov.sweep_iterator())
    return []


def validate_cli(argv: list[str], multirun: bool | None = None) -> int:
    """Check every name and value in ``deltakv-eval``'s command line before Hydra runs anything: config
    group choices (benchmark / method / model / ... with the valid names and the closest one),
    ``method.name``, ``kv_budget``, ``backend``, ``query_mode``; in a ``-m`` sweep every choice, then
    every job's composed config (``preflight``). Raises ConfigError; returns the number of jobs."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if multirun is None:
        multirun = "-m" in argv or "--multirun" in argv
    try:
        overrides = OverridesParser.create().parse_overrides(cli_overrides(argv))
    except Exception as exc:  # noqa: BLE001 - a syntax error: Hydra reports it itself
        log.debug("override parsing left to Hydra: %s", exc)
        return 0
    groups = config_groups()
    for ov in overrides:
        key = ov.key_or_group
        values = _override_values(ov)
        if key in groups and ov.package is None:
            valid = group_options(key)
            for v in values:
                if v is not None and str(v) not in valid:
                    raise unknown_name(key, v, valid, hint=f"{key}=")
        elif key == "method.name":
            for v in values:
                check_method_name(str(v))
        elif key == "kv_budget":
            for v in values:
                check_kv_budget(v)
        elif key in _CLI_CHOICES:
            for v in values:
                if str(v) not in _CLI_CHOICES[key]:
                    raise unknown_name(key, v, _CLI_CHOICES[key], hint=f"{key}=")
        elif key in ("shard", "merge_shards"):
            from benchmark.eval_shards import parse_merge, parse_shard

            for v in values:
                (parse_shard if key == "shard" else parse_merge)(v)
    if not multirun:
        return 1
    # every job of the sweep, composed as Hydra will compose it, passes the same checks as a single run
    import itertools

    axes = []
    for ov in overrides:
        if ov.is_hydra_override():
            continue
        key = ov.get_key_element()
        if ov.is_sweep_override():
            if ov.value_type is not None and ov.value_type.name == "GLOB_CHOICE_SWEEP":
                vals = [str(v) for v in _override_values(ov)]
            elif ov.is_discrete_sweep():
                vals = list(ov.sweep_string_iterator())
            else:
                return 0  # interval sweeps belong to other sweepers
            axes.append([f"{key}={v}" for v in vals])
        else:
            axes.append([ov.input_line or f"{key}={ov.get_value_element_as_str()}"])
    jobs = [list(j) for j in itertools.product(*axes)]
    for job in jobs:
        try:
            cfg = compose(job)
        except Exception as exc:  # noqa: BLE001 - Hydra's own message for a bad override
            raise ConfigError(f"job {' '.join(job)}: {exc}") from None
        try:
            preflight(cfg)
        except (ValueError, FileNotFoundError, ImportError, KeyError) as exc:
            raise ConfigError(f"job {' '.join(job)}: {exc}") from None
    return len(jobs)


_BUDGET_KNOBS = ("budget", "num_top_tokens", "token_budget", "max_capacity_prompt")


def _method_fields(name: str) -> dict | None:
    """The engine's knob fields of a cache method ({name: default or MISSING}); None if unknown."""
    try:
        import dataclasses

        from sparse_engine.cache.registry import get_method

        return {f.name: f.default for f in dataclasses.fields(get_method(name).Config)}
    except Exception:  # noqa: BLE001 - engine absent or method unknown: the engine will say so later
        return None


def changed_knobs(method: str, knobs: dict) -> dict:
    """The knobs that differ from the method's engine defaults (all of them when the engine or the
    method is unknown): what a run chose, for its fingerprint, the tables and the heatmap title."""
    fields = _method_fields(method) if method != "vanilla" else None
    if not fields:
        return dict(knobs)
    return {k: v for k, v in knobs.items() if k not in fields or fields[k] != v}


def _conf_method_fields(name: str) -> dict | None:
    """The knobs a method's config file names (used when the engine does not import)."""
    path = CONF_DIR / "method" / f"{name}.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    return {k: v for k, v in OmegaConf.to_container(OmegaConf.load(path)).items() if k != "name"}


def method_and_knobs(cfg) -> tuple[str, dict]:
    """Method name and the knobs passed to ``sparse_engine.LLM``: the method group's keys, then
    ``kv_budget`` mapped onto the method's own budget knob (``budget`` / ``num_top_tokens`` ...), then
    knobs the method requires that the model config provides (e.g. OmniKV's ``full_attn_layers``)."""
    m = _plain(cfg.get("method")) or {}
    if isinstance(m, str):
        m = {"name": m}
    name = str(m.get("name", "vanilla"))
    knobs = {k: v for k, v in m.items() if k != "name" and not str(k).startswith("_")}
    budget = check_kv_budget(cfg.get("kv_budget"))
    if name == "vanilla":
        if budget is not None:
            log.info("kv_budget=%s not applied: method=vanilla keeps the full KV cache", budget)
        return name, knobs
    check_method_name(name)
    fields = _method_fields(name)
    budget_fields = fields if fields is not None else _conf_method_fields(name)
    if budget is not None:
        key = next((k for k in _BUDGET_KNOBS if k in (budget_fields or {})), None)
        if key is None:
            raise ConfigError(f"kv_budget given but method {name!r} has no budget knob "
                              f"(knobs: {sorted(budget_fields or {})})")
        knobs[key] = budget  # an explicit kv_budget wins over the method config's default
    if fields:
        import dataclasses

        model = _plain(cfg.get("model")) or {}
        for k, default in fields.items():
            if k not in knobs and default is dataclasses.MISSING and isinstance(model, dict) and k in model:
                knobs[k] = model[k]
    return name, knobs


def model_ref(cfg) -> str | None:
    m = _plain(cfg.get("model"))
    if m is None or isinstance(m, str):
        return m
    for key in ("path", "name_or_path", "pretrained_model_name_or_path", "model_path", "name"):
        if m.get(key):
            return str(m[key])
    return None


def _knob_tag(knobs: dict, method: str | None = None) -> str:
    """The knobs part of the folder names used before issue 18.8 (``legacy_run_name``)."""
    import re

    fields = _method_fields(method) if method else None
    if fields:
        knobs = {k: v for k, v in knobs.items() if k not in fields or fields[k] != v}
    if not knobs:
        return ""
    text = ",".join(f"{k}={knobs[k]}" for k in sorted(knobs))
    text = re.sub(r"[^A-Za-z0-9_=.,+-]", "", text.replace(", ", "_"))
    if len(text) <= 64:
        return "-" + text
    return "-" + hashlib.sha1(text.encode()).hexdigest()[:8]


def legacy_run_name(cfg, method: str, knobs: dict) -> str:
    """``<backend>-<method>[-<knobs>]-<query_mode>``: the run folders before issue 18.8 (a path
    knob came out as ``deltakv_path=runssmokecompressor``). Still found by resume."""
    return f"{cfg.backend}-{method}{_knob_tag(knobs, method)}-{cfg.get('query_mode', 'aware')}"


def settings_hash(fp: dict) -> str:
    """8 hex digits of sha1 over the run's fingerprint (sorted JSON): every setting that changes
    the generations, and nothing else (not results_root, data_dir, scoring, shard, batch_size)."""
    return hashlib.sha1(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()[:8]


def run_name(cfg, method: str | None = None, knobs: dict | None = None) -> str:
    """``<method>-<hash of the settings>``, e.g. ``deltakv-3f9a1c2e``; the settings themselves are
    in the run's ``run.json`` (fingerprint, overrides, full config) and ``summary.json``."""
    if method is None:
        method, knobs = method_and_knobs(cfg)
    return f"{method}-{settings_hash(_fingerprint(cfg, method, knobs or {}))}"


def resolve_output_dir(cfg) -> Path:
    """``output_dir``, else ``<results_root>/<benchmark>/<run_name or method-hash>``. A run of the
    same settings started under the old naming (``legacy_run_name``) and not yet under the new one
    is resumed where it is."""
    if cfg.get("output_dir"):
        return Path(str(cfg.output_dir))
    root = Path(str(cfg.get("results_root") or "runs/eval")) / str(cfg.benchmark.name)
    if cfg.get("run_name"):
        return root / str(cfg.run_name)
    method, knobs = method_and_knobs(cfg)
    new = root / run_name(cfg, method, knobs)
    old = root / legacy_run_name(cfg, method, knobs)
    if not new.exists() and (old / "predictions.jsonl").is_file() and (old / "run.json").is_file():
        try:
            same = json.loads((old / "run.json").read_text()).get("fingerprint") == json.loads(
                json.dumps(_fingerprint(cfg, method, knobs), default=str))
        except ValueError:
            same = False
        if same:
            log.info("resuming the run in %s (folder named before issue 18.8; new runs go to %s)", old, new.name)
            return old
    return new


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


# ------------------------------------------------------------------------------------------------
# predictions store with resume
# ------------------------------------------------------------------------------------------------
class PredictionStore:
    """Append-only JSONL of records. A request's records carry ``uid`` and ``n_records``; on open,
    a torn last line and requests with missing records (a kill in the middle of a write) are
    dropped, so that exactly the finished requests count as done."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: list[dict] = []
        self.dropped = 0
        if self.path.exists():
            self._load()

    def _load(self):
        good, groups = [], Counter()
        raw = self.path.read_text(encoding="utf-8").splitlines()
        for line in raw:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                self.dropped += 1
                continue
            good.append(rec)
            groups[rec["uid"]] += 1
        complete = [r for r in good if groups[r["uid"]] == r.get("n_records", 1)]
        self.dropped += len(good) - len(complete)
        self.records = complete
        if self.dropped:
            log.warning("predictions: dropped %d torn/incomplete line(s) from %s", self.dropped, self.path)
            tmp = self.path.with_suffix(".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                for r in complete:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            os.replace(tmp, self.path)

    @property
    def done(self) -> set[str]:
        return {r["uid"] for r in self.records}

    def append(self, recs: list[dict]):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # one os.write of whole lines on an O_APPEND fd, fsynced: a kill tears at most the last line
        append_lines(self.path, [json.dumps(r, ensure_ascii=False) + "\n" for r in recs])
        self.records.extend(recs)


def _records_for(req: Request, outs: list[GenOutput], common: dict, elapsed: float) -> list[dict]:
    recs = []
    for k, o in enumerate(outs):
        rec = {"uid": req.uid, "task": req.task, "n_records": len(outs)}
        if req.kind == "session":
            rec["turn"] = k
        rec.update(req.meta)
        if req.turn_meta:
            rec.update(req.turn_meta[k])
        rec.update({"pred": o.text, "finish_reason": o.finish_reason, "gen_tokens": len(o.token_ids),
                    "context_tokens": o.prompt_len or None, "kv_bytes": o.kv_bytes,
                    "prompt_tokens": req.n_prompt_tokens if k == 0 or not req.accumulate else None,
                    "time_s": round(elapsed / max(1, len(outs)), 4)})
        rec.update(common)
        recs.append(rec)
    return recs


def run_requests(backend: Backend, requests: list[Request], store: PredictionStore, common: dict,
                 batch_size: int = 1, progress: bool = True, stop_after: int | None = None) -> int:
    """Generate every request not yet in the store, appending records as requests finish.
    ``stop_after`` (tests) stops after that many requests, as a kill would."""
    from tqdm.auto import tqdm

    done = store.done
    todo = [r for r in requests if r.uid not in done]
    if len(todo) < len(requests):
        log.info("resuming: %d of %d requests already done", len(requests) - len(todo), len(requests))
    bar = tqdm(total=len(requests), initial=len(requests) - len(todo), desc="generate", unit="req",
               disable=not progress, dynamic_ncols=True)
    n = 0
    i = 0
    try:
        while i < len(todo):
            if stop_after is not None and n >= stop_after:
                break
            req = todo[i]
            t0 = time.time()
            if req.kind == "single":
                batch = [req]
                while (len(batch) < batch_size and i + len(batch) < len(todo)
                       and todo[i + len(batch)].kind == "single"
                       and (stop_after is None or n + len(batch) < stop_after)):
                    batch.append(todo[i + len(batch)])
                outs = backend.generate([r.prompt_ids for r in batch], [r.params for r in batch])
                dt = (time.time() - t0) / len(batch)
                recs = []
                for r, o in zip(batch, outs):
                    recs += _records_for(r, [o], common, dt)
                store.append(recs)
                i += len(batch)
                n += len(batch)
                bar.update(len(batch))
            else:
                outs = backend.generate_session(req.context_ids, req.turns, req.params, accumulate=req.accumulate)
                store.append(_records_for(req, outs, common, time.time() - t0))
                i += 1
                n += 1
                bar.update(1)
    finally:
        bar.close()
    return n


# ------------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------------
def kv_summary(records: list[dict], bytes_per_token: int | None) -> dict:
    """Mean KV bytes a request held at its end, and its fraction of the full cache of the same
    tokens (context + generated) when the backend reports bytes per token."""
    vals = [(r["kv_bytes"], (r.get("context_tokens") or 0) + r.get("gen_tokens", 0)) for r in records
            if r.get("kv_bytes") is not None]
    if not vals:
        return {}
    out = {"kv_bytes_mean": round(sum(v for v, _ in vals) / len(vals))}
    if bytes_per_token:
        fr = [v / (n * bytes_per_token) for v, n in vals if n]
        if fr:
            out["kv_fraction_mean"] = round(sum(fr) / len(fr), 4)
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def summary_markdown(summary: dict) -> str:
    lines = [f"# {summary['benchmark']}: {summary['label']}", ""]
    lines.append(f"- backend: {summary['backend']}, method: {summary['method']}, knobs: {summary['knobs']}")
    lines.append(f"- model: {summary['model']}, query mode: {summary['query_mode']}"
                 f" (effective: {summary['query_agnostic_effective'] if summary['query_mode'] == 'agnostic' else 'n/a'}),"
                 f" session mode: {summary['session_mode']}")
    lines.append(f"- records: {summary['n_records']}, wall time: {summary['wall_s']:.1f}s")
    lines.append(f"- metric: {summary['result'].get('metric', '')}")
    for line in summary["result"].get("header") or []:
        lines.append(f"- {line}")
    lines.append("")
    scores = summary["result"]["scores"]
    lines.append("| task | score |")
    lines.append("| --- | ---: |")
    for k, v in scores.items():
        lines.append(f"| {k} | {_fmt(v)} |")
    if summary["result"].get("average") is not None:
        lines.append(f"| **average** | **{_fmt(summary['result']['average'])}** |")
    for extra in ("categories", "per_turn", "buckets", "grid", "actual_tokens", "kv"):
        if summary["result"].get(extra):
            lines += ["", f"## {extra}", "", "```json", json.dumps(summary["result"][extra], indent=1), "```"]
    if summary.get("kv_stats"):
        lines += ["", "## kv_stats", "", "```json", json.dumps(summary["kv_stats"], indent=1, default=str), "```"]
    return "\n".join(lines) + "\n"


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{summary['benchmark']} | {summary['label']}")
    t.add_column("task")
    t.add_column("score", justify="right")
    t.add_column("n", justify="right")
    ns = summary["result"].get("n", {})
    for k, v in summary["result"]["scores"].items():
        t.add_row(str(k), _fmt(v), str(ns.get(k, "")))
    if summary["result"].get("average") is not None:
        t.add_row("[bold]average", f"[bold]{_fmt(summary['result']['average'])}", "")
    Console(width=140).print(t)


def header_notes(rows: list[dict]) -> list[str]:
    """The setup lines the harnesses put in ``result["header"]`` (truncation length, scoring mode,
    preset, actual prompt lengths...): once when every run has it, else per run."""
    out: list[str] = []
    seen = []
    for s in rows:
        for line in s["result"].get("header") or []:
            if line not in seen:
                seen.append(line)
    for line in seen:
        holders = [s["label"] for s in rows if line in (s["result"].get("header") or [])]
        out.append(line if len(holders) == len(rows) else f"{', '.join(holders)}: {line}")
    return out


def comparison_table(root: Path, benchmark: str | None = None) -> str:
    """One markdown table over the ``summary.json`` files directly under ``root`` (one run per
    subfolder): rows are runs, columns the union of tasks, plus the average."""
    rows, cols = [], []
    for path in sorted(Path(root).glob("*/summary.json")):
        s = json.loads(path.read_text())
        if benchmark and s.get("benchmark") != benchmark:
            continue
        rows.append(s)
        for k in s["result"]["scores"]:
            if k not in cols:
                cols.append(k)
    if not rows:
        return ""
    head = "| run | backend | method | knobs | query | " + " | ".join(cols) + " | avg | KV % |"
    sep = "| --- | --- | --- | --- | --- | " + " | ".join("---:" for _ in cols) + " | ---: | ---: |"
    lines = [head, sep]
    for s in rows:
        sc = s["result"]["scores"]
        knobs = ", ".join(f"{k}={v}" for k, v in sorted(changed_knobs(s["method"], s["knobs"]).items())) or "-"
        lines.append(f"| {s['label']} | {s['backend']} | {s['method']} | {knobs} | {s['query_mode']} | "
                     + " | ".join(_fmt(sc.get(c)) for c in cols) + f" | {_fmt(s['result'].get('average'))} | "
                     + (f"{100 * s['result']['kv']['kv_fraction_mean']:.1f}" if s["result"].get("kv", {}).get(
                         "kv_fraction_mean") is not None else "-") + " |")
    notes = header_notes(rows)
    if notes:  # the setup every number depends on, above the table
        lines = [f"- {n}" for n in notes] + [""] + lines
    return "\n".join(lines) + "\n"


def print_markdown_table(md: str, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    lines = [ln for ln in md.strip().splitlines() if ln.startswith("|")]
    if len(lines) < 3:
        return
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    t = Table(title=title)
    for h in cells[0]:
        t.add_column(h)
    for row in cells[2:]:
        t.add_row(*row)
    Console(width=200).print(t)


# ------------------------------------------------------------------------------------------------
# main entry
# ------------------------------------------------------------------------------------------------
def _fingerprint(cfg, method, knobs) -> dict:
    b = dict(_plain(cfg.benchmark))
    b.pop("data_dir", None)  # moving the data does not change the run
    b.pop("scoring", None)  # nor does scoring the same generations another way (the summary says which)
    knobs = changed_knobs(method, knobs)  # knobs equal to the engine's defaults do not change the run
    return {"benchmark": b, "backend": str(cfg.backend), "method": method, "knobs": knobs,
            "model": model_ref(cfg), "query_mode": str(cfg.get("query_mode", "aware")),
            "engine": _plain(cfg.get("engine")) or {}}


def _overrides() -> list[str] | None:
    """The Hydra overrides of this run (``deltakv-eval`` / ``-m`` job), None outside a Hydra app."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 - compose() API / no Hydra app running
        return None


def shard_spec(cfg) -> tuple[int, int] | None:
    """(i, n) from ``shard=i/n``, else from ``accelerate launch`` / ``torchrun``'s RANK / WORLD_SIZE."""
    from benchmark.eval_shards import parse_shard, shard_from_env

    spec = parse_shard(cfg.get("shard"))
    if spec is None and not cfg.get("merge_shards"):
        spec = shard_from_env()
        if spec is not None:
            log.info("shard %d/%d from RANK / WORLD_SIZE", *spec)
    return spec


def run_eval(cfg, backend: Backend | None = None, stop_after: int | None = None) -> dict | None:
    """Run (or resume) one evaluation described by ``cfg``; return the summary dict (None when
    ``stop_after`` interrupted it before the end, or for a shard whose siblings are not all done).

    The run's folder is locked for the whole run (``benchmark.eval_lock``): a second run on the same
    folder fails at once naming the holder. ``shard=i/n`` runs every n-th request into
    ``<run>/shards/<i>-of-<n>`` and merges the shards when the last one ends; ``merge_shards=n``
    merges by hand (``benchmark.eval_shards``)."""
    from benchmark.eval_shards import parse_merge, shard_dir

    t_start = time.time()
    bcfg = cfg.benchmark
    harness = harness_module(bcfg)
    merge_n = parse_merge(cfg.get("merge_shards"))
    shard = shard_spec(cfg)
    if shard and merge_n:
        raise ConfigError(f"shard={shard[0]}/{shard[1]} and merge_shards={merge_n} given together: run the "
                          "shards with shard=i/n, then merge with merge_shards=n alone")
    # every name and value is checked before a folder is made or a model loaded
    method, knobs = preflight(cfg, harness, check_model=backend is None and not merge_n)
    out_dir = resolve_output_dir(cfg)
    fp = _fingerprint(cfg, method, knobs)
    if merge_n:
        return merge_shards(cfg, out_dir, merge_n, harness, method, knobs, fp, t_start)
    work_dir = shard_dir(out_dir, *shard) if shard else out_dir
    with OutputDirLock(work_dir, what=f"shard {shard[0]}/{shard[1]}" if shard else "eval"):
        summary = _run_locked(cfg, backend, stop_after, harness, method, knobs, fp, work_dir, shard, t_start)
    if shard is None or summary is None:
        return summary
    return _auto_merge(cfg, out_dir, shard[1], harness, method, knobs, fp, t_start)


def _run_locked(cfg, backend, stop_after, harness, method, knobs, fp, out_dir: Path, shard, t_start) -> dict | None:
    """Generate the run's (or shard's) missing requests into ``out_dir`` (locked by the caller);
    score an unsharded run, mark a shard done. Returns the summary / the shard's done record."""
    from benchmark.eval_shards import DONE, pin_local_gpu, select, shard_from_env, write_done

    bcfg = cfg.benchmark
    query_mode = str(cfg.get("query_mode", "aware"))
    run_path = out_dir / "run.json"
    pred_path = out_dir / "predictions.jsonl"
    if run_path.exists() and pred_path.exists():
        old = json.loads(run_path.read_text()).get("fingerprint")
        if old != json.loads(json.dumps(fp)):
            if not cfg.get("overwrite"):
                raise ValueError(
                    f"{out_dir} holds a run with different settings ({old}); pass overwrite=true to replace it, "
                    "or choose another output_dir / run_name"
                )
            pred_path.unlink()
    elif cfg.get("overwrite") and pred_path.exists():
        pred_path.unlink()
    if shard:
        (out_dir / DONE).unlink(missing_ok=True)  # done again only when this run ends

    if cfg.get("torch_threads"):  # after the lock: a refused run must not pay torch's import
        import torch

        torch.set_num_threads(int(cfg.torch_threads))
    own_backend = backend is None
    if own_backend:
        if shard and shard_from_env() == shard:  # launched by accelerate / torchrun: one GPU per rank
            pin_local_gpu()
        backend = make_backend(str(cfg.backend), model_ref(cfg), method=method, knobs=knobs,
                               engine_kwargs=_plain(cfg.get("engine")) or {}, hf_kwargs=_plain(cfg.get("hf")) or {})
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        info = backend.describe()
        run_info = {"fingerprint": fp, "settings_hash": settings_hash(fp), "backend_info": info,
                    "output_dir": str(out_dir), "shard": list(shard) if shard else None, "overrides": _overrides(),
                    "config": _plain(cfg), "git_commit": _git_commit(), "python": platform.python_version(),
                    "argv": sys.argv, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_atomic(run_path, json.dumps(run_info, indent=1, default=str))

        requests = harness.build_requests(bcfg, backend.tokenizer, backend.max_model_len, query_mode=query_mode)
        seen = Counter(r.uid for r in requests)
        dup = [u for u, c in seen.items() if c > 1]
        if dup:
            raise RuntimeError(f"duplicate request ids {dup[:5]}")
        n_total = len(requests)
        picked = select(requests, *shard) if shard else None
        if picked is not None:
            requests = [r for _, r in picked]
        common = {"query_mode": query_mode}
        store = PredictionStore(pred_path)
        bs = int(cfg.get("batch_size") or 1)
        n_run = run_requests(backend, requests, store, common, batch_size=bs, progress=bool(cfg.get("progress", True)),
                             stop_after=stop_after)
        if stop_after is not None and len(store.done) < len(requests):
            return None
        if shard:
            write_done(out_dir, shard[0], shard[1], picked, n_total, fp, info, backend.kv_stats(), n_run)
            log.info("shard %d/%d done: %d requests in %s", shard[0], shard[1], len(requests), out_dir)
            return {"shard": list(shard), "n_requests": len(requests), "n_generated_now": n_run}
        wanted = {r.uid for r in requests}
        records = [r for r in store.records if r["uid"] in wanted]
        return finish_run(cfg, harness, out_dir, records, info, backend.kv_stats(), method, knobs,
                          n_requests=n_total, n_run=n_run, t_start=t_start)
    finally:
        if own_backend:
            backend.close()


def finish_run(cfg, harness, out_dir: Path, records: list[dict], info: dict, kvs: dict, method: str, knobs: dict,
               n_requests: int, n_run: int, t_start: float, extra: dict | None = None) -> dict:
    """Score the records (in request order) and write ``summary.*``, ``scored.jsonl``, the
    harness's artifacts and ``../comparison.md``: the end of an unsharded run and of a merge."""
    bcfg = cfg.benchmark
    query_mode = str(cfg.get("query_mode", "aware"))
    session_mode = info.get("session_mode", "reprefill")
    agnostic_effective = (query_mode == "agnostic") and (session_mode == "native")
    if query_mode == "agnostic" and not agnostic_effective:
        log.warning("query_mode=agnostic but the backend has no session API: the context is re-prefilled together "
                    "with the question, so compression is NOT query-agnostic in this run (recorded in outputs)")
    result = harness.score(records, bcfg)
    result["kv"] = kv_summary(records, kvs.get("bytes_per_token"))
    label = out_dir.name
    summary = {"benchmark": str(bcfg.name), "label": label, "backend": str(cfg.backend), "method": method,
               "knobs": knobs, "model": info.get("model_path") or model_ref(cfg) or "smollm2-135m",
               "query_mode": query_mode, "query_agnostic_effective": agnostic_effective,
               "session_mode": session_mode, "n_requests": n_requests, "n_generated_now": n_run,
               "n_records": len(records), "wall_s": time.time() - t_start, "kv_stats": kvs,
               "result": result, **(extra or {})}
    if hasattr(harness, "artifacts"):
        summary["artifacts"] = harness.artifacts(records, bcfg, out_dir, summary)
    write_atomic(out_dir / "summary.json", json.dumps(summary, indent=1, default=str))
    write_atomic(out_dir / "summary.md", summary_markdown(summary))
    write_atomic(out_dir / "scored.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    if cfg.get("print_table", True):
        print_summary(summary)
    comp = comparison_table(out_dir.parent, str(bcfg.name))
    if comp:  # shared by the runs beside this one: replaced whole, never half written
        write_atomic(out_dir.parent / "comparison.md", f"# {bcfg.name}: comparison\n\n" + comp)
        if cfg.get("print_table", True):
            print_markdown_table(comp, f"{bcfg.name}: all runs in {out_dir.parent}")
    log.info("wrote %s", out_dir / "summary.json")
    return summary


def merge_shards(cfg, out_dir: Path, n: int, harness, method, knobs, fp, t_start) -> dict:
    """Merge the n shards of the run in ``out_dir`` into its ``predictions.jsonl`` + summary (under
    the run folder's lock); ShardsIncomplete when one is missing or unfinished."""
    from benchmark.eval_shards import collect

    with OutputDirLock(out_dir, what=f"merge of {n} shards"):
        got = collect(out_dir, n, fp)
        records = got["records"]
        write_atomic(out_dir / "predictions.jsonl",
                     "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        run_info = {"fingerprint": fp, "settings_hash": settings_hash(fp), "backend_info": got["backend_info"],
                    "output_dir": str(out_dir), "merged_shards": got["shards"], "overrides": _overrides(),
                    "config": _plain(cfg), "git_commit": _git_commit(), "python": platform.python_version(),
                    "argv": sys.argv, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_atomic(out_dir / "run.json", json.dumps(run_info, indent=1, default=str))
        log.info("merged %d shards (%d records) into %s", n, len(records), out_dir)
        return finish_run(cfg, harness, out_dir, records, got["backend_info"], got["kv_stats"], method, knobs,
                          n_requests=got["n_total"], n_run=got["n_generated"], t_start=t_start)


def _auto_merge(cfg, out_dir: Path, n: int, harness, method, knobs, fp, t_start) -> dict | None:
    """After a shard: merge when every shard is done; another shard merging right now, or one still
    running, is not an error (the last one to finish merges)."""
    from benchmark.eval_shards import all_done

    if not all_done(out_dir, n):
        log.info("not merging yet: other shards of %s are still running (or merge later with merge_shards=%d)",
                 out_dir, n)
        return None
    try:
        return merge_shards(cfg, out_dir, n, harness, method, knobs, fp, t_start)
    except OutputDirLocked as exc:
        log.info("not merging: %s", exc)
        return None


def compose(overrides: list[str] | None = None):
    """The eval config as ``deltakv-eval`` would compose it (for tests and notebooks)."""
    from hydra import compose as h_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return h_compose(config_name="eval", overrides=list(overrides or []))


def _hydra_entry():
    import hydra

    @hydra.main(config_path=str(CONF_DIR), config_name="eval", version_base="1.3")
    def _main(cfg):
        try:
            run_eval(cfg)
        except (FileNotFoundError, ValueError, ImportError, KeyError, OutputDirLocked, OSError) as exc:
            _fail(exc)

    return _main


def _fail(exc) -> None:
    from rich.console import Console
    from rich.text import Text

    msg = Text("deltakv-eval error: ", style="bold red")
    msg.append(str(exc))
    Console(stderr=True, soft_wrap=True).print(msg)
    raise SystemExit(2) from None


_DECLARED_PLUS = ("+shard=", "+merge_shards=")


def main():
    # `+shard=i/n` (the documented spelling) names keys conf/eval.yaml declares: Hydra would refuse the `+`
    sys.argv[1:] = [a[1:] if a.startswith(_DECLARED_PLUS) else a for a in sys.argv[1:]]
    try:  # names and values of the whole command (every job of a -m sweep) before Hydra runs anything
        validate_cli(sys.argv[1:])
    except (ConfigError, FileNotFoundError, ValueError, ImportError, KeyError) as exc:
        _fail(exc)
    _hydra_entry()()


# ------------------------------------------------------------------------------------------------
# paper-table helper (experiments/table_*.py)
# ------------------------------------------------------------------------------------------------
# ALL_METHODS: every method registered in the engine (``sparse_engine.cache.registry.METHODS``),
# vanilla first. It is read from the registry when asked for (module ``__getattr__`` below), so that
# importing this module (the HF backend, the tests) does not import the engine.
#
# TABLE_METHODS: the default of experiments/table_*.py, the registered methods a table can run with
# one shared ``kv_budget`` and no per-method inputs. Left out: ``deltakv`` needs a trained compressor
# (``method.deltakv_path``) and ``sparsex`` has no budget knob and only differs from vanilla when
# prompts come with reusable segments. Pass them with ``--methods`` when those are given.
TABLE_METHODS = ("vanilla", "snapkv", "adakv", "pyramidkv", "omnikv", "streaming")


def registry_methods() -> tuple[str, ...]:
    """Names of all cache methods in the engine's registry, vanilla first (imports the engine)."""
    from sparse_engine.cache.registry import METHODS

    return tuple(sorted(METHODS, key=lambda m: m != "vanilla"))  # stable: registry order otherwise


def __getattr__(name: str):
    if name == "ALL_METHODS":
        return registry_methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def list_arg(x, cast=str) -> list:
    """A list from a comma string or a tuple/list (fire turns "a,b" into a tuple)."""
    if isinstance(x, (list, tuple)):
        return [cast(v) for v in x]
    return [cast(v) for v in str(x).split(",") if str(v).strip()]


def available_methods() -> list[str]:
    """The engine's registered methods, or [] when the engine does not import."""
    try:
        return list(registry_methods())
    except Exception:  # noqa: BLE001
        return []


def run_table(benchmark: str, overrides: list[str], methods=TABLE_METHODS, kv_budget: int | None = None,
              results_root: str = "runs/eval_tables", out_md: str | Path | None = None, title: str = "",
              command: str = "", notes: str = "", backend: str = "engine") -> str:
    """Run ``benchmark`` once per method (same overrides, ``kv_budget`` for the compressing ones)
    and write one comparison table (markdown) over the runs; methods the engine lacks are listed
    as skipped. Returns the markdown."""
    known = set(available_methods())
    root = Path(results_root) / benchmark
    ran, skipped = [], []
    for m in methods:
        if backend == "engine" and known and m not in known:
            skipped.append(m)
            continue
        pick = f"method={m}" if (CONF_DIR / "method" / f"{m}.yaml").is_file() else f"method.name={m}"
        ov = [f"benchmark={benchmark}", f"backend={backend}", pick, f"results_root={results_root}",
              "print_table=false", *overrides]
        if kv_budget is not None and m != "vanilla":
            ov.append(f"kv_budget={kv_budget}")
        cfg = compose(ov)
        t0 = time.time()
        s = run_eval(cfg)
        log.info("%s/%s: average %s (%.0fs)", benchmark, m, s["result"].get("average"), time.time() - t0)
        ran.append(s["label"])
    # keep only this table's runs
    rows = []
    for label in ran:
        rows.append(json.loads((root / label / "summary.json").read_text()))
    tmp = Path(results_root) / f".table_{benchmark}"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    for s in rows:
        (tmp / s["label"]).mkdir(parents=True, exist_ok=True)
        (tmp / s["label"] / "summary.json").write_text(json.dumps(s, default=str))
    table = comparison_table(tmp, None)
    kv = "\n".join(f"| {s['label']} | {s['result'].get('kv', {}).get('kv_bytes_mean', '-')} | "
                   f"{s['kv_stats'].get('bytes_per_token', '-')} | {s['n_records']} | {s['wall_s']:.0f} |" for s in rows)
    md = [f"# {title or benchmark}", ""]
    if command:
        md += ["Regenerate with:", "", "```bash", command, "```", ""]
    md += [f"Model: {rows[0]['model'] if rows else '-'}; backend: {backend}; kv_budget: {kv_budget}; "
           f"generated {time.strftime('%Y-%m-%d %H:%M')} (git {_git_commit()}).", ""]
    md += [table, ""]
    md += ["| run | mean KV bytes per request (at its end) | full-KV bytes per token | records | wall s |",
           "| --- | ---: | ---: | ---: | ---: |", kv, ""]
    if skipped:
        md.append(f"Skipped (not in the engine's method registry yet): {', '.join(skipped)}.")
        md.append("")
    if notes:
        md += [notes, ""]
    if out_md:  # keep the run's pictures (NIAH heatmaps) beside the table
        import shutil

        for s in rows:
            for key, path in (s.get("artifacts") or {}).items():
                if Path(path).is_file():
                    dest = Path(out_md).parent / f"{Path(out_md).stem}_{s['method']}{Path(path).suffix}"
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, dest)
                    md.append(f"![{s['label']} {key}]({dest.name})")
        md.append("")
    text = "\n".join(md)
    if out_md:
        Path(out_md).parent.mkdir(parents=True, exist_ok=True)
        Path(out_md).write_text(text)
    print_markdown_table(table, title or benchmark)
    return text


if __name__ == "__main__":  # at the end: main() uses the helpers defined above
    main()
