"""Generation backends for the evaluation harnesses.

A backend turns token-id prompts into generations. Two implementations:

* ``EngineBackend``: ``sparse_engine.LLM`` with any cache method and its knobs (the system under test).
* ``HFBackend``: HF transformers ``generate`` with the full KV cache (the independent baseline).

Harnesses only use this interface::

    backend.tokenizer                       # HF tokenizer
    backend.max_model_len                   # int
    backend.generate(prompts, params)       # list[list[int]] -> list[GenOutput]
    backend.generate_session(context, turns, params, accumulate=True)  # -> list[GenOutput]
    backend.kv_stats()                      # dict (may be empty)
    backend.describe()                      # dict recorded in the run's outputs

``generate_session`` serves SCBench's shared-context sessions and the query-agnostic mode: the
context is prefilled (and, for a compressing method, compressed) before any turn is seen. With
``accumulate=True`` turn k sees ``context + turns[0] + ... + turns[k]`` (multi-turn); with
``accumulate=False`` it sees ``context + turns[k]`` (same context, different queries). The engine
backend calls ``LLM.generate_session`` when the engine has it (session KV reuse); until then it
falls back to re-prefilling the whole prefix for every turn, and says so in ``session_mode``.

Engine session contract this module expects (for the engine team)::

    outs = llm.generate_session(context_ids: list[int], turns: list[list[int]],
                                sampling_params: list[SamplingParams], accumulate: bool = True)
    # -> one output dict per turn ({"text", "token_ids", "finish_reason", "kv_bytes", ...});
    # the context is prefilled (and compressed by the method) once, before any turn is seen;
    # accumulate=True keeps context + turns[:k] (not the generated tokens) in the session's KV;
    # an empty turns[0] means "generate right after the context"; kv_stats() shows the reuse.
"""

from __future__ import annotations

import copy
import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

log = logging.getLogger(__name__)


@dataclass
class GenParams:
    """Backend-neutral sampling parameters."""

    max_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    min_tokens: int = 0

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")


@dataclass
class GenOutput:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_len: int
    kv_bytes: int | None = None  # KV bytes the sequence held at its end (engine), full KV for hf


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    cut = len(text)
    for s in stops:
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut], cut < len(text)


