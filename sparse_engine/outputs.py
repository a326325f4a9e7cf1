"""Results of `LLM.generate` / `generate_session`, shaped like vLLM's `vllm.outputs`.

    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0.0))[0]
    out.outputs[0].text, out.outputs[0].token_ids, out.outputs[0].finish_reason
    out.prompt_token_ids, out.metrics.first_token_time - out.metrics.arrival_time  # TTFT (s)

`RequestOutput` is one request: its prompt, one `CompletionOutput` per generated sequence (always
one here: the engine has no `n` / beam search), whether it finished, and `RequestMetrics` (wall-clock
`time.time()` stamps like vLLM, plus this engine's KV bytes and preemptions).

Transitional: `LLM.generate` used to return dicts. A `RequestOutput` still answers the old keys
read-only - `out["text"]`, `out["token_ids"]`, `out["finish_reason"]`, `out["logits"]` (only with
`return_logits`), `out["kv_bytes"]`, `out["num_preemptions"]`, `out["prompt_token_ids"]`, plus
`.get()`, `in` and `.keys()` - without a warning, so that callers can migrate at their own pace. New
code should use the attributes; the shim will go once the callers in this repository are migrated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Logprob:
    """One token's log-probability at one position (raw model distribution, before temperature /
    top-k / top-p), its rank in that distribution (1 = most likely) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One generated sequence of a request.

    `logprobs`: when `SamplingParams.logprobs` is set, one dict per output token mapping token id ->
    `Logprob`: the sampled token plus the `logprobs` most likely ones; None otherwise.
    `cumulative_logprob`: the sum of the sampled tokens' log-probabilities (None without logprobs).
    `finish_reason`: "stop" (EOS, a stop token or a stop string), "length" (max_tokens or
    max_model_len), "abort", or None while the request runs. `stop_reason`: the stop string or stop
    token id that ended it (None for EOS and the other reasons). `logits`: this engine's extension,
    each step's float32 logits when `SamplingParams.return_logits` (None otherwise).
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logits: list | None = field(default=None, repr=False, compare=False)

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """`time.time()` stamps of one request: arrival (added to the engine), first output token
    accepted, finish (None until then); the KV bytes the cache method held for it (at finish, or now
    while it runs) and how often it was preempted."""

    arrival_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    kv_bytes: int = 0
    num_preemptions: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        if self.arrival_time is None or self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        if self.arrival_time is None or self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time


_MISSING = object()


def _legacy_logits(o: "RequestOutput"):
    logits = o.outputs[0].logits if o.outputs else None
    return _MISSING if logits is None else logits  # the old dict had the key only with return_logits


# old dict key -> how to read it from a RequestOutput (transitional, see the module docstring)
_LEGACY_KEYS = {
    "text": lambda o: o.outputs[0].text,
    "token_ids": lambda o: o.outputs[0].token_ids,
    "prompt_token_ids": lambda o: o.prompt_token_ids,
    "finish_reason": lambda o: o.outputs[0].finish_reason,
    "num_preemptions": lambda o: o.metrics.num_preemptions,
    "kv_bytes": lambda o: o.metrics.kv_bytes,
    "logits": _legacy_logits,
}


@dataclass
class RequestOutput:
    """One request's result (or its state so far while `finished` is False)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics = field(default_factory=RequestMetrics)

    # ------------------------------------------------------------ transitional dict-style access
    def __getitem__(self, key: str) -> Any:
        """Read-only access by the old dict keys (`out["text"]` ...); prefer the attributes."""
        getter = _LEGACY_KEYS.get(key) if isinstance(key, str) else None
        value = getter(self) if getter is not None else _MISSING
        if value is _MISSING:
            raise KeyError(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in _LEGACY_KEYS and self.get(key, _MISSING) is not _MISSING

    def keys(self) -> list[str]:
        """The old dict's keys (so `dict(out)` still gives the old dict)."""
        return [k for k in _LEGACY_KEYS if k in self]
