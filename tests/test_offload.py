"""DeltaKV latent tiers: host offload (+ prefetch) and the memory-mapped cold tier give the same
tokens as device-resident latents, and `kv_stats()` reports bytes per tier."""

from __future__ import annotations

import os

import torch

from sparse_engine import LLM
from sparse_engine.offload.latent_store import COLD, LatentCodec, TieredLatentStore
from tests.test_deltakv_inference import COMMON, SP, prompts, tiny_compressor


def _run(path, **knobs):
    llm = LLM(path, method="deltakv", deltakv_path=tiny_compressor(latent=16), latent_dtype="int8", recent_size=8,
              num_top_tokens=12, **COMMON, **knobs)
    seq = llm.add_request(prompts()[1], SP)
    mid = None
    while not seq.finished:
        llm.step()
        if mid is None and len(seq.output_token_ids) == 3:
            mid = llm.kv_stats()
            mid["seq_bytes"] = llm.method.kv_bytes(seq)
    return seq.output_token_ids, mid, llm


def test_tiers_same_tokens_and_bytes_per_tier(tiny_model_factory, tmp_path):
    path = str(tiny_model_factory("llama"))
    base, st0, _ = _run(path)
    assert st0["latent_bytes_device"] > 0 and st0["latent_bytes_host"] == st0["latent_bytes_disk"] == 0

    warm, st1, llm1 = _run(path, deltakv_offload_latent=True)
    assert warm == base
    assert st1["latent_bytes_host"] == st0["latent_bytes_device"] and st1["latent_bytes_device"] == 0
    assert llm1.method.prefetcher.hits > 0  # the next sparse layer's rows were prefetched and used

    cold, st2, llm2 = _run(path, deltakv_cold_after=0, deltakv_cold_dir=str(tmp_path))
    assert cold == base
    assert st2["latent_bytes_disk"] > 0 and st2["latent_rows_demoted"] > 0 and st2["latent_rows_promoted"] > 0
    assert st2["latent_bytes_device"] + st2["latent_bytes_disk"] == st0["latent_bytes_device"]
    assert st2["seq_bytes"] == st0["seq_bytes"]  # a sequence's bytes count every tier

    both, st3, _ = _run(path, deltakv_offload_latent=True, deltakv_cold_after=1, deltakv_cold_dir=str(tmp_path))
    assert both == base
    assert st3["latent_bytes_host"] + st3["latent_bytes_disk"] == st0["latent_bytes_device"]
    llm2.close()


def test_store_demote_promote_roundtrip(tmp_path):
    codec = LatentCodec(8, "bf16", 2, 2)
    store = TieredLatentStore(codec, "cpu", offload=True, cold_after=1, cold_dir=str(tmp_path))
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(300, 8, generator=g)
    fathers = torch.randint(0, 50, (300, 2), generator=g)
    h = store.put(lat, fathers)
    want = store.get(h)
    store.tick()
    store.tick()
    store.tick()
    assert (store.tier[h] == COLD).all() and store.bytes_per_tier()["disk"] == 300 * codec.row_bytes
    assert any(f.startswith("deltakv_cold_") for f in os.listdir(tmp_path))
    got = store.get(h.flip(0))
    assert torch.equal(got[0], want[0].flip(0)) and torch.equal(got[1], want[1].flip(0))
    assert store.bytes_per_tier() == {"device": 0, "host": 300 * codec.row_bytes, "disk": 0}
    store.free(h)
    assert store.bytes_per_tier()["host"] == 0
    store.close()
    assert not any(f.startswith("deltakv_cold_") for f in os.listdir(tmp_path))
