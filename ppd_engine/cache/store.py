"""On-disk layout of the latent + text cache and its lazy, memory-mapped reader.

cache_dir/
  index.json                  {"format", "fingerprint", "meta", "latent_shards", "text_shards", "failed_images",
                               "sha256": {shard name: sha256 of the file}}
  latents-r000-00000.safetensors  "<uid>" (C, h, w), "<uid>#flip" (C, h, w) when flips are cached,
                              "<uid>#time_ids" (6,) float32 (orig h, w, crop top, left, target h, w), SDXL only
  texts-r000-00000.safetensors    "<sha256(caption)[:32]>" (T, D), "<hash>#pooled" (D2,) for SDXL
  index-rank<r>.json          shards rank r wrote during a build not yet merged into index.json

Every shard also carries the fingerprint in its safetensors metadata, and the index records the
sha256 of each shard as written: a reader hashes every shard once when it first opens the cache
(one sequential read of the whole cache; `verify=False` skips it) and refuses one that differs,
naming the file. The index lists shards only;
which keys a shard holds is read from the shard headers, so the index stays small and is cheap to
rewrite after every shard. Shards and the index are written to a temporary name and renamed, so a
killed build leaves a consistent cache that the next build extends.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from safetensors import safe_open

from ppd_engine.files import save_safetensors_atomic, write_json_atomic
from ppd_engine.integrity import CorruptFileError, sha256_file

log = logging.getLogger(__name__)

INDEX = "index.json"
FORMAT = 1
FLIP = "#flip"
TIME_IDS = "#time_ids"
POOLED = "#pooled"
PART_GLOB = "index-rank*.json"


def caption_key(caption: str) -> str:
    """Cache key of a caption's text states."""
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()[:32]


