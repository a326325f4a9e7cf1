"""DeltaKV's full layers quantized KIVI-style (`full_layer_kv_quant_bits`, issue 15.4).

* with every layer full, DeltaKV + KIVI is exactly `method=kivi` with DeltaKV's sinks (same tokens,
  logits and bytes) - and `method=kivi` is checked against an HF-eager reference over dequantized
  K/V in tests/test_kivi.py;
* with sparse layers too: the engine checks of tests/test_every_method.py (no leak, the same tokens
  when a tight pool preempts, `slots_needed` an upper bound in every step, sessions);
* a wide residual window gives plain DeltaKV's tokens and bytes.
"""

from __future__ import annotations

import pytest
import torch

from sparse_engine import LLM, SamplingParams
from tests.test_every_method import (LENGTHS, MAX_TOKENS, StepLedger, _session_inputs, _tiny_deltakv_compressor,
                                     assert_no_leak, budget_for, params, prompts, tokens)

COMMON = dict(dtype="float32", device="cpu", chunk_prefill_size=64, kv_cache_bytes=1 << 22)
KIVI = dict(full_layer_kv_quant_bits=2, full_layer_kivi_group_size=8, full_layer_kivi_residual_length=8)


def dk(**over):
    return {**dict(deltakv_path=_tiny_deltakv_compressor(), latent_dtype="int8", num_top_tokens=16,
                   num_top_tokens_in_prefill=32, recent_size=8, decode_compress_block=4), **over}


@pytest.fixture(scope="module")
def tiny(tiny_model_factory):
    return str(tiny_model_factory("llama"))


def test_all_layers_full_equals_method_kivi(tiny):
    sp = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, return_logits=True) for m in MAX_TOKENS]
    comp = _tiny_deltakv_compressor()
    a = LLM(tiny, method="deltakv", **dk(full_attn_layers=[0, 1, 2, 3], num_top_tokens=1.0,
                                             num_top_tokens_in_prefill=None, **KIVI), **COMMON).generate(prompts(), sp,
                                                                                                   use_tqdm=False)
    b = LLM(tiny, method="kivi", bits=2, group_size=8, residual_length=8, sink_size=comp.reference.num_sinks,
            **COMMON).generate(prompts(), sp, use_tqdm=False)
    for x, y in zip(a, b):
        assert x["token_ids"] == y["token_ids"] and x["kv_bytes"] == y["kv_bytes"]
        assert all(torch.equal(p, q) for p, q in zip(x["logits"], y["logits"]))


def test_wide_window_equals_plain_deltakv(tiny):
    a = LLM(tiny, method="deltakv", **dk(), **COMMON).generate(prompts(), params(), use_tqdm=False)
    wide = {**KIVI, "full_layer_kivi_residual_length": 4096}
    b = LLM(tiny, method="deltakv", **dk(**wide), **COMMON).generate(prompts(), params(), use_tqdm=False)
    assert tokens(a) == tokens(b) and [o["kv_bytes"] for o in a] == [o["kv_bytes"] for o in b]


def test_engine_checks_with_sparse_layers(tiny):
    llm = LLM(tiny, method="deltakv", **dk(**KIVI), **COMMON)
    ledger = StepLedger(llm)
    ref = tokens(llm.generate(prompts(), params(), use_tqdm=False))
    assert not ledger.violations(), "slots_needed must bound every step's allocations"
    assert_no_leak(llm, "deltakv+kivi batch")
    plain = LLM(tiny, method="deltakv", **dk(), **COMMON).generate(prompts(), params(), use_tqdm=False)
    ours = llm.generate(prompts(), params(), use_tqdm=False)
    assert tokens(ours) == ref
    assert all(o["kv_bytes"] < p["kv_bytes"] for o, p in zip(ours[1:], plain[1:]))  # prompts >= 75 quantize
    # a tight pool (the largest request's admission bound) preempts and gives the same tokens
    # (admission='chunk' starts prompts that do not fit whole: the preemption path is exercised)
    need = max(llm.method.max_slots(n + m) for n, m in zip(LENGTHS, MAX_TOKENS))
    tight = LLM(tiny, method="deltakv", **dk(**KIVI), **{**COMMON, **budget_for(llm, need), "admission": "chunk"})
    assert tokens(tight.generate(prompts(), params(), use_tqdm=False)) == ref
    assert tight.kv_stats()["num_preemptions"] > 0
    assert_no_leak(tight, "deltakv+kivi tight pool")
    # sessions (forks share blocks) leave nothing behind
    ctx, turns, sps = _session_inputs()
    for acc in (True, False):
        llm.generate_session(ctx, turns, sps, accumulate=acc)
    assert_no_leak(llm, "deltakv+kivi sessions")
    assert not ledger.violations()


def test_bad_full_layer_knobs(tiny):
    for knobs, msg in ((dict(full_layer_kv_quant_bits=3), "full_layer_kv_quant_bits"),
                       (dict(full_layer_kv_quant_bits=4, full_layer_kivi_group_size=5), "group_size"),
                       (dict(full_layer_kv_quant_bits=4, full_layer_kivi_group_size=8, deltakv_offload_latent=True),
                        "batch path")):
        with pytest.raises(ValueError, match=msg):
            LLM(tiny, method="deltakv", **dk(**knobs), **COMMON)
