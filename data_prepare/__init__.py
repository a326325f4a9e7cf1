"""Data preparation: local text / JSONL / saved ``datasets`` -> tokenized, packed, ``save_to_disk``."""

from data_prepare.config import PackConfig, SourceConfig
from data_prepare.pack import pack_dataset

__all__ = ["PackConfig", "SourceConfig", "pack_dataset"]
