"""DeltaKV serving in sparse_engine: exact reconstruction path, OmniKV equivalence, byte accounting,
latent codecs, loader errors, and `deltakv-bench` on CPU. Tiny random models + compressors built here."""

from __future__ import annotations

import pytest
import torch

from deltakv.checkpoint import CheckpointError, save_compressor
from deltakv.compressor import DeltaKVCompressor
from deltakv.reference import ReferenceSpec
from deltakv.testing import tiny_compressor as _tiny_compressor
from sparse_engine import LLM, SamplingParams
from sparse_engine.offload.latent_store import LatentCodec

COMMON = dict(dtype="float32", chunk_prefill_size=32, kv_cache_bytes=1 << 24)
SP = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
REF = ReferenceSpec(num_sinks=4, cluster_ratio=0.25, top_k=2)  # stride 4


def tiny_compressor(latent: int | None = None, seed: int = 0, layers=(1, 2, 3), full=(0,), ref: ReferenceSpec = REF,
                    num_layers: int = 4, num_kv_heads: int = 2, head_dim: int = 16) -> DeltaKVCompressor:
    """See `deltakv.testing.tiny_compressor` (latent=None: lossless; else lossy of that width)."""
    return _tiny_compressor(latent, seed, layers, full, ref, num_layers, num_kv_heads, head_dim)


def prompts():
    g = torch.Generator().manual_seed(1)
    return [list(range(3, 70)), [int(x) for x in torch.randint(3, 250, (110,), generator=g)]]


def _tokens(outs):
    return [o["token_ids"] for o in outs]


@pytest.fixture(scope="module")
def tiny(tiny_model_factory):
    return str(tiny_model_factory("llama"))


@pytest.fixture(scope="module")
def vanilla_out(tiny):
    return LLM(tiny, **COMMON).generate(prompts(), SP, use_tqdm=False)


def test_identity_compressor_equals_vanilla(tiny, vanilla_out):
    """Lossless latents: compress + reconstruct (fathers, inverse RoPE, RoPE) gives vanilla's tokens."""
    llm = LLM(tiny, method="deltakv", deltakv_path=tiny_compressor(), latent_dtype="float32", recent_size=8,
              num_top_tokens=4096, **COMMON)
    out = llm.generate(prompts(), SP, use_tqdm=False)
    assert _tokens(out) == _tokens(vanilla_out)
    st = llm.kv_stats()
    assert st["compressed_tokens"] > 100 and st["reconstructed_tokens"] > st["compressed_tokens"]
    assert st["slots_used"] == 0 and st["latent_bytes_device"] == 0  # everything released


def test_identity_topk_equals_omnikv(tiny):
    """With a top-k narrower than the history, DeltaKV reads exactly OmniKV's tokens."""
    knobs = dict(num_top_tokens=10, recent_size=8, **COMMON)
    omni = LLM(tiny, method="omnikv", full_attn_layers=[0], sink_size=4, **knobs).generate(prompts(), SP, use_tqdm=False)
    dkv = LLM(tiny, method="deltakv", deltakv_path=tiny_compressor(), latent_dtype="float32",
              **knobs).generate(prompts(), SP, use_tqdm=False)
    assert _tokens(dkv) == _tokens(omni)


@pytest.mark.parametrize("dtype", ["bf16", "int8", "int4"])
def test_kv_bytes_exact_and_below_vanilla(tiny, vanilla_out, dtype):
    llm = LLM(tiny, method="deltakv", deltakv_path=tiny_compressor(latent=16), latent_dtype=dtype, recent_size=8,
              **COMMON)
    seq = llm.add_request(prompts()[1], SP)
    while seq.num_computed < seq.num_prompt_tokens:
        llm.step()
    m = llm.method
    full_slots = sum(t.total() for t in seq.kv.tables)
    rows = m.latent_rows(seq)
    payload = {"bf16": 32, "int8": 16 + 2, "int4": 8 + 2}[dtype]
    assert m.store.row_bytes == payload + 2 * 2  # + two int16 father ordinals
    assert m.kv_bytes(seq) == full_slots * llm.pool.bytes_per_slot + rows * m.store.row_bytes
    n = seq.num_computed
    n_proto = int(REF.is_prototype(torch.arange(n - 8)).sum())
    assert rows == 3 * (n - 8 - n_proto)  # every non-prototype token outside the recent window, 3 layers
    st = llm.kv_stats()
    assert st["latent_bytes_device"] == rows * m.store.row_bytes
    assert st["kv_bytes_used_all_tiers"] == st["full_precision_bytes_used"] + st["latent_bytes_device"]
    vanilla_bytes = 4 * 2 * n * llm.pool.bytes_per_slot
    assert m.kv_bytes(seq) < 0.7 * vanilla_bytes  # 1 of 4 layers full, 1 in 4 tokens a prototype
    while not seq.finished:
        llm.step()
    assert len(seq.output_token_ids) == SP.max_tokens


