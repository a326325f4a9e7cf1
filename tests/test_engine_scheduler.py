"""Scheduler behaviour: continuous batching under a small KV budget, preemption, slot accounting."""

from __future__ import annotations

import torch

from sparse_engine import LLM, SamplingParams


def test_200_mixed_requests_small_budget_preempt_and_free(tiny_model_factory):
    path = tiny_model_factory("qwen2")
    # bytes for ~900 tokens of KV for this model (4 layers x 2 KV heads x 16 dims x 2 (K,V) x 4 bytes)
    per_token = 4 * 2 * 16 * 2 * 4
    llm = LLM(path, dtype="float32", kv_cache_bytes=900 * per_token, max_num_seqs=16,
              max_num_batched_tokens=256, chunk_prefill_size=64)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 300, (200,), generator=g).tolist()
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]
    params = [SamplingParams(temperature=0.0, max_tokens=int(m), ignore_eos=True)
              for m in torch.randint(1, 24, (200,), generator=g)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    stats = llm.kv_stats()
    assert all(o["finish_reason"] == "length" for o in outs)
    assert [len(o["token_ids"]) for o in outs] == [p.max_tokens for p in params]
    assert stats["num_preemptions"] > 0, "budget chosen so that preemption must happen"
    assert stats["slots_used"] == 0 and stats["slots_free"] == stats["slots_total"]

    # preemption (recompute) must not change greedy results: compare with an unconstrained engine
    roomy = LLM(path, dtype="float32", max_num_seqs=256)
    ref = roomy.generate(prompts[:40], params[:40], use_tqdm=False)
    assert [o["token_ids"] for o in outs[:40]] == [o["token_ids"] for o in ref]


def test_mixed_prefill_and_decode_share_a_step(tiny_model_factory):
    path = tiny_model_factory("qwen2")
    llm = LLM(path, dtype="float32", chunk_prefill_size=32, max_num_batched_tokens=64)
    short = llm.add_request([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    llm.step()  # short prefilled
    long = llm.add_request(list(range(3, 203)), SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    batch = llm.scheduler.schedule()
    kinds = {s.seq_id: n for s, n in batch}
    assert kinds[short.seq_id] == 1 and kinds[long.seq_id] == 32  # decode token + prefill chunk together
    samplers, _ = llm.runner.run(batch)
    assert short in samplers and long not in samplers


def test_kv_stats_accounting(tiny_model_factory):
    path = tiny_model_factory("qwen2")
    llm = LLM(path, dtype="float32")
    seq = llm.add_request(list(range(3, 53)), SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    llm.step()
    stats = llm.kv_stats()
    # 50 prompt tokens x 4 layers x 2 KV heads slots of 2 x 16 float32
    assert stats["slots_used"] == 50 * 4 * 2
    assert stats["bytes_per_slot"] == 2 * 16 * 4
    assert stats["per_sequence_bytes"][seq.seq_id] == 50 * 4 * 2 * 2 * 16 * 4
    while llm.scheduler.has_work():
        llm.step()
    assert llm.kv_stats()["slots_used"] == 0


def test_prompt_in_progress_waits_instead_of_thrashing(tiny_model_factory):
    """A prefilling sequence whose next chunk does not fit keeps its KV and waits while an older one
    decodes; a sequence preempted in a step is not re-admitted in that same step. Before, the younger
    prompt freed its chunks and restarted every step (5 preemptions here)."""
    path = tiny_model_factory("llama")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 250, (160,), generator=g).tolist() for _ in range(2)]
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    budget = int(1.5 * 168) * 4 * 2 * 2 * 16 * 4  # 1.5 sequences: tokens x layers x kv heads x (k, v) x D x fp32
    roomy = LLM(path, dtype="float32", chunk_prefill_size=32).generate(prompts, sp, use_tqdm=False)
    llm = LLM(path, dtype="float32", chunk_prefill_size=32, kv_cache_bytes=budget)
    out = llm.generate(prompts, sp, use_tqdm=False)
    assert [o["token_ids"] for o in out] == [o["token_ids"] for o in roomy]
    assert llm.kv_stats()["num_preemptions"] <= 1 and llm.kv_stats()["slots_used"] == 0


def _peak_running(llm) -> list[int]:
    """Record how many sequences run in each step (spy on the scheduler)."""
    seen, schedule = [], llm.scheduler.schedule

    def spy():
        batch = schedule()
        seen.append(len(llm.scheduler.running))
        llm.tokens_computed = getattr(llm, "tokens_computed", 0) + sum(n for _, n in batch)
        return batch

    llm.scheduler.schedule = spy
    return seen


def test_prompt_admission_starts_a_request_only_when_its_whole_prompt_fits(tiny_model_factory):
    """Vanilla under a budget of 1.5 sequences (hand-computed: 168 tokens x 4 layers x 2 KV heads x
    2 x 16 x 4 bytes each), 3 prompts of 160 tokens in chunks of 32: with admission='chunk' a second
    prompt starts in the free half, is prefilled and preempted when the first decodes (recomputed);
    with 'prompt' (default) it waits until the first finishes: no preemption, one sequence at a time,
    the same tokens as an unconstrained engine."""
    path = tiny_model_factory("llama")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 250, (160,), generator=g).tolist() for _ in range(3)]
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    budget = int(1.5 * 168) * 4 * 2 * 2 * 16 * 4
    ref = LLM(path, dtype="float32", chunk_prefill_size=32).generate(prompts, sp, use_tqdm=False)
    runs = {}
    for admission in ("chunk", "prompt"):
        llm = LLM(path, dtype="float32", chunk_prefill_size=32, kv_cache_bytes=budget, admission=admission)
        running = _peak_running(llm)
        out = llm.generate(prompts, sp, use_tqdm=False)
        assert [o["token_ids"] for o in out] == [o["token_ids"] for o in ref]
        assert llm.kv_stats()["slots_used"] == 0
        runs[admission] = (llm.kv_stats()["num_preemptions"], max(running), llm.tokens_computed)
    assert runs["chunk"][0] > 0 and runs["chunk"][1] >= 2 and runs["chunk"][2] > 3 * (160 + 7)  # chunks computed twice
    assert runs["prompt"][0] == 0 and runs["prompt"][1] == 1
    assert runs["prompt"][2] == 3 * (160 + 7)  # every token computed once (the 8th output is sampled, never fed)


def test_prompt_admission_counts_what_running_prompts_still_claim(tiny_model_factory):
    """Two prompts that fit together only once the first is done: while the first is half prefilled
    (its KV half held), the free slots hold the second prompt, but not both prompts' remainders, so
    'prompt' admission waits; it starts the second as soon as the first's prompt is whole in a pool of
    two sequences."""
    path = tiny_model_factory("llama")
    per_tok = 4 * 2  # slots per token: layers x KV heads
    llm = LLM(path, dtype="float32", chunk_prefill_size=64, max_num_batched_tokens=64,
              kv_cache_bytes=int(1.9 * 128) * per_tok * 2 * 16 * 4)
    sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    a = llm.add_request(list(range(3, 131)), sp)
    b = llm.add_request(list(range(5, 133)), sp)
    batch = llm.scheduler.schedule()
    assert [(s.seq_id, n) for s, n in batch] == [(a.seq_id, 64)]  # 243 free - 64 owed < 128 for b
    llm.runner.run(batch)
    a.num_computed += 64
    free = llm.pool.num_free // per_tok
    assert free >= 128 > free - 64  # b's prompt fits the free slots, not beside a's remaining 64
    assert [s.seq_id for s, _ in llm.scheduler.schedule()] == [a.seq_id]


def test_deltakv_prompt_admission_runs_more_sequences_without_preempting(tiny_model_factory):
    """DeltaKV's footprint is its compressed size (`max_slots` / `max_rows`): under the budget where
    vanilla runs one sequence at a time, 'prompt' admission runs several at once, with no preemption
    and the tokens of an unconstrained DeltaKV engine."""
    from deltakv.reference import ReferenceSpec
    from deltakv.testing import tiny_compressor

    path = tiny_model_factory("llama")
    g = torch.Generator().manual_seed(0)
    n, m = 480, 8
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for _ in range(4)]
    sp = SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True)
    comp = tiny_compressor(12, 5, (1, 2, 3), (0,), ReferenceSpec(num_sinks=4, cluster_ratio=1 / 16, top_k=2))
    dk = dict(method="deltakv", deltakv_path=comp, latent_dtype="int8", num_top_tokens=16, recent_size=8,
              dtype="float32", chunk_prefill_size=32)
    ref = LLM(path, **dk).generate(prompts, sp, use_tqdm=False)
    llm = LLM(path, **dk, kv_cache_bytes=int(1.5 * (n + m)) * 4 * 2 * 2 * 16 * 4)
    running = _peak_running(llm)
    out = llm.generate(prompts, sp, use_tqdm=False)
    assert [o["token_ids"] for o in out] == [o["token_ids"] for o in ref]
    assert llm.kv_stats()["num_preemptions"] == 0 and max(running) >= 2


def test_admission_typo_is_refused():
    import pytest

    from sparse_engine.config import EngineConfig

    with pytest.raises(ValueError, match="admission must be 'prompt'.*'chunk'.*'prompts'"):
        EngineConfig(admission="prompts").validate()
