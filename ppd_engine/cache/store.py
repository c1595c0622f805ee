"""On-disk layout of the latent + text cache and its lazy, memory-mapped reader.

cache_dir/
  index.json                  {"format", "fingerprint", "meta", "latent_shards", "text_shards", "failed_images"}
  latents-00000.safetensors   "<uid>" (C, h, w), "<uid>#flip" (C, h, w) when flips are cached,
                              "<uid>#time_ids" (6,) float32 (orig h, w, crop top, left, target h, w)
  texts-00000.safetensors     "<sha256(caption)[:32]>" (T, D), "<hash>#pooled" (D2,) for SDXL

Every shard also carries the fingerprint in its safetensors metadata. The index lists shards only;
which keys a shard holds is read from the shard headers, so the index stays small and is cheap to
rewrite after every shard. Shards and the index are written to a temporary name and renamed, so a
killed build leaves a consistent cache that the next build extends.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors import safe_open

from ppd_engine.files import save_safetensors_atomic, write_json_atomic

INDEX = "index.json"
FORMAT = 1
FLIP = "#flip"
TIME_IDS = "#time_ids"
POOLED = "#pooled"


def caption_key(caption: str) -> str:
    """Cache key of a caption's text states."""
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()[:32]


def fingerprint(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()


class CacheMismatchError(RuntimeError):
    """The cache on disk was built for another model, resolution or preprocessing."""


def _atomic_json(path: str, obj: dict) -> None:
    write_json_atomic(path, obj, indent=1, sort_keys=True)


def write_shard(path: str, tensors: dict[str, torch.Tensor], fp: str) -> None:
    """Write one safetensors shard atomically."""
    save_safetensors_atomic({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path,
                            metadata={"fingerprint": fp, "format": str(FORMAT)})


def read_index(cache_dir: str) -> dict | None:
    path = os.path.join(cache_dir, INDEX)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_index(cache_dir: str, index: dict) -> None:
    _atomic_json(os.path.join(cache_dir, INDEX), index)


def shard_keys(path: str) -> list[str]:
    with safe_open(path, framework="pt", device="cpu") as f:
        return list(f.keys())


class CacheReader:
    """Lazy reader: shard headers are read on first use, tensors come out of the memory-mapped files.

    Handles are reopened after pickling, so a reader can be shipped to DataLoader workers.
    """

    def __init__(self, cache_dir: str):
        self.cache_dir = cache_dir
        index = read_index(cache_dir)
        if index is None:
            raise FileNotFoundError(f"no latent cache in {cache_dir!r} (missing {INDEX}); build it first "
                                    f"with ppd_engine.cache.build_cache")
        if index.get("format") != FORMAT:
            raise CacheMismatchError(f"{cache_dir!r}: cache format {index.get('format')} != {FORMAT}; rebuild it")
        self.index = index
        self.meta = index["meta"]
        self.fingerprint = index["fingerprint"]
        self._where: dict[str, tuple[str, int]] | None = None
        self._handles: dict[tuple[str, int], object] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _locate(self) -> dict[str, tuple[str, int]]:
        if self._where is None:
            where = {}
            for kind in ("latent_shards", "text_shards"):
                for i, name in enumerate(self.index[kind]):
                    path = os.path.join(self.cache_dir, name)
                    with safe_open(path, framework="pt", device="cpu") as f:
                        if (f.metadata() or {}).get("fingerprint") != self.fingerprint:
                            raise CacheMismatchError(f"shard {path!r} belongs to another cache build "
                                                     f"(fingerprint differs from {INDEX}); rebuild the cache")
                        for k in f.keys():
                            where[k] = (kind, i)
            self._where = where
        return self._where

    def __contains__(self, key: str) -> bool:
        return key in self._locate()

    def keys(self) -> set[str]:
        return set(self._locate())

    def get(self, key: str) -> torch.Tensor:
        """The stored tensor for `key` (in the cache's storage dtype)."""
        loc = self._locate().get(key)
        if loc is None:
            raise KeyError(f"{key!r} is not in the cache at {self.cache_dir!r}")
        handle = self._handles.get(loc)
        if handle is None:
            handle = safe_open(os.path.join(self.cache_dir, self.index[loc[0]][loc[1]]), framework="pt", device="cpu")
            self._handles[loc] = handle
        return handle.get_tensor(key)

    def has_image(self, uid: str) -> bool:
        return uid in self._locate()

    def latents(self, uid: str, flipped: bool = False) -> torch.Tensor:
        return self.get(uid + FLIP if flipped else uid)

    def time_ids(self, uid: str) -> torch.Tensor:
        return self.get(uid + TIME_IDS)

    def text(self, caption: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = caption_key(caption)
        pooled = self.get(key + POOLED) if key + POOLED in self._locate() else None
        return self.get(key), pooled