def test_lossy_compressor_runs_with_prefill_topk(tiny):
    llm = LLM(tiny, method="deltakv", deltakv_path=tiny_compressor(latent=24), latent_dtype="int8", recent_size=8,
              num_top_tokens=0.5, num_top_tokens_in_prefill=0.5, **COMMON)
    out = llm.generate(prompts(), SP, use_tqdm=False)
    assert all(len(t) == SP.max_tokens for t in _tokens(out))
    assert llm.pool.num_used == 0


@pytest.mark.parametrize("dtype", ["float32", "bf16", "int8", "int4"])
def test_latent_codec_roundtrip(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 24, generator=g) * torch.rand(50, 1, generator=g) * 5
    x[3] = 0.0
    fathers = torch.randint(-1, 3000, (50, 4), generator=g)
    codec = LatentCodec(24, dtype, 4, 2)
    rows = codec.encode(x, fathers)
    assert rows.dtype == torch.uint8 and rows.shape == (50, codec.row_bytes)
    lat, f = codec.decode(rows)
    assert torch.equal(f, fathers)
    amax = x.abs().amax(1, keepdim=True)
    tol = {"float32": 0 * amax, "bf16": amax / 128, "int8": amax / 127 * 0.51, "int4": amax / 7 * 0.51}[dtype]
    assert ((lat - x).abs() <= tol + 1e-6).all()
    assert torch.equal(lat[3], torch.zeros(24))


def test_loader_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match="needs deltakv_path"):
        LLM(tiny, method="deltakv", **COMMON)
    with pytest.raises(CheckpointError, match="does not exist"):
        LLM(tiny, method="deltakv", deltakv_path=str(tmp_path / "nope"), **COMMON)
    wrong = save_compressor(tmp_path / "wrong", tiny_compressor(latent=16, layers=range(1, 6), num_layers=6))
    with pytest.raises(CheckpointError, match="does not match the model.*layers: checkpoint 6, model 4"):
        LLM(tiny, method="deltakv", deltakv_path=str(wrong), **COMMON)
    wide = save_compressor(tmp_path / "wide", tiny_compressor(latent=16, head_dim=32))
    with pytest.raises(CheckpointError, match="joined KV width"):
        LLM(tiny, method="deltakv", deltakv_path=str(wide), **COMMON)
    partial = save_compressor(tmp_path / "partial", tiny_compressor(latent=16, layers=(2, 3)))
    with pytest.raises(ValueError, match=r"layers \[1\] are neither"):
        LLM(tiny, method="deltakv", deltakv_path=str(partial), **COMMON)
    ok = save_compressor(tmp_path / "ok", tiny_compressor(latent=16))
    with pytest.raises(ValueError, match="sink_size=8 differs"):
        LLM(tiny, method="deltakv", deltakv_path=str(ok), sink_size=8, **COMMON)
    with pytest.raises(ValueError, match="latent_dtype"):
        LLM(tiny, method="deltakv", deltakv_path=str(ok), latent_dtype="int3", **COMMON)
    # a single weights file next to its config loads too; layers in full_attn_layers stay full
    llm = LLM(tiny, method="deltakv", deltakv_path=str(ok / "compressor.safetensors"), full_attn_layers=[0, 2],
              **COMMON)
    assert llm.method.sparse == [1, 3] and llm.method.source == {1: 0, 3: 2}


