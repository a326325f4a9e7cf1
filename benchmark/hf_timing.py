"""HF transformers timing for `deltakv-bench`: per-step time stamps inside ONE `model.generate` call.

A `StepTimer` (a `StoppingCriteria` that never stops) is called by `generate` once per new token, right
after the token is chosen, so one greedy `generate(max_new_tokens=min_new_tokens=N)` gives N stamps:
TTFT = first stamp - the stamp taken before the call (setup + prefill + first token), decode step time =
mean difference of consecutive stamps, decode tok/s = batch / step time. No second run is subtracted.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList


class StepTimer(StoppingCriteria):
    """Records `time.perf_counter()` every time `generate` asks whether to stop; never stops.

    `start()` stamps the moment before `generate`; `stamps` gets one entry per generated token (on CUDA
    the stream is synchronised first, so a stamp is taken when the step's work is done).
    """

    def __init__(self):
        self.t0: float | None = None
        self.stamps: list[float] = []

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.stamps = []

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        if input_ids.is_cuda:
            torch.cuda.synchronize(input_ids.device)
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    @property
    def ttft_s(self) -> float:
        return self.stamps[0] - self.t0

    @property
    def step_s(self) -> float:
        """Mean time between consecutive tokens (nan with fewer than 2 stamps)."""
        if len(self.stamps) < 2:
            return float("nan")
        return (self.stamps[-1] - self.stamps[0]) / (len(self.stamps) - 1)

    @property
    def total_s(self) -> float:
        return self.stamps[-1] - self.t0


def pad_left(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input ids and their attention mask (equal-length prompts get no padding)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def timed_generate(model, prompts: list[list[int]], decode_tokens: int, pad_id: int = 0) -> StepTimer:
    """One greedy `generate` of exactly `decode_tokens` new tokens per prompt; returns its StepTimer."""
    device = next(model.parameters()).device
    ids, mask = pad_left(prompts, pad_id, device)
    timer = StepTimer()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timer.start()
    model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=decode_tokens,
                   min_new_tokens=decode_tokens, pad_token_id=pad_id, eos_token_id=None,
                   stopping_criteria=StoppingCriteriaList([timer]))
    if len(timer.stamps) != decode_tokens:  # generate must not stop early nor skip a step
        raise RuntimeError(f"HF generate made {len(timer.stamps)} steps, expected {decode_tokens}")
    return timer


def run_hf(model, prompts: list[list[int]], decode_tokens: int, pad_id: int = 0) -> dict:
    """The fixed workload (equal-length prompts: no padding) through one HF `generate` call."""
    t = timed_generate(model, prompts, decode_tokens, pad_id)
    return {"hf_ttft_s": t.ttft_s, "hf_decode_step_ms": 1000 * t.step_s,
            "hf_decode_tok_s": len(prompts) / t.step_s}


def run_hf_mixed(model, prompts: list[list[int]], decode_tokens: int, hf_batch: int, pad_id: int) -> dict:
    """Mixed-length requests in arrival order, `hf_batch` at a time (left padding), one `generate` each."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    ttfts, padded = [], 0
    for i in range(0, len(prompts), hf_batch):
        batch = prompts[i : i + hf_batch]
        timer = timed_generate(model, batch, decode_tokens, pad_id)
        ttfts += [timer.stamps[0] - t0] * len(batch)  # every request arrived at t0
        padded += len(batch) * max(len(p) for p in batch) - sum(len(p) for p in batch)
    wall = time.perf_counter() - t0
    prompt_tokens = sum(len(p) for p in prompts)
    output_tokens = len(prompts) * decode_tokens
    return {"wall_s": wall, "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
            "output_tok_s": output_tokens / wall, "total_tok_s": (prompt_tokens + output_tokens) / wall,
            "mean_ttft_s": sum(ttfts) / len(ttfts), "pad_tokens": padded}


def load_hf_model(path: Path, random_weights: bool, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The HF model in the engine's dtype on the engine's device (random weights: the same config shapes)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if random_weights:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval()


def hf_pad_id(tokenizer, model) -> int:
    for cand in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None),
                 getattr(model.config, "pad_token_id", None), getattr(model.config, "eos_token_id", None)):
        if isinstance(cand, (list, tuple)):
            cand = cand[0] if cand else None
        if isinstance(cand, int) and 0 <= cand < model.config.vocab_size:
            return cand
    return 0


@torch.no_grad()
def hf_decode_step(model, prompts: list[list[int]], warm_steps: int = 2):
    """Prefill `prompts` (equal length) with HF's default cache (DynamicCache), run `warm_steps` greedy decode forwards, and
    return a zero-argument function doing ONE more decode forward + greedy argmax (what a step is)."""
    import inspect

    device = next(model.parameters()).device
    # the cache argument / output is `past_key_values` up to transformers 5.x, `cache` after the rename
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    cache = out[cache_kw] if cache_kw in out else out["past_key_values"]
    if cache is None:
        raise RuntimeError("the HF model returned no KV cache for use_cache=True")
    state = {"tok": out.logits[:, -1].argmax(-1, keepdim=True), "mask": mask}

    def step():
        state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(len(prompts), 1)], dim=1)
        o = model(input_ids=state["tok"], attention_mask=state["mask"], use_cache=True, **{cache_kw: cache})
        state["tok"] = o.logits[:, -1].argmax(-1, keepdim=True)

    for _ in range(warm_steps):
        step()
    return torch.no_grad()(step)
