"""KIVI (issue 15 items 4-5): the quantizer against a naive per-group loop written here, its round-trip
error bound, and `method=kivi` in the engine against an HF-eager reference whose attention reads the
quantize-dequantized K/V of every whole group that left the residual window (the rule written out
here), plus the wide-window == vanilla and byte-accounting checks."""

from __future__ import annotations

import pytest
import torch

from sparse_engine import LLM, SamplingParams
from sparse_engine.cache.kivi_quant import (KiviCodec, finite_words, from_finite_words, pack_codes, to_finite_words,
                                            unpack_codes)
from tests.hf_reference import first_divergence_is_tie

POOL = 1 << 24


# ---------------------------------------------------------------------------------------------- naive
def naive_quant(x: torch.Tensor, bits: int):
    """One group (1-D): fp16 min and scale, then the codes, with explicit Python arithmetic."""
    qmax = 2 ** bits - 1
    mn = torch.tensor(float(x.min()), dtype=torch.float16)
    scale = torch.tensor((float(x.max()) - float(mn)) / qmax, dtype=torch.float32).to(torch.float16)
    s = float(scale) if float(scale) > 0 else 1.0
    codes = [min(max(int(torch.round(torch.tensor((float(xi) - float(mn)) / s, dtype=torch.float32))), 0), qmax)
             for xi in x.float()]
    deq = torch.tensor([c * float(scale) + float(mn) for c in codes])
    return codes, deq


def naive_block(k: torch.Tensor, v: torch.Tensor, bits: int, G: int):
    """k, v [G, H, D] of one block -> dequantized k, v: keys per (head, channel) over the G tokens,
    values per (token, head) in groups of G channels."""
    _, H, D = k.shape
    kd, vd = torch.empty(G, H, D), torch.empty(G, H, D)
    for h in range(H):
        for c in range(D):
            kd[:, h, c] = naive_quant(k[:, h, c], bits)[1]
        for t in range(G):
            for c0 in range(0, D, G):
                vd[t, h, c0 : c0 + G] = naive_quant(v[t, h, c0 : c0 + G], bits)[1]
    return kd, vd


