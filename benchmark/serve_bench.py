"""Serving benchmark: a Poisson stream of real-text requests against `deltakv-serve` (or any
OpenAI-compatible server), reporting TTFT / ITL percentiles and throughput.

    # against a running server
    python -m benchmark.serve_bench --url http://127.0.0.1:8000 --num_requests 64 --rate 2
    # launch one server per config (same common overrides, e.g. ONE kv_cache_bytes), one table
    python -m benchmark.serve_bench --num_requests 48 --rate 1.5 \
        --common "kv_cache_bytes=67108864 engine.max_model_len=2048" \
        --launch "vanilla=method=vanilla" --launch "snapkv=method=snapkv kv_budget=128" \
        --launch "deltakv=method=deltakv method.deltakv_path=runs/smoke/compressor method.num_top_tokens=128" \
        --out experiments/results/serve_cpu.md

Requests: windows of the shipped news corpus (`benchmark.throughput.text_windows`, token ids of the
served model's tokenizer) with prompt lengths drawn uniformly from `--min_len..--max_len` and
`--max_tokens` greedy output tokens (EOS ignored), sent as streamed /v1/completions at Poisson arrival
times of `--rate` requests/s (`--rate 0`: all at once); seeded. Per request: TTFT (send -> first
token-bearing chunk), ITL (gaps between later token-bearing chunks), end-to-end latency. Per run:
p50 / p90 / p99 of each, output tok/s and req/s over the wall time from the first send to the last
answer, and the server's `/v1/kv_stats` afterwards (peak slots, preemptions, compressed / vanilla KV
bytes of the finished requests). A launched server is `python -m serving.cli <common> <config>
port=<free>` (its log in the temp dir); its model is the config's (default the shipped SmolLM2-135M).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COLUMNS = ["config", "requests", "ok", "rate_req_s", "wall_s", "req_s", "out_tok_s", "ttft_p50_ms", "ttft_p90_ms",
           "ttft_p99_ms", "itl_p50_ms", "itl_p90_ms", "itl_p99_ms", "e2e_p50_s", "e2e_p99_s", "slots_peak",
           "preemptions", "kv_ratio_vs_vanilla", "kv_budget_bytes"]


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), NaN for no data."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Arrival offsets (s) of `n` requests at `rate` per second (exponential gaps); all 0 for rate 0."""
    if rate <= 0:
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def make_requests(tokenizer_path: str | None, n: int, min_len: int, max_len: int, seed: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from benchmark.throughput import text_windows
    from data_prepare.resources import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer_path))
    rng = random.Random(seed)
    lengths = [rng.randint(min_len, max_len) for _ in range(n)]
    return text_windows(tok, lengths, len(tok))


async def _one(client, url: str, headers: dict, model: str, prompt: list[int], max_tokens: int, delay: float,
               t0: float) -> dict:
    import httpx

    await asyncio.sleep(max(0.0, t0 + delay - time.perf_counter()))
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "return_token_ids": True}
    sent = time.perf_counter()
    stamps, tokens, error = [], 0, None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    data = json.loads(line[6:])
                    if "error" in data:
                        error = data["error"].get("message")
                        break
                    for c in data.get("choices", []):
                        n = len(c.get("token_ids") or [])
                        if n:
                            stamps.append(time.perf_counter())
                            tokens += n
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    done = time.perf_counter()
    return {"sent": sent, "done": done, "stamps": stamps, "tokens": tokens, "error": error}


