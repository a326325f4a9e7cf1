"""`EngineLoop`: one thread that owns the `LLM` and runs continuous batching over every request.

The HTTP side (an asyncio event loop) never touches the engine: it `submit`s token ids and
`SamplingParams` and reads `Update`s from the request's asyncio queue. The engine thread, between
steps, adds queued requests (`LLM.add_request`), aborts those whose client went away (`LLM.abort`:
the sequence's KV goes back at once) and runs `call`s (e.g. `kv_stats`); each `LLM.step()` then
advances every running request together, and each request that gained tokens gets one `Update`
(its new token ids; the final `RequestOutput` once it finished).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from sparse_engine import LLM, RequestOutput, SamplingParams

log = logging.getLogger("deltakv.serve.engine")


@dataclass
class Update:
    """What one request gained in one engine step: its new output token ids; `output` (the final
    `RequestOutput`) when it finished; `error` when it could not run (a bad request: ValueError /
    TypeError, or an engine failure). `logprobs`: the new tokens' entries when the request asked.
    `accepted`: the first update of a request the engine queued (nothing generated yet). `index`:
    the request's index among those of one HTTP request (they may share a queue)."""

    new_token_ids: list[int] = field(default_factory=list)
    output: RequestOutput | None = None
    error: BaseException | None = None
    logprobs: list | None = None
    accepted: bool = False
    index: int = 0


class RequestHandle:
    """The HTTP side's view of one submitted request (created on the event loop thread)."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, prompt: str | None,
                 queue: asyncio.Queue | None = None, index: int = 0):
        self.prompt_ids = prompt_ids
        self.params = params
        self.prompt = prompt
        self.index = index
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Update] = queue if queue is not None else asyncio.Queue()
        self.seq = None  # the engine's Sequence, set on the engine thread
        self.sent = 0  # output tokens already published (engine thread)
        self.done = False  # a final update (output or error) was published

    def _publish(self, update: Update) -> None:
        """Engine thread -> event loop. A closed loop (server shutting down) drops the update."""
        update.index = self.index
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, update)
        except RuntimeError:
            pass


class EngineLoop:
    """Owns `llm` on one daemon thread; every public method is safe to call from other threads."""

    def __init__(self, llm: LLM, name: str = "deltakv-engine"):
        self.llm = llm
        self._cmds: deque = deque()
        self._wake = threading.Event()
        self._active: dict[int, RequestHandle] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.steps = 0
        self.requests_total = 0
        self.requests_aborted = 0
        self.engine_errors = 0
        self.started_at = time.time()

    # ------------------------------------------------------------------ lifetime
    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Abort whatever runs, give every slot back and end the thread."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def num_active(self) -> int:
        return len(self._active)

    # ------------------------------------------------------------------ commands (any thread)
    def submit(self, prompt_ids: list[int], params: SamplingParams, prompt: str | None = None,
               queue: asyncio.Queue | None = None, index: int = 0) -> RequestHandle:
        """Queue one request (call from the event loop: the handle binds to it). Requests given one
        `queue` publish into it, each update tagged with the request's `index`."""
        handle = RequestHandle(list(prompt_ids), params, prompt, queue, index)
        self._command(("add", handle))
        return handle

    def abort(self, handle: RequestHandle) -> None:
        """End `handle`'s request and free its KV (no-op once it finished)."""
        self._command(("abort", handle))

    def call(self, fn: Callable[[LLM], Any]) -> concurrent.futures.Future:
        """Run `fn(llm)` on the engine thread between two steps; its result in a Future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._command(("call", (fn, fut)))
        return fut

    def _command(self, cmd) -> None:
        if self._stopping or not self._thread.is_alive():
            raise RuntimeError("the engine loop is not running")
        self._cmds.append(cmd)  # deque.append / popleft are thread-safe
        self._wake.set()

    # ------------------------------------------------------------------ engine thread
    def _drain(self) -> None:
        while self._cmds:
            kind, arg = self._cmds.popleft()
            if kind == "add":
                self._add(arg)
            elif kind == "abort":
                self._abort(arg)
            else:
                fn, fut = arg
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(self.llm))
                    except BaseException as exc:  # noqa: BLE001 - handed to the caller
                        fut.set_exception(exc)

    def _add(self, h: RequestHandle) -> None:
        if h.done:  # aborted before the engine saw it
            return
        try:
            h.seq = self.llm.add_request(h.prompt_ids, h.params)
        except (ValueError, TypeError) as exc:  # the request does not fit: the client's 400
            h.done = True
            h._publish(Update(error=exc))
            return
        self.requests_total += 1
        self._active[h.seq.seq_id] = h
        h._publish(Update(accepted=True))

    def _abort(self, h: RequestHandle) -> None:
        if h.done:
            return
        h.done = True
        if h.seq is not None:
            self._active.pop(h.seq.seq_id, None)
            if not h.seq.finished:
                self.llm.abort(h.seq)
                self.requests_aborted += 1

    def _fail_all(self, exc: BaseException) -> None:
        """An engine step raised: every running request ends with the error, every slot goes back."""
        self.engine_errors += 1
        for h in list(self._active.values()):
            h.done = True
            h._publish(Update(error=exc))
        self._active.clear()
        try:
            self.llm.abort_all()
        except Exception:  # noqa: BLE001
            log.exception("abort_all after an engine failure failed too")

    def _publish_progress(self) -> None:
        llm = self.llm
        for sid, h in list(self._active.items()):
            seq = h.seq
            n = len(seq.token_ids) - seq.num_prompt_tokens
            if seq.finished:
                out = llm.output(seq, h.prompt)
                lps = out.outputs[0].logprobs[h.sent:] if out.outputs[0].logprobs is not None else None
                h.done = True
                h._publish(Update(new_token_ids=out.outputs[0].token_ids[h.sent:], output=out, logprobs=lps))
                del self._active[sid]
            elif n > h.sent:
                new = seq.token_ids[seq.num_prompt_tokens + h.sent:]
                lps = None
                if h.params.logprobs is not None:
                    lps = llm.output(seq).outputs[0].logprobs[h.sent:n]
                h.sent = n
                h._publish(Update(new_token_ids=new, logprobs=lps))

    def _run(self) -> None:
        llm = self.llm
        while True:
            self._wake.clear()
            try:
                self._drain()
            except Exception as exc:  # noqa: BLE001 - never let the loop die on one command
                log.exception("engine command failed")
                self._fail_all(exc)
            if self._stopping:
                break
            if not llm.scheduler.has_work():
                self._wake.wait(1.0)
                continue
            try:
                llm.step()
            except Exception as exc:  # noqa: BLE001 - the requests get the error, the server stays up
                log.exception("engine step failed; aborting the %d running request(s)", len(self._active))
                self._fail_all(exc)
                continue
            self.steps += 1
            self._publish_progress()
        # shutting down: nothing keeps KV
        for h in list(self._active.values()):
            h.done = True
            h._publish(Update(error=RuntimeError("the server is shutting down")))
        self._active.clear()
        try:
            llm.abort_all()
        except Exception:  # noqa: BLE001
            log.exception("abort_all at shutdown failed")
