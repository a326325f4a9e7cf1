"""`deltakv-serve` with real clients: the `openai` package (streaming and not, threads, asyncio) against
live servers on free ports, equal to offline greedy `generate`; auth (401), limits (413 / 429 / 504),
OpenAI-shaped 400s naming the field, client disconnects freeing the KV, a 64-request streamed load
test, and the Hydra composition of the command. Model: a tiny random llama with the shipped
SmolLM2 tokenizer (and its chat template)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serving import BackgroundServer, ServeSettings, build_app  # noqa: E402
from sparse_engine import LLM, SamplingParams  # noqa: E402

NAME = "tiny-smol"
KEY = "sk-test-key"
KV_BYTES = 64 << 20
MAX_LEN = 4096  # the tiny model's max_position_embeddings
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory, shipped_model_path, tmp_path_factory):
    """A tiny random llama of SmolLM2's vocabulary with SmolLM2's tokenizer and chat template."""
    dst = tmp_path_factory.mktemp("serve_model")
    shutil.copytree(tiny_model_factory("llama", vocab_size=49152), dst, dirs_exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(Path(shipped_model_path) / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def ref_llm(model_dir):
    return LLM(model_dir, dtype="float32", kv_cache_bytes=KV_BYTES, max_model_len=MAX_LEN)


@pytest.fixture(scope="module")
def server(model_dir):
    llm = LLM(model_dir, dtype="float32", kv_cache_bytes=KV_BYTES, max_model_len=MAX_LEN)
    app = build_app(llm, ServeSettings(served_model_name=NAME, api_key=KEY, max_concurrent_requests=128))
    with BackgroundServer(app) as srv:
        srv.llm = llm
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def limited(model_dir):
    """One generation at a time, 4 KB bodies, 1.5 s per request, no key."""
    llm = LLM(model_dir, dtype="float32", kv_cache_bytes=KV_BYTES)
    app = build_app(llm, ServeSettings(served_model_name=NAME, max_concurrent_requests=1, max_body_bytes=4096,
                                       request_timeout_s=1.5))
    with BackgroundServer(app) as srv:
        srv.llm = llm
        yield srv


def _auth(key=KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _greedy(llm, prompts, max_tokens, **kw):
    return llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw), use_tqdm=False)


def _chat_ids(tok, messages) -> list[int]:
    return tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)


def _wait_idle(url: str, headers: dict | None = None, timeout: float = 15.0) -> dict:
    """kv_stats once nothing runs, waits or holds KV (requests are aborted asynchronously)."""
    t0 = time.monotonic()
    while True:
        stats = httpx.get(url + "/v1/kv_stats", headers=headers or {}).json()
        if stats["slots_used"] == 0 and stats["requests_running"] == 0 and stats["requests_waiting"] == 0 \
                and stats["server"]["requests_in_flight"] == 0:
            return stats
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"the server did not go idle: {stats}")
        time.sleep(0.05)


def _error(fn) -> "openai.APIStatusError":
    with pytest.raises(openai.APIStatusError) as info:
        fn()
    return info.value


# ------------------------------------------------------------------ auth, models, stats
def test_every_endpoint_needs_the_key(server, client):
    for method, path in (("GET", "/v1/models"), ("GET", "/v1/kv_stats"), ("GET", "/metrics"), ("GET", "/health"),
                         ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")):
        for headers in ({}, _auth("wrong"), {"Authorization": KEY}):
            r = httpx.request(method, server.url + path, headers=headers, json={"model": NAME, "prompt": "hi"})
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(server.url + "/health", headers=_auth()).json() == {"status": "ok"}


def test_kv_stats_and_metrics(server, client):
    client.completions.create(model=NAME, prompt="Hello there", max_tokens=3, temperature=0)
    stats = _wait_idle(server.url, _auth())
    assert stats["method"] == "vanilla" and stats["slots_total"] > 0 and stats["kv_budget_bytes"] == KV_BYTES
    assert stats["server"]["requests_finished"] >= 1 and stats["server"]["compression_ratio_finished"] == 1.0
    text = httpx.get(server.url + "/metrics", headers=_auth()).text
    assert "deltakv_slots_total " in text and "deltakv_server_requests_finished " in text


# ------------------------------------------------------------------ completions
def test_completion_equals_offline_greedy(client, ref_llm):
    prompt = "The quick brown fox jumps over the lazy dog because"
    want = _greedy(ref_llm, prompt, 12)
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == NAME and len(r.choices) == 1
    assert r.choices[0].text == want.outputs[0].text
    assert r.choices[0].finish_reason == want.outputs[0].finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(want.prompt_token_ids), len(want.outputs[0].token_ids))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    ids = client.completions.create(model=NAME, prompt=want.prompt_token_ids, max_tokens=12, temperature=0,
                                    extra_body={"return_token_ids": True})
    assert ids.choices[0].token_ids == want.outputs[0].token_ids and ids.choices[0].text == want.outputs[0].text
    batch = client.completions.create(model=NAME, prompt=[prompt, "Hello"], max_tokens=5, temperature=0)
    ref = _greedy(ref_llm, [prompt, "Hello"], 5)
    assert [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == [o.outputs[0].text for o in ref]


def test_completion_stream_concatenates_to_the_text(client, ref_llm):
    prompt = "Once upon a time in a land far away"
    want = _greedy(ref_llm, prompt, 16)
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == want.outputs[0].text and len(texts) > 1
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == want.outputs[0].finish_reason and all(f is None for f in finals[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.outputs[0].token_ids)


def test_stop_strings_seed_and_top_k(client, ref_llm):
    prompt = "In the beginning there was"
    full = _greedy(ref_llm, prompt, 24, ignore_eos=True).outputs[0].text
    # a 3-character ASCII stop string from the middle of the greedy text (random weights: odd text)
    starts = [i for i in range(len(full) // 3, len(full) - 3) if full[i:i + 3].isascii() and full[i:i + 3].strip()]
    assert starts, full
    stop = full[starts[0]:starts[0] + 3]
    want = full[: full.index(stop)]
    for stream in (False, True):
        r = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0, stop=[stop],
                                      extra_body={"ignore_eos": True}, stream=stream)
        if stream:
            text = "".join(c.choices[0].text for c in r)
        else:
            assert r.choices[0].finish_reason == "stop"
            text = r.choices[0].text
        assert text == want, (stream, stop)
    seeded = [client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=1.0, seed=7,
                                        extra_body={"return_token_ids": True, "ignore_eos": True}).choices[0].token_ids
              for _ in range(2)]
    offline = ref_llm.generate(prompt, SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True),
                               use_tqdm=False).outputs[0].token_ids
    assert seeded[0] == seeded[1] == offline
    top1 = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=1.0, seed=3,
                                     extra_body={"top_k": 1, "return_token_ids": True, "ignore_eos": True})
    assert top1.choices[0].token_ids == _greedy(ref_llm, prompt, 12, ignore_eos=True).outputs[0].token_ids


def test_logprobs(client):
    r = client.completions.create(model=NAME, prompt="Logprobs please", max_tokens=6, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and 1 <= len(top) <= 2 and max(top.values()) == pytest.approx(chosen)  # greedy: the best
    assert lp.text_offset[0] == 0
    streamed = client.completions.create(model=NAME, prompt="Logprobs please", max_tokens=6, temperature=0,
                                         logprobs=2, stream=True, extra_body={"ignore_eos": True})
    tokens = [t for c in streamed for t in (c.choices[0].logprobs.tokens if c.choices[0].logprobs else [])]
    assert tokens == lp.tokens
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == pytest.approx(c.logprob) for c in content)


# ------------------------------------------------------------------ chat
def test_chat_uses_the_template_and_equals_offline(client, ref_llm):
    messages = [{"role": "user", "content": "Name three colours."}]
    ids = _chat_ids(ref_llm.tokenizer, messages)
    want = _greedy(ref_llm, ids, 10)
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.outputs[0].text and r.usage.prompt_tokens == len(ids)
    parts = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Name three colours."}]}], max_tokens=10, temperature=0)
    assert parts.choices[0].message.content == want.outputs[0].text
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.outputs[0].text
    assert chunks[-1].choices[0].finish_reason == want.outputs[0].finish_reason


# ------------------------------------------------------------------ errors
def test_bad_requests_are_openai_400s_naming_the_field(server, client):
    e = _error(lambda: client.completions.create(model=NAME, prompt="hi", n=2))
    assert e.status_code == 400 and e.param == "n" and "n=1" in e.message
    e = _error(lambda: client.completions.create(model=NAME, prompt="hi", temperature=-1))
    assert e.status_code == 400 and e.param == "temperature"
    e = _error(lambda: client.completions.create(model=NAME, prompt="hi", max_tokens=0))
    assert e.status_code == 400 and e.param == "max_tokens"
    e = _error(lambda: client.completions.create(model=NAME, prompt=list(range(3, MAX_LEN + 10))))
    assert e.status_code == 400 and e.param == "prompt" and e.code == "context_length_exceeded"
    assert str(MAX_LEN) in e.message and "max_model_len" in e.message
    e = _error(lambda: client.completions.create(model=NAME, prompt=[3, 10 ** 7]))
    assert e.status_code == 400 and "vocabulary" in e.message
    e = _error(lambda: client.completions.create(model="gpt-4", prompt="hi"))
    assert e.status_code == 404 and e.code == "model_not_found"
    e = _error(lambda: client.completions.create(model=NAME, prompt="hi", stop=[""]))
    assert e.status_code == 400 and e.param == "stop"
    e = _error(lambda: client.completions.create(model=NAME, prompt="hi", echo=True))
    assert e.status_code == 400 and e.param == "echo"
    e = _error(lambda: client.completions.create(model=NAME, prompt="hi", presence_penalty=0.5))
    assert e.status_code == 400 and e.param == "presence_penalty"
    e = _error(lambda: client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}],
                                                      top_logprobs=2))
    assert e.status_code == 400 and e.param == "top_logprobs"
    e = _error(lambda: client.chat.completions.create(model=NAME, messages=[]))
    assert e.status_code == 400 and e.param == "messages"
    e = _error(lambda: client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]))
    assert e.status_code == 400 and e.param == "messages.0.content"
    raw = httpx.post(server.url + "/v1/completions", headers=_auth(), json={"model": NAME})
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "prompt"
    raw = httpx.post(server.url + "/v1/completions", headers={**_auth(), "Content-Type": "application/json"},
                     content=b"{not json")
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    raw = httpx.get(server.url + "/v1/nothing", headers=_auth())
    assert raw.status_code == 404 and "error" in raw.json()
    _wait_idle(server.url, _auth())


# ------------------------------------------------------------------ concurrency
def test_concurrent_requests_from_threads(client, ref_llm):
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 49152) for _ in range(rng.randrange(4, 120))] for _ in range(12)]
    want = [o.outputs[0].token_ids for o in _greedy(ref_llm, prompts, 10)]

    def one(i):
        kw = dict(model=NAME, prompt=prompts[i], max_tokens=10, temperature=0, extra_body={"return_token_ids": True})
        if i % 2:
            return [t for c in client.completions.create(stream=True, **kw)
                    for t in getattr(c.choices[0], "token_ids", None) or []]
        return client.completions.create(**kw).choices[0].token_ids

    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(one, range(len(prompts))))
    assert got == want


def test_load_64_concurrent_streams_equal_offline_greedy(server, ref_llm):
    """64 streamed requests of mixed prompt / output lengths at once: all complete, tokens equal
    offline greedy `generate`, the engine batched them, and nothing holds KV afterwards."""
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 49152) for _ in range(rng.randrange(4, 400))] for _ in range(64)]
    max_tokens = [rng.randrange(1, 48) for _ in prompts]
    ref = ref_llm.generate(prompts, [SamplingParams(temperature=0.0, max_tokens=m) for m in max_tokens], use_tqdm=False)
    before = httpx.get(server.url + "/v1/kv_stats", headers=_auth()).json()["server"]["engine_steps"]

    async def run():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)

        async def one(p, m):
            ids, text, finish = [], [], None
            stream = await aclient.completions.create(model=NAME, prompt=p, max_tokens=m, temperature=0, stream=True,
                                                      extra_body={"return_token_ids": True})
            async for c in stream:
                ids += getattr(c.choices[0], "token_ids", None) or []
                text.append(c.choices[0].text)
                finish = c.choices[0].finish_reason or finish
            return ids, "".join(text), finish

        try:
            return await asyncio.gather(*(one(p, m) for p, m in zip(prompts, max_tokens)))
        finally:
            await aclient.close()

    got = asyncio.run(run())
    assert [g[0] for g in got] == [o.outputs[0].token_ids for o in ref]
    assert [g[1] for g in got] == [o.outputs[0].text for o in ref]
    assert [g[2] for g in got] == [o.outputs[0].finish_reason for o in ref]
    stats = _wait_idle(server.url, _auth())
    assert stats["slots_used"] == 0 and stats["server"]["requests_in_flight"] == 0
    steps = stats["server"]["engine_steps"] - before
    assert steps < sum(len(o.outputs[0].token_ids) for o in ref) / 4, "the engine loop batched the requests"


# ------------------------------------------------------------------ limits
def test_body_limit_413(limited):
    big = {"model": NAME, "prompt": "word " * 2000, "max_tokens": 1}
    r = httpx.post(limited.url + "/v1/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large" and "4096" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the server counts what arrives
        body = json.dumps(big).encode()
        for i in range(0, len(body), 1000):
            yield body[i:i + 1000]

    r = httpx.post(limited.url + "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    ok = httpx.post(limited.url + "/v1/completions", json={"model": NAME, "prompt": "short", "max_tokens": 2})
    assert ok.status_code == 200


def test_concurrency_limit_429(limited):
    body = {"model": NAME, "prompt": "go on and on", "max_tokens": 4000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    c = openai.OpenAI(base_url=limited.url + "/v1", api_key="unused", max_retries=0)
    with httpx.stream("POST", limited.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # keep it: a collected iterator closes the connection
        assert next(line for line in lines if line.startswith("data: "))
        assert httpx.get(limited.url + "/v1/kv_stats").json()["server"]["requests_in_flight"] == 1
        with pytest.raises(openai.RateLimitError) as info:
            c.completions.create(model=NAME, prompt="hi", max_tokens=2)
        assert info.value.response.headers["retry-after"] == "1" and "max_concurrent_requests" in info.value.message
    stats = _wait_idle(limited.url)
    assert stats["server"]["requests_rejected_429"] >= 1
    assert c.completions.create(model=NAME, prompt="hi", max_tokens=2).usage.completion_tokens >= 1


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_and_frees_the_kv(server, stream):
    """A client that goes away mid-generation: its request is aborted (not run to the end) and its KV freed."""
    before = httpx.get(server.url + "/v1/kv_stats", headers=_auth()).json()["server"]["requests_aborted"]
    body = {"model": NAME, "prompt": "go on and on", "max_tokens": MAX_LEN - 16, "temperature": 0, "stream": stream,
            "ignore_eos": True}
    if stream:
        with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=_auth(), timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # keep it: a collected iterator closes the connection
            assert next(line for line in lines if line.startswith("data: "))
            assert httpx.get(server.url + "/v1/kv_stats", headers=_auth()).json()["slots_used"] > 0
    else:
        with pytest.raises(httpx.TimeoutException):  # the client gives up after 0.3 s
            httpx.post(server.url + "/v1/completions", json=body, headers=_auth(), timeout=0.3)
    stats = _wait_idle(server.url, _auth())
    assert stats["server"]["requests_aborted"] == before + 1, "aborted, not run to max_tokens"


def test_request_timeout_aborts(limited):
    r = httpx.post(limited.url + "/v1/completions", timeout=60,
                   json={"model": NAME, "prompt": "never ending", "max_tokens": 4000, "ignore_eos": True})
    assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
    assert "request_timeout_s" in r.json()["error"]["message"]
    _wait_idle(limited.url)


# ------------------------------------------------------------------ the command
def test_serve_config_composes_like_eval(model_dir, monkeypatch):
    from serving.cli import compose, engine_kwargs, settings_from

    cfg = compose(["method=snapkv", "kv_budget=64", f"model.path={model_dir}", "kv_cache_bytes=1000000",
                   "engine.max_model_len=512"])
    model, method, kw = engine_kwargs(cfg)
    assert (model, method) == (str(model_dir), "snapkv")
    assert kw["budget"] == 64 and kw["kv_cache_bytes"] == 1000000 and kw["max_model_len"] == 512
    assert "dtype" not in kw  # null engine knobs are not passed
    assert cfg.host == "127.0.0.1"
    monkeypatch.setenv("DELTAKV_API_KEY", "from-env")
    s = settings_from(cfg, model)
    assert s.api_key == "from-env" and s.served_model_name == str(model_dir) and s.max_concurrent_requests == 64
    monkeypatch.delenv("DELTAKV_API_KEY")
    assert settings_from(compose([]), None).api_key is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_deltakv_serve_command(model_dir):
    port = _free_port()
    env = {**os.environ, "DELTAKV_API_KEY": "k"}
    proc = subprocess.Popen([sys.executable, "-m", "serving.cli", f"model.path={model_dir}", f"port={port}",
                             "served_model_name=tiny", "engine.dtype=float32", f"kv_cache_bytes={KV_BYTES}",
                             "log_level=warning"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(url + "/health", headers=_auth("k")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() - t0 < 120, "deltakv-serve did not start"
            time.sleep(0.2)
        c = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        r = c.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens >= 1
        assert httpx.get(url + "/v1/models").status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0, proc.stdout.read().decode()


# ------------------------------------------------------------------ the serving benchmark
def test_serve_bench_helpers():
    from benchmark.serve_bench import percentile, poisson_arrivals

    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5 and percentile([5.0], 99) == 5.0
    assert percentile([0.0, 10.0], 90) == pytest.approx(9.0)
    arr = poisson_arrivals(2000, 4.0, seed=1)
    assert arr[0] == 0 and arr == sorted(arr) and arr == poisson_arrivals(2000, 4.0, seed=1)
    assert 2000 / arr[-1] == pytest.approx(4.0, rel=0.1)  # mean rate
    assert poisson_arrivals(3, 0, seed=1) == [0.0, 0.0, 0.0]


def test_serve_bench_against_a_live_server(server, model_dir, tmp_path):
    from benchmark.serve_bench import main

    out = tmp_path / "bench.md"
    rows = main(["--url", f"tiny={server.url}", "--api_key", KEY, "--tokenizer", str(model_dir), "--num_requests", "6",
                 "--rate", "50", "--min_len", "16", "--max_len", "64", "--max_tokens", "5", "--warmup", "1",
                 "--out", str(out)])
    r = rows[0]
    assert r["config"] == "tiny" and r["ok"] == r["requests"] == 6 and r["errors"] == []
    assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] and r["itl_p50_ms"] > 0 and r["out_tok_s"] > 0
    assert r["kv_ratio_vs_vanilla"] == 1.0 and r["kv_budget_bytes"] == KV_BYTES
    md = out.read_text()
    assert md.startswith("Command: `python -m benchmark.serve_bench") and "| tiny | 6 | 6 |" in md
    assert out.with_suffix(".csv").read_text().startswith("# python -m benchmark.serve_bench")


def test_deltakv_serve_refuses_bad_names_before_loading_anything():
    """A bad method / model group name is a clear error (exit 2), not a silently skipped optional group."""
    for arg, want in (("method=snapvk", "Closest: 'snapkv'"), ("model=smollm", "Closest: 'smollm2_135m'"),
                      ("kv_budget=0.5", "kv_budget must be")):
        proc = subprocess.run([sys.executable, "-m", "serving.cli", arg, "port=1"], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and want in proc.stderr and "Traceback" not in proc.stderr, (arg, proc.stderr)