async def run_workload(url: str, prompts: list[list[int]], max_tokens: int, rate: float, seed: int,
                       api_key: str | None = None, model: str | None = None, timeout: float = 3600) -> dict:
    """Send every request at its Poisson time; per-request timings and the run's summary."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        if model is None:
            model = (await client.get(url + "/v1/models", headers=headers)).json()["data"][0]["id"]
        arrivals = poisson_arrivals(len(prompts), rate, seed)
        t0 = time.perf_counter()
        res = await asyncio.gather(*(_one(client, url, headers, model, p, max_tokens, d, t0)
                                     for p, d in zip(prompts, arrivals)))
        stats = (await client.get(url + "/v1/kv_stats", headers=headers)).json()
    return summarize(res, rate, stats)


def summarize(res: list[dict], rate: float, stats: dict | None = None) -> dict:
    ok = [r for r in res if r["error"] is None and r["stamps"]]
    ttft = [(r["stamps"][0] - r["sent"]) * 1e3 for r in ok]
    itl = [(b - a) * 1e3 for r in ok for a, b in zip(r["stamps"], r["stamps"][1:])]
    e2e = [r["done"] - r["sent"] for r in ok]
    wall = (max(r["done"] for r in res) - min(r["sent"] for r in res)) if res else float("nan")
    out_tokens = sum(r["tokens"] for r in ok)
    stats = stats or {}
    server = stats.get("server") or {}
    row = {"requests": len(res), "ok": len(ok), "rate_req_s": rate, "wall_s": wall,
           "req_s": len(ok) / wall if wall else float("nan"), "out_tok_s": out_tokens / wall if wall else float("nan"),
           "e2e_p50_s": percentile(e2e, 50), "e2e_p99_s": percentile(e2e, 99),
           "slots_peak": stats.get("slots_peak"), "preemptions": stats.get("num_preemptions"),
           "kv_ratio_vs_vanilla": server.get("compression_ratio_finished"),
           "kv_budget_bytes": stats.get("kv_budget_bytes")}
    for name, xs in (("ttft", ttft), ("itl", itl)):
        for q in (50, 90, 99):
            row[f"{name}_p{q}_ms"] = percentile(xs, q)
    row["errors"] = sorted({r["error"] for r in res if r["error"]})[:3]
    return row


# ------------------------------------------------------------------ launching servers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launched:
    """`python -m serving.cli <overrides> port=<free>` until closed."""

    def __init__(self, overrides: list[str], startup_timeout: float = 600, log_path: Path | None = None):
        import httpx

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w") if log_path else subprocess.DEVNULL
        cmd = [sys.executable, "-m", "serving.cli", *overrides, f"port={self.port}", "log_level=warning"]
        env = {k: v for k, v in os.environ.items() if k != "DELTAKV_API_KEY"}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"deltakv-serve {' '.join(overrides)} exited with {self.proc.returncode}"
                                   + (f" (log: {log_path})" if log_path else ""))
            if time.monotonic() - t0 > startup_timeout:
                self.close()
                raise TimeoutError(f"deltakv-serve {' '.join(overrides)} did not start in {startup_timeout} s")
            time.sleep(0.5)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.log is not subprocess.DEVNULL:
            self.log.close()


# ------------------------------------------------------------------ output
def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def write_results(rows: list[dict], out: Path, command: str, notes: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"Command: `{command}`", "", notes, "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    errors = [f"- {r['config']}: {e}" for r in rows for e in r.get("errors", [])]
    if errors:
        lines += ["", "Errors:", *errors]
    lines += ["", "How to read: TTFT = send -> first token-bearing SSE chunk; ITL = gap between successive "
              "token-bearing chunks of one request; out_tok_s / req_s over the wall time from the first send to "
              "the last answer; slots_peak / preemptions / kv_ratio_vs_vanilla (compressed / full KV bytes of the "
              "finished requests) from the server's /v1/kv_stats after the run.", ""]
    out.write_text("\n".join(lines))
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        f.write(f"# {command}\n")
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", action="append", default=[], help="a running server (repeatable; label=URL allowed)")
    ap.add_argument("--launch", action="append", default=[],
                    help="label=overrides of a deltakv-serve to launch (repeatable)")
    ap.add_argument("--common", default="", help="overrides given to every launched server")
    ap.add_argument("--api_key", default=os.environ.get("DELTAKV_API_KEY"))
    ap.add_argument("--tokenizer", default=None, help="model folder of the tokenizer (default: the shipped model)")
    ap.add_argument("--num_requests", type=int, default=32)
    ap.add_argument("--rate", type=float, default=1.0, help="Poisson arrivals per second (0: all at once)")
    ap.add_argument("--min_len", type=int, default=128)
    ap.add_argument("--max_len", type=int, default=1024)
    ap.add_argument("--max_tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=2, help="requests sent (and not measured) before each run")
    ap.add_argument("--out", default="experiments/results/serve_bench.md")
    ap.add_argument("--notes", default="")
    args = ap.parse_args(argv)
    if not args.url and not args.launch:
        ap.error("give --url (a running server) or --launch (servers to start)")
    command = "python -m benchmark.serve_bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    prompts = make_requests(args.tokenizer, args.num_requests, args.min_len, args.max_len, args.seed)
    warm = make_requests(args.tokenizer, args.warmup, args.min_len, args.min_len, args.seed + 1) if args.warmup else []
    notes = args.notes or (f"{args.num_requests} requests, prompts {args.min_len}..{args.max_len} tokens of news text, "
                           f"{args.max_tokens} greedy output tokens each (EOS ignored), Poisson arrivals at "
                           f"{args.rate} req/s, seed {args.seed}.")
    out = Path(args.out)
    targets = [(u.split("=", 1) if "=" in u.split("://")[0] else (u, u)) for u in args.url]
    targets += [tuple(spec.split("=", 1)) if "=" in spec else (spec, spec) for spec in args.launch]
    rows = []
    for i, (label, spec) in enumerate(targets):
        server = None
        if i >= len(args.url):
            overrides = shlex.split(args.common) + shlex.split(spec)
            log_path = Path(tempfile.gettempdir()) / f"serve_bench_{label}_{os.getpid()}.log"
            server = Launched(overrides, log_path=log_path)
            url, key = server.url, None
        else:
            url, key = spec, args.api_key
        try:
            if warm:
                asyncio.run(run_workload(url, warm, 4, 0, args.seed, api_key=key))
            row = {"config": label, **asyncio.run(run_workload(url, prompts, args.max_tokens, args.rate, args.seed,
                                                               api_key=key))}
        finally:
            if server is not None:
                server.close()
        rows.append(row)
        print(json.dumps({k: row.get(k) for k in COLUMNS}), flush=True)
        write_results(rows, out, command, notes)
    return rows


if __name__ == "__main__":
    main()
