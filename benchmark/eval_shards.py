"""Sharded evaluation (issue 18.7): ``deltakv-eval ... shard=i/n`` runs every n-th request, and
the shards merge into the run an unsharded command would have written.

* ``shard=i/n`` (or ``+shard=i/n``; under ``accelerate launch`` / ``torchrun`` the shard is taken
  from ``RANK`` / ``WORLD_SIZE`` when ``shard`` is not given, and each rank's model goes to GPU
  ``LOCAL_RANK``) runs the requests whose index in the benchmark's request list is ``i`` modulo
  ``n``. The list is built deterministically (seeded), so the n shards cover it exactly once. Shard ``i`` writes into ``<run>/shards/<i>-of-<n>/`` with its
  own lock, its own ``predictions.jsonl`` (resumable like any run) and, when finished, ``done.json``
  (its request indices and uids, the backend's description and KV stats).
* The merge takes the run folder's lock, checks that every shard is there and complete (else it
  refuses, naming the missing shards and the command that runs them), orders the records by request
  index and scores them exactly like an unsharded run: ``predictions.jsonl``, ``summary.*`` and
  ``comparison.md`` are those of the unsharded run (timings aside; with the engine, also only as far
  as its generations do not depend on which requests share a batch). It runs automatically when the
  last shard finishes, or by hand: ``deltakv-eval <same overrides> merge_shards=n``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger("deltakv.eval")

DONE = "done.json"


class ShardsIncomplete(ValueError):
    """A merge was asked for while a shard is missing or unfinished."""


def parse_shard(value) -> tuple[int, int] | None:
    """``"i/n"`` -> (i, n) with 0 <= i < n; None / "" -> None. Anything else: ValueError naming the fix."""
    if value is None or value == "":
        return None
    text = str(value).strip()
    head, sep, tail = text.partition("/")
    try:
        if not sep:
            raise ValueError
        i, n = int(head), int(tail)
    except ValueError:
        raise ValueError(f"shard={value!r}: expected 'i/n' with whole numbers, e.g. shard=0/2 "
                         "(shard i of n, counted from 0)") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard={value!r}: need 0 <= i < n (the shards of n=2 are 0/2 and 1/2)")
    return i, n


def shard_from_env(env=None) -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) set by ``accelerate launch`` / ``torchrun`` when more than one process runs."""
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", env.get("LOCAL_RANK", "0")))
    except ValueError:
        return None
    return (rank, world) if world > 1 and 0 <= rank < world else None


def pin_local_gpu(env=None) -> int | None:
    """Under ``accelerate launch`` / ``torchrun`` (WORLD_SIZE > 1): put this process on GPU
    LOCAL_RANK (``torch.cuda.set_device``), so that ``device=cuda`` / ``auto`` of each shard's model
    lands on its own GPU. Returns the index, or None (no launcher, no CUDA, fewer GPUs than ranks)."""
    env = os.environ if env is None else env
    try:
        local, world = int(env["LOCAL_RANK"]), int(env.get("WORLD_SIZE", "1"))
    except (KeyError, ValueError):
        return None
    if world < 2:
        return None
    import torch

    if not torch.cuda.is_available() or local >= torch.cuda.device_count():
        return None
    torch.cuda.set_device(local)
    return local


def parse_merge(value) -> int | None:
    if value is None or value is False:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"merge_shards={value!r}: expected the number of shards to merge (e.g. merge_shards=2)")
    return int(value)


def shard_dir(out_dir: Path, i: int, n: int) -> Path:
    return Path(out_dir) / "shards" / f"{i}-of-{n}"


def select(requests: list, i: int, n: int) -> list[tuple[int, object]]:
    """(index, request) for the requests of shard i of n: index modulo n."""
    return [(k, r) for k, r in enumerate(requests) if k % n == i]


