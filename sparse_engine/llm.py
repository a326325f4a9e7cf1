"""`LLM`: the user-facing engine. `LLM(model, method=..., **knobs).generate(prompts, SamplingParams())`.

Data path: generate -> Scheduler.schedule (chunked prefill, continuous batching, preemption) ->
ModelRunner.run (one flattened forward) -> Attention layer -> cache method (write / view / observe)
-> KVPool slots -> attention kernel (Triton decode on CUDA, SDPA elsewhere) -> sampler.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import signal
import threading
import time
import weakref
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .cache.pool import KVPool
from .cache.registry import get_method
from .config import EngineConfig, split_knobs
from .engine.model_runner import ModelRunner
from .engine.scheduler import Scheduler
from .engine.sequence import Sequence, Status
from .layers.sampler import sample
from .models.loader import load_model, random_model
from .models.spec import ModelSpec
from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from .sampling_params import SamplingParams
from .shipped import resolve_model_path

def _load_tokenizer(path):
    """The folder's tokenizer, or None for a tokenizer-less folder (token-id prompts only)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        return None


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def deferred_sigint():
    """Hold a SIGINT that arrives inside the block and raise KeyboardInterrupt when it ends. Only in
    the main thread while Python's default handler is installed (a framework's own handler is left alone)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    pending = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt("interrupted (Ctrl-C); the engine step in progress was completed first")


def derived_seed(engine_seed: int, request_index: int) -> int:
    """The sampling seed of request `request_index` of a call on an engine seeded `engine_seed`."""
    digest = hashlib.blake2b(f"{engine_seed}/{request_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _resolve_device(name: str) -> torch.device:
    """`device` knob -> torch.device, refusing a CUDA device this machine does not have (torch would
    raise a bare AssertionError "Torch not compiled with CUDA enabled" from deep inside)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but CUDA is not available on this machine (torch "
                             f"{torch.__version__}); use device='cpu' or device='auto'.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); pick one of those or device='auto'.")
    return device