class Backend:
    """Base class; subclasses implement ``generate`` and may override ``generate_session``."""

    name = "base"
    tokenizer: Any
    max_model_len: int
    session_mode = "reprefill"

    def generate(self, prompts: list[list[int]], params: GenParams | list[GenParams], use_tqdm: bool = False) -> list[GenOutput]:
        raise NotImplementedError

    def generate_session(
        self, context: list[int], turns: list[list[int]], params: GenParams | list[GenParams], accumulate: bool = True
    ) -> list[GenOutput]:
        """Fallback: re-prefill the shared context (and, when accumulating, the earlier turns) for
        every turn. Turns are independent when ``accumulate=False``, so they go in one batch."""
        plist = params if isinstance(params, list) else [params] * len(turns)
        if not accumulate:
            return self.generate([context + t for t in turns], plist)
        outs, prefix = [], list(context)
        for turn, p in zip(turns, plist):
            prefix = prefix + list(turn)
            outs.append(self.generate([prefix], p)[0])
        return outs

    def kv_stats(self) -> dict:
        return {}

    def describe(self) -> dict:
        return {"backend": self.name, "session_mode": self.session_mode}

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------------
# HF transformers baseline
# ------------------------------------------------------------------------------------------------
class HFBackend(Backend):
    """Full-KV HF transformers ``generate`` (one request at a time: no padding effects).

    Sessions keep a real ``DynamicCache`` of the shared prefix and crop it back after each turn's
    generation, so turn 2 does not prefill the context again (``session_mode = "native"``).
    """

    name = "hf"
    session_mode = "native"

    def __init__(self, model: str | None = None, dtype: str = "float32", device: str = "cpu",
                 max_model_len: int | None = None, attn_implementation: str | None = "sdpa"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from data_prepare.resources import resolve_model_path

        self.model_path = str(resolve_model_path(model))
        torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        kwargs = {"dtype": torch_dtype}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, **kwargs).to(device).eval()
        self.device = device
        self.dtype = dtype
        cfg_len = getattr(self.model.config, "max_position_embeddings", None) or 4096
        self.max_model_len = int(max_model_len or cfg_len)
        self._eos = self._eos_ids()
        self._peak_ctx = 0

    def _eos_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def _check_len(self, n_prompt: int, p: GenParams):
        if n_prompt + p.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({n_prompt} tokens) + max_tokens ({p.max_tokens}) exceeds max_model_len "
                f"{self.max_model_len}; lower the benchmark's max_input_tokens"
            )

    def _gen_kwargs(self, p: GenParams) -> dict:
        kw: dict[str, Any] = {
            "max_new_tokens": p.max_tokens,
            "eos_token_id": self._eos + [t for t in p.stop_token_ids if t not in self._eos],
            "pad_token_id": self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self._eos[0],
        }
        if p.min_tokens:
            kw["min_new_tokens"] = p.min_tokens
        if p.temperature > 0:
            kw.update(do_sample=True, temperature=p.temperature, top_p=p.top_p)
            if p.top_k and p.top_k > 0:
                kw["top_k"] = p.top_k
            else:
                kw["top_k"] = None
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if p.stop:
            kw.update(stop_strings=list(p.stop), tokenizer=self.tokenizer)
        return kw

    def _finish(self, prompt_len: int, new_ids: list[int], p: GenParams) -> GenOutput:
        stops = set(self._eos) | set(p.stop_token_ids)
        reason = "length"
        if new_ids and new_ids[-1] in stops:
            reason = "stop"
            new_ids = new_ids[:-1]
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        text, hit = _cut_at_stop(text, p.stop)
        if hit:
            reason = "stop"
        n_ctx = prompt_len + len(new_ids)
        return GenOutput(text=text, token_ids=list(new_ids), finish_reason=reason, prompt_len=prompt_len,
                         kv_bytes=n_ctx * self._bytes_per_token())

    def _run(self, ids: list[int], p: GenParams, cache=None) -> GenOutput:
        import torch

        self._check_len(len(ids), p)
        if p.seed is not None:
            torch.manual_seed(p.seed)
        x = torch.tensor([ids], device=self.device)
        kw = self._gen_kwargs(p)
        if cache is not None:
            kw["past_key_values"] = cache
        with torch.inference_mode():
            out = self.model.generate(x, attention_mask=torch.ones_like(x), **kw)
        self._peak_ctx = max(self._peak_ctx, out.shape[1])
        return self._finish(len(ids), out[0, len(ids):].tolist(), p)

    def generate(self, prompts, params, use_tqdm=False):
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        outs = []
        for ids, p in zip(prompts, plist):
            if not ids:
                raise ValueError("empty prompt")
            outs.append(self._run(list(ids), p))
        return outs

    def _prefill(self, ids: list[int]):
        import torch
        from transformers import DynamicCache

        cache = DynamicCache()
        with torch.inference_mode():
            self.model(torch.tensor([ids], device=self.device), past_key_values=cache, use_cache=True)
        return cache

    def generate_session(self, context, turns, params, accumulate=True):
        plist = params if isinstance(params, list) else [params] * len(turns)
        turns = [list(t) for t in turns]
        if turns and not turns[0] and context:
            # an empty first turn means "generate right after the context" (query in the context)
            if not accumulate:
                raise ValueError("an empty turn only makes sense for the first turn of an accumulating session")
            context, turns[0] = list(context[:-1]), [context[-1]]
        if not context:
            return super().generate_session(context, turns, plist, accumulate)
        base = self._prefill(list(context))  # the shared context is prefilled exactly once
        prefix = list(context)
        outs = []
        for turn, p in zip(turns, plist):
            if not turn:
                raise ValueError("a session turn has no tokens; every turn needs at least one token")
            full = prefix + list(turn)
            cache = base if accumulate else copy.deepcopy(base)
            outs.append(self._run(full, p, cache=cache))
            if accumulate:
                extra = cache.get_seq_length() - len(full)
                if extra > 0:
                    cache.crop(-extra)  # drop the generated tokens, keep context + turns so far
                prefix = full
        return outs

    def _bytes_per_token(self) -> int:
        cfg = self.model.config
        n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        elt = {"float32": 4, "bfloat16": 2, "float16": 2}.get(str(self.dtype), 4)
        return 2 * cfg.num_hidden_layers * n_kv * head_dim * elt

    def kv_stats(self) -> dict:
        cfg = self.model.config
        n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        elt = {"float32": 4, "bfloat16": 2, "float16": 2}.get(str(self.dtype), 4)
        per_tok = 2 * cfg.num_hidden_layers * n_kv * head_dim * elt
        return {"bytes_per_token": per_tok, "peak_context_tokens": self._peak_ctx,
                "kv_bytes_peak": per_tok * self._peak_ctx}

    def describe(self):
        return {"backend": "hf", "model_path": self.model_path, "dtype": self.dtype,
                "session_mode": self.session_mode, "max_model_len": self.max_model_len}