def write_done(sdir: Path, i: int, n: int, picked: list[tuple[int, object]], n_total: int, fingerprint: dict,
               info: dict, kv_stats: dict, n_generated: int) -> None:
    from benchmark.eval_lock import write_atomic

    rec = {"shard": [i, n], "n_total": n_total, "index": [k for k, _ in picked], "uids": [r.uid for _, r in picked],
           "fingerprint": fingerprint, "backend_info": info, "kv_stats": kv_stats, "n_generated": n_generated}
    write_atomic(Path(sdir) / DONE, json.dumps(rec, default=str))


def merge_kv_stats(stats: list[dict]) -> dict:
    """One ``kv_stats`` for the merged run: peaks -> max, counters (preemptions, reused session
    tokens) -> sum, everything else (sizes per token / slot, method) from shard 0. A peak depends
    on how many requests ran at once, so it can be lower than the unsharded run's (engine, 6 NIAH
    requests at batch_size=8: slots_peak 72,000 merged vs 129,600 unsharded; predictions, scores
    and the per-request KV summary identical)."""
    if not stats:
        return {}
    out = dict(stats[0])
    for k, v in stats[0].items():
        vals = [s.get(k) for s in stats]
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals):
            continue
        if "peak" in k:
            out[k] = max(vals)
        elif k in ("num_preemptions", "session_reused_tokens"):
            out[k] = sum(vals)
    return out


def collect(out_dir: Path, n: int, fingerprint: dict) -> dict:
    """Every shard's records in request order, with the backend info and merged KV stats; raises
    ShardsIncomplete naming what is missing."""
    from benchmark.eval_runner import PredictionStore

    missing, unfinished, other = [], [], []
    dones = []
    for i in range(n):
        sdir = shard_dir(out_dir, i, n)
        if not sdir.is_dir():
            missing.append(i)
            continue
        if not (sdir / DONE).is_file():
            unfinished.append(i)
            continue
        done = json.loads((sdir / DONE).read_text())
        if done.get("fingerprint") != json.loads(json.dumps(fingerprint, default=str)):
            other.append(i)
            continue
        dones.append((i, sdir, done))
    if missing or unfinished or other:
        parts = []
        if missing:
            parts.append(f"missing shard(s) {missing}")
        if unfinished:
            parts.append(f"unfinished shard(s) {unfinished} (no {DONE}: still running or killed)")
        if other:
            parts.append(f"shard(s) {other} ran with other settings")
        raise ShardsIncomplete(
            f"cannot merge {n} shards in {out_dir}: {'; '.join(parts)}; run (or resume) them with the same "
            f"overrides plus {', '.join(f'shard={i}/{n}' for i in missing + unfinished + other)}, then merge again")
    totals = {d["n_total"] for _, _, d in dones}
    if len(totals) != 1:
        raise ShardsIncomplete(f"cannot merge shards in {out_dir}: they saw different request lists ({sorted(totals)} requests)")
    order: dict[str, int] = {}
    records = []
    for i, sdir, done in dones:
        uids = set(done["uids"])
        store = PredictionStore(sdir / "predictions.jsonl")
        got = store.done & uids
        if got != uids:
            raise ShardsIncomplete(f"cannot merge: shard {i}/{n} ({sdir}) has {len(got)} of its {len(uids)} requests; "
                                   f"resume it with shard={i}/{n}")
        order.update(zip(done["uids"], done["index"]))
        records += [r for r in store.records if r["uid"] in uids]
    n_total = totals.pop()
    if sorted(order.values()) != list(range(n_total)):
        raise ShardsIncomplete(f"cannot merge shards in {out_dir}: they do not cover the {n_total} requests once each")
    records.sort(key=lambda r: order[r["uid"]])  # stable: a request's records keep their order
    return {"records": records, "n_total": n_total, "backend_info": dones[0][2]["backend_info"],
            "kv_stats": merge_kv_stats([d["kv_stats"] for _, _, d in dones]),
            "n_generated": sum(d.get("n_generated", 0) for _, _, d in dones),
            "shards": [str(sdir) for _, sdir, _ in dones]}


def all_done(out_dir: Path, n: int) -> bool:
    return all((shard_dir(out_dir, i, n) / DONE).is_file() for i in range(n))
