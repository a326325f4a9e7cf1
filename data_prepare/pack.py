"""Tokenize and pack documents into fixed-length sequences, cached by a content hash.

``pack_dataset(cfg, tokenizer)`` reads every document, hashes (settings, tokenizer, texts), and
returns the ``DatasetDict`` (``train`` / ``validation``, column ``input_ids``) stored under
``<cache>/packed/<name>-<hash>``; the same inputs are never tokenized twice. Documents are shuffled
with ``cfg.seed``, the last ``eval_fraction`` of them are held out, each document is followed by the
EOS separator, and each split is cut into ``seq_len`` blocks (the tail is dropped).

CLI: ``deltakv-pack data=news model=smollm2_135m data.seq_len=1024`` (Hydra; ``conf/pack.yaml``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from data_prepare.config import PackConfig
from data_prepare.sources import read_documents

PACK_FORMAT_VERSION = 1

# "../conf" of this file, as an absolute path so Hydra finds it whether run as a module or a script
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's vocabulary and rules (independent of where it was loaded from)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([type(tokenizer).__name__, tokenizer.eos_token_id], default=str)
    return hashlib.sha256((blob + extra).encode()).hexdigest()


def packed_path(cfg: PackConfig, digest: str) -> Path:
    if cfg.cache_dir:
        root = Path(cfg.cache_dir).expanduser()
    else:
        from data_prepare.resources import cache_dir

        root = cache_dir() / "packed"
    return root / f"{cfg.name}-{digest[:16]}"


def _pack(docs_tokens: list[list[int]], seq_len: int, sep: list[int]) -> list[list[int]]:
    stream: list[int] = []
    for toks in docs_tokens:
        stream.extend(toks)
        stream.extend(sep)
    n = len(stream) // seq_len
    return [stream[i * seq_len:(i + 1) * seq_len] for i in range(n)]


def pack_dataset(cfg: PackConfig, tokenizer, force: bool = False):
    """Return ``(DatasetDict, folder)``; packs on first use, loads the cached copy afterwards."""
    from datasets import Dataset, DatasetDict, load_from_disk

    docs = [doc for src in cfg.sources
            for doc in tqdm(read_documents(src), desc=f"read {src.path or src.type}", unit="doc", leave=False)]
    if not docs:
        raise ValueError(f"data sources {[s.path or s.type for s in cfg.sources]} yielded no documents")
    h = hashlib.sha256()
    h.update(json.dumps({"v": PACK_FORMAT_VERSION, **cfg.hash_settings()}, sort_keys=True, default=str).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    for doc in docs:
        h.update(hashlib.sha256(doc.encode()).digest())
    digest = h.hexdigest()
    out = packed_path(cfg, digest)
    if (out / "pack_meta.json").exists() and not force:
        return load_from_disk(str(out)), out

    order = list(range(len(docs)))
    if cfg.shuffle:
        random.Random(cfg.seed).shuffle(order)
    if cfg.max_documents:
        order = order[: cfg.max_documents]
    n_eval = 0 if cfg.eval_fraction == 0 else max(1, round(len(order) * cfg.eval_fraction))
    split_docs = {"train": order[: len(order) - n_eval]}
    if n_eval:
        split_docs["validation"] = order[len(order) - n_eval:]

    sep = []
    if cfg.separator == "eos":
        if tokenizer.eos_token_id is None:
            raise ValueError("The tokenizer has no EOS token; use data.separator=none")
        sep = [tokenizer.eos_token_id]
    tokens: dict[int, list[int]] = {}
    chosen = [i for i in order]
    for start in tqdm(range(0, len(chosen), cfg.batch_size), desc=f"tokenize {cfg.name}", unit="batch"):
        idx = chosen[start:start + cfg.batch_size]
        enc = tokenizer([docs[i] for i in idx], add_special_tokens=False)["input_ids"]
        tokens.update(zip(idx, enc))

    splits = {}
    for split, idx in split_docs.items():
        blocks = _pack([tokens[i] for i in idx], cfg.seq_len, sep)
        if not blocks:
            n_tok = sum(len(tokens[i]) + len(sep) for i in idx)
            raise ValueError(
                f"The {split} split has {n_tok} tokens, fewer than one sequence of data.seq_len={cfg.seq_len}; "
                "lower seq_len, add documents, or change data.eval_fraction"
            )
        splits[split] = Dataset.from_dict({"input_ids": blocks})
    dd = DatasetDict(splits)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    dd.save_to_disk(str(tmp))
    meta = {
        "hash": digest, "documents": len(order), "eval_documents": n_eval,
        "sequences": {k: len(v) for k, v in splits.items()}, "seq_len": cfg.seq_len,
        "settings": cfg.hash_settings(),
    }
    (tmp / "pack_meta.json").write_text(json.dumps(meta, indent=2, default=str))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return load_from_disk(str(out)), out


def _pack_config(cfg) -> PackConfig:
    """The ``data`` group as a ``PackConfig``; a required value left at ``???`` (``data=text`` /
    ``jsonl`` / ``hf_disk`` without a path) is a one-line error naming the override to add."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    try:
        data = OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        key = re.sub(r"\[(\d+)\]", r".\1", str(getattr(e, "full_key", None) or "data"))  # sources[0] -> sources.0
        key = key if key.startswith("data") else f"data.{key}"
        raise ValueError(f"{key} is required and not set: this data source reads local files, add {key}=/path/to/"
                         "your/data (a file, a folder or a glob; nothing is downloaded), or use data=news "
                         "(the shipped corpus).") from None
    return PackConfig.from_dict(data)


def main() -> None:
    import sys

    import hydra

    @hydra.main(config_path=CONF_DIR, config_name="pack", version_base="1.3")
    def _run(cfg) -> None:
        from transformers import AutoTokenizer

        from data_prepare.resources import resolve_model_path

        try:
            pack_cfg = _pack_config(cfg)
            tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.path))
            dd, folder = pack_dataset(pack_cfg, tokenizer, force=bool(cfg.get("force", False)))
        except (ValueError, FileNotFoundError, KeyError) as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"deltakv-pack: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        print(f"packed dataset: {folder}")
        for split, ds in dd.items():
            print(f"  {split:<11} {len(ds):>7} sequences x {pack_cfg.seq_len} tokens")

    _run()


if __name__ == "__main__":
    main()