# ------------------------------------------------------------------------------------------------
# sparse_engine
# ------------------------------------------------------------------------------------------------
def engine_import_error() -> str | None:
    """None when ``from sparse_engine import LLM, SamplingParams`` works, else the reason."""
    try:
        from sparse_engine import LLM, SamplingParams  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


class EngineBackend(Backend):
    name = "engine"

    def __init__(self, model: str | None = None, method: str = "vanilla", knobs: dict | None = None,
                 engine_kwargs: dict | None = None, use_tqdm: bool = False):
        reason = engine_import_error()
        if reason:
            raise ImportError(
                f"backend=engine needs `from sparse_engine import LLM, SamplingParams`, which failed ({reason}). "
                "Use backend=hf for the HF transformers baseline."
            )
        from sparse_engine import LLM, SamplingParams

        self._SamplingParams = SamplingParams
        self._sp_fields = set(inspect.signature(SamplingParams).parameters)
        self.method = method
        self.knobs = dict(knobs or {})
        self.engine_kwargs = {k: v for k, v in (engine_kwargs or {}).items() if v is not None}
        self.model_ref = model
        self.use_tqdm = use_tqdm
        self.llm = LLM(model if model is not None else "smollm2-135m", method=method,
                       **self.engine_kwargs, **self.knobs)
        self.tokenizer = self.llm.tokenizer
        self.max_model_len = int(self._engine_max_len())
        self.session_mode = "native" if hasattr(self.llm, "generate_session") else "reprefill"

    def _engine_max_len(self) -> int:
        for holder in (self.llm, getattr(self.llm, "config", None)):
            if holder is not None and getattr(holder, "max_model_len", None):
                return holder.max_model_len
        if self.engine_kwargs.get("max_model_len"):
            return self.engine_kwargs["max_model_len"]
        from transformers import AutoConfig

        from data_prepare.resources import resolve_model_path

        cfg = AutoConfig.from_pretrained(resolve_model_path(self.model_ref))
        return getattr(cfg, "max_position_embeddings", 4096)

    def _sp(self, p: GenParams):
        wanted = {"temperature": p.temperature, "max_tokens": p.max_tokens, "top_p": p.top_p,
                  "top_k": p.top_k if p.top_k and p.top_k > 0 else None, "seed": p.seed,
                  "stop": list(p.stop) or None, "stop_token_ids": list(p.stop_token_ids) or None,
                  "min_tokens": p.min_tokens or None}
        missing = sorted(k for k, v in wanted.items() if v is not None and k not in self._sp_fields)
        if missing:  # never drop a sampling setting: the run would differ from the HF backend's
            raise TypeError(f"sparse_engine.SamplingParams has no {missing}, which this request sets "
                            f"({ {k: wanted[k] for k in missing} }); the engine cannot honour it")
        return self._SamplingParams(**{k: v for k, v in wanted.items() if v is not None})

    def _eos_ids(self) -> set[int]:
        ids = set(getattr(getattr(self.llm, "spec", None), "eos_token_ids", None) or ())
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _to_output(self, o: dict, p: GenParams) -> GenOutput:
        text, hit = _cut_at_stop(o.get("text", ""), p.stop)
        ids = list(o.get("token_ids", []))
        reason = str(o.get("finish_reason", ""))
        if reason == "stop" and ids and ids[-1] in (self._eos_ids() | set(p.stop_token_ids)):
            ids = ids[:-1]  # the EOS / stop token that ended it, as the HF backend reports it (not kept)
        return GenOutput(text=text, token_ids=ids, finish_reason="stop" if hit else reason,
                         prompt_len=len(o.get("prompt_token_ids", []) or []), kv_bytes=o.get("kv_bytes"))

    def generate(self, prompts, params, use_tqdm=None):
        plist = params if isinstance(params, list) else [params] * len(prompts)
        sps = [self._sp(p) for p in plist]
        same = all(p == plist[0] for p in plist)
        outs = self.llm.generate([list(p) for p in prompts], sps[0] if same else sps,
                                 use_tqdm=self.use_tqdm if use_tqdm is None else use_tqdm)
        return [self._to_output(o, p) for o, p in zip(outs, plist)]

    def generate_session(self, context, turns, params, accumulate=True):
        plist = params if isinstance(params, list) else [params] * len(turns)
        if self.session_mode == "native":
            outs = self.llm.generate_session(list(context), [list(t) for t in turns],
                                             [self._sp(p) for p in plist], accumulate=accumulate)
            return [self._to_output(o, p) for o, p in zip(outs, plist)]
        return super().generate_session(context, turns, plist, accumulate)

    def kv_stats(self) -> dict:
        try:
            return dict(self.llm.kv_stats())
        except Exception as exc:  # noqa: BLE001
            return {"error": str(exc)}

    def describe(self):
        return {"backend": "engine", "method": self.method, "knobs": self.knobs,
                "engine_kwargs": self.engine_kwargs, "session_mode": self.session_mode,
                "max_model_len": self.max_model_len}

    def close(self):
        for name in ("close", "shutdown", "exit"):
            fn = getattr(self.llm, name, None)
            if callable(fn):
                fn()
                return


