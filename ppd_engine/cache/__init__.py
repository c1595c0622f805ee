"""Latent + text cache: encode once with the frozen VAE / text encoders, train from memory-mapped shards."""

from ppd_engine.cache.build import CacheReport, build_cache
from ppd_engine.cache.dataset import PairCacheDataset
from ppd_engine.cache.store import CacheMismatchError, CacheReader

__all__ = ["CacheReport", "build_cache", "PairCacheDataset", "CacheMismatchError", "CacheReader"]