def test_bench_runs_on_cpu(tiny, tmp_path):
    from benchmark.throughput import bench

    ckpt = save_compressor(tmp_path / "c", tiny_compressor(latent=16))
    rows = bench(tiny, methods="vanilla,deltakv", lengths="96", batch_sizes="1", decode_tokens=4, warmup=False,
                 knobs={"deltakv": {"deltakv_path": str(ckpt), "latent_dtype": "int8", "recent_size": 8}},
                 out=str(tmp_path / "bench"), dtype="float32", kv_cache_bytes=1 << 24)
    by = {r["method"]: r for r in rows}
    assert by["deltakv"]["kv_bytes_per_seq"] < 0.7 * by["vanilla"]["kv_bytes_per_seq"]
    assert by["deltakv"]["decode_tok_s"] > 0


def test_session_forks_share_latents_safely(tiny):
    """generate_session forks the context's latent rows into every turn: children finishing at different
    times must not free rows the session or a sibling still reads (identity compressor -> vanilla tokens)."""
    g = torch.Generator().manual_seed(7)
    ctx = [int(x) for x in torch.randint(3, 250, (120,), generator=g)]
    turns = [[], [int(x) for x in torch.randint(3, 250, (5,), generator=g)], [9, 10, 11]]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (3, 12, 20)]
    llm = LLM(tiny, method="deltakv", deltakv_path=tiny_compressor(), latent_dtype="float32", recent_size=8,
              num_top_tokens=4096, **COMMON)
    got = llm.generate_session(ctx, turns, params, accumulate=False)
    ref = LLM(tiny, **COMMON).generate([ctx + t for t in turns], params, use_tqdm=False)
    assert _tokens(got) == _tokens(ref)
    st = llm.kv_stats()
    assert st["slots_used"] == 0 and st["latent_bytes_device"] == 0  # every row freed exactly once


@pytest.mark.parametrize("block", [1, 5])
def test_decode_compresses_in_blocks(tiny, block):
    """During decode at most block-1 tokens past the recent window wait at full precision; the rest are latent."""
    llm = LLM(tiny, method="deltakv", deltakv_path=tiny_compressor(latent=16), latent_dtype="int8", recent_size=8,
              decode_compress_block=block, **COMMON)
    seq = llm.add_request(prompts()[1], SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True))
    waiting = set()
    is_proto = lambda p: bool(REF.is_prototype(torch.tensor([p])).item())  # noqa: E731
    while not seq.finished:
        llm.step()
        if seq.finished:
            break
        boundary = seq.num_computed - 8  # tokens before it have left the recent window
        lat_pos = set(seq.kv.state.lat_pos.tolist())
        full_pos = set(llm.pool.pos[seq.kv.tables[1].padded()[0][0]].tolist())
        assert full_pos.isdisjoint(lat_pos) and full_pos | lat_pos == set(range(seq.num_computed))
        pending = [p for p in range(REF.num_sinks, boundary) if not is_proto(p) and p not in lat_pos]
        assert all(boundary - p < block for p in pending)  # only the last block-1 departed tokens wait
        waiting.add(max((boundary - p for p in pending), default=0))
    assert max(waiting) == block - 1  # it does wait (block 1: never) before compressing


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_training_tap_sees_the_k_the_engine_caches(tiny_model_factory, family):
    """The K/V the trainer taps (deltakv.kv_tap) equal the engine's pool K/V with RoPE undone - also for
    qk-norm models, where K is taken after k_norm - so a trained compressor is served on its own inputs."""
    from transformers import AutoModelForCausalLM

    from deltakv.kv_tap import capture_kv
    from sparse_engine.kernels.deltakv_kernels import gather_inverse_rope_ref, rope_half_tables

    path = tiny_model_factory(family)
    ids = prompts()[1][:40]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tapped = capture_kv(model, torch.tensor([ids]), layers=[2])[2][0]
    llm = LLM(str(path), **COMMON)
    seq = llm.add_request(ids, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    while seq.num_computed < seq.num_prompt_tokens:
        llm.step()
    slots = seq.kv.tables[2].padded()[0]
    pos = llm.pool.pos[slots[0]]
    cos, sin = rope_half_tables(llm.spec.inv_freq, pos)
    served = gather_inverse_rope_ref(llm.pool.k, llm.pool.v, slots, cos, sin, float(llm.spec.rope_attention_scaling))
    torch.testing.assert_close(served, tapped[pos], atol=1e-4, rtol=1e-4)


def test_qk_norm_model_served_and_old_checkpoints_refused(tiny_model_factory):
    path = str(tiny_model_factory("qwen3"))
    comp = tiny_compressor()
    comp.config.model_type = "qwen3"
    with pytest.raises(ValueError, match="before the model's k_norm.*retrain"):
        LLM(path, method="deltakv", deltakv_path=comp, **COMMON)
    comp.config.k_after_norm = True
    llm = LLM(path, method="deltakv", deltakv_path=comp, latent_dtype="float32", recent_size=8, num_top_tokens=4096,
              **COMMON)
    out = llm.generate(prompts(), SP, use_tqdm=False)
    assert _tokens(out) == _tokens(LLM(path, **COMMON).generate(prompts(), SP, use_tqdm=False))
    assert llm.kv_stats()["compressed_tokens"] > 100


@pytest.mark.parametrize("latent_dtype,prefill_top", [("int4", None), ("float32", 12)])
def test_batched_path_equals_per_sequence_path(tiny, latent_dtype, prefill_top):
    """The whole-batch path (one scoring, one reconstruction per layer for every sequence, scratch
    slots shared by all sparse layers) gives the per-sequence path's tokens and logits, with a lossy
    compressor, top-k narrower than the history and sequences of different lengths in one batch."""
    g = torch.Generator().manual_seed(3)
    ps = prompts() + [[int(x) for x in torch.randint(3, 250, (n,), generator=g)] for n in (45, 160)]
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, return_logits=True)

    def run(batched: bool):
        llm = LLM(tiny, method="deltakv", deltakv_path=tiny_compressor(latent=24, seed=5), latent_dtype=latent_dtype,
                  num_top_tokens=10, num_top_tokens_in_prefill=prefill_top, recent_size=8, decode_compress_block=4,
                  **COMMON)
        if not batched:
            llm.method.batched = lambda plan: False
        seen = []
        prepare = llm.runner.prepare
        llm.runner.prepare = lambda batch: seen.append(prepare(batch)) or seen[-1]
        out = llm.generate(ps, sp, use_tqdm=False)
        assert all(p.batched == batched for p in seen) and any(len(p.seqs) > 1 for p in seen)
        st = llm.kv_stats()
        assert st["slots_used"] == 0 and st["latent_bytes_device"] == 0
        return out, st

    (per_seq, st1), (batched, st2) = run(False), run(True)
    assert _tokens(batched) == _tokens(per_seq)
    for a, b in zip(batched, per_seq):
        torch.testing.assert_close(torch.stack(a["logits"]), torch.stack(b["logits"]), rtol=1e-4, atol=1e-4)
    assert st1["compressed_tokens"] == st2["compressed_tokens"] > 100
    assert st1["reconstructed_tokens"] == st2["reconstructed_tokens"] > 0


