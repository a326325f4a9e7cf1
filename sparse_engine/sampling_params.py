"""`SamplingParams`: how to pick each next token and when to stop."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field


GREEDY_BELOW = 1e-5  # temperatures below this are greedy


def _int(name: str, value, also: str = "") -> None:
    """A whole number (bool is not one: `max_tokens=True` is a typo, not 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int{' ' + also if also else ''}, got {value!r} ({type(value).__name__})")


def _real(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")


@dataclass
class SamplingParams:
    """temperature 0.0 (or any below 1e-5, as in vLLM) is exact greedy (argmax). top_k 0 / top_p 1.0 disable those filters.

    `seed` makes sampling reproducible per request; `stop` strings end generation (the stop string is
    removed from the text); `stop_token_ids` end it like EOS; `ignore_eos` keeps going to max_tokens.
    `min_tokens`: EOS and `stop_token_ids` are masked until this many tokens were generated (HF's
    `min_new_tokens`, vLLM's `min_tokens`; LongBench's samsum uses 1).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 64
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    return_logits: bool = False  # keep each step's full float32 logits in the output (tests, analysis)
    logprobs: int | None = None  # per output token: the sampled token's log-prob + this many top ones (None: none)

    def __post_init__(self):
        # Types first: a wrong type would otherwise fail deep inside a generate step (e.g.
        # `stop_token_ids=5`: "argument of type 'int' is not iterable" after the prompt was prefilled).
        _real("temperature", self.temperature)
        _real("top_p", self.top_p)
        _int("top_k", self.top_k)
        _int("max_tokens", self.max_tokens)
        if self.seed is not None:
            _int("seed", self.seed, "or None")
            if not -(1 << 63) <= self.seed < (1 << 64):
                raise ValueError(f"seed must be an int in [-2**63, 2**64) or None, got {self.seed}")
        for name in ("ignore_eos", "return_logits"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
            raise TypeError(f"stop must be a str or a list of str, got {self.stop!r}; e.g. stop=['\\n\\n']")
        if any(s == "" for s in self.stop):
            raise ValueError(f"stop={self.stop!r} holds an empty string, which every text contains (generation "
                             "would end after one token); remove it")
        self.stop = list(self.stop)
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in self.stop_token_ids):
            raise TypeError(f"stop_token_ids must be a list of int token ids, got {self.stop_token_ids!r}; "
                            f"e.g. stop_token_ids=[{self.stop_token_ids if isinstance(self.stop_token_ids, int) else 2}]")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids >= 0, got {self.stop_token_ids!r}")
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        if not self.temperature >= 0 or self.temperature == math.inf:  # `not >=` also catches nan
            raise ValueError(f"temperature must be >= 0 and finite (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or not \
                0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an int in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or self.logprobs < 0):
            raise ValueError(f"logprobs must be None or an int >= 0 (top log-probs per token), got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        # as vLLM: a temperature this small is argmax (dividing logits by it would overflow to inf)
        return self.temperature < GREEDY_BELOW
