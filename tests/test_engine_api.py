"""Public API behaviour: sampling options, stop conditions, clear errors for bad input."""

from __future__ import annotations

import pytest
import torch

from sparse_engine import LLM, SamplingParams
from sparse_engine.cache.pool import KVPool


@pytest.fixture(scope="module")
def tiny(tiny_model_factory):
    return LLM(tiny_model_factory("qwen2"), dtype="float32")


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(tiny):
    p = [list(range(3, 40))]
    a = tiny.generate(p, SamplingParams(temperature=1.0, seed=7, max_tokens=16, ignore_eos=True), use_tqdm=False)
    b = tiny.generate(p, SamplingParams(temperature=1.0, seed=7, max_tokens=16, ignore_eos=True), use_tqdm=False)
    c = tiny.generate(p, SamplingParams(temperature=1.0, seed=8, max_tokens=16, ignore_eos=True), use_tqdm=False)
    greedy = tiny.generate(p, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    topk1 = tiny.generate(p, SamplingParams(temperature=0.8, top_k=1, seed=3, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert a[0]["token_ids"] == b[0]["token_ids"]
    assert a[0]["token_ids"] != c[0]["token_ids"]
    assert topk1[0]["token_ids"] == greedy[0]["token_ids"]


def test_top_p_keeps_the_nucleus():
    from sparse_engine.layers.sampler import sample

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    seen = {sample(logits, SamplingParams(temperature=1.0, top_p=0.7), torch.Generator().manual_seed(s))
            for s in range(200)}
    assert seen == {0, 1}  # 0.5 < 0.7 so token 1 is needed; 0.5 + 0.3 >= 0.7 so token 2 never


def test_stop_token_ids_and_max_model_len(tiny):
    p = list(range(3, 40))
    ref = tiny.generate([p], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    stop_at = ref["token_ids"][5]
    first = ref["token_ids"].index(stop_at)
    out = tiny.generate([p], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                            stop_token_ids=[stop_at]), use_tqdm=False)[0]
    assert out["token_ids"] == ref["token_ids"][: first + 1] and out["finish_reason"] == "stop"
    short = LLM(tiny.model_path, dtype="float32", max_model_len=45)
    out = short.generate([p], SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True), use_tqdm=False)[0]
    assert len(p) + len(out["token_ids"]) == 45 and out["finish_reason"] == "length"


def test_stop_strings_on_shipped_model(shipped_model_path):
    llm = LLM(shipped_model_path, dtype="float32")
    out = llm.generate("The capital of France is", SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    assert out["text"].startswith(" Paris")
    cut = llm.generate("The capital of France is", SamplingParams(temperature=0.0, max_tokens=8, stop=["aris"]),
                       use_tqdm=False)
    assert cut["text"] == " P" and cut["finish_reason"] == "stop"


def test_bad_inputs_name_the_fix(tiny, tmp_path, tiny_model_factory):
    with pytest.raises(ValueError, match="Empty prompt"):
        tiny.generate([[]], SamplingParams(temperature=0.0), use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(tiny.model_path, max_model_len=10).generate([list(range(3, 30))], use_tqdm=False)
    with pytest.raises(TypeError, match="Did you mean 'chunk_prefill_size'"):
        LLM(tiny.model_path, chunk_prefil_size=8)
    with pytest.raises(ValueError, match="max_num_seqs must be a positive"):
        LLM(tiny.model_path, max_num_seqs=0)
    with pytest.raises(ValueError, match="kv_cache_bytes must be positive"):
        LLM(tiny.model_path, kv_cache_bytes=-1)
    with pytest.raises(ValueError, match="Unknown cache method 'snapvk'"):
        LLM(tiny.model_path, method="snapvk")
    with pytest.raises(ValueError, match="no config.json"):
        LLM(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        LLM("org/not-a-local-model")
    with pytest.raises(ValueError, match="Raise kv_cache_bytes"):
        LLM(tiny.model_path, kv_cache_bytes=4096).generate([list(range(3, 60))], use_tqdm=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny.generate([[3, 999999]], use_tqdm=False)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingParams(temperature=-1)
    gpt2_like = tmp_path / "gpt2"
    gpt2_like.mkdir()
    (gpt2_like / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ValueError, match="Unsupported architecture"):
        LLM(gpt2_like)


def test_context_manager_frees_and_interrupt_returns_slots(tiny_model_factory):
    path = tiny_model_factory("qwen2")
    with LLM(path, dtype="float32") as llm:
        seq = llm.add_request(list(range(3, 30)), SamplingParams(temperature=0.0, max_tokens=5))
        llm.step()
        assert llm.kv_stats()["slots_used"] > 0
        llm.abort_all()
        assert llm.kv_stats()["slots_used"] == 0 and seq.finish_reason == "abort"
    assert llm.pool is None


def test_pool_refcounts():
    pool = KVPool(8, 4, torch.float32, torch.device("cpu"))
    a = pool.allocate(3)
    pool.incref(a[:1])
    pool.free(a)
    assert pool.num_free == 7  # the shared slot stays until its second owner lets go
    pool.free(a[:1])
    assert pool.num_free == 8
    with pytest.raises(RuntimeError, match="freed more times"):
        pool.free(a[:1])


def test_min_tokens_masks_eos_like_hf(tiny_model_factory):
    """min_tokens: EOS (and stop ids) cannot end the output early; equal to HF's min_new_tokens."""
    from transformers import AutoModelForCausalLM

    prompt = list(range(5, 40))
    first = LLM(tiny_model_factory("llama"), dtype="float32").generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True), use_tqdm=False)[0]["token_ids"][0]
    path = tiny_model_factory("llama", eos_token_id=first)  # same weights: the greedy first token is now EOS
    llm = LLM(path, dtype="float32")
    plain = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)[0]
    assert plain["token_ids"] == [first] and plain["finish_reason"] == "stop"
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, min_tokens=3), use_tqdm=False)[0]
    assert len(out["token_ids"]) >= 3 and first not in out["token_ids"][:3]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=8, min_new_tokens=3, do_sample=False, eos_token_id=first, pad_token_id=0)
    want = ref[0, len(prompt):].tolist()
    if first in want[3:]:  # HF pads after EOS; the engine stops at it
        want = want[: want.index(first, 3) + 1]
    assert out["token_ids"] == want
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