def fast_block(k: torch.Tensor, v: torch.Tensor, bits: int, G: int):
    """`naive_block` vectorised over the groups (same formula; the engine reference calls it per block)."""
    def qd(x):  # groups along the last axis
        qmax = 2 ** bits - 1
        mn = x.amin(-1, keepdim=True).half().float()
        scale = ((x.amax(-1, keepdim=True) - mn) / qmax).half().float()
        s = torch.where(scale > 0, scale, torch.ones_like(scale))
        return torch.round((x - mn) / s).clamp(0, qmax) * scale + mn

    _, H, D = k.shape
    return qd(k.permute(1, 2, 0)).permute(2, 0, 1), qd(v.reshape(G, H, D // G, G)).reshape(G, H, D)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codec_matches_naive_per_group_quantization(bits):
    g = torch.Generator().manual_seed(bits)
    G, H, D = 8, 2, 16
    k = torch.randn(3, G, H, D, generator=g) * 3
    k[:, :, 0, 5] += 40.0  # an outlier channel: per-channel keys keep it from flattening the others
    v = torch.randn(3, G, H, D, generator=g)
    v[1, :, 1] = 0.25  # constant groups: scale 0, stored exactly as the min
    codec = KiviCodec(H, D, bits, G)
    rows = codec.encode(k, v)
    assert rows.shape == (3, codec.block_bytes) and rows.dtype == torch.uint8
    kd, vd = codec.decode(rows)
    for b in range(3):
        rk, rv = naive_block(k[b], v[b], bits, G)
        torch.testing.assert_close(kd[b], rk, rtol=0, atol=1e-6)
        torch.testing.assert_close(vd[b], rv, rtol=0, atol=1e-6)
        fk, fv = fast_block(k[b], v[b], bits, G)
        torch.testing.assert_close(fk, rk, rtol=0, atol=1e-6)
        torch.testing.assert_close(fv, rv, rtol=0, atol=1e-6)
    assert torch.equal(vd[1, :, 1], torch.full((G, D), 0.25))
    # round trip: within half a step of the group's range (plus fp16 rounding of min / scale)
    step_k = (k.amax(1, keepdim=True) - k.amin(1, keepdim=True)) / (2 ** bits - 1)
    assert bool(((kd - k).abs() <= step_k * 0.5 + 1e-2 * (k.abs() + 1)).all())
    vg = v.view(3, G, H, D // G, G)
    step_v = ((vg.amax(-1, keepdim=True) - vg.amin(-1, keepdim=True)) / (2 ** bits - 1)).expand_as(vg).reshape(v.shape)
    assert bool(((vd - v).abs() <= step_v * 0.5 + 1e-2 * (v.abs() + 1)).all())


def test_codec_bytes_are_the_kivi_formula():
    """Block bytes at the paper's setting (D=128, G=32): codes bits/8 per element + fp16 min and scale
    per key channel per group and per value token per channel group."""
    for bits, per_head in ((4, 2 * 32 * 128 * 4 // 8 + 2 * 2 * 128 + 2 * 2 * 32 * 4),
                           (2, 2 * 32 * 128 * 2 // 8 + 2 * 2 * 128 + 2 * 2 * 32 * 4)):
        c = KiviCodec(4, 128, bits, 32)
        assert c.block_bytes == 4 * per_head
    assert KiviCodec(4, 128, 4, 32).bytes_per_token / (4 * 128 * 2 * 2) == 0.3125  # 160 / 512 bytes per head
    assert KiviCodec(4, 128, 2, 32).bytes_per_token / (4 * 128 * 2 * 2) == 0.1875


def test_pack_unpack_roundtrip():
    for bits in (2, 4, 8):
        q = torch.randint(0, 2 ** bits, (5, 3, 16), dtype=torch.uint8)
        p = pack_codes(q, bits)
        assert p.shape[-1] == 16 * bits // 8 and torch.equal(unpack_codes(p, bits), q)


@pytest.mark.parametrize("num_bytes", [1, 7, 100, 7680])
def test_pool_words_round_trip_and_stay_finite(num_bytes):
    """Blocks live in pool rows that engines read masked (0 x NaN = NaN): the stored words must be finite
    floats in every pool dtype, and carry the bytes back exactly, at 15 payload bits per word."""
    rows = torch.randint(0, 256, (4, num_bytes), dtype=torch.uint8, generator=torch.Generator().manual_seed(num_bytes))
    rows[0] = 255  # all ones: NaN patterns everywhere if stored raw
    words = to_finite_words(rows)
    assert torch.equal(from_finite_words(words, num_bytes), rows)
    assert words.shape[1] == 2 * finite_words(num_bytes)
    if num_bytes >= 100:
        assert words.shape[1] <= 2 * (-(-num_bytes * 8 // 15)) + 16
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        padded = torch.nn.functional.pad(words, (0, (-words.shape[1]) % 4)).contiguous()
        assert bool(torch.isfinite(padded.view(dt).float()).all()), dt


def test_bad_knobs(spec_tiny):
    from sparse_engine.cache.kivi import KiviConfig

    for knobs, msg in ((dict(bits=3), "bits"), (dict(group_size=5), "divide"), (dict(residual_length=-1), "residual"),
                       (dict(sink_size=1.5), "sink_size")):
        with pytest.raises(ValueError, match=msg):
            KiviConfig(**{"group_size": 8, **knobs}).validate(spec_tiny)


# ---------------------------------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def tiny(tiny_model_factory):
    return str(tiny_model_factory("llama"))


@pytest.fixture(scope="module")
def spec_tiny(tiny):
    from sparse_engine.models.spec import ModelSpec

    return ModelSpec.from_pretrained(tiny)


_REF = {}


def _kivi_ref_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager causal attention over the HF cache's full-precision K/V, with positions
    [sinks, quant_end(cached before this step)) replaced by their naive quantize-dequantize."""
    r = _REF
    qpos = r["qpos"]
    bits, G, sinks, R = r["bits"], r["G"], r["sinks"], r["residual"]
    cached = int(qpos[0])
    end = sinks + max(0, cached - sinks - R) // G * G
    k, v = key[0].transpose(0, 1).clone(), value[0].transpose(0, 1).clone()  # [T, H, D]
    for s in range(sinks, end, G):
        kd, vd = r["cache"].setdefault((module.layer_idx, s), fast_block(k[s : s + G], v[s : s + G], bits, G))
        k[s : s + G], v[s : s + G] = kd, vd
    gq = query.shape[1] // key.shape[1]
    kk = k.transpose(0, 1)[None].repeat_interleave(gq, dim=1).float()
    vv = v.transpose(0, 1)[None].repeat_interleave(gq, dim=1).float()
    scores = torch.matmul(query.float(), kk.transpose(2, 3)) * scaling
    mask = torch.arange(key.shape[2])[None, :] <= qpos[:, None]
    probs = torch.softmax(scores.masked_fill(~mask[None, None], float("-inf")), dim=-1)
    return torch.matmul(probs, vv).to(query.dtype).transpose(1, 2).contiguous(), probs


@torch.no_grad()
def kivi_ref_generate(path, prompt, steps, chunk, **knobs):
    from transformers import AttentionInterface, AutoModelForCausalLM, DynamicCache

    AttentionInterface.register("kivi_ref", _kivi_ref_attention)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="kivi_ref").eval()
    _REF.clear()
    _REF.update(cache={}, **knobs)
    cache = DynamicCache(config=model.config)
    p = len(prompt)
    for s in range(0, p, chunk):
        _REF["qpos"] = torch.arange(s, min(p, s + chunk))
        out = model(torch.tensor([prompt[s : s + chunk]]), position_ids=_REF["qpos"][None], past_key_values=cache)
    toks, logits = [], []
    for i in range(steps):
        lg = out.logits[0, -1].float()
        toks.append(int(lg.argmax()))
        logits.append(lg)
        _REF["qpos"] = torch.tensor([p + i])
        out = model(torch.tensor([[toks[-1]]]), position_ids=_REF["qpos"][None], past_key_values=cache)
    return toks, logits


@pytest.mark.parametrize("bits,sinks", [(4, 0), (2, 4)])
def test_engine_matches_dequantized_reference(tiny, bits, sinks):
    """Chunked prefill (64) of 200 tokens + 12 decode steps: logits equal the reference's (float32)."""
    G, R, steps, chunk = 8, 8, 12, 64
    prompt = torch.randint(3, 256, (200,), generator=torch.Generator().manual_seed(5)).tolist()
    llm = LLM(tiny, method="kivi", bits=bits, group_size=G, residual_length=R, sink_size=sinks, dtype="float32",
              kv_cache_bytes=POOL, chunk_prefill_size=chunk)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True,
                                                return_logits=True), use_tqdm=False)[0]
    ref_toks, ref_logits = kivi_ref_generate(tiny, prompt, steps, chunk, bits=bits, G=G, sinks=sinks, residual=R)
    ok, why = first_divergence_is_tie(out["token_ids"], ref_toks, ref_logits)
    assert ok, why
    n = next((i for i, (a, b) in enumerate(zip(out["token_ids"], ref_toks)) if a != b), steps)
    for a, b in zip(out["logits"][:n], ref_logits[:n]):
        torch.testing.assert_close(a.float(), b, rtol=1e-4, atol=1e-4)
    # bytes: sinks + full-precision tail, whole groups as blocks of ceil(stored bytes / slot) slots, stored
    # bytes = block_bytes at 15 payload bits per 16-bit word (every pool element a finite float)
    spec, total, bps = llm.spec, len(prompt) + steps - 1, llm.pool.bytes_per_slot
    quant = max(0, total - sinks - R) // G * G
    codec = KiviCodec(spec.num_kv_heads, spec.head_dim, bits, G)
    spb = llm.method.store.slots_per_block
    assert codec.block_bytes * 16 / 15 <= spb * bps < codec.block_bytes * 16 / 15 + 16 + bps
    want = spec.num_layers * ((total - quant) * spec.num_kv_heads * bps + quant // G * spb * bps)
    assert out["kv_bytes"] == want
    assert want < 0.5 * total * spec.num_layers * spec.num_kv_heads * bps
    assert llm.kv_stats()["slots_used"] == 0


def test_wide_residual_window_equals_vanilla(tiny):
    prompts = [torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (40, 150)]
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, return_logits=True)
    common = dict(dtype="float32", kv_cache_bytes=POOL, chunk_prefill_size=64)
    van = LLM(tiny, method="vanilla", **common).generate(prompts, sp, use_tqdm=False)
    kv = LLM(tiny, method="kivi", bits=2, group_size=8, residual_length=4096, **common).generate(prompts, sp,
                                                                                                 use_tqdm=False)
    for a, b in zip(kv, van):
        assert a["token_ids"] == b["token_ids"] and a["kv_bytes"] == b["kv_bytes"]
        assert all(torch.equal(x, y) for x, y in zip(a["logits"], b["logits"]))
