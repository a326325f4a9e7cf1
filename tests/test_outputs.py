"""vLLM-shaped results: `LLM.generate` / `generate_session` return `RequestOutput`s (completion,
metrics with first-token time, logprobs), the old dict keys still read, and `LLM.abort` frees a
request's KV whether it waits or runs."""

from __future__ import annotations

import pytest
import torch

from deltakv.testing import make_tiny_model
from sparse_engine import LLM, CompletionOutput, RequestOutput, SamplingParams

PROMPT = list(range(5, 40))


@pytest.fixture(scope="module")
def tiny(tiny_model_factory):
    return LLM(tiny_model_factory("qwen2"), dtype="float32", kv_cache_bytes=16 << 20)


@pytest.fixture(scope="module")
def worded(tmp_path_factory):
    """A tiny model with a word-level tokenizer: text prompts and stop strings."""
    path = make_tiny_model(tmp_path_factory.mktemp("worded"), ["the cat sat on the mat and the dog ran far away"])
    return LLM(path, dtype="float32", kv_cache_bytes=16 << 20)


def test_generate_returns_request_outputs(tiny):
    outs = tiny.generate([PROMPT, PROMPT[:10]], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                         use_tqdm=False)
    assert all(isinstance(o, RequestOutput) for o in outs)
    o = outs[0]
    c = o.outputs[0]
    assert isinstance(c, CompletionOutput) and len(o.outputs) == 1 and c.index == 0
    assert o.finished and c.finished() and c.finish_reason == "length" and c.stop_reason is None
    assert o.prompt is None and o.prompt_token_ids == PROMPT and len(c.token_ids) == 6
    assert c.logprobs is None and c.cumulative_logprob is None and c.logits is None
    assert o.request_id != outs[1].request_id
    m = o.metrics
    assert m.arrival_time <= m.first_token_time <= m.finished_time
    assert m.time_to_first_token >= 0 and m.e2e_latency >= m.time_to_first_token
    per_token = tiny.kv_stats()["bytes_per_token"]
    assert m.kv_bytes == (len(PROMPT) + 6 - 1) * per_token and m.num_preemptions == 0


def test_legacy_dict_keys_read_the_attributes(tiny):
    o = tiny.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    c = o.outputs[0]
    assert o["token_ids"] == c.token_ids and o["text"] == c.text and o["finish_reason"] == c.finish_reason
    assert o["prompt_token_ids"] == o.prompt_token_ids and o["kv_bytes"] == o.metrics.kv_bytes
    assert o["num_preemptions"] == 0 and o.get("kv_bytes") == o.metrics.kv_bytes
    assert "logits" not in o and o.get("logits") is None and "text" in o and "nope" not in o
    with pytest.raises(KeyError):
        o["logits"]
    with pytest.raises(KeyError):
        o["nope"]
    assert set(dict(o)) == {"text", "token_ids", "prompt_token_ids", "finish_reason", "num_preemptions", "kv_bytes"}
    with_logits = tiny.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True,
                                                       return_logits=True), use_tqdm=False)
    assert "logits" in with_logits and len(with_logits["logits"]) == 3
    assert with_logits["logits"] is with_logits.outputs[0].logits


def test_logprobs_are_the_log_softmax_of_the_logits(tiny):
    sp = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=3, return_logits=True)
    o = tiny.generate(PROMPT, sp, use_tqdm=False).outputs[0]
    assert len(o.logprobs) == 5
    total = 0.0
    for tok, entry, logits in zip(o.token_ids, o.logprobs, o.logits):
        lp = torch.log_softmax(logits.float(), -1)
        assert list(entry)[0] == tok and entry[tok].rank == 1  # greedy: the sampled token is the most likely
        assert len(entry) == 3 and [e.rank for e in entry.values()] == [1, 2, 3]
        for t, e in entry.items():
            assert e.logprob == pytest.approx(float(lp[t]), abs=1e-5)
        assert set(entry) == set(torch.topk(lp, 3).indices.tolist())
        total += entry[tok].logprob
    assert o.cumulative_logprob == pytest.approx(total)
    sampled = tiny.generate(PROMPT, SamplingParams(temperature=1.5, seed=3, max_tokens=8, ignore_eos=True, logprobs=0),
                            use_tqdm=False).outputs[0]
    assert all(len(e) == 1 and list(e)[0] == t for e, t in zip(sampled.logprobs, sampled.token_ids))
    assert all(e[t].rank >= 1 for e, t in zip(sampled.logprobs, sampled.token_ids))
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=-1)


def test_text_prompt_stop_reason_and_decoded_logprobs(worded):
    ref = worded.generate("the cat sat", SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                          use_tqdm=False)
    assert ref.prompt == "the cat sat" and ref.prompt_token_ids == worded.tokenizer.encode("the cat sat")
    stop_id = ref.outputs[0].token_ids[2]
    cut = worded.generate("the cat sat", SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                                                         stop_token_ids=[stop_id], logprobs=1), use_tqdm=False)
    c = cut.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop_id and c.token_ids[-1] == stop_id
    assert all(e[t].decoded_token == worded.tokenizer.decode([t]) for e, t in zip(c.logprobs, c.token_ids))
    words = ref.outputs[0].text.split()
    if len(words) >= 3:
        s = worded.generate("the cat sat", SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                                                           stop=[words[2]]), use_tqdm=False).outputs[0]
        assert s.finish_reason == "stop" and s.stop_reason == words[2] and words[2] not in s.text


def test_session_turns_are_request_outputs(tiny):
    outs = tiny.generate_session(PROMPT, [[50, 51], []], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert [type(o) for o in outs] == [RequestOutput, RequestOutput]
    assert all(o.finished and len(o.outputs[0].token_ids) == 3 for o in outs)
    assert all(o.metrics.first_token_time is not None for o in outs)


def test_abort_frees_a_running_and_a_waiting_request(tiny_model_factory):
    llm = LLM(tiny_model_factory("qwen2"), dtype="float32", kv_cache_bytes=16 << 20, max_num_seqs=1)
    sp = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    a, b = llm.add_request(PROMPT, sp), llm.add_request(PROMPT, sp)
    for _ in range(3):
        llm.step()
    assert a in llm.scheduler.running and b in llm.scheduler.waiting and llm.pool.num_used > 0
    first = llm.output(a)
    assert not first.finished and first.outputs[0].finish_reason is None and len(first.outputs[0].token_ids) >= 1
    assert first.metrics.kv_bytes > 0
    llm.abort(b)
    assert b.finished and b.finish_reason == "abort" and b not in llm.scheduler.waiting
    llm.abort(a)
    assert a.finished and llm.output(a).outputs[0].finish_reason == "abort"
    assert llm.pool.num_used == 0 and not llm.scheduler.has_work()
    llm.abort(a)  # a finished request: nothing happens
    out = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 4 and llm.pool.num_used == 0
