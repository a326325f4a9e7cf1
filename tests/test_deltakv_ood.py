"""Out-of-domain fidelity (issue 15.7): KL(p_true || p_recon) and top-1 agreement against a naive
computation written here (a second copy of the model from disk for p, float64 loops for the KL)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deltakv.evaluate import ood_fidelity
from deltakv.model import DeltaKVForTraining
from deltakv.ood_text import STDLIB_MODULES, ood_sequences, stdlib_source_texts
from deltakv.testing import WORDS, make_tiny_model, tiny_compressor


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("tiny_ood"), num_layers=4, num_kv_heads=2, head_dim=16, seed=3)
    lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():  # peaked next-token distributions: a random tiny model's are near uniform,
        lm.lm_head.weight.mul_(30.0)  # where KL(p||q) ~ KL(q||p) and the test could not tell them apart
    lm.save_pretrained(str(path))
    return path, AutoTokenizer.from_pretrained(str(path))


def _wrapper(path, latent):
    lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return DeltaKVForTraining(lm, tiny_compressor(latent=latent, seed=1))


def _sequences(n=3, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, len(WORDS) + 2, (n, length), generator=g)


def test_identity_compressor_gives_kl_zero_and_full_agreement(tiny):
    path, _ = tiny
    m = ood_fidelity(_wrapper(path, latent=None), _sequences())
    assert m["kl_mean"] == pytest.approx(0.0, abs=1e-6)
    assert m["top1_agree"] == 1.0
    assert m["ppl_recon"] == pytest.approx(m["ppl_true"], rel=1e-5) and m["tokens"] == 3 * 23


def test_lossy_compressor_matches_naive_kl_and_top1(tiny):
    path, _ = tiny
    seqs = _sequences()
    wrapper = _wrapper(path, latent=2)
    m = ood_fidelity(wrapper, seqs)
    reference_lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)  # untouched copy: p
    kl_pq = kl_qp = agree = acc_recon = nll_true = 0.0
    count = 0
    with torch.no_grad():
        for row in seqs:
            ids = row.unsqueeze(0)
            p_logits = reference_lm(input_ids=ids).logits[0, :-1].double()
            q_logits = wrapper(input_ids=ids)["logits"][0, :-1].double()
            for t in range(ids.shape[1] - 1):
                p, q = torch.softmax(p_logits[t], -1), torch.softmax(q_logits[t], -1)
                kl_pq += sum(float(p[v] * (math.log(p[v]) - math.log(q[v]))) for v in range(p.numel()))
                kl_qp += sum(float(q[v] * (math.log(q[v]) - math.log(p[v]))) for v in range(q.numel()))
                agree += int(int(p.argmax()) == int(q.argmax()))
                acc_recon += int(int(q.argmax()) == int(row[t + 1]))
                nll_true -= math.log(float(p[row[t + 1]]))
                count += 1
    # the setup tells the two directions of KL and the two readings of "top-1" apart
    assert abs(kl_pq - kl_qp) / count > 1e-3 and agree != acc_recon
    assert m["tokens"] == count
    assert m["kl_mean"] == pytest.approx(kl_pq / count, rel=1e-4)
    assert m["top1_agree"] == pytest.approx(agree / count)
    assert m["ppl_true"] == pytest.approx(math.exp(nll_true / count), rel=1e-5)
    assert 0 < m["top1_agree"] < 1 and m["kl_mean"] > 0
    batched = ood_fidelity(wrapper, seqs, batch_size=2)  # evaluate_ood batches short sequences
    for key in ("kl_mean", "top1_agree", "ppl_true", "ppl_recon", "tokens"):
        assert batched[key] == pytest.approx(m[key], rel=1e-4), key


def test_ood_sequences_cut_the_token_stream(tiny):
    _, tok = tiny
    texts = [("a", "the year after the first people said"), ("b", "one two three time more")]
    ids, used = ood_sequences(tok, max_tokens=14, seq_len=4, texts=texts)
    stream = tok(texts[0][1], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    stream += tok(texts[1][1], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids.shape == (3, 4) and ids.flatten().tolist() == stream[:12] and used == ["a", "b"]
    with pytest.raises(ValueError, match="fewer than one sequence"):
        ood_sequences(tok, max_tokens=64, seq_len=64, texts=texts[:1])


def test_stdlib_texts_are_python_source():
    texts = stdlib_source_texts()
    assert [p.rsplit("/", 1)[-1] for p, _ in texts] == list(STDLIB_MODULES)
    assert all("def " in t for _, t in texts)


def test_eval_ood_tokens_knob_is_validated():
    from deltakv.config import EvalConfig

    assert EvalConfig().ood_tokens > 0 and EvalConfig(ood_tokens=0).ood_tokens == 0
    for bad in (1, -5):
        with pytest.raises(ValueError, match="eval.ood_tokens="):
            EvalConfig(ood_tokens=bad)
