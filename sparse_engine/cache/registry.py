"""Method registry: name -> CacheMethod subclass. Adding a method = one file + one line here."""

from __future__ import annotations

import difflib

from .base import CacheMethod
from .deltakv import DeltaKVCache
from .kivi import KiviCache
from .omnikv import OmniKVCache
from .pyramidkv import PyramidKVCache
from .snapkv import AdaKVCache, SnapKVCache
from .sparsex import SparseXCache
from .streaming import StreamingCache
from .vanilla import VanillaCache

METHODS: dict[str, type[CacheMethod]] = {
    "vanilla": VanillaCache,
    "snapkv": SnapKVCache,
    "adakv": AdaKVCache,
    "pyramidkv": PyramidKVCache,
    "omnikv": OmniKVCache,
    "streaming": StreamingCache,
    "deltakv": DeltaKVCache,
    "sparsex": SparseXCache,
    "kivi": KiviCache,
}


def get_method(name: str) -> type[CacheMethod]:
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"Unknown cache method '{name}'. Known: {sorted(METHODS)}.{hint}")
    return METHODS[name]
