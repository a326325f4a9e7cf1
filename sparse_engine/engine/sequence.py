"""`Sequence`: one request's tokens, progress through the KV cache, and status."""

from __future__ import annotations

import itertools
from enum import Enum, auto

from ..sampling_params import SamplingParams


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    HELD = auto()  # KV kept, nothing to run (a session between turns)
    FINISHED = auto()


_ids = itertools.count()


class Sequence:
    def __init__(self, prompt_token_ids: list[int], params: SamplingParams, segments: list[int] | None = None):
        self.seq_id = next(_ids)
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)
        self.params = params
        self.status = Status.WAITING
        self.num_computed = 0  # tokens whose K/V is in the cache (prefix of token_ids)
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        self.kv = None  # SequenceKV, owned by the cache method
        self.generator = None  # torch.Generator for seeded sampling
        self.hold = False  # session prefix: once every token is cached, keep the KV and do not sample
        self.last_logits = None  # held sequences keep the logits of their last token
        self.segments = segments  # caller-given segment lengths (tokens) partitioning the prompt's start
        self.logits: list = []  # per output token, when params.return_logits
        self.kv_bytes_at_finish = 0  # KV bytes the method held when the sequence finished
        self.arrival_time = self.first_token_time = self.finished_time = None  # time.time() stamps set by LLM (RequestOutput.metrics)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_pending(self) -> int:
        """Tokens not yet in the cache: the prompt (or its rest) during prefill, 1 during decode."""
        return self.num_tokens - self.num_computed

    @property
    def is_prefill(self) -> bool:
        return self.num_pending > 1 or self.num_computed < self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED
