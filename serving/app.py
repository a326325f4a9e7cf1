"""The OpenAI-compatible FastAPI app over one `EngineLoop`.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (the model's chat
template), GET /v1/kv_stats (the engine's KV statistics + server counters, JSON), GET /metrics (the
numeric ones, Prometheus text), GET /health. `stream=true` answers Server-Sent Events
(`data: {chunk}` ... `data: [DONE]`), `stream_options.include_usage` adds a usage chunk.

Safety: with an API key every endpoint needs `Authorization: Bearer <key>` (401); bodies over
`max_body_bytes` get 413; more than `max_concurrent_requests` generations at once get 429; prompts
over `max_prompt_tokens` or not leaving room under `max_model_len` get 400 naming the limit; a
generation running past `request_timeout_s` is aborted (504). Errors are OpenAI-shaped JSON
(`{"error": {"message", "type", "param", "code"}}`), never a traceback. A client that disconnects
aborts its generation and the engine frees its KV at once.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sparse_engine import LLM, RequestOutput, SamplingParams

from .engine_loop import EngineLoop, RequestHandle, Update
from .protocol import APIError, ChatCompletionRequest, CompletionRequest

log = logging.getLogger("deltakv.serve")


@dataclass
class ServeSettings:
    """Server knobs (conf/serve.yaml). `max_prompt_tokens` None = max_model_len - 1;
    `request_timeout_s` None = no timeout; `default_max_tokens`: /v1/completions without max_tokens
    (OpenAI's 16); chat without max_tokens may run to max_model_len."""

    served_model_name: str = "deltakv"
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_concurrent_requests: int = 64
    max_prompt_tokens: int | None = None
    request_timeout_s: float | None = 600.0
    default_max_tokens: int = 16

    def validate(self) -> None:
        for name in ("max_body_bytes", "max_concurrent_requests", "default_max_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1 or null, got {self.max_prompt_tokens}")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0 or null, got {self.request_timeout_s}")


_SP_FIELDS = {f.name for f in fields(SamplingParams)}


class _ClientGone(Exception):
    pass


# ------------------------------------------------------------------------------------------------
# ASGI guard: auth (401) and body size (413) before any route runs
# ------------------------------------------------------------------------------------------------
async def _send_error(send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    for k, v in (err.headers or {}).items():
        headers.append((k.lower().encode(), str(v).encode()))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Bearer auth on every endpoint when an API key is set; request bodies read here, at most
    `max_body_bytes` (413 above), and replayed to the app."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.expected is not None and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            return await _send_error(send, APIError(
                "Missing or wrong API key: send `Authorization: Bearer <key>` (the server's api_key / DELTAKV_API_KEY).",
                401, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
        too_large = APIError(f"The request body is larger than the server's limit of {self.max_body_bytes} bytes "
                             "(max_body_bytes).", 413, code="request_too_large")
        length = headers.get(b"content-length")
        if length is not None:
            try:
                if int(length) > self.max_body_bytes:
                    return await _send_error(send, too_large)
            except ValueError:
                return await _send_error(send, APIError("Invalid Content-Length header.", 400))
        chunks, size = [], 0
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                size += len(msg.get("body", b""))
                if size > self.max_body_bytes:
                    return await _send_error(send, too_large)
                chunks.append(msg.get("body", b""))
                if not msg.get("more_body", False):
                    break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay_receive():
            if replay:
                return replay.pop()
            return await receive()

        return await self.app(scope, replay_receive, send)


# ------------------------------------------------------------------------------------------------
# the app
# ------------------------------------------------------------------------------------------------
class _State:
    def __init__(self, llm: LLM, engine: EngineLoop, settings: ServeSettings):
        self.llm = llm
        self.engine = engine
        self.settings = settings
        self.tokenizer = llm.tokenizer
        self.max_model_len = int(llm.max_model_len)
        self.in_flight = 0
        self.rejected_429 = 0
        self.finished = 0
        self.kv_bytes_finished = 0
        self.vanilla_bytes_finished = 0
        self.created = int(time.time())


def build_app(llm: LLM, settings: ServeSettings | None = None, engine: EngineLoop | None = None) -> FastAPI:
    """The ASGI app serving `llm`. The engine loop starts with the app (lifespan) and stops with it."""
    settings = settings or ServeSettings()
    settings.validate()
    if llm.tokenizer is None:
        raise ValueError(f"{llm.model_path} has no tokenizer: the server needs one (text in, text out).")
    engine = engine or EngineLoop(llm)
    st = _State(llm, engine, settings)

    @asynccontextmanager
    async def lifespan(_app):
        if not engine.alive:
            engine.start()
        log.info("serving %s (method=%s, max_model_len=%d, kv budget %d bytes)", settings.served_model_name,
                 llm.method.name, st.max_model_len, llm.kv_budget_bytes)
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="deltakv-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = st

    # ---------------------------------------------------------------- errors, OpenAI-shaped
    @app.exception_handler(APIError)
    async def _api_error(_req, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(p) for p in first.get("loc", ())[1:] if not _is_type_tag(p)]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            msg, param = "The body is not valid JSON.", None
        elif first.get("type") == "missing":
            msg = f"Missing required field '{param}'." if param else "The request body is missing."
        else:
            msg = f"Invalid value for '{param}': {msg}." if param else f"{msg}."
        return JSONResponse(APIError(msg, 400, param=param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req, exc: StarletteHTTPException):
        return JSONResponse(APIError(str(exc.detail), exc.status_code).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(_req, exc: Exception):
        log.exception("internal error")
        return JSONResponse(APIError(f"Internal server error ({type(exc).__name__}).", 500).body(), status_code=500)

    # ---------------------------------------------------------------- info endpoints
    @app.get("/health")
    async def health():
        if not engine.alive:
            raise APIError("The engine loop is not running.", 503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": settings.served_model_name, "object": "model", "created": st.created, "owned_by": "deltakv",
            "root": str(llm.model_path), "max_model_len": st.max_model_len, "kv_method": llm.method.name}]}

    @app.get("/v1/kv_stats")
    async def kv_stats():
        return await _kv_stats(st)

    @app.get("/metrics")
    async def metrics():
        stats = await _kv_stats(st)
        lines = []
        for key, value in _flatten(stats):
            if isinstance(value, bool):
                value = int(value)
            if isinstance(value, (int, float)):
                lines.append(f"deltakv_{key} {value}")
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    # ---------------------------------------------------------------- generation
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_common(st, body)
        for name, bad in (("best_of", body.best_of not in (None, 1)), ("echo", body.echo),
                          ("suffix", bool(body.suffix))):
            if bad:
                raise APIError(f"'{name}' is not supported by this server.", 400, param=name)
        prompts = _completion_prompts(st, body.prompt)
        max_tokens = body.max_tokens if body.max_tokens is not None else settings.default_max_tokens
        params = [_sampling_params(body, max_tokens, body.logprobs) for _ in prompts]
        return await _generate(st, request, body, prompts, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _check_common(st, body)
        if body.tools:
            raise APIError("'tools' (function calling) is not supported by this server.", 400, param="tools")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise APIError("Only response_format type 'text' is supported.", 400, param="response_format")
        ids, text = _chat_prompt(st, body)
        limit = body.max_completion_tokens or body.max_tokens
        max_tokens = limit if limit is not None else max(1, st.max_model_len - len(ids))
        top = body.top_logprobs if body.logprobs else None
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError("'top_logprobs' needs 'logprobs': true.", 400, param="top_logprobs")
        params = [_sampling_params(body, max_tokens, (top or 0) if body.logprobs else None)]
        return await _generate(st, request, body, [(ids, text)], params, chat=True)

    return GuardMiddleware(app, settings.api_key, settings.max_body_bytes)


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _is_type_tag(part) -> bool:
    """pydantic puts the union member tried in an error's loc ('str', 'list[int]'...): not a field."""
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or "-" in part)


def app_state(app) -> _State:
    """The server state of an app from `build_app` (tests, benchmarks)."""
    inner = app.app if isinstance(app, GuardMiddleware) else app
    return inner.state.serve


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            if k == "per_sequence_bytes":
                continue
            yield from _flatten(v, key + "_")
        else:
            yield key, v


async def _kv_stats(st: _State) -> dict:
    def collect(llm: LLM) -> dict:
        stats = llm.kv_stats()
        per_token = stats.get("bytes_per_token") or 0
        running = list(llm.scheduler.running)
        vanilla = sum(s.num_computed for s in running) * per_token
        held = sum(stats.get("per_sequence_bytes", {}).values())
        stats["compression_ratio_running"] = (held / vanilla) if vanilla else None
        stats["requests_waiting"] = len(llm.scheduler.waiting)
        stats["requests_running"] = len(running)
        return stats

    try:
        stats = await asyncio.wait_for(asyncio.wrap_future(st.engine.call(collect)), 30)
    except RuntimeError as exc:
        raise APIError(str(exc), 503) from None
    stats["per_sequence_bytes"] = {str(k): v for k, v in stats.get("per_sequence_bytes", {}).items()}
    stats["server"] = {
        "requests_in_flight": st.in_flight, "requests_total": st.engine.requests_total,
        "requests_finished": st.finished, "requests_aborted": st.engine.requests_aborted,
        "requests_rejected_429": st.rejected_429, "engine_steps": st.engine.steps,
        "engine_errors": st.engine.engine_errors, "kv_bytes_finished": st.kv_bytes_finished,
        "compression_ratio_finished": (st.kv_bytes_finished / st.vanilla_bytes_finished
                                       if st.vanilla_bytes_finished else None),
    }
    return stats


def _check_common(st: _State, body) -> None:
    name = st.settings.served_model_name
    if body.model is not None and body.model != name:
        raise APIError(f"The model '{body.model}' does not exist; this server serves '{name}'.", 404,
                       param="model", code="model_not_found")
    if body.n != 1:
        raise APIError("n > 1 is not supported: this server returns one choice per prompt (n=1).", 400, param="n")
    for key in ("presence_penalty", "frequency_penalty"):
        if getattr(body, key):
            raise APIError(f"'{key}' is not supported by this server (use 0).", 400, param=key)
    if body.logit_bias:
        raise APIError("'logit_bias' is not supported by this server.", 400, param="logit_bias")
    if body.stream_options is not None and not body.stream:
        raise APIError("'stream_options' needs 'stream': true.", 400, param="stream_options")


def _check_prompt_len(st: _State, ids: list[int], param: str) -> None:
    n = len(ids)
    if n == 0:
        raise APIError("The prompt is empty.", 400, param=param)
    cap = st.settings.max_prompt_tokens
    if cap is not None and n > cap:
        raise APIError(f"The prompt has {n} tokens, over this server's limit of {cap} prompt tokens "
                       "(max_prompt_tokens).", 400, param=param, code="context_length_exceeded")
    if n >= st.max_model_len:
        raise APIError(f"This model's maximum context length is {st.max_model_len} tokens (max_model_len) and the "
                       f"prompt has {n} tokens, leaving no room for output. Shorten the prompt.", 400, param=param,
                       code="context_length_exceeded")
    vocab = st.llm.spec.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise APIError(f"Token ids {bad[:5]} are outside the vocabulary [0, {vocab}).", 400, param=param)


def _completion_prompts(st: _State, prompt) -> list[tuple[list[int], str | None]]:
    if isinstance(prompt, str):
        items = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        items = [list(prompt)]
    else:
        items = list(prompt)
    if not items:
        raise APIError("The prompt is empty.", 400, param="prompt")
    out = []
    for p in items:
        if isinstance(p, str):
            if not p:
                raise APIError("The prompt is empty.", 400, param="prompt")
            ids, text = st.tokenizer.encode(p), p
        else:
            ids, text = list(p), None
        _check_prompt_len(st, ids, "prompt")
        out.append((ids, text))
    return out


def _chat_prompt(st: _State, body: ChatCompletionRequest) -> tuple[list[int], str]:
    tok = st.tokenizer
    if not getattr(tok, "chat_template", None):
        raise APIError("This model has no chat template: use /v1/completions.", 400, param="messages")
    messages = []
    for i, m in enumerate(body.messages):
        content = m.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError("Only text content parts are supported.", 400, param=f"messages.{i}.content")
                parts.append(part["text"])
            content = "\n".join(parts)
        messages.append({"role": m.role, "content": content or ""})
    try:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - a template that refuses these messages (roles, order)
        raise APIError(f"The chat template refused the messages: {exc}", 400, param="messages") from None
    ids = tok.encode(text, add_special_tokens=False)
    _check_prompt_len(st, ids, "messages")
    return ids, text


def _sampling_params(body, max_tokens: int, logprobs: int | None) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(not s for s in stop):
        raise APIError("Stop strings must not be empty.", 400, param="stop")
    kw = dict(temperature=1.0 if body.temperature is None else body.temperature,
              top_p=1.0 if body.top_p is None else body.top_p, top_k=max(0, body.top_k or 0),
              max_tokens=max_tokens, seed=body.seed, stop=stop, stop_token_ids=list(body.stop_token_ids or []),
              ignore_eos=body.ignore_eos, logprobs=logprobs)
    if body.min_tokens:
        if "min_tokens" not in _SP_FIELDS:
            raise APIError("'min_tokens' is not supported by this engine.", 400, param="min_tokens")
        kw["min_tokens"] = body.min_tokens
    try:
        return SamplingParams(**kw)
    except ValueError as exc:
        msg = str(exc)
        param = next((k for k in ("temperature", "top_p", "top_k", "max_tokens", "min_tokens", "logprobs")
                      if msg.startswith(k)), None)
        raise APIError(msg, 400, param=param) from None


def _engine_error(exc: BaseException) -> APIError:
    if isinstance(exc, (ValueError, TypeError)):
        return APIError(str(exc), 400, param="prompt")
    log.error("engine failure: %s: %s", type(exc).__name__, exc)
    return APIError(f"The engine failed on this request ({type(exc).__name__}: {exc}).", 500)


class _Slot:
    """One of `max_concurrent_requests` generation slots (429 when none is left)."""

    def __init__(self, st: _State):
        self.st = st
        self.held = False

    def take(self) -> "_Slot":
        st = self.st
        if st.in_flight >= st.settings.max_concurrent_requests:
            st.rejected_429 += 1
            raise APIError(f"Too many concurrent requests: the server runs at most {st.settings.max_concurrent_requests} "
                           "at once (max_concurrent_requests). Retry later.", 429, code="rate_limit_exceeded",
                           headers={"Retry-After": "1"})
        st.in_flight += 1
        self.held = True
        return self

    def release(self) -> None:
        if self.held:
            self.held = False
            self.st.in_flight -= 1


class _Run:
    """The engine requests of one HTTP request: submit, await updates (timeout, disconnect), abort."""

    def __init__(self, st: _State, request: Request, prompts, params):
        self.st = st
        self.request = request
        self.queue: asyncio.Queue[Update] = asyncio.Queue()
        t = st.settings.request_timeout_s
        self.deadline = None if t is None else time.monotonic() + t
        self.handles: list[RequestHandle] = []
        self._checked = time.monotonic()
        try:
            for i, ((ids, text), sp) in enumerate(zip(prompts, params)):
                self.handles.append(st.engine.submit(ids, sp, text, queue=self.queue, index=i))
        except RuntimeError as exc:
            self.abort()
            raise APIError(str(exc), 503) from None
        self.finished: dict[int, RequestOutput] = {}

    async def next(self) -> Update:
        while True:
            now = time.monotonic()
            if now - self._checked > 0.25:  # also while tokens flow: a gone client stops its generation
                self._checked = now
                if await self.request.is_disconnected():
                    raise _ClientGone()
            wait = 0.25
            if self.deadline is not None:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise APIError(f"The request ran past the server's timeout of {self.st.settings.request_timeout_s} s "
                                   "(request_timeout_s) and was aborted.", 504, code="request_timeout",
                                   type="timeout_error")
                wait = min(wait, left)
            try:
                return await asyncio.wait_for(self.queue.get(), wait)
            except asyncio.TimeoutError:
                continue

    async def accepted(self) -> None:
        """Wait until the engine queued every request (a request that cannot fit is a 400 here)."""
        pending = set(range(len(self.handles)))
        early: list[Update] = []
        while pending:
            upd = await self.next()
            if upd.error is not None:
                raise _engine_error(upd.error)
            if upd.accepted:
                pending.discard(upd.index)
            else:
                early.append(upd)
        for upd in early:
            self.queue.put_nowait(upd)

    def abort(self) -> None:
        for h in self.handles:
            try:
                self.st.engine.abort(h)
            except RuntimeError:
                pass

    def record(self, out: RequestOutput) -> None:
        st = self.st
        st.finished += 1
        st.kv_bytes_finished += out.metrics.kv_bytes
        n = len(out.prompt_token_ids) + len(out.outputs[0].token_ids) - 1
        st.vanilla_bytes_finished += max(0, n) * st.llm.pool.bytes_per_slot * st.llm.spec.num_layers * \
            st.llm.spec.num_kv_heads


async def _generate(st: _State, request: Request, body, prompts, params, chat: bool):
    slot = _Slot(st).take()
    run = None
    try:
        run = _Run(st, request, prompts, params)
        await run.accepted()
    except BaseException as exc:
        if run is not None:
            run.abort()
        slot.release()
        if isinstance(exc, _ClientGone):
            return JSONResponse(APIError("Client disconnected.", 499).body(), status_code=499)
        raise
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    model = st.settings.served_model_name
    if body.stream:
        return _SSEResponse(_stream(st, run, slot, body, rid, created, model, chat), lambda: (run.abort(), slot.release()))
    try:
        while len(run.finished) < len(run.handles):
            upd = await run.next()
            if upd.error is not None:
                raise _engine_error(upd.error)
            if upd.output is not None:
                run.finished[upd.index] = upd.output
                run.record(upd.output)
    except _ClientGone:
        log.info("client went away: %s aborted", rid)
        return JSONResponse(APIError("Client disconnected.", 499).body(), status_code=499)
    finally:
        run.abort()  # no-op for finished requests; frees the KV of the others
        slot.release()
    outs = [run.finished[i] for i in range(len(run.handles))]
    usage = _usage(outs)
    if chat:
        o = outs[0].outputs[0]
        choice = {"index": 0, "message": {"role": "assistant", "content": o.text},
                  "logprobs": _chat_logprobs(st, o.logprobs, body.top_logprobs or 0) if body.logprobs else None,
                  "finish_reason": _finish(o.finish_reason)}
        if body.return_token_ids:
            choice.update(token_ids=o.token_ids, prompt_token_ids=outs[0].prompt_token_ids)
        return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": [choice], "usage": usage}
    choices = [{"index": i, "text": out.outputs[0].text,
                "logprobs": _completion_logprobs(st, out.outputs[0].logprobs, body.logprobs)
                if body.logprobs is not None else None,
                "finish_reason": _finish(out.outputs[0].finish_reason)} for i, out in enumerate(outs)]
    if body.return_token_ids:
        for c, out in zip(choices, outs):
            c.update(token_ids=out.outputs[0].token_ids, prompt_token_ids=out.prompt_token_ids)
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": usage}


class _SSEResponse(StreamingResponse):
    """Server-Sent Events whose cleanup (abort what still runs, free the concurrency slot) also runs
    when the stream never started or stopped early (the client went away before or during it)."""

    def __init__(self, gen, cleanup):
        super().__init__(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                self._cleanup()


def _usage(outs: list[RequestOutput]) -> dict:
    p = sum(len(o.prompt_token_ids) for o in outs)
    c = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _finish(reason: str | None) -> str | None:
    return reason if reason in ("stop", "length") else ("stop" if reason else None)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _TextStream:
    """Text deltas of one streamed choice: decodes the tokens so far and holds back what may still
    turn out to be a stop string (and an incomplete UTF-8 character), so that the streamed pieces
    concatenate to exactly the final text."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tok = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.sent = ""

    def update(self, new_ids: list[int]) -> str:
        self.ids += new_ids
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            if s in text:
                text = text[: text.index(s)]
        end = len(text) - self.hold
        while end > 0 and text[end - 1] == "\ufffd":
            end -= 1
        if end <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta = text[len(self.sent):end]
        self.sent += delta
        return delta

    def final(self, text: str) -> str:
        delta = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent = text
        return delta


async def _stream(st: _State, run: _Run, slot: _Slot, body, rid: str, created: int, model: str, chat: bool):
    kind = "chat.completion.chunk" if chat else "text_completion"
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    texts = {i: _TextStream(st.tokenizer, h.params.stop) for i, h in enumerate(run.handles)}
    top = (body.top_logprobs or 0) if chat else body.logprobs
    want_lp = bool(body.logprobs) if chat else body.logprobs is not None

    def chunk(i: int, text: str | None, finish: str | None, logprobs=None, role: bool = False,
              ids: list[int] | None = None) -> dict:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": i, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        if body.return_token_ids and ids is not None:
            choice["token_ids"] = ids
        out = {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]}
        if include_usage:
            out["usage"] = None
        return out

    try:
        if chat:
            yield _sse(chunk(0, None, None, role=True))
        while len(run.finished) < len(run.handles):
            try:
                upd = await run.next()
            except APIError as err:  # timeout: the error as the last event
                yield _sse(err.body())
                break
            if upd.error is not None:
                yield _sse(_engine_error(upd.error).body())
                break
            if upd.accepted:
                continue
            ts = texts[upd.index]
            lps = None
            if want_lp and upd.logprobs:
                lps = _chat_logprobs(st, upd.logprobs, top) if chat else _completion_logprobs(st, upd.logprobs, top)
            if upd.output is not None:
                ts.ids += upd.new_token_ids
                delta = ts.final(upd.output.outputs[0].text)
                run.finished[upd.index] = upd.output
                run.record(upd.output)
                yield _sse(chunk(upd.index, delta, _finish(upd.output.outputs[0].finish_reason), lps,
                                 ids=upd.new_token_ids))
            else:
                delta = ts.update(upd.new_token_ids)
                if delta or lps or (body.return_token_ids and upd.new_token_ids):
                    yield _sse(chunk(upd.index, delta, None, lps, ids=upd.new_token_ids))
        else:
            if include_usage:
                outs = [run.finished[i] for i in range(len(run.handles))]
                yield _sse({"id": rid, "object": kind, "created": created, "model": model, "choices": [],
                            "usage": _usage(outs)})
        yield "data: [DONE]\n\n"
    except _ClientGone:
        log.info("client went away: %s aborted", rid)
    finally:  # also on cancellation (the client disconnected): the engine frees the KV now
        run.abort()
        slot.release()


def _completion_logprobs(st: _State, entries, top: int | None) -> dict:
    """Legacy completions `logprobs`: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = 0
    for d in entries or []:
        chosen = next(iter(d))  # the sampled token is the first entry
        lp = d[chosen]
        text = lp.decoded_token or ""
        tokens.append(text)
        token_lps.append(lp.logprob)
        ranked = sorted(d.items(), key=lambda kv: kv[1].rank or 0)
        best: dict[str, float] = {}
        for _, v in ranked[:top or 0]:
            best.setdefault(v.decoded_token or "", v.logprob)  # two ids may decode alike: the likelier one
        tops.append(best if top else None)
        offsets.append(pos)
        pos += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(st: _State, entries, top: int) -> dict:
    content = []
    for d in entries or []:
        chosen = next(iter(d))
        lp = d[chosen]
        text = lp.decoded_token or ""
        ranked = sorted(d.items(), key=lambda kv: kv[1].rank or 0)[:top]
        content.append({"token": text, "logprob": lp.logprob, "bytes": list(text.encode("utf-8")),
                        "top_logprobs": [{"token": v.decoded_token or "", "logprob": v.logprob,
                                          "bytes": list((v.decoded_token or "").encode("utf-8"))} for _, v in ranked]})
    return {"content": content}
