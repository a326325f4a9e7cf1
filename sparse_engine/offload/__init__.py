"""KV offload tiers: DeltaKV latent rows on device / host (pinned) / a memory-mapped file on disk."""

from .latent_store import LATENT_DTYPES, LatentCodec, Prefetcher, TieredLatentStore

__all__ = ["LATENT_DTYPES", "LatentCodec", "Prefetcher", "TieredLatentStore"]
