"""Build the latent + text cache once: every image through the VAE once, every caption through the
text encoder(s) once, into sharded safetensors files (layout in `ppd_engine.cache.store`).

Random flip: a VAE latent of a flipped image is not the flipped latent, so with `flip=True` (the
default, Diffusion-DPO's recipe) each image is also encoded flipped and stored as "<uid>#flip";
the dataset then picks the plain or flipped pair per sample. That doubles the image part of the
cache; `flip=False` stores only the plain latents and the dataset never flips.

The fingerprint covers the model (family, source, VAE config, latent scale), the resolution,
the preprocessing, the flip flag and the storage dtype: if any differs from the cache on disk, the
cache is rebuilt (`on_mismatch="rebuild"`) or a CacheMismatchError names what changed
(`on_mismatch="raise"`). With a matching fingerprint, only images and captions not yet in the cache
are encoded, so an interrupted build resumes and a grown dataset extends the cache.

Build on one process (rank 0) and let the others wait at a barrier: shards are not written under
a lock.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from ppd_engine.cli.common import cli_errors
from ppd_engine.dtypes import canonical_dtype, torch_dtype
from ppd_engine.cache.store import (FLIP, FORMAT, INDEX, POOLED, TIME_IDS, CacheMismatchError, caption_key,
                                    fingerprint, read_index, shard_keys, write_index, write_shard)
from ppd_engine.data.images import PREPROCESSING, center_crop
from ppd_engine.models import make_time_ids

log = logging.getLogger(__name__)


@dataclass
class CacheReport:
    """What one `build_cache` call did."""

    cache_dir: str
    fingerprint: str
    rebuilt: bool = False
    images_encoded: int = 0
    images_reused: int = 0
    images_failed: list[str] = field(default_factory=list)
    texts_encoded: int = 0
    texts_reused: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        return (f"cache {self.cache_dir}: {self.images_encoded} images encoded, {self.images_reused} reused, "
                f"{len(self.images_failed)} failed to decode; {self.texts_encoded} captions encoded, "
                f"{self.texts_reused} reused{' (rebuilt: fingerprint changed)' if self.rebuilt else ''}; "
                f"{self.seconds:.1f} s")


def cache_meta(model, resolution: int, flip: bool, dtype: str) -> dict:
    """Everything the cached tensors depend on; its hash is the cache fingerprint."""
    vae_config = {k: v for k, v in dict(model.vae.config).items() if not k.startswith("_")} if model.vae is not None else None
    return {"format": FORMAT, "family": model.family, "source": model.source, "resolution": int(resolution),
            "latent_scale": float(model.latent_scale), "latent_shift": float(getattr(model, "latent_shift", 0.0)),
            "vae_config": vae_config, "preprocessing": PREPROCESSING, "flip": bool(flip), "dtype": dtype}


class _ShardWriter:
    """Buffers tensors and writes a new shard whenever the buffer passes `shard_bytes`."""

    def __init__(self, cache_dir: str, index: dict, kind: str, prefix: str, fp: str, shard_bytes: int):
        self.cache_dir, self.index, self.kind, self.prefix = cache_dir, index, kind, prefix
        self.fp, self.shard_bytes = fp, shard_bytes
        self.buf: dict[str, torch.Tensor] = {}
        self.nbytes = 0

    def add(self, key: str, t: torch.Tensor) -> None:
        self.buf[key] = t
        self.nbytes += t.numel() * t.element_size()

    def maybe_flush(self) -> None:
        if self.nbytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        name = f"{self.prefix}-{len(self.index[self.kind]):05d}.safetensors"
        write_shard(os.path.join(self.cache_dir, name), self.buf, self.fp)
        # Index after shard: a kill between the two leaves an unlisted shard that the next build overwrites.
        self.index[self.kind].append(name)
        write_index(self.cache_dir, self.index)
        self.buf, self.nbytes = {}, 0


def _remove_cache_files(cache_dir: str) -> None:
    for pattern in ("latents-*.safetensors", "texts-*.safetensors", ".tmp-*", INDEX):
        for p in glob.glob(os.path.join(cache_dir, pattern)):
            os.unlink(p)


def _diff(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def build_cache(model, records, cache_dir: str, *, resolution: int | None = None, flip: bool = True,
                dtype: str = "fp16", batch_size: int = 8, shard_bytes: int = 256 << 20,
                on_mismatch: str = "rebuild", progress: bool = True) -> CacheReport:
    """Encode the images and captions of `records` (PairRecord-like) into `cache_dir`.

    model: a DiffusionModel (its VAE and text encoder(s) are used here and nowhere in training).
    resolution: image side fed to the VAE (default model.resolution); latents are (C, R/f, R/f).
    dtype: storage dtype, fp16 (default) | bf16 | fp32 (ppd_engine.dtypes; aliases such as "float16"
    accepted); the dataset returns float32.
    on_mismatch: "rebuild" or "raise" when the cache on disk has another fingerprint.
    Images that fail to decode are skipped, logged, listed in the report and in the index
    ("failed_images"); PairCacheDataset leaves out pairs that use them.
    """
    from tqdm.auto import tqdm

    if on_mismatch not in ("rebuild", "raise"):
        raise ValueError(f"on_mismatch must be 'rebuild' or 'raise'; got {on_mismatch!r}")
    dtype = canonical_dtype(dtype)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    t0 = time.perf_counter()
    resolution = int(resolution or model.resolution)
    store_dtype = torch_dtype(dtype)
    os.makedirs(cache_dir, exist_ok=True)
    meta = cache_meta(model, resolution, flip, dtype)
    fp = fingerprint(meta)
    report = CacheReport(cache_dir=cache_dir, fingerprint=fp)

    index = read_index(cache_dir)
    if index is not None and index.get("fingerprint") != fp:
        changed = _diff(index.get("meta", {}), meta)
        msg = (f"latent cache {cache_dir!r} was built with different settings "
               f"(changed: {', '.join(changed) or 'format'})")
        if on_mismatch == "raise":
            raise CacheMismatchError(msg + "; delete it or build with on_mismatch='rebuild'")
        log.warning("%s; rebuilding", msg)
        _remove_cache_files(cache_dir)
        report.rebuilt, index = True, None
    if index is None:
        index = {"format": FORMAT, "fingerprint": fp, "meta": meta, "latent_shards": [], "text_shards": [],
                 "failed_images": []}
        write_index(cache_dir, index)
    present = set()
    for kind in ("latent_shards", "text_shards"):
        for name in index[kind]:
            present.update(shard_keys(os.path.join(cache_dir, name)))
    failed_before = set(index["failed_images"])

    # Unique images and captions in record order (deterministic shard contents).
    images: dict[str, object] = {}
    captions: dict[str, str] = {}
    for r in records:
        images.setdefault(r.uid_w, r.image_w)
        images.setdefault(r.uid_l, r.image_l)
        captions.setdefault(caption_key(r.caption), r.caption)
    todo_images = [u for u in images if u not in present and u not in failed_before]
    todo_texts = [k for k in captions if k not in present]
    report.images_reused = len(images) - len(todo_images) - len(failed_before & set(images))
    report.texts_reused = len(captions) - len(todo_texts)
    report.images_failed = sorted(failed_before & set(images))

    writer = _ShardWriter(cache_dir, index, "latent_shards", "latents", fp, shard_bytes)
    with tqdm(total=len(todo_images), desc="Caching latents", unit="img", disable=not progress) as bar:
        for s in range(0, len(todo_images), batch_size):
            uids, pixels, time_ids = [], [], []
            for uid in todo_images[s:s + batch_size]:
                try:
                    px, orig, crop = center_crop(images[uid], resolution)
                # Untrusted image bytes: a decoder failure skips the image, never the build.
                except Exception as e:  # noqa: BLE001
                    if len(report.images_failed) < 5:
                        log.warning("cache: skipping image %s that does not decode: %s", uid, e)
                    report.images_failed.append(uid)
                    index["failed_images"].append(uid)
                    continue
                uids.append(uid)
                pixels.append(px)
                time_ids.append(make_time_ids(orig, crop, (resolution, resolution)))
            if uids:
                batch = torch.stack(pixels)
                if flip:
                    batch = torch.cat([batch, batch.flip(-1)])
                lat = model.encode_images(batch).to("cpu", store_dtype)
                for i, uid in enumerate(uids):
                    writer.add(uid, lat[i].clone())
                    if flip:
                        writer.add(uid + FLIP, lat[len(uids) + i].clone())
                    # One time_ids per image: a center crop's offset in the mirrored image differs by at
                    # most the one pixel that rounding put on the other side.
                    writer.add(uid + TIME_IDS, time_ids[i])
                writer.maybe_flush()
            report.images_encoded += len(uids)
            bar.update(len(todo_images[s:s + batch_size]))
    writer.flush()
    if report.images_failed:
        write_index(cache_dir, index)

    writer = _ShardWriter(cache_dir, index, "text_shards", "texts", fp, shard_bytes)
    with tqdm(total=len(todo_texts), desc="Caching text", unit="caption", disable=not progress) as bar:
        for s in range(0, len(todo_texts), batch_size):
            keys = todo_texts[s:s + batch_size]
            cond = model.encode_text([captions[k] for k in keys])
            states = cond.states.to("cpu", store_dtype)
            pooled = cond.pooled.to("cpu", store_dtype) if cond.pooled is not None else None
            for i, k in enumerate(keys):
                writer.add(k, states[i].clone())
                if pooled is not None:
                    writer.add(k + POOLED, pooled[i].clone())
            writer.maybe_flush()
            report.texts_encoded += len(keys)
            bar.update(len(keys))
    writer.flush()
    report.seconds = time.perf_counter() - t0
    log.info("%s", report.summary())
    return report


@cli_errors
def main(argv: list[str] | None = None) -> int:
    """`python -m ppd_engine.cache.build`: build the cache for a Pick-a-Pic folder ahead of training."""
    from ppd_engine.cli.common import DefaultsFormatter, add_debug, add_device, add_dtype, add_progress, resolve_device
    from ppd_engine.data.pickapic import format_stats, load_pairs
    from ppd_engine.models import load_diffusion_model

    p = argparse.ArgumentParser(prog="python -m ppd_engine.cache.build",
                                description="Encode Pick-a-Pic images (VAE) and captions (text encoders) once "
                                            "into a sharded safetensors cache used by training.",
                                formatter_class=DefaultsFormatter)
    p.add_argument("--family", required=True, choices=["sd15", "sdxl"], help="model family")
    p.add_argument("--pretrained", required=True, help="diffusers hub id or local pipeline folder")
    p.add_argument("--data", required=True, help="folder of Pick-a-Pic v2 parquet files")
    p.add_argument("--split", default=None, help="only files named SPLIT-*.parquet (default: all)")
    p.add_argument("--cache-dir", required=True, help="output folder of the cache")
    p.add_argument("--min-pairs-per-user", type=int, default=4, help="drop users with fewer pairs (default 4)")
    p.add_argument("--max-users", type=int, default=None, help="keep only the users with most pairs")
    p.add_argument("--resolution", type=int, default=None, help="image side (default: the model's)")
    p.add_argument("--no-flip", action="store_true", help="do not cache horizontally flipped latents")
    add_dtype(p, "fp16", "storage dtype of the cached latents and text states")
    add_dtype(p, "fp32", "dtype the encoders run in", flag="--model-dtype")
    add_device(p, "device of the encoders")
    add_progress(p)
    add_debug(p)
    p.add_argument("--batch-size", type=int, default=16, help="images / captions per encoder call")
    p.add_argument("--shard-mb", type=int, default=256, help="approximate shard size in MiB")
    p.add_argument("--no-rebuild", action="store_true", help="fail instead of rebuilding a cache built with other settings")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    pairs = load_pairs(args.data, min_pairs_per_user=args.min_pairs_per_user, max_users=args.max_users,
                       decode_images=False, split=args.split, progress=args.progress)
    print(format_stats(pairs.stats))
    model = load_diffusion_model(args.family, args.pretrained, dtype=torch_dtype(args.model_dtype),
                                 device=resolve_device(args.device))
    report = build_cache(model, pairs.records, args.cache_dir, resolution=args.resolution, flip=not args.no_flip,
                         dtype=args.dtype, batch_size=args.batch_size, shard_bytes=args.shard_mb << 20,
                         on_mismatch="raise" if args.no_rebuild else "rebuild", progress=args.progress)
    print(report.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
