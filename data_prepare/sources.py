"""Reading documents from local sources (never from a hub)."""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from pathlib import Path

from data_prepare.config import SourceConfig


def _files(path: str, suffixes: tuple[str, ...]) -> list[Path]:
    p = Path(path).expanduser()
    if any(ch in path for ch in "*?["):
        found = sorted(Path(f) for f in glob.glob(str(p)))
    elif p.is_dir():
        found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
    elif p.is_file():
        found = [p]
    else:
        raise FileNotFoundError(
            f"Dataset path {path} does not exist. Point data.sources[i].path at a local file, folder or glob "
            "(nothing is downloaded), or use the shipped corpus with data=news."
        )
    if not found:
        raise FileNotFoundError(f"Dataset path {path} matched no {'/'.join(suffixes)} files")
    return found


def _text_docs(src: SourceConfig) -> Iterator[str]:
    for f in _files(src.path, (".txt", ".cor", ".md")):
        text = f.read_text(encoding="utf-8", errors="replace")
        if src.doc_split == "file":
            parts = [text]
        elif src.doc_split == "line":
            parts = text.splitlines()
        else:
            parts = [block for block in text.replace("\r\n", "\n").split("\n\n")]
        yield from (p.strip() for p in parts if p.strip())


def _jsonl_docs(src: SourceConfig) -> Iterator[str]:
    for f in _files(src.path, (".jsonl", ".json")):
        with f.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if src.text_field not in row:
                    raise KeyError(f"{f}:{n} has no field {src.text_field!r} (fields: {sorted(row)}); set text_field")
                if str(row[src.text_field]).strip():
                    yield str(row[src.text_field]).strip()


def _hf_disk_docs(src: SourceConfig) -> Iterator[str]:
    from datasets import DatasetDict, load_from_disk

    path = Path(src.path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"Dataset path {path} does not exist (expected a folder written by save_to_disk)")
    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        splits = [src.split] if src.split else sorted(ds)
        missing = [s for s in splits if s not in ds]
        if missing:
            raise KeyError(f"{path} has splits {sorted(ds)}, not {missing}")
        parts = [ds[s] for s in splits]
    else:
        parts = [ds]
    for part in parts:
        if src.text_field not in part.column_names:
            raise KeyError(f"{path} has columns {part.column_names}, no {src.text_field!r}; set text_field")
        for text in part[src.text_field]:
            if text and str(text).strip():
                yield str(text).strip()


def read_documents(src: SourceConfig) -> Iterator[str]:
    """Yield the non-empty documents of one source, in a deterministic order."""
    if src.type == "shipped_news":
        from data_prepare.resources import shipped_articles

        yield from shipped_articles()
    elif src.type == "text":
        yield from _text_docs(src)
    elif src.type == "jsonl":
        yield from _jsonl_docs(src)
    else:
        yield from _hf_disk_docs(src)
