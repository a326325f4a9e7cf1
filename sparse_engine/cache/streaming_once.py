"""`streaming` with `mode="once"`: kvpress's StreamingLLMPress convention.

The prompt is prefilled with FULL attention (vanilla), then, once, every layer keeps its first
`sink_size` tokens and the most recent `budget - sink_size` prompt tokens (or, with
`compression_ratio` r, int(T * (1 - r)) tokens of a T-token prompt, sinks included: kvpress's
`n_pruned = k_len - int(k_len * (1 - r))` tokens after the sinks are dropped); decode then appends
every new token (the cache grows). Evicted slots go back to the pool. Today's streaming (windowed
prefill, a rolling ring during decode) stays `mode="rolling"`, the default (`streaming.py`).

Reference (read, not copied): NVIDIA/kvpress `kvpress/presses/streaming_llm_press.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import CacheMethod
from .budgets import ratio_budget


@dataclass
class OnceState:
    evicted: bool = False


class StreamingOnceCache(CacheMethod):
    name = "streaming"

    def __init__(self, config, spec, pool, sliding_window=None):
        super().__init__(config, spec, pool, sliding_window)
        self.budgets = config.layer_budgets(spec.num_layers)

    def new_sequence(self, seq) -> None:
        super().new_sequence(seq)
        seq.kv.state = OnceState()

    def budgets_for(self, prompt_len: int) -> list[int]:
        c = self.config
        if c.compression_ratio is None:
            return self.budgets
        return [max(ratio_budget(prompt_len, c.compression_ratio), min(prompt_len, c.sink_size))] * self.spec.num_layers

    def expected_kv_tokens(self, prompt_len: int) -> int:
        return sum(min(prompt_len, b) for b in self.budgets_for(prompt_len)) * self.spec.num_kv_heads

    def after_step(self, seq, prefill_done: bool, num_new_tokens: int) -> None:
        """Once the prompt is complete: drop, per layer, the prompt tokens between the sinks and the
        layer's most recent budget - sink_size (tables are in position order, nothing evicted yet)."""
        st: OnceState = seq.kv.state
        if not prefill_done or st.evicted:
            return
        st.evicted = True
        T, s, kv = seq.num_prompt_tokens, self.config.sink_size, seq.kv
        for layer, b in enumerate(self.budgets_for(T)):
            drop = T - max(b, s)
            if drop <= 0:
                continue
            table = kv.tables[layer]
            slots = table.slots[:, : int(table.lens[0])].clone()  # [Hkv, t]: t = num_computed (same per head)
            gone = slots[:, s : s + drop]
            keep = torch.cat([slots[:, :s], slots[:, s + drop :]], dim=1)
            # free, then remove: an interrupt inside `free` leaves them in the table for release to find
            self.pool.free(gone.reshape(-1))
            table.replace(list(keep))
