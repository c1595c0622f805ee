"""Training dataset over the latent + text cache: no VAE, no text encoder, only memory-mapped reads."""

from __future__ import annotations

import hashlib
import logging
from typing import NamedTuple

from torch.utils.data import Dataset

from ppd_engine.cache.store import CacheReader, caption_key

log = logging.getLogger(__name__)


class _Pair(NamedTuple):
    caption: str
    uid_w: str
    uid_l: str
    user_id: str
    pair_id: str


class PairCacheDataset(Dataset):
    """Preference pairs served from a cache built by `build_cache`.

    Items (float32 tensors; shapes for a cache at resolution R and VAE downscale f):
      "latents_w", "latents_l": (C, R/f, R/f) model-space clean latents, preferred image first
      "text": (T, D) caption hidden states
      "pooled": (D2,)                                        SDXL and Stable Cascade caches
      "time_ids_w", "time_ids_l": (6,)                       SDXL caches only
      "user_id": str, "pair_id": str
    Random flip: when the cache holds flipped latents and `flip` is True, the winner and the loser
    are flipped together with probability 1/2, decided by hash(seed, epoch, pair_id), so the
    sequence is reproducible across restarts and DataLoader workers; `set_epoch` changes it.
    Pairs whose images or caption are missing from the cache (e.g. corrupt JPEGs skipped at build)
    are left out and counted in `self.missing`.
    verify: hash every shard against the index here, before training (see CacheReader).
    """

    def __init__(self, cache_dir: str, records, flip: bool = True, seed: int = 0, verify: bool = True):
        self.reader = CacheReader(cache_dir, verify=verify)
        self.family = self.reader.meta["family"]
        self.flip = bool(flip and self.reader.meta.get("flip", False))
        self.seed = seed
        self.epoch = 0
        records = list(records)
        found = self.reader.contains([k for r in records for k in (r.uid_w, r.uid_l, caption_key(r.caption))])
        ok = found.reshape(-1, 3).all(1) if len(records) else found
        # Only ids are kept, so the caller can free the records' images once the cache is built.
        self.pairs = [_Pair(r.caption, r.uid_w, r.uid_l, r.user_id, r.pair_id) for r, keep in zip(records, ok) if keep]
        self.missing = len(records) - len(self.pairs)
        if self.missing:
            log.warning("PairCacheDataset: %d of %d pairs are not in the cache %s (images that failed to "
                        "decode, or records added after the build) and are left out",
                        self.missing, len(records), cache_dir)

    def fingerprint(self) -> str:
        """What the items of every epoch depend on: the cache's fingerprint, the flip rule and the pairs
        in order (the cached reference pass keys on it instead of reading every latent)."""
        h = hashlib.sha256(f"{self.reader.fingerprint}:{self.flip}:{self.seed}".encode())
        for p in self.pairs:
            h.update("\x1f".join(p).encode() + b"\x1e")
        return h.hexdigest()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.pairs)

    def _flipped(self, pair_id: str) -> bool:
        if not self.flip:
            return False
        digest = hashlib.sha256(f"{self.seed}:{self.epoch}:{pair_id}".encode()).digest()
        return bool(digest[0] & 1)

    def __getitem__(self, i: int) -> dict:
        r = self.pairs[i]
        flipped = self._flipped(r.pair_id)
        text, pooled = self.reader.text(r.caption)
        item = {
            "latents_w": self.reader.latents(r.uid_w, flipped).float(),
            "latents_l": self.reader.latents(r.uid_l, flipped).float(),
            "text": text.float(),
            "user_id": r.user_id,
            "pair_id": r.pair_id,
        }
        if pooled is not None:  # SDXL's text_embeds, Stable Cascade's clip_text_pooled
            item["pooled"] = pooled.float()
        if self.family == "sdxl":
            item["time_ids_w"] = self.reader.time_ids(r.uid_w).float()
            item["time_ids_l"] = self.reader.time_ids(r.uid_l).float()
        return item
