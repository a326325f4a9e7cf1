"""`prefill_compress` (issue 15.3): incremental (the default and the reference's: compress after
every prefill chunk) vs at_end (the prompt stays exact until its last chunk, then is compressed at
once, within the slot budget)."""

from __future__ import annotations

import pytest
import torch

from deltakv.testing import tiny_compressor
from sparse_engine import LLM, SamplingParams

COMMON = dict(dtype="float32", chunk_prefill_size=32, kv_cache_bytes=1 << 24)
SP = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tiny_model_factory):
    return str(tiny_model_factory("llama"))


def _trace(llm):
    """(num_computed, prompt length, latent tokens, exact tokens of a sparse layer) after every step."""
    m, out = llm.method, []
    orig = m.after_step

    def after_step(seq, prefill_done, num_new_tokens):
        orig(seq, prefill_done, num_new_tokens)
        out.append((seq.num_computed, seq.num_prompt_tokens, seq.kv.state.num_latent,
                    int(seq.kv.tables[m.sparse[0]].lens[0])))

    m.after_step = after_step
    return out


@pytest.mark.parametrize("mode", ["incremental", "at_end"])
def test_when_the_prompt_is_compressed(tiny, mode):
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, 250, (110,), generator=g).tolist()
    llm = LLM(tiny, method="deltakv", deltakv_path=tiny_compressor(latent=24, seed=5), latent_dtype="float32",
              recent_size=8, decode_compress_block=4, prefill_compress=mode, **COMMON)
    trace = _trace(llm)
    llm.generate([prompt], SP, use_tqdm=False)
    prefill = [t for t in trace if t[0] < t[1]]
    assert len(prefill) == 3  # 110 tokens in chunks of 32
    if mode == "at_end":
        assert all(lat == 0 and exact == n for n, _, lat, exact in prefill)  # exact until the last chunk
    else:
        assert all(lat > 0 for _, _, lat, _ in prefill[1:])
    # after the last chunk, both: every non-prototype in [sinks, prompt - recent) is latent (stride 4, 4 sinks)
    end = next(t for t in trace if t[0] == t[1])
    want = sum(1 for p in range(4, 110 - 8) if (p - 4) % 4 != 0)
    assert end[2] == want and end[3] == 110 - want
    assert llm.kv_stats()["slots_used"] == 0


def test_at_end_lossless_equals_vanilla_and_budgets_the_whole_prompt(tiny):
    g = torch.Generator().manual_seed(3)
    ps = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (110, 70)]
    ref = LLM(tiny, **COMMON).generate(ps, SP, use_tqdm=False)
    llm = LLM(tiny, method="deltakv", deltakv_path=tiny_compressor(), latent_dtype="float32", recent_size=8,
              num_top_tokens=4096, prefill_compress="at_end", **COMMON)
    assert [o["token_ids"] for o in llm.generate(ps, SP, use_tqdm=False)] == [o["token_ids"] for o in ref]
    hkv, layers = llm.method.spec.num_kv_heads, llm.method.spec.num_layers
    assert llm.method.max_slots(110) >= 110 * layers * hkv  # admission counts the exact prompt in every layer
    inc = LLM(tiny, method="deltakv", deltakv_path=tiny_compressor(), latent_dtype="float32", recent_size=8, **COMMON)
    assert inc.method.max_slots(110) < llm.method.max_slots(110)
