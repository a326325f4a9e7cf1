"""`vanilla`: keep every token's K/V (the base class already does exactly that)."""

from .base import CacheMethod


class VanillaCache(CacheMethod):
    name = "vanilla"