def test_one_budget_bounds_slots_and_latent_rows(tiny):
    """kv_cache_bytes bounds full-precision slots AND latent rows: the device arena is carved out of
    the budget, admission / preemption count rows, the peak of both stays within the budget, and a
    tight budget gives the roomy budget's tokens. Under the same budget DeltaKV runs more sequences
    at once than vanilla."""
    g = torch.Generator().manual_seed(4)
    ps = [[int(x) for x in torch.randint(3, 250, (n,), generator=g)] for n in (300, 260, 280, 240, 310, 290)]
    sp = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    knobs = dict(deltakv_path=tiny_compressor(latent=24, seed=5), latent_dtype="int4", num_top_tokens=16,
                 recent_size=8, decode_compress_block=4, dtype="float32", chunk_prefill_size=64)
    roomy = LLM(tiny, method="deltakv", kv_cache_bytes=1 << 24, **knobs).generate(ps, sp, use_tqdm=False)
    budget = int(1.5 * 4 * 2 * 326 * 2 * 16 * 4)  # 1.5 vanilla sequences: layers x heads x tokens x (k, v) x D x fp32
    peak = {}

    def run(method, **kw):
        llm = LLM(tiny, method=method, kv_cache_bytes=budget, **kw)
        step = llm.step

        def counted():  # sequences holding a whole prompt's KV at once (past their prefill)
            out = step()
            done = sum(s.num_computed >= s.num_prompt_tokens for s in llm.scheduler.running)
            peak[method] = max(peak.get(method, 0), done)
            return out

        llm.step = counted
        return llm, llm.generate(ps, sp, use_tqdm=False)

    llm, out = run("deltakv", **knobs)
    st = llm.kv_stats()
    assert _tokens(out) == _tokens(roomy)
    pool_bytes = st["slots_total"] * st["bytes_per_slot"]
    assert pool_bytes + st["latent_arena_bytes"] <= budget  # the split respects the one budget
    assert st["slots_peak"] <= st["slots_total"] and 0 < st["latent_rows_peak"] <= st["latent_rows_capacity"]
    assert st["latent_rows_peak"] * st["latent_row_bytes"] + st["slots_peak"] * st["bytes_per_slot"] <= budget
    assert st["slots_used"] == 0 and st["latent_rows_used"] == 0
    run("vanilla", dtype="float32", chunk_prefill_size=64)
    assert peak["vanilla"] == 1 and peak["deltakv"] >= 2, peak  # tiny geometry: ~0.48x vanilla bytes per token


