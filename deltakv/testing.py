"""Tiny random HF models and tokenizers for tests and demos (built locally, nothing downloaded)."""

from __future__ import annotations

import re
from pathlib import Path

WORDS = (
    "the a of to and in is was for on that with as by at from his her it an were are which this be has "
    "had not but have they he she their its or one two three year new after first people said more time"
).split()


def make_tokenizer(path: str | Path, texts: list[str] | None = None):
    """A word-level ``PreTrainedTokenizerFast`` (``[UNK]``, ``<eos>``, lowercase words) saved to ``path``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(WORDS)
    for t in texts or []:
        words.extend(re.findall(r"\w+|[^\w\s]", t.lower()))
    vocab = {"[UNK]": 0, "<eos>": 1}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>", pad_token="<eos>")
    fast.save_pretrained(str(path))
    return fast


def make_tiny_model(path: str | Path, texts: list[str] | None = None, model_type: str = "llama",
                    num_layers: int = 4, num_kv_heads: int = 2, head_dim: int = 8, seed: int = 0):
    """Save a tiny random causal LM (+ tokenizer) of a supported family into ``path``; returns the path."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    tok = make_tokenizer(path, texts)
    heads = 2 * num_kv_heads
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tok), hidden_size=heads * head_dim, intermediate_size=64,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=num_kv_heads,
        head_dim=head_dim, max_position_embeddings=2048, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(path))
    return path


def tiny_compressor(latent: int | None = None, seed: int = 0, layers=(1, 2, 3), full=(0,), reference=None,
                    num_layers: int = 4, num_kv_heads: int = 2, head_dim: int = 16):
    """A DeltaKV compressor for a tiny model: `latent=None` is identity-like (latent width = joined
    width, down = an orthogonal Q, up = Q^T: lossless); else a lossy linear one of that latent width
    (orthonormal down rows, up = down^T, the best rank-r inverse). Default reference: 4 sinks, stride
    4, 2 fathers."""
    import torch

    from .compressor import CompressorConfig, DeltaKVCompressor
    from .reference import ReferenceSpec

    width = 2 * num_kv_heads * head_dim
    ref = reference if reference is not None else ReferenceSpec(num_sinks=4, cluster_ratio=0.25, top_k=2)
    cfg = CompressorConfig(model_type="llama", num_hidden_layers=num_layers, num_kv_heads=num_kv_heads,
                           head_dim=head_dim, layers=list(layers), full_attn_layers=list(full),
                           kv_compressed_size=latent or width - 1, down="linear", bias=True, reference=ref)
    if latent is None:
        cfg.kv_compressed_size = width  # past the checkpoint validation: a lossless latent, for tests only
    comp = DeltaKVCompressor(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            q, _ = torch.linalg.qr(torch.randn(width, width, generator=g, dtype=torch.float64))
            q = q.float()[: cfg.kv_compressed_size]
            pair = comp[layer]
            pair.down.proj.weight.copy_(q)
            pair.down.proj.bias.zero_()
            pair.up.proj.weight.copy_(q.T)
            pair.up.proj.bias.zero_()
    return comp


TINY_TEXT = [
    "the first year of the new time was one of more people and more work",
    "they said it was the first time that the people had a new year",
    "after three years the work was done and the people were happy with it",
    "a new year is the time for people to say what they had done",
] * 6


def tiny_training_setup(root: str | Path, text: list[str] | None = None) -> tuple[Path, Path]:
    """The training tests' model and data under `root`: a tiny llama (3 layers, 2 KV heads x 8) whose
    tokenizer knows `text` (default `TINY_TEXT`), and `root/corpus.txt` holding that text."""
    root = Path(root)
    text = TINY_TEXT if text is None else text
    model = make_tiny_model(root / "model", text, num_layers=3, num_kv_heads=2, head_dim=8)
    (root / "corpus.txt").write_text("\n\n".join(text))
    return root, model
