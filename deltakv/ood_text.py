"""Text of another domain than the training data, read from this machine (nothing downloaded).

A compressor trained on news can lower the news perplexity below the true-KV one (it adapts the
model to the domain); fidelity has to be measured where that cannot help. The default source is
Python source of the standard library: a fixed list of modules, read from ``sysconfig``'s stdlib
path, so every run of the same Python reads the same text. ``ood_sequences`` tokenizes the files in
order (an EOS between files when the tokenizer has one) and cuts the stream into equal sequences.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

# plain-Python modules present in every CPython 3.x, in this order (docstrings, code and comments)
STDLIB_MODULES = ("textwrap.py", "fractions.py", "heapq.py", "bisect.py", "difflib.py", "statistics.py",
                  "shlex.py", "calendar.py", "string.py", "colorsys.py")


def stdlib_source_texts(modules=STDLIB_MODULES) -> list[tuple[str, str]]:
    """``[(path, text)]`` of the given standard-library source files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for name in modules:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"stdlib source {path} not found (a Python without its .py sources?); "
                                    "pass texts of another domain explicitly")
        out.append((str(path), path.read_text(encoding="utf-8")))
    return out


def ood_sequences(tokenizer, max_tokens: int, seq_len: int, texts: list[tuple[str, str]] | None = None
                  ) -> tuple[torch.Tensor, list[str]]:
    """``(ids [N, L], sources used)``: ``L = min(seq_len, max_tokens)``, ``N = max_tokens // L`` sequences
    cut from the token stream of ``texts`` (default: ``stdlib_source_texts()``)."""
    if max_tokens < 2 or seq_len < 2:
        raise ValueError(f"ood tokens={max_tokens}, seq_len={seq_len}: both must be >= 2 (one prediction needs 2 tokens)")
    length = min(seq_len, max_tokens)
    n = max_tokens // length
    texts = stdlib_source_texts() if texts is None else texts
    stream: list[int] = []
    used = []
    eos = tokenizer.eos_token_id
    for source, text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
        used.append(source)
        if len(stream) >= n * length:
            break
    n = min(n, len(stream) // length)
    if n == 0:
        raise ValueError(f"the out-of-domain texts give {len(stream)} tokens, fewer than one sequence of {length}")
    return torch.tensor(stream[: n * length]).view(n, length), used
