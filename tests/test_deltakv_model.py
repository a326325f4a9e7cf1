"""The training wrapper on tiny random HF models: K/V tap, hand-built loss, gradients, bad models."""

import math

import pytest
import torch

from deltakv.compressor import CompressorConfig, DeltaKVCompressor
from deltakv.hf_model import UnsupportedModelError, load_frozen_lm
from deltakv.kv_tap import KVTap, capture_kv
from deltakv.model import DeltaKVForTraining
from deltakv.reference import ReferenceSpec
from deltakv.testing import make_tiny_model


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("tiny_llama"), num_layers=3, num_kv_heads=2, head_dim=8)
    model, _ = load_frozen_lm(path, dtype="float32", attn_implementation="eager")
    return model


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, theta):
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    ang = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    rot = torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], -1)
    return x * cos + rot * sin


def _top1_l2_reference(kv, protos):
    """Reference by hand: nearest (l2) strictly-earlier prototype; zeros if none."""
    ref = torch.zeros_like(kv)
    for t in range(kv.shape[0]):
        cands = [j for j in protos if j < t]
        if cands:
            d = torch.stack([((kv[t] - kv[j]) ** 2).sum() for j in cands])
            ref[t] = kv[cands[int(d.argmin())]]
    return ref


def hand_built_loss(model, comp, ids, mse_weight, layer_weights):
    """An independent Llama forward (eager math) with DeltaKV reconstruction, returning the loss."""
    cfg = model.config
    theta = cfg.rope_parameters["rope_theta"]
    hd, nkv, nh = cfg.head_dim, cfg.num_key_value_heads, cfg.num_attention_heads
    T = ids.shape[0]
    pos = torch.arange(T)
    spec = comp.reference
    protos = [j for j in range(T) if spec.is_prototype(torch.tensor(j))]
    keep = torch.tensor([j in protos for j in range(T)])
    h = model.model.embed_tokens.weight[ids]
    mse_total = 0.0
    for i, layer in enumerate(model.model.layers):
        a = layer.self_attn
        x = _rms(h, layer.input_layernorm.weight, cfg.rms_norm_eps)
        q, k, v = x @ a.q_proj.weight.T, x @ a.k_proj.weight.T, x @ a.v_proj.weight.T
        if str(i) in comp.layers:
            kv = torch.cat([k, v], -1)
            ref = _top1_l2_reference(kv, protos)
            pair = comp[i]
            latent = (kv @ pair.down.proj.weight.T + pair.down.proj.bias) - (ref @ pair.down.proj.weight.T + pair.down.proj.bias)
            recon = latent @ pair.up.proj.weight.T + pair.up.proj.bias + ref
            mse_total = mse_total + layer_weights.get(i, 1.0) * ((recon - kv)[~keep] ** 2).mean()
            kv_hat = torch.where(keep[:, None], kv, recon)
            k, v = kv_hat[:, : nkv * hd], kv_hat[:, nkv * hd:]
        q = _rope(q.view(T, nh, hd).transpose(0, 1), pos, theta)
        k = _rope(k.view(T, nkv, hd).transpose(0, 1), pos, theta)
        v = v.view(T, nkv, hd).transpose(0, 1)
        k, v = k.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        att = torch.softmax(scores, -1) @ v
        h = h + att.transpose(0, 1).reshape(T, nh * hd) @ a.o_proj.weight.T
        x = _rms(h, layer.post_attention_layernorm.weight, cfg.rms_norm_eps)
        m = layer.mlp
        h = h + (torch.nn.functional.silu(x @ m.gate_proj.weight.T) * (x @ m.up_proj.weight.T)) @ m.down_proj.weight.T
    logits = _rms(h, model.model.norm.weight, cfg.rms_norm_eps) @ model.lm_head.weight.T
    ce = torch.nn.functional.cross_entropy(logits[:-1], ids[1:])
    return ce + mse_weight * mse_total, ce


def _compressor(model, layers, latent=6, spec=None):
    cfg = model.config
    c = CompressorConfig(cfg.model_type, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, layers,
                         [i for i in range(cfg.num_hidden_layers) if i not in layers], latent, down="linear",
                         reference=spec or ReferenceSpec(num_sinks=2, cluster_ratio=0.25, top_k=1))
    torch.manual_seed(0)
    return DeltaKVCompressor(c)


def test_loss_equals_hand_built_computation(tiny_llama):
    comp = _compressor(tiny_llama, [1, 2])
    wrapper = DeltaKVForTraining(tiny_llama, comp, mse_weight=0.7, layer_weights={2: 0.5})
    ids = torch.randint(2, tiny_llama.config.vocab_size, (1, 23))
    out = wrapper(input_ids=ids, labels=ids)
    want_loss, want_ce = hand_built_loss(tiny_llama, comp, ids[0], 0.7, {2: 0.5})
    torch.testing.assert_close(out["ce"], want_ce.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["loss"], want_loss, atol=1e-4, rtol=1e-4)
    wrapper.tap.remove()


def test_only_compressor_params_get_grad(tiny_llama):
    comp = _compressor(tiny_llama, [0, 2])
    wrapper = DeltaKVForTraining(tiny_llama, comp)
    ids = torch.randint(2, tiny_llama.config.vocab_size, (2, 16))
    wrapper(input_ids=ids, labels=ids)["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in tiny_llama.parameters())
    trainable = [n for n, p in wrapper.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("compressor.") for n in trainable)
    for name, p in comp.named_parameters():
        if name.endswith("down.proj.bias"):  # cancels in down(kv) - down(ref): exactly zero gradient
            assert p.grad is not None and p.grad.abs().sum() == 0
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    wrapper.tap.remove()


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral"])
def test_tap_captures_and_replaces_pre_rope_kv(tmp_path, model_type):
    path = make_tiny_model(tmp_path, model_type=model_type, num_layers=2)
    model, _ = load_frozen_lm(path, dtype="float32")
    ids = torch.randint(2, model.config.vocab_size, (1, 9))
    base = model(input_ids=ids).logits
    kv = capture_kv(model, ids)
    a = model.model.layers[1].self_attn
    x = model.model.layers[1].input_layernorm
    assert kv[1].shape == (1, 9, 2 * 2 * 8)
    # independent reference for the K half: k_proj of the layer's normed input, then k_norm where the model has one
    h = model(input_ids=ids, output_hidden_states=True).hidden_states[1]
    k_ref = a.k_proj(x(h)).view(1, 9, 2, 8)
    if model_type == "qwen3":
        k_ref = a.k_norm(k_ref)
    torch.testing.assert_close(kv[1][..., :16], k_ref.flatten(-2))
    torch.testing.assert_close(kv[1][..., 16:], a.v_proj(x(h)))
    # K half really is k_proj's output: replacing K/V by what was captured changes nothing
    tap = KVTap(model, [0, 1], lambda layer, t: t.clone())
    torch.testing.assert_close(model(input_ids=ids).logits, base)
    tap.remove()
    # replacing V of one layer with zeros does change the output
    tap = KVTap(model, [1], lambda layer, t: torch.cat([t[..., :16], torch.zeros_like(t[..., 16:])], -1))
    assert not torch.allclose(model(input_ids=ids).logits, base)
    tap.remove()
    assert a is not None and x is not None


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="gpt2.*not supported.*llama, qwen2, qwen3, mistral"):
        load_frozen_lm(tmp_path)