def make_backend(backend: str, model: str | None, method: str = "vanilla", knobs: dict | None = None,
                 engine_kwargs: dict | None = None, hf_kwargs: dict | None = None) -> Backend:
    """Build the backend named by ``backend`` ('engine' or 'hf')."""
    t0 = time.time()
    if backend == "hf":
        if method != "vanilla" or knobs:
            raise ValueError(
                f"backend=hf is the full-KV HF transformers baseline: it runs method=vanilla only "
                f"(got method={method!r}, knobs={knobs}). Use backend=engine for cache methods."
            )
        b: Backend = HFBackend(model, **(hf_kwargs or {}))
    elif backend == "engine":
        b = EngineBackend(model, method=method, knobs=knobs, engine_kwargs=engine_kwargs)
    else:
        raise ValueError(f"unknown backend {backend!r}; choose 'engine' or 'hf'")
    log.info("backend %s ready in %.1fs", backend, time.time() - t0)
    return b


# ------------------------------------------------------------------------------------------------
# Requests and prompt helpers shared by the harnesses
# ------------------------------------------------------------------------------------------------
@dataclass
class Request:
    """One unit of generation work; the runner's resume granularity.

    ``kind="single"``: generate from ``prompt_ids``; one record.
    ``kind="session"``: ``context_ids`` then ``turns`` through ``generate_session`` (``accumulate``
    as there); one record per turn, ``meta`` shared and ``turn_meta[k]`` per turn. The
    query-agnostic mode is a one-turn session.
    """

    uid: str
    task: str
    kind: str = "single"
    prompt_ids: list[int] = field(default_factory=list)
    context_ids: list[int] = field(default_factory=list)
    turns: list[list[int]] = field(default_factory=list)
    accumulate: bool = True
    params: Any = None  # GenParams, or a list (one per turn) for sessions
    meta: dict = field(default_factory=dict)
    turn_meta: list[dict] = field(default_factory=list)

    @property
    def n_prompt_tokens(self) -> int:
        if self.kind == "single":
            return len(self.prompt_ids)
        return len(self.context_ids) + sum(len(t) for t in self.turns)


