"""Validated configuration of data packing (the ``data`` Hydra group)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

SOURCE_TYPES = ("text", "jsonl", "hf_disk", "shipped_news")
DOC_SPLITS = ("line", "blank_line", "file")


@dataclass
class SourceConfig:
    """One input source.

    Attributes:
        type: ``text`` (plain text files), ``jsonl`` (one JSON object per line), ``hf_disk`` (a
            ``datasets`` Dataset/DatasetDict saved with ``save_to_disk``) or ``shipped_news`` (the
            299 Lee news articles shipped in gensim's wheel; no path).
        path: a file, a directory (all ``*.txt`` / ``*.jsonl`` files inside, sorted) or a glob.
        text_field: field holding the text (``jsonl`` / ``hf_disk``).
        split: split of a saved DatasetDict (``hf_disk``; default: every split, sorted by name).
        doc_split: how ``text`` files are cut into documents: ``line``, ``blank_line`` or ``file``.
    """

    type: str
    path: str | None = None
    text_field: str = "text"
    split: str | None = None
    doc_split: str = "blank_line"

    def __post_init__(self) -> None:
        if self.type not in SOURCE_TYPES:
            raise ValueError(f"data source type {self.type!r} is unknown; choose one of {SOURCE_TYPES}")
        if self.type != "shipped_news" and not self.path:
            raise ValueError(f"data source of type {self.type!r} needs a path (e.g. data.sources.0.path=/my/corpus)")
        if self.doc_split not in DOC_SPLITS:
            raise ValueError(f"doc_split={self.doc_split!r} is unknown; choose one of {DOC_SPLITS}")


@dataclass
class PackConfig:
    """How documents become fixed-length training sequences.

    Attributes:
        name: prefix of the packed folder in the cache.
        sources: list of ``SourceConfig``; documents are read in order.
        seq_len: tokens per packed sequence (the remainder of each split is dropped).
        separator: ``eos`` appends the tokenizer's EOS after every document; ``none`` appends nothing.
        eval_fraction: fraction of documents (after a seeded shuffle) held out as ``validation``.
        max_documents: keep only the first N documents (after shuffling); null = all.
        seed: shuffle seed (packing is deterministic for a given seed).
        shuffle: shuffle documents before splitting.
        cache_dir: where packed datasets live; null = ``<user cache>/packed``.
        batch_size: documents per tokenizer call.
    """

    name: str = "news"
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig(type="shipped_news")])
    seq_len: int = 512
    separator: str = "eos"
    eval_fraction: float = 0.1
    max_documents: int | None = None
    seed: int = 0
    shuffle: bool = True
    cache_dir: str | None = None
    batch_size: int = 64

    def __post_init__(self) -> None:
        self.sources = [s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in self.sources]
        if not self.sources:
            raise ValueError("data.sources is empty; give at least one source")
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len must be >= 2, got {self.seq_len}")
        if self.separator not in ("eos", "none"):
            raise ValueError(f"data.separator={self.separator!r}; choose eos or none")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")

    @classmethod
    def from_dict(cls, data: dict) -> "PackConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"Unknown data fields {sorted(unknown)}; valid: {sorted(names)}")
        return cls(**data)

    def hash_settings(self) -> dict:
        """The settings that change the packed output (cache_dir and batch_size do not)."""
        d = asdict(self)
        d.pop("cache_dir")
        d.pop("batch_size")
        d.pop("name")
        return d