def test_bf16_up_matmul_is_the_bf16_rounded_product(tiny):
    """up_matmul_dtype='bf16': the up-projection is the product of bf16-rounded latents and weights,
    rounded to bf16, + the float32 bias, for one layer and for an observer's stacked layers; the engine
    serves with it; non-linear ups and unknown dtypes are refused with the fix named."""
    comp = tiny_compressor(latent=16)
    llm = LLM(tiny, method="deltakv", deltakv_path=comp, latent_dtype="float32", up_matmul_dtype="bf16", **COMMON)
    m = llm.method
    g = torch.Generator().manual_seed(3)
    for layers in [(m.sparse[0],), tuple(m.sparse)]:
        z = torch.randn(len(layers), 7, 16, generator=g)
        got = m._up_many(layers, z)
        for i, l in enumerate(layers):
            p = comp[l].up.proj
            # float32 sums of exact bf16 x bf16 products, rounded once to bf16 (CPU bmm returns bf16)
            prod = (z[i].bfloat16().float() @ p.weight.bfloat16().float().t()).bfloat16().float()
            torch.testing.assert_close(got[i], prod + p.bias.float(), rtol=2**-8, atol=1e-6)  # <= 1 bf16 ulp apart
            assert (got[i] - p(z[i])).abs().max() > 0  # not the float32 product
    outs = llm.generate(prompts(), SP, use_tqdm=False)
    assert [len(o["token_ids"]) for o in outs] == [SP.max_tokens] * len(prompts())
    with pytest.raises(ValueError, match="up_matmul_dtype"):
        LLM(tiny, method="deltakv", deltakv_path=comp, up_matmul_dtype="fp16", **COMMON)
    gelu = tiny_compressor(latent=16)
    gelu.config.up = "mlp_gelu"
    with pytest.raises(ValueError, match="up_matmul_dtype='float32'"):
        LLM(tiny, method="deltakv", deltakv_path=gelu, up_matmul_dtype="bf16", **COMMON)


def test_prefill_chunks_take_the_causal_fast_path(tiny, monkeypatch):
    """A prefill chunk that reads every compressed token (no top-k in prefill) attends on the dense causal
    path in EVERY layer: the full layer (its table is whole though the sparse ones are shorter) and the
    sparse ones, whose view (kept exact tokens + reconstructed ones) is sorted so column j holds
    position j. Checked against the pool: the positions stored in the slots each dense view reads."""
    import sparse_engine.cache.base as base

    calls = []
    real = base.attend_group

    def spy(q, group, table, lens, pool, *args, dense=False, **kw):
        if not group.decode:
            calls.append((dense, pool.pos[table].clone(), int(group.q_pos.max()) + 1))
        return real(q, group, table, lens, pool, *args, dense=dense, **kw)

    monkeypatch.setattr(base, "attend_group", spy)
    llm = LLM(tiny, method="deltakv", deltakv_path=tiny_compressor(latent=24, seed=5), latent_dtype="int4",
              num_top_tokens=10, recent_size=8, **COMMON)
    llm.generate([prompts()[1]], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    num_layers = 4
    assert len(calls) == num_layers * 4  # 110 tokens in chunks of 32: 4 chunks x 4 layers
    assert all(dense for dense, _, _ in calls)
    for _, kpos, end in calls:
        assert torch.equal(kpos, torch.arange(end).expand_as(kpos))
    assert llm.kv_stats()["compressed_tokens"] > 50  # the later chunks did read reconstructed tokens