def middle_truncate_ids(ids: list[int], max_len: int) -> list[int]:
    """Keep the first and last ``max_len // 2`` tokens (LongBench / SCBench middle truncation)."""
    if max_len <= 0 or len(ids) <= max_len:
        return list(ids)
    half = max_len // 2
    return list(ids[:half]) + list(ids[len(ids) - half:])


def middle_truncate_text(tokenizer, text: str, max_len: int) -> str:
    """LongBench ``pred.py``: if the prompt has more than ``max_len`` tokens, keep the decoded first
    and last ``int(max_len/2)`` tokens (special tokens skipped) and join the two strings."""
    ids = tokenizer(text, truncation=False).input_ids
    if len(ids) <= max_len:
        return text
    half = int(max_len / 2)
    return (tokenizer.decode(ids[:half], skip_special_tokens=True)
            + tokenizer.decode(ids[-half:], skip_special_tokens=True))


def encode(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens, truncation=False).input_ids)


def _adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    probe = encode(tokenizer, "a", add_special_tokens=True)
    return bool(probe) and probe[0] == bos


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    """Token ids of a whole prompt. Plain text: the tokenizer's special tokens (BOS) are added, as the
    official scripts do. Text rendered by a chat template: NOT added, because templates such as
    Llama 3's already start with BOS (adding it again gives two); a BOS the tokenizer would add and
    the template did not write is put back, so that the prompt starts with exactly one BOS either way."""
    if not chat:
        return encode(tokenizer, text, add_special_tokens=True)
    ids = encode(tokenizer, text, add_special_tokens=False)
    if _adds_bos(tokenizer) and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_wrap(tokenizer, user_text: str, system: str | None = None) -> str:
    """Render one user message with the model's chat template and the generation prompt."""
    msgs = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": user_text}]
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


_SPLIT = "[SEPSEPSEP]"


def chat_split(tokenizer, context_part: str, query_part: str, use_chat: bool) -> tuple[str, str]:
    """Split one user message into (context text, query text) after chat rendering, so that the
    context can be prefilled before the query is seen (query-agnostic mode)."""
    if not use_chat:
        return context_part, query_part
    rendered = chat_wrap(tokenizer, context_part + _SPLIT + query_part)
    head, tail = rendered.split(_SPLIT, 1)
    return head, tail


def chat_followup(tokenizer, previous_answer: str | None, user_text: str) -> str:
    """A follow-up turn in chat form without the system prefix (SCBench's construction): the
    previous (golden) assistant answer, then the new user message and the generation prompt."""
    base = tokenizer.apply_chat_template([{"role": "system", "content": ""}], add_generation_prompt=True,
                                         tokenize=False)
    msgs = [{"role": "system", "content": ""}]
    if previous_answer is not None:
        msgs.append({"role": "assistant", "content": str(previous_answer)})
    msgs.append({"role": "user", "content": user_text})
    rendered = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return rendered.replace(base, "")
