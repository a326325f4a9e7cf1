"""Evaluate a compressor without the engine: perplexity on true vs reconstructed K/V, MSE per layer.

``evaluate_reconstruction(wrapper, dataset)`` runs every held-out sequence twice through the frozen
model: once on its true K/V, once with every compressed layer's K/V replaced by the reconstruction
(prototypes exact), and reports token-level perplexities, their ratio, and per layer the MSE and the
relative error ``MSE / Var(kv)`` (fraction of the KV variance not reconstructed).

``ood_fidelity(wrapper, sequences)`` measures faithfulness where adapting to the training domain
cannot help (issue 15.7): on text of another domain (``deltakv.ood_text``: Python stdlib source), the
mean KL(p_true || p_recon) of the next-token distributions and the top-1 agreement of the two, with
both perplexities beside them. ``ood_fidelity_of_checkpoint`` does it for a saved compressor.

CLI: ``python -m deltakv.evaluate CHECKPOINT_DIR [--model PATH] [--max-sequences N] [--ood-tokens N] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from deltakv.model import DeltaKVForTraining
from deltakv.reference import prototype_mask


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    logits = logits[:, :-1].float()
    target = ids[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
    return float(loss), target.numel()


@torch.no_grad()
def evaluate_reconstruction(wrapper: DeltaKVForTraining, dataset, max_sequences: int | None = None,
                            batch_size: int = 1, desc: str = "eval") -> dict:
    """Return ``{"ppl_true", "ppl_recon", "ppl_ratio", "tokens", "sequences", "layers": {l: {mse, rel_err}}}``."""
    was_training = wrapper.training
    wrapper.eval()
    device = next(wrapper.lm.parameters()).device
    n = len(dataset) if max_sequences is None else min(len(dataset), max_sequences)
    if n == 0:
        raise ValueError("The evaluation split is empty; raise data.eval_fraction or add documents")
    spec = wrapper.compressor.reference
    nll_true = nll_rec = 0.0
    tokens = 0
    sq = {i: 0.0 for i in wrapper.compressor.compressed_layers()}
    var = {i: 0.0 for i in sq}
    cnt = {i: 0 for i in sq}

    for start in tqdm(range(0, n, batch_size), desc=desc, leave=False):
        ids = torch.tensor(dataset[start:min(n, start + batch_size)]["input_ids"], device=device)
        with wrapper.reconstruction(False):
            nt, tok = _nll(wrapper.lm(input_ids=ids, use_cache=False).logits, ids)
        out = wrapper(input_ids=ids)
        nr, _ = _nll(out["logits"], ids)
        nll_true, nll_rec, tokens = nll_true + nt, nll_rec + nr, tokens + tok
        keep = prototype_mask(spec, ids.shape[1])
        elems = int((~keep).sum()) * ids.shape[0] * wrapper.compressor.config.kv_width
        for layer, m in wrapper._mse.items():
            sq[layer] += float(m) * elems
            var[layer] += float(wrapper._var[layer]) * elems
            cnt[layer] += elems
    wrapper.train(was_training)
    layers = {
        i: {"mse": sq[i] / max(cnt[i], 1), "rel_err": sq[i] / max(var[i], 1e-12)} for i in sorted(sq)
    }
    ppl_true, ppl_rec = math.exp(nll_true / tokens), math.exp(nll_rec / tokens)
    return {
        "ppl_true": ppl_true, "ppl_recon": ppl_rec, "ppl_ratio": ppl_rec / ppl_true, "tokens": tokens,
        "sequences": n, "mse_mean": sum(v["mse"] for v in layers.values()) / max(len(layers), 1),
        "rel_err_mean": sum(v["rel_err"] for v in layers.values()) / max(len(layers), 1), "layers": layers,
    }


@torch.no_grad()
def ood_fidelity(wrapper: DeltaKVForTraining, sequences: torch.Tensor, batch_size: int = 1,
                 desc: str = "ood") -> dict:
    """``{"kl_mean", "top1_agree", "ppl_true", "ppl_recon", "ppl_ratio", "tokens", "sequences"}`` over the
    next-token distributions at every position but the last of each sequence (the positions the
    perplexity scores): p from the true K/V, q from the reconstructed one, ``KL(p || q) = sum_v p_v
    (log p_v - log q_v)`` in nats, top-1 agreement = fraction of positions where argmax p == argmax q."""
    was_training = wrapper.training
    wrapper.eval()
    device = next(wrapper.lm.parameters()).device
    sequences = torch.as_tensor(sequences)
    if sequences.dim() != 2 or sequences.shape[0] == 0 or sequences.shape[1] < 2:
        raise ValueError(f"ood sequences of shape {tuple(sequences.shape)}: need [N >= 1, L >= 2] token ids")
    kl_sum = agree = nll_true = nll_rec = 0.0
    positions = 0
    for start in tqdm(range(0, sequences.shape[0], batch_size), desc=desc, leave=False):
        ids = sequences[start:start + batch_size].to(device)
        with wrapper.reconstruction(False):
            true_logits = wrapper.lm(input_ids=ids, use_cache=False).logits[:, :-1].float()
        rec_logits = wrapper(input_ids=ids)["logits"][:, :-1].float()
        logp, logq = true_logits.log_softmax(-1), rec_logits.log_softmax(-1)
        kl_sum += float((logp.exp() * (logp - logq)).sum())
        agree += float((true_logits.argmax(-1) == rec_logits.argmax(-1)).sum())
        target = ids[:, 1:].unsqueeze(-1)
        nll_true -= float(logp.gather(-1, target).sum())
        nll_rec -= float(logq.gather(-1, target).sum())
        positions += target.numel()
    wrapper.train(was_training)
    ppl_true, ppl_rec = math.exp(nll_true / positions), math.exp(nll_rec / positions)
    return {"kl_mean": kl_sum / positions, "top1_agree": agree / positions, "ppl_true": ppl_true,
            "ppl_recon": ppl_rec, "ppl_ratio": ppl_rec / ppl_true, "tokens": positions,
            "sequences": int(sequences.shape[0])}


def evaluate_ood(wrapper: DeltaKVForTraining, tokenizer, tokens: int = 4096, seq_len: int = 512,
                 texts: list[tuple[str, str]] | None = None) -> dict:
    """``ood_fidelity`` on ``tokens`` tokens of ``texts`` (default: Python stdlib source,
    ``deltakv.ood_text``) cut into sequences of ``min(seq_len, tokens)``; the result names the sources."""
    from deltakv.ood_text import ood_sequences

    seqs, sources = ood_sequences(tokenizer, tokens, seq_len, texts)
    batch = max(1, 512 // seqs.shape[1])  # ~512 positions per forward: short sequences batched, logits bounded
    return {**ood_fidelity(wrapper, seqs, batch_size=batch), "sources": sources}


def ood_fidelity_of_checkpoint(checkpoint: str | Path, model: str | None = "smollm2-135m", tokens: int = 4096,
                               seq_len: int = 512, texts: list[tuple[str, str]] | None = None) -> dict:
    """``evaluate_ood`` of a saved compressor on its frozen model (what ``experiments/train_ablations``
    calls on each trained compressor)."""
    from deltakv.checkpoint import load_compressor
    from deltakv.hf_model import load_frozen_lm

    lm, tok = load_frozen_lm(model)
    comp = load_compressor(checkpoint, expected_model_config=lm.config)
    return evaluate_ood(DeltaKVForTraining(lm, comp), tok, tokens, seq_len, texts)


def format_ood(metrics: dict, title: str = "DeltaKV fidelity out of domain (Python stdlib source)") -> str:
    """Plain-text lines of an ``ood_fidelity`` result."""
    return "\n".join([
        title, f"  sequences {metrics['sequences']}, predicted tokens {metrics['tokens']}",
        f"  KL(true || reconstructed) {metrics['kl_mean']:.4f} nats/token",
        f"  top-1 agreement           {metrics['top1_agree']:.4f}",
        f"  perplexity true KV {metrics['ppl_true']:.3f}, reconstructed {metrics['ppl_recon']:.3f} "
        f"(x{metrics['ppl_ratio']:.3f})"])


def format_table(metrics: dict, title: str = "DeltaKV reconstruction (held-out)") -> str:
    """Plain-text table of an ``evaluate_reconstruction`` result."""
    lines = [title, f"  sequences {metrics['sequences']}, tokens {metrics['tokens']}",
             f"  perplexity true KV          {metrics['ppl_true']:.3f}",
             f"  perplexity reconstructed KV {metrics['ppl_recon']:.3f}  (x{metrics['ppl_ratio']:.3f})",
             "  layer      mse   rel_err"]
    for layer, v in metrics["layers"].items():
        lines.append(f"  {int(layer):>5} {v['mse']:>8.4f} {v['rel_err']:>9.4f}")
    lines.append(f"   mean {metrics['mse_mean']:>8.4f} {metrics['rel_err_mean']:>9.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from data_prepare.config import PackConfig, SourceConfig
    from data_prepare.pack import pack_dataset
    from deltakv.checkpoint import load_compressor
    from deltakv.hf_model import load_frozen_lm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-sequences", type=int, default=16, help="held-out sequences (0: skip the held-out part)")
    ap.add_argument("--text", default=None, help="held-out text file (default: the shipped news split)")
    ap.add_argument("--cache-dir", default=None, help="where packed data is cached (default: user cache)")
    ap.add_argument("--ood-tokens", type=int, default=4096,
                    help="tokens of Python stdlib source for the out-of-domain KL / top-1 (0: skip)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    lm, tok = load_frozen_lm(args.model)
    comp = load_compressor(args.checkpoint, expected_model_config=lm.config)
    wrapper = DeltaKVForTraining(lm, comp)
    metrics = {}
    if args.max_sequences:  # 0: only the out-of-domain part
        if args.text:  # every document of the file is evaluation data
            cfg = PackConfig(name="eval", sources=[SourceConfig(type="text", path=args.text)], seq_len=args.seq_len,
                             eval_fraction=0.5, cache_dir=args.cache_dir)
        else:
            cfg = PackConfig(seq_len=args.seq_len, cache_dir=args.cache_dir)
        data, _ = pack_dataset(cfg, tok)
        metrics = evaluate_reconstruction(wrapper, data["validation"], args.max_sequences)
        print(format_table(metrics))
    if args.ood_tokens:
        metrics["ood"] = evaluate_ood(wrapper, tok, args.ood_tokens, args.seq_len)
        print(format_ood(metrics["ood"]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
