"""`Scheduler`: continuous batching with chunked prefill, a token budget and recompute preemption.

Each step walks the running sequences in admission order (decode tokens and prefill chunks may share a
step), then admits waiting ones while the token budget, `max_num_seqs` and free KV slots allow. When
a running sequence needs slots that are not free, the method's evictable slots are reclaimed first
(`reclaim`: DeltaKV's reconstruction caches), then the youngest running sequence is preempted: its
slots return to the pool and it is re-queued to recompute its KV later (never a crash).

Admission (`EngineConfig.admission`): with "prompt" a waiting request starts beside running ones only
when the free budget holds its whole prompt (the method's footprint) after what the running prompts
still need, so no prompt is prefilled only to be preempted; with "chunk" when its next chunk fits.
"""

from __future__ import annotations

from collections import deque

from ..config import EngineConfig
from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, config: EngineConfig, method, pool):
        self.config = config
        self.method = method
        self.pool = pool
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._preempted_now: set[int] = set()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _chunk(self, seq: Sequence, budget: int) -> int:
        if seq.num_computed >= seq.num_prompt_tokens:
            # Decode - or replaying the tokens a preempted request had generated: one per step, as
            # they were first computed, so eviction / selection see the same history (a chunked
            # recompute would score and compress them as prompt tokens and change the output).
            return min(1, budget)
        n = min(seq.num_prompt_tokens - seq.num_computed, self.config.chunk_prefill_size, budget)
        p = seq.num_prompt_tokens
        if n < p and seq.num_computed == 0 and p <= self.config.max_num_batched_tokens and self.method.whole_prefill(seq):
            return p if p <= budget else 0  # 0: wait for a step with room
        return n

    def _preempt(self, seq: Sequence) -> None:
        self._preempted_now.add(seq.seq_id)
        self.method.release(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def _fits(self, need: int, rows: int, reserved: int, reserved_rows: int) -> bool:
        if self.pool.num_free - reserved >= need and self.method.rows_free() - reserved_rows >= rows:
            return True
        # evictable slots (a method's caches) go before any sequence does, when that alone makes room
        short = need - (self.pool.num_free - reserved)
        if 0 < short <= self.method.reclaimable() and self.method.rows_free() - reserved_rows >= rows:
            self.method.reclaim(short)
            return self.pool.num_free - reserved >= need
        return False

    def _prompt_left(self, seq: Sequence, done: int) -> tuple[int, int]:
        """Slots and rows a sequence's prompt still claims once `done` tokens are in (footprints)."""
        if done >= seq.num_prompt_tokens:
            return 0, 0
        m, p = self.method, seq.num_prompt_tokens
        return (max(0, m.admission_slots(p) - (m.max_slots(done) if done else 0)),
                max(0, m.max_rows(p) - (m.max_rows(done) if done else 0)))

    def _room_for_prompt(self, seq: Sequence, reserved: int, reserved_rows: int, owed: tuple[int, int]) -> bool:
        """admission='prompt': the whole prompt of `seq` fits beside this step's reservations and
        what the running prompts still claim (`owed`)."""
        need, rows = self._prompt_left(seq, 0)
        return (self.pool.num_free - reserved - owed[0] >= need
                and self.method.rows_free() - reserved_rows - owed[1] >= rows)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """Pool slots AND the method's rows outside the pool (DeltaKV latents) are both reserved for
        the step; whichever runs short preempts the youngest running sequence."""
        budget = self.config.max_num_batched_tokens
        batch: list[tuple[Sequence, int]] = []
        reserved = reserved_rows = 0
        preempted = self._preempted_now = set()  # not re-admitted in the step that preempted them (thrash)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._chunk(seq, budget)
            if n == 0:
                i += 1
                continue
            need, rows = self.method.slots_needed(seq, n), self.method.rows_needed(seq, n)
            while not self._fits(need, rows, reserved, reserved_rows) and self.running[-1] is not seq:
                self._preempt(self.running[-1])
            if not self._fits(need, rows, reserved, reserved_rows):
                if batch and seq.num_computed < seq.num_prompt_tokens:
                    i += 1  # a prompt in progress waits, KV kept, while older sequences run and free room
                    continue
                self._preempt(seq)  # even alone it does not fit now; retry when others finish
                continue
            batch.append((seq, n))
            reserved += need
            reserved_rows += rows
            budget -= n
            i += 1
        owed = None  # admission='prompt': (slots, rows) the running prompts still claim
        if self.config.admission == "prompt" and self.waiting:
            done = {s.seq_id: s.num_computed + n for s, n in batch}
            left = [self._prompt_left(s, done.get(s.seq_id, s.num_computed)) for s in self.running]
            owed = (sum(x for x, _ in left), sum(r for _, r in left))
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.seq_id in preempted and self.running:
                break
            n = self._chunk(seq, budget)
            if n == 0:
                break
            need, rows = self.method.slots_needed(seq, n), self.method.rows_needed(seq, n)
            if owed is not None and seq.kv is None and self.running \
                    and not self._room_for_prompt(seq, reserved, reserved_rows, owed):
                break
            if not self._fits(need, rows, reserved, reserved_rows):
                break
            if owed is not None:
                left = self._prompt_left(seq, n)
                owed = (owed[0] + left[0], owed[1] + left[1])
            self.waiting.popleft()
            seq.status = Status.RUNNING
            if seq.kv is None:  # forked or held sessions arrive with their KV
                self.method.new_sequence(seq)
            self.running.append(seq)
            batch.append((seq, n))
            reserved += need
            reserved_rows += rows
            budget -= n
        if not batch and self.waiting and not self.running:
            seq = self.waiting[0]
            n = self._chunk(seq, self.config.max_num_batched_tokens)
            raise RuntimeError(
                f"Request {seq.seq_id} cannot be scheduled: it needs {self.method.slots_needed(seq, n)} KV slots "
                f"and {self.method.rows_needed(seq, n)} latent rows for one chunk, the pool has {self.pool.num_free} "
                f"free slots of {self.pool.num_slots} ({self.method.rows_free()} rows free). "
                "Raise kv_cache_bytes or lower chunk_prefill_size."
            )
        return batch

    def hold(self, seq: Sequence) -> None:
        """Stop running `seq` but keep its KV (a session waiting for its next turn)."""
        seq.status = Status.HELD
        self.running.remove(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self.method.release(seq)
        self.running.remove(seq)