class LLM:
    def __init__(self, model: str | Path | None = None, method: str = "vanilla", tokenizer=None, **knobs):
        method_cls = get_method(method)
        method_fields = {f.name for f in dataclasses.fields(method_cls.Config)}
        engine_knobs, method_knobs = split_knobs(knobs, method_fields, method)
        self.config = EngineConfig(**engine_knobs)
        self.config.validate()
        self.model_path = resolve_model_path(model)
        self.spec = ModelSpec.from_pretrained(self.model_path)
        cfg = self.config
        self.device = _resolve_device(cfg.device)
        if cfg.dtype != "auto":
            self.dtype = _DTYPES[cfg.dtype]
        elif self.device.type == "cpu":
            self.dtype = torch.float32
        else:
            self.dtype = self.spec.torch_dtype if self.spec.torch_dtype != torch.float32 else torch.bfloat16
        self.max_model_len = cfg.max_model_len or self.spec.max_position_embeddings
        if self.max_model_len > self.spec.max_position_embeddings:
            raise ValueError(
                f"max_model_len={cfg.max_model_len} exceeds the model's max_position_embeddings="
                f"{self.spec.max_position_embeddings} ({self.model_path}/config.json): positions past it were never "
                "trained. Lower max_model_len or leave it unset (= max_position_embeddings)."
            )
        self.tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(self.model_path)
        if cfg.load_format == "random":
            self.model = random_model(self.spec, self.dtype, self.device, cfg.seed)
        else:
            self.model = load_model(self.model_path, self.spec, self.dtype, self.device)
        from .layers.linear import mkldnn_available

        if cfg.cpu_decode_weights == "mkldnn" and not mkldnn_available(self.device, self.dtype):
            raise ValueError("cpu_decode_weights='mkldnn' needs device='cpu', dtype float32 and a torch built with "
                             "oneDNN; use 'auto' or 'dense'")
        if cfg.cpu_decode_weights != "dense" and mkldnn_available(self.device, self.dtype):
            self.model.enable_mkldnn_decode()
        self.kv_budget_bytes = self._kv_budget_bytes()
        self.pool = KVPool(self.kv_budget_bytes // self._bytes_per_slot(), self.spec.head_dim, self.dtype, self.device)
        self.method = method_cls(method_cls.make_config(**method_knobs), self.spec, self.pool,
                                 sliding_window=self.spec.sliding_window)
        if cfg.use_triton is True or (cfg.use_triton == "auto" and self.device.type == "cuda"):
            from .kernels import triton_available
            from .kernels.decode_attention import decode_attention_triton

            if triton_available(self.device):
                self.method.decode_kernel = decode_attention_triton
            elif cfg.use_triton is True:
                raise ValueError("use_triton=True but Triton cannot run here (install triton; CUDA or TRITON_INTERPRET=1); "
                                 "use use_triton='auto' or False")
        self.method.max_chunk = cfg.chunk_prefill_size
        # One KV budget: the method claims what it keeps outside the slots (DeltaKV latent rows).
        pool_bytes = self.method.claim_budget(self.kv_budget_bytes)
        if pool_bytes < self.kv_budget_bytes:
            self.pool.resize(pool_bytes // self.pool.bytes_per_slot)
        self.scheduler = Scheduler(cfg, self.method, self.pool)
        self.runner = ModelRunner(self.model, self.method, self.device)
        self._seqs: dict[int, Sequence] = {}
        self._solo_requests = 0  # seeds of sampled add_request() calls that give no request_index
        # Sequence -> [(sampled token, {token id: (logprob, rank)}), ...] per output token, when params.logprobs;
        # weak keys: the entry goes with its sequence
        self._logprobs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.session_reused_tokens = 0

    # ------------------------------------------------------------------ setup
    def _bytes_per_slot(self) -> int:
        return 2 * self.spec.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def _kv_budget_bytes(self) -> int:
        """The run's KV memory: `kv_cache_bytes`, else a share of free GPU memory, else 1 GiB."""
        budget = self.config.kv_cache_bytes
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * self.config.gpu_memory_utilization)
            else:
                budget = 1 << 30
        return budget

    # ------------------------------------------------------------------ requests
    def _tokenize(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.model_path} has no tokenizer: pass token-id lists or LLM(..., tokenizer=...).")
            if not prompt:
                raise ValueError("Empty prompt: give at least one character (or one token id).")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            if not prompt:
                raise ValueError("Empty prompt: a token-id list needs at least one id.")
            bad = [t for t in prompt if not 0 <= t < self.spec.vocab_size]
            if bad:
                raise ValueError(f"Token ids {bad[:5]} are outside the vocabulary [0, {self.spec.vocab_size}).")
            return list(prompt)
        raise TypeError(f"A prompt must be a str or a list of int token ids, got {type(prompt).__name__}.")

    def _segmented(self, pieces, prompt) -> tuple[list[int], list[int]]:
        """Token ids of `pieces` (str or token-id lists, each tokenized on its own) followed by `prompt`
        (the request's new tail; None or "" for none), and the pieces' token lengths."""
        if not isinstance(pieces, (list, tuple)) or not pieces:
            raise TypeError("segments: give one non-empty list of pieces (str or token-id lists) per prompt")
        ids, lens = [], []
        for piece in list(pieces) + ([prompt] if prompt not in (None, "", []) else []):
            if isinstance(piece, str) and ids and self.tokenizer is not None:
                toks = self.tokenizer.encode(piece, add_special_tokens=False)  # no BOS inside the prompt
            else:
                toks = self._tokenize(piece)
            ids.extend(toks)
            lens.append(len(toks))
        return ids, lens[: len(pieces)]

    def add_request(self, prompt, params: SamplingParams, segments=None, request_index: int | None = None) -> Sequence:
        """Queue one request. `segments`: optional list of pieces (documents, turns...: str or token-id
        lists) placed BEFORE `prompt`; each is tokenized alone and its token span is recorded on the
        sequence (`seq.segments`, lengths) for methods that reuse segment KV (SparseX).
        `request_index`: seeds a sampled request without its own seed (see `_new_sequence`)."""
        ids, seg_lens = self._check_request(prompt, params, segments)
        return self._enqueue(ids, params, seg_lens, request_index)

    def _check_request(self, prompt, params, segments=None) -> tuple[list[int], list[int] | None]:
        """Validate one request without touching the engine: (token ids, segment lengths) or a clear
        ValueError / TypeError. `generate` checks every request of a call before queueing any."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams (or a list of them, one per prompt), got "
                            f"{type(params).__name__}: {params!r}")
        if segments is None:
            ids, seg_lens = self._tokenize(prompt), None
        else:
            ids, seg_lens = self._segmented(segments, prompt)
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"Prompt has {len(ids)} tokens but max_model_len is {self.max_model_len} (prompt + output "
                "must fit). Truncate the prompt (e.g. middle truncation) or raise max_model_len."
            )
        need = self.method.max_slots(min(len(ids) + params.max_tokens, self.max_model_len))
        if need > self.pool.num_slots:
            raise ValueError(
                f"One request of {len(ids)} prompt + {params.max_tokens} output tokens needs up to {need} KV "
                f"slots but the pool has {self.pool.num_slots}. Raise kv_cache_bytes (now "
                f"{self.pool.num_slots * self.pool.bytes_per_slot} bytes) or lower max_tokens."
            )
        rows = self.method.max_rows(min(len(ids) + params.max_tokens, self.max_model_len))
        if rows > self.method.rows_capacity():
            raise ValueError(
                f"One request of {len(ids)} prompt + {params.max_tokens} output tokens needs up to {rows} latent rows "
                f"but the latent tier holds {self.method.rows_capacity()}. Raise kv_cache_bytes (or the method's "
                "latent share) or lower max_tokens."
            )
        return ids, seg_lens

    def _enqueue(self, ids: list[int], params: SamplingParams, seg_lens, request_index: int | None,
                 own: list[Sequence] | None = None) -> Sequence:
        seq = self._new_sequence(ids, params, request_index, segments=seg_lens)
        if own is not None:
            own.append(seq)  # the caller owns it before any engine state refers to it (rollback sees it)
        self._seqs[seq.seq_id] = seq
        self.scheduler.add(seq)
        return seq

    def _new_sequence(self, ids: list[int], params: SamplingParams, request_index: int | None = None, **kw) -> Sequence:
        """A sequence with its own seeded generator when it samples: the request's seed, else one derived
        from the engine seed and `request_index`, the request's position in its `generate` call (its turn
        in `generate_session`), so the same call gives the same text in a fresh engine and in a used one.
        Requests queued one by one through `add_request` without an index count up per engine."""
        seq = Sequence(ids, params, **kw)
        seq.arrival_time = time.time()
        if not params.greedy:
            if params.seed is not None:
                seed = params.seed
            else:
                if request_index is None:
                    request_index, self._solo_requests = self._solo_requests, self._solo_requests + 1
                seed = derived_seed(self.config.seed, request_index)
            seq.generator = torch.Generator().manual_seed(seed)
        return seq

    def step(self) -> list[Sequence]:
        """Run one scheduler step; return the sequences that finished in it.

        A Ctrl-C (SIGINT) that arrives during the step is held until the step is complete and then
        raised as KeyboardInterrupt: no method's tables, pool or scratch are left half-updated, so the
        caller's cleanup finds every slot where it belongs (main thread, default SIGINT handler only)."""
        with deferred_sigint():
            return self._step()

    @torch.inference_mode()  # tables and pool are touched only under inference mode (no autograd state)
    def _step(self) -> list[Sequence]:
        batch = self.scheduler.schedule()
        samplers, logits = self.runner.run(batch)
        for seq, n in batch:
            seq.num_computed += n
            self.method.after_step(seq, prefill_done=seq.num_computed >= seq.num_prompt_tokens, num_new_tokens=n)
        finished = []
        for i, seq in enumerate(samplers):
            self._mask_min_tokens(seq, logits[i])
        greedy = torch.argmax(logits, dim=-1).tolist() if samplers else []  # one device sync per step
        for i, seq in enumerate(samplers):
            if seq.hold:  # a session prefix is cached: keep its KV and the logits of its last token
                seq.last_logits = logits[i]
                self.scheduler.hold(seq)
                continue
            token = greedy[i] if seq.params.greedy else sample(logits[i], seq.params, seq.generator)
            if self._accept(seq, token, logits[i]):
                self.scheduler.finish(seq, seq.finish_reason)
                self._seqs.pop(seq.seq_id, None)
                finished.append(seq)
        return finished

    def _mask_min_tokens(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Before `min_tokens` outputs, EOS and stop token ids cannot be chosen (in place on [V])."""
        if len(seq.output_token_ids) < seq.params.min_tokens and not seq.hold:
            ban = [t for t in (*self.spec.eos_token_ids, *seq.params.stop_token_ids) if 0 <= t < logits.shape[-1]]
            if ban:
                logits[ban] = float("-inf")

    def _accept(self, seq: Sequence, token: int, logits: torch.Tensor) -> bool:
        """Append a sampled token; return True (with `seq.finish_reason` set) if the sequence ends."""
        if seq.params.return_logits:
            seq.logits.append(logits.cpu())
        if seq.params.logprobs is not None:
            self._logprobs.setdefault(seq, []).append(self._token_logprobs(logits, token, seq.params.logprobs))
        seq.token_ids.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = time.time()
        reason = self._stop_reason(seq, token)
        if reason:
            seq.kv_bytes_at_finish = self.method.kv_bytes(seq)
            seq.finish_reason = reason
            seq.finished_time = time.time()
        return reason is not None

    @staticmethod
    def _token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[int, dict[int, tuple[float, int]]]:
        """(token, {token id: (logprob, rank)}) for the sampled token and the `top` most likely ones."""
        lp = torch.log_softmax(logits.float(), dim=-1)
        chosen = float(lp[token])
        out = {token: (chosen, int((lp > lp[token]).sum()) + 1)}
        if top:
            values, ids = torch.topk(lp, min(top, lp.numel()))
            for rank, (t, v) in enumerate(zip(ids.tolist(), values.tolist()), start=1):
                out.setdefault(t, (v, rank))
        return token, out

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if not p.ignore_eos and token in self.spec.eos_token_ids:
            return "stop"
        if token in p.stop_token_ids:
            return "stop"
        if p.stop and any(s in self._text(seq) for s in p.stop):
            return "stop"
        if len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _text(self, seq: Sequence) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)

    def output(self, seq: Sequence, prompt: str | None = None) -> RequestOutput:
        """The `RequestOutput` of a sequence: its result once finished, its state so far while it runs
        (`finished` False; a server streams these). `prompt`: the request's text, when it had one."""
        text = self._text(seq)
        stop_reason = None
        for s in seq.params.stop:
            if s in text:
                text = text[: text.index(s)]
                stop_reason = s
        out_ids = list(seq.output_token_ids)
        if seq.finish_reason == "stop" and stop_reason is None and out_ids and out_ids[-1] in seq.params.stop_token_ids:
            stop_reason = out_ids[-1]
        logprobs = cumulative = None
        if seq.params.logprobs is not None:
            entries = self._logprobs.get(seq, [])
            decode = (lambda t: self.tokenizer.decode([t])) if self.tokenizer is not None else (lambda t: None)
            logprobs = [{t: Logprob(lp, rank, decode(t)) for t, (lp, rank) in d.items()} for _, d in entries]
            cumulative = sum(d[t][0] for t, d in entries)
        finished = seq.finished
        completion = CompletionOutput(
            index=0, text=text, token_ids=out_ids, cumulative_logprob=cumulative, logprobs=logprobs,
            finish_reason=seq.finish_reason, stop_reason=stop_reason if seq.finish_reason == "stop" else None,
            logits=seq.logits if seq.params.return_logits else None)
        kv = seq.kv_bytes_at_finish if seq.kv is None or finished else self.method.kv_bytes(seq)
        metrics = RequestMetrics(arrival_time=seq.arrival_time, first_token_time=seq.first_token_time,
                                 finished_time=seq.finished_time, kv_bytes=kv, num_preemptions=seq.num_preemptions)
        return RequestOutput(request_id=str(seq.seq_id), prompt=prompt, prompt_token_ids=list(seq.prompt_token_ids),
                             outputs=[completion], finished=finished, metrics=metrics)

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, segments: list | None = None) -> list[RequestOutput]:
        """Generate for a prompt or a list of prompts (strings or token-id lists), in input order: one
        `RequestOutput` per prompt (`out.outputs[0].text / token_ids / finish_reason`, `out.metrics`).

        `segments` (optional, one entry per prompt, None for a plain prompt): the pieces placed before
        each prompt, see `add_request`."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        if single:
            prompts = [prompts]
            segments = None if segments is None else [segments]
        if segments is not None and len(segments) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(segments)} segment lists; give one per prompt.")
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams; give one or one per prompt.")
        segs = segments if segments is not None else [None] * len(prompts)
        # Every request is checked before any is queued: a bad one fails the call with the engine as it was.
        checked = [self._check_request(p, sp, sg) for p, sp, sg in zip(prompts, params, segs)]
        seqs: list[Sequence] = []
        bar = tqdm(total=len(checked), desc="generate", disable=not use_tqdm, dynamic_ncols=True)
        try:
            for i, ((ids, seg_lens), sp) in enumerate(zip(checked, params)):
                self._enqueue(ids, sp, seg_lens, request_index=i, own=seqs)
            while self.scheduler.has_work():
                bar.update(len(self.step()))
        except BaseException:
            self._drop(seqs)  # failed or interrupted: give back everything this call holds
            raise
        finally:
            bar.close()
        outs = [self.output(s, p if isinstance(p, str) else None) for s, p in zip(seqs, prompts)]
        for s in seqs:
            self._seqs.pop(s.seq_id, None)
        return outs[0] if single else outs

    def abort(self, seq: Sequence) -> None:
        """End one request now (waiting, running or held) and give its KV back: a server's client that
        went away. Its finish_reason is "abort"; a finished request is left as it is."""
        if seq.finished:
            return
        if seq in self.scheduler.running:
            self.scheduler.finish(seq, "abort")
        else:
            if seq in self.scheduler.waiting:
                self.scheduler.waiting.remove(seq)
            self.method.release(seq)
            seq.status, seq.finish_reason = Status.FINISHED, "abort"
        seq.finished_time = time.time()
        self._seqs.pop(seq.seq_id, None)

    def _drop(self, own: list[Sequence]) -> None:
        """After a failed or interrupted `generate` / `generate_session`: end the call's own sequences
        (waiting, running, held or half-finished) and return every slot and latent row they hold.
        Other callers' running sequences are re-queued to recompute their KV: an interrupted step may
        have appended slots to their tables without counting the tokens as computed."""
        with deferred_sigint():  # a second Ctrl-C waits for the cleanup
            self._drop_now(own)

    def _drop_now(self, own: list[Sequence]) -> None:
        sched = self.scheduler
        mine = {id(s) for s in own}
        for seq in own:
            if any(s is seq for s in sched.waiting):
                sched.waiting.remove(seq)
            if any(s is seq for s in sched.running):
                sched.running.remove(seq)
            self.method.release(seq)  # no-op when it holds nothing
            if seq.status != Status.FINISHED:
                seq.status, seq.finish_reason = Status.FINISHED, "abort"
            self._seqs.pop(seq.seq_id, None)
        queued = {id(s) for s in sched.waiting}
        # running ones, and registered ones an interrupt caught between the waiting and running lists
        stray = [s for s in self._seqs.values() if id(s) not in mine and id(s) not in queued
                 and s.status != Status.FINISHED and not any(r is s for r in sched.running)]
        for seq in [s for s in sched.running if id(s) not in mine] + stray:
            self.method.release(seq)
            seq.num_computed, seq.status = 0, Status.WAITING
            if any(r is seq for r in sched.running):
                sched.running.remove(seq)
            sched.waiting.appendleft(seq)

    def abort_all(self) -> None:
        for seq in list(self.scheduler.running):
            self.scheduler.finish(seq, "abort")
        self.scheduler.waiting.clear()
        self._seqs.clear()

    # ------------------------------------------------------------------ sessions
    def generate_session(self, context, turns, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                         accumulate: bool = True, use_tqdm: bool = False) -> list[RequestOutput]:
        """Shared-context multi-turn generation that prefills the context once (SCBench sessions).

        The context is prefilled - and compressed by the method, before any question is seen
        (query-agnostic) - into a held session KV. With `accumulate=True` turn k sees context +
        turns[0..k] (turn tokens, not generated answers, extend the session); with False each turn
        sees context + turns[k] and all turns run as one batch. Each answer forks the session's KV:
        slots are shared by reference, never copied or recomputed. An empty turn generates right
        after the context. Returns one `RequestOutput` per turn; `kv_stats()["session_reused_tokens"]`
        counts the prompt tokens served from the session instead of being prefilled.
        """
        if isinstance(turns, (str, bytes)) or not isinstance(turns, (list, tuple)):
            raise TypeError(f"turns must be a list of turns (str, token-id lists, or '' for none), got "
                            f"{type(turns).__name__}")
        context = self._tokenize(context)
        turns = [self._tokenize(t) if t else [] for t in turns]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * len(turns)
        if len(params) != len(turns):
            raise ValueError(f"{len(turns)} turns but {len(params)} SamplingParams; give one or one per turn.")
        for p in params:
            if not isinstance(p, SamplingParams):
                raise TypeError(f"sampling_params must be a SamplingParams (or a list of them, one per turn), got "
                                f"{type(p).__name__}: {p!r}")
        total = len(context) + sum(map(len, turns)) * (1 if accumulate else 0) + max(map(len, turns), default=0)
        if total >= self.max_model_len:
            raise ValueError(f"The session needs {total} prompt tokens but max_model_len is {self.max_model_len}.")
        session = Sequence(context, SamplingParams(temperature=0.0, max_tokens=1))
        session.hold = True
        own = [session]  # everything this call creates: released on return, interrupt or error
        outs = []
        try:
            self._run_until_held(session)
            if accumulate:
                for k, (turn, p) in enumerate(zip(turns, params)):
                    if turn:
                        session.token_ids += turn
                        session.prompt_token_ids = list(session.token_ids)  # turn text is prompt, prefilled in chunks
                        self._run_until_held(session)
                    outs.append(self._run_children(session, [[]], [p], own, first_index=k)[0])
            else:
                outs = self._run_children(session, turns, params, own)
            with deferred_sigint():  # a Ctrl-C inside the release waits for it to finish
                self.method.release(session)
        except BaseException:
            self._drop(own)  # Ctrl-C / error: the session and every forked turn give their KV back
            raise
        return outs

    def _run_until_held(self, session: Sequence) -> None:
        session.status = Status.WAITING
        self.scheduler.add(session)
        while session.status != Status.HELD:
            self.step()

    def _run_children(self, session: Sequence, turns: list[list[int]], params: list[SamplingParams],
                      own: list[Sequence], first_index: int = 0) -> list[RequestOutput]:
        """Fork one sequence per turn from the held session and run them to completion together (each
        child is recorded in `own` as soon as it exists; turn k seeds like request k of a call)."""
        children = []
        for k, (turn, p) in enumerate(zip(turns, params)):
            child = self._new_sequence(session.token_ids + turn, p, first_index + k)
            own.append(child)
            self.method.fork(session, child)
            child.num_computed = session.num_computed
            self.session_reused_tokens += session.num_computed
            children.append(child)
            if turn:
                self.scheduler.add(child)
                continue
            # nothing new to prefill: the first token comes from the session's last logits
            logits = session.last_logits.clone()
            self._mask_min_tokens(child, logits)
            token = int(torch.argmax(logits)) if p.greedy else sample(logits, p, child.generator)
            if self._accept(child, token, logits):
                child.status = Status.FINISHED
                with deferred_sigint():
                    self.method.release(child)
            else:
                self.scheduler.add(child)
        while any(c.status != Status.FINISHED for c in children):
            self.step()
        return [self.output(c) for c in children]

    # ------------------------------------------------------------------ introspection
    def kv_stats(self) -> dict:
        pool = self.pool
        running = self.scheduler.running
        return {
            "method": self.method.name,
            "slots_total": pool.num_slots,
            "slots_used": pool.num_used,
            "slots_free": pool.num_free,
            "bytes_per_slot": pool.bytes_per_slot,
            "bytes_per_token": pool.bytes_per_slot * self.spec.num_layers * self.spec.num_kv_heads,
            "kv_budget_bytes": self.kv_budget_bytes,
            "kv_bytes_total": pool.num_slots * pool.bytes_per_slot,
            "slots_peak": pool.peak_used,
            "kv_bytes_used": pool.num_used * pool.bytes_per_slot,
            "num_preemptions": self.scheduler.num_preemptions,
            "session_reused_tokens": self.session_reused_tokens,
            "per_sequence_bytes": {s.seq_id: self.method.kv_bytes(s) for s in running},
            **self.method.stats(),
        }

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Free the model and KV pool (also on `with LLM(...) as llm:` exit)."""
        self.abort_all()
        for name in ("model", "pool", "method", "runner", "scheduler"):
            setattr(self, name, None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