def fingerprint(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()


class CacheMismatchError(ValueError):
    """The cache on disk was built for another model, resolution or preprocessing."""


def _atomic_json(path: str, obj: dict) -> None:
    write_json_atomic(path, obj, indent=1, sort_keys=True)


def write_shard(path: str, tensors: dict[str, torch.Tensor], fp: str) -> str:
    """Write one safetensors shard atomically; returns the sha256 of the file as it landed on disk
    (just written, so the read hits the page cache)."""
    save_safetensors_atomic({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path,
                            metadata={"fingerprint": fp, "format": str(FORMAT)})
    return sha256_file(path)


def read_index(cache_dir: str) -> dict | None:
    path = os.path.join(cache_dir, INDEX)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_index(cache_dir: str, index: dict) -> None:
    _atomic_json(os.path.join(cache_dir, INDEX), index)


def write_part(cache_dir: str, rank: int, part: dict) -> None:
    _atomic_json(os.path.join(cache_dir, f"index-rank{rank}.json"), part)


def merge_parts(cache_dir: str) -> None:
    """Fold every rank's part into index.json (parts of another fingerprint are stale: dropped)."""
    paths = sorted(glob.glob(os.path.join(cache_dir, PART_GLOB)))
    if not paths:
        return
    index = read_index(cache_dir)
    for p in paths:
        with open(p) as f:
            part = json.load(f)
        if part.get("fingerprint") == index["fingerprint"]:
            for kind in ("latent_shards", "text_shards", "failed_images"):
                index[kind] += [x for x in part[kind] if x not in index[kind]]
            index.setdefault("sha256", {}).update(part.get("sha256", {}))
    write_index(cache_dir, index)
    for p in paths:
        os.unlink(p)


def key_hash(keys) -> np.ndarray:
    """64-bit hashes of cache keys (the reader's compact lookup table holds these, not the strings)."""
    return np.array([int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") for k in keys],
                    dtype=np.uint64)


def shard_keys(path: str) -> list[str]:
    with safe_open(path, framework="pt", device="cpu") as f:
        return list(f.keys())


def verify_cache(cache_dir: str, rank: int = 0, world_size: int = 1, exchange=None, index: dict | None = None) -> None:
    """Hash the cache's shards against the sha256 its index records; CorruptFileError names the
    first mismatch. Several ranks split the work: rank r hashes every world_size-th shard, and
    `exchange(text) -> [every rank's text]` (training.distributed.all_gather_str) shares what each
    found, so every rank refuses a corrupt cache while each reads 1/world_size of it. Threads:
    hashlib releases the GIL, and one core hashes ~1.8 GB/s, below what a local NVMe reads."""
    index = index if index is not None else read_index(cache_dir)
    if index is None:
        raise FileNotFoundError(f"no latent cache in {cache_dir!r} (missing {INDEX})")
    recorded = index.get("sha256", {})
    names = list(index["latent_shards"]) + list(index["text_shards"])
    unhashed = [n for n in names if n not in recorded]
    if unhashed and rank == 0:
        log.warning("cache %s: %d shard(s) have no sha256 in %s (built before ppd_engine recorded them; e.g. %s); "
                    "they are not verified", cache_dir, len(unhashed), INDEX, unhashed[0])
    mine = [n for n in names if n in recorded][rank::world_size]
    bad = ""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for name, got in zip(mine, pool.map(lambda n: sha256_file(os.path.join(cache_dir, n)), mine)):
            if got != recorded[name]:
                bad = os.path.join(cache_dir, name)
                break
    found = exchange(bad) if exchange is not None else [bad]
    first = next((b for b in found if b), "")
    if first:
        raise CorruptFileError(f"{first}: content does not match the sha256 in {INDEX} (corrupted file); "
                               f"delete {cache_dir} and build the cache again")


class CacheReader:
    """Lazy reader: shard headers are read on first use, tensors come out of the memory-mapped files.

    Handles are reopened after pickling, so a reader can be shipped to DataLoader workers.
    verify: hash every shard against the index on first use (one read of the whole cache per process;
    a reader pickled after that first use does not hash again).
    """

    def __init__(self, cache_dir: str, verify: bool = True):
        self.cache_dir = cache_dir
        self.verify = verify
        index = read_index(cache_dir)
        if index is None:
            raise FileNotFoundError(f"no latent cache in {cache_dir!r} (missing {INDEX}); build it first "
                                    f"with ppd_engine.cache.build_cache")
        if index.get("format") != FORMAT:
            raise CacheMismatchError(f"{cache_dir!r}: cache format {index.get('format')} != {FORMAT}; rebuild it")
        self.index = index
        self.meta = index["meta"]
        self.fingerprint = index["fingerprint"]
        self._shards = [("latent_shards", i) for i in range(len(index["latent_shards"]))] + \
                       [("text_shards", i) for i in range(len(index["text_shards"]))]
        self._hashes: np.ndarray | None = None   # sorted 64-bit key hashes
        self._shard_of: np.ndarray | None = None  # shard number of each hash
        self._handles: dict[tuple[str, int], object] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _locate(self) -> None:
        """Build the lookup table: ~10 bytes per key (sorted hashes + shard numbers), not a dict of
        strings, so every rank of a big run can hold it (a full Pick-a-Pic cache has ~5.7M keys)."""
        if self._hashes is not None:
            return
        if self.verify:
            self._check_hashes()
        hashes, owners = [], []
        for n, (kind, i) in enumerate(self._shards):
            path = os.path.join(self.cache_dir, self.index[kind][i])
            with safe_open(path, framework="pt", device="cpu") as f:
                if (f.metadata() or {}).get("fingerprint") != self.fingerprint:
                    raise CacheMismatchError(f"shard {path!r} belongs to another cache build "
                                             f"(fingerprint differs from {INDEX}); rebuild the cache")
                h = key_hash(f.keys())
            hashes.append(h)
            owners.append(np.full(len(h), n, dtype=np.int32))
        h = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
        o = np.concatenate(owners) if owners else np.zeros(0, np.int32)
        order = np.argsort(h, kind="stable")
        self._hashes, self._shard_of = h[order], o[order]

    def _check_hashes(self) -> None:
        verify_cache(self.cache_dir, index=self.index)

    def _find(self, hashes: np.ndarray) -> np.ndarray:
        """Shard numbers of `hashes`, -1 where absent."""
        self._locate()
        pos = np.searchsorted(self._hashes, hashes)
        pos_c = np.minimum(pos, max(len(self._hashes) - 1, 0))
        hit = (pos < len(self._hashes)) & (self._hashes[pos_c] == hashes) if len(self._hashes) else np.zeros(len(hashes), bool)
        return np.where(hit, self._shard_of[pos_c] if len(self._hashes) else -1, -1)

    def contains(self, keys: list[str]) -> np.ndarray:
        """Boolean array: which of `keys` are in the cache (one vectorised lookup)."""
        return self._find(key_hash(keys)) >= 0

    def __contains__(self, key: str) -> bool:
        return bool(self.contains([key])[0])

    def __len__(self) -> int:
        self._locate()
        return len(self._hashes)

    def get(self, key: str) -> torch.Tensor:
        """The stored tensor for `key` (in the cache's storage dtype)."""
        n = int(self._find(key_hash([key]))[0])
        if n < 0:
            raise KeyError(f"{key!r} is not in the cache at {self.cache_dir!r}")
        loc = self._shards[n]
        handle = self._handles.get(loc)
        if handle is None:
            handle = safe_open(os.path.join(self.cache_dir, self.index[loc[0]][loc[1]]), framework="pt", device="cpu")
            self._handles[loc] = handle
        return handle.get_tensor(key)

    def has_image(self, uid: str) -> bool:
        return uid in self

    def latents(self, uid: str, flipped: bool = False) -> torch.Tensor:
        return self.get(uid + FLIP if flipped else uid)

    def time_ids(self, uid: str) -> torch.Tensor:
        return self.get(uid + TIME_IDS)

    def text(self, caption: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = caption_key(caption)
        pooled = self.get(key + POOLED) if key + POOLED in self else None
        return self.get(key), pooled
