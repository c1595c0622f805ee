"""Build the latent + text cache once: every image through the VAE once, every caption through the
text encoder(s) once, into sharded safetensors files (layout in `ppd_engine.cache.store`).

Random flip: a VAE latent of a flipped image is not the flipped latent, so with `flip=True` (the
default, Diffusion-DPO's recipe) each image is also encoded flipped and stored as "<uid>#flip";
the dataset then picks the plain or flipped pair per sample. That doubles the image part of the
cache; `flip=False` stores only the plain latents and the dataset never flips.

The fingerprint covers the model (family, source, VAE config, latent scale, and a sha256 of the
VAE's and text encoders' tensors), the resolution,
the preprocessing, the flip flag and the storage dtype: if any differs from the cache on disk, the
cache is rebuilt (`on_mismatch="rebuild"`) or a CacheMismatchError names what changed
(`on_mismatch="raise"`). With a matching fingerprint, only images and captions not yet in the cache
are encoded, so an interrupted build resumes and a grown dataset extends the cache.

Distributed: every rank of a torchrun job builds a disjoint slice of what is missing, reading and
decoding with DataLoader workers and encoding in `batch_size` VAE batches, into shards of its own
(`latents-r<rank>-NNNNN.safetensors`) listed in its own part of the index (`index-rank<r>.json`);
rank 0 merges the parts into index.json at the end (and at the start of the next build, should a
build have been killed). Temp files a killed build left behind are removed on start.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import inspect
import logging
import os
import time
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ppd_engine.cli.common import cli_errors
from ppd_engine.dtypes import canonical_dtype, torch_dtype
from ppd_engine.cache.store import (FLIP, FORMAT, INDEX, PART_GLOB, POOLED, TIME_IDS, CacheMismatchError, caption_key,
                                    fingerprint, merge_parts, read_index, shard_keys, write_index, write_part,
                                    write_shard)
from ppd_engine.files import TEMP_PREFIX
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


def _closure_modules(fn, _seen: set | None = None) -> list[torch.nn.Module]:
    """nn.Modules held by a closure's free variables (directly, in a list/tuple, or in the closure of
    a function it wraps, e.g. a counting or caching wrapper around encode_text)."""
    seen = set() if _seen is None else _seen
    if id(fn) in seen or not inspect.isfunction(fn):
        return []
    seen.add(id(fn))
    found = []
    for v in inspect.getclosurevars(fn).nonlocals.values():
        for m in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(m, torch.nn.Module):
                found.append(m)
            elif inspect.isfunction(m):
                found += _closure_modules(m, seen)
    return found


def weights_digest(modules: list[torch.nn.Module]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every tensor of `modules` (weights and buffers)."""
    h = hashlib.sha256()
    for i, m in enumerate(modules):
        for name, t in m.state_dict().items():
            t = t.detach().to("cpu").contiguous()
            h.update(f"{i}.{name}:{t.dtype}:{tuple(t.shape)};".encode())
            # view as bytes: numpy has no bfloat16, so hash the raw storage rather than the values.
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_meta(model, resolution: int, flip: bool, dtype: str) -> dict:
    """Everything the cached tensors depend on; its hash is the cache fingerprint.

    The weights count, not only where they came from: a VAE or text encoder replaced at the same
    path must not reuse latents of the old one. The text encoders are reached through the
    `encode_text` closure that holds them (DiffusionModel keeps no other handle on them)."""
    vae_config = {k: v for k, v in dict(model.vae.config).items() if not k.startswith("_")} if model.vae is not None else None
    return {"format": FORMAT, "family": model.family, "source": model.source, "resolution": int(resolution),
            "latent_scale": float(model.latent_scale), "latent_shift": float(getattr(model, "latent_shift", 0.0)),
            "vae_config": vae_config, "preprocessing": PREPROCESSING, "flip": bool(flip), "dtype": dtype,
            "vae_weights": weights_digest([model.vae]) if model.vae is not None else None,
            "text_weights": weights_digest(_closure_modules(model.encode_text))}


class _ShardWriter:
    """Buffers tensors and writes a new shard whenever the buffer passes `shard_bytes`; lists each
    shard in this rank's part of the index (`index-rank<r>.json`) right after writing it."""

    def __init__(self, cache_dir: str, part: dict, kind: str, prefix: str, fp: str, shard_bytes: int, rank: int,
                 taken: set[str]):
        self.cache_dir, self.part, self.kind, self.fp = cache_dir, part, kind, fp
        self.shard_bytes, self.rank, self.prefix, self.taken = shard_bytes, rank, prefix, taken
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
        n = 0
        while (name := f"{self.prefix}-r{self.rank:03d}-{n:05d}.safetensors") in self.taken:
            n += 1
        self.taken.add(name)
        digest = write_shard(os.path.join(self.cache_dir, name), self.buf, self.fp)
        # Part after shard: a kill between the two leaves an unlisted shard that a later build overwrites.
        self.part[self.kind].append(name)
        self.part["sha256"][name] = digest
        write_part(self.cache_dir, self.rank, self.part)
        self.buf, self.nbytes = {}, 0


def _remove_cache_files(cache_dir: str) -> None:
    for pattern in ("latents-*.safetensors", "texts-*.safetensors", ".tmp-*", INDEX, PART_GLOB):
        for p in glob.glob(os.path.join(cache_dir, pattern)):
            os.unlink(p)


def _remove_orphans(cache_dir: str) -> int:
    """Temp files of writes a killed build never finished (files.atomic_path names them .tmp-*)."""
    orphans = glob.glob(os.path.join(cache_dir, TEMP_PREFIX + "*"))
    for p in orphans:
        os.unlink(p)
    if orphans:
        log.info("cache %s: removed %d temp file(s) left by an interrupted build", cache_dir, len(orphans))
    return len(orphans)


def _diff(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


class _DecodeCrop(IterableDataset):
    """Decoded, center-cropped pixels of the images to encode, read unit by unit (a parquet row group,
    or a run of in-memory images); DataLoader workers take every num_workers-th unit.

    Yields (uid, pixels (3, R, R) or None when the bytes do not decode, time_ids (6,) or None, error)."""

    def __init__(self, units: list, reader, resolution: int):
        self.units, self.reader, self.resolution = units, reader, resolution

    def __iter__(self):
        info = get_worker_info()
        units = self.units if info is None else self.units[info.id::info.num_workers]
        for unit in units:
            for uid, data in self._images(unit):
                try:
                    px, orig, crop = center_crop(data, self.resolution)
                # Untrusted image bytes: a decoder failure skips the image, never the build.
                except Exception as e:  # noqa: BLE001
                    yield uid, None, None, str(e)
                    continue
                yield uid, px, make_time_ids(orig, crop, (self.resolution, self.resolution)), None

    def _images(self, unit):
        kind, payload = unit
        if kind == "inline":
            yield from payload
            return
        si, g, recs, wanted = payload
        for rec, b_w, b_l in self.reader.read_unit(si, g, recs):
            for uid, data in ((rec.uid_w, b_w), (rec.uid_l, b_l)):
                if uid in wanted:
                    yield uid, data


def _image_units(records, todo: list[str], reader, inline_chunk: int = 64) -> list:
    """Units of reading for the uids in `todo`: parquet row groups for records that hold only a
    location, chunks of in-memory images for records that carry them."""
    first: dict[str, object] = {}
    for r in records:
        first.setdefault(r.uid_w, r)
        first.setdefault(r.uid_l, r)
    inline, located = [], {}
    for uid in todo:
        r = first[uid]
        data = r.image_w if uid == r.uid_w else r.image_l
        if data is not None:
            inline.append((uid, data))
        else:
            located.setdefault(id(r), (r, set()))[1].add(uid)
    units = [("inline", inline[i:i + inline_chunk]) for i in range(0, len(inline), inline_chunk)]
    if located:
        if reader is None:
            raise ValueError("records hold no image bytes (load_images=False): pass images=pairs.image_reader()")
        wanted_of = {id(r): w for r, w in located.values()}
        for si, g, recs in reader.row_groups([r for r, _ in located.values()]):
            wanted = set().union(*(wanted_of[id(r)] for r in recs))
            units.append(("parquet", (si, g, recs, wanted)))
    return units


def _slice(items: list, rank: int, world: int) -> list:
    per = -(-len(items) // world) if items else 0
    return items[rank * per:(rank + 1) * per]


def build_cache(model, records, cache_dir: str, *, resolution: int | None = None, flip: bool = True,
                dtype: str = "fp16", batch_size: int = 8, shard_bytes: int = 256 << 20,
                on_mismatch: str = "rebuild", progress: bool = True, images=None, num_workers: int = 0,
                rank: int = 0, world_size: int = 1, barrier=None) -> CacheReport:
    """Encode the images and captions of `records` (PairRecord-like) into `cache_dir`.

    model: a DiffusionModel (its VAE and text encoder(s) are used here and nowhere in training).
    resolution: image side fed to the VAE (default model.resolution); latents are (C, R/f, R/f).
    dtype: storage dtype, fp16 (default) | bf16 | fp32 (ppd_engine.dtypes; aliases such as "float16"
    accepted); the dataset returns float32.
    on_mismatch: "rebuild" or "raise" when the cache on disk has another fingerprint.
    images: a PairImageReader (PickAPicPairs.image_reader()) for records that hold only where their
    bytes are; records that carry bytes or PIL images use those.
    num_workers: DataLoader worker processes that read, decode and crop (0 = in this process).
    rank, world_size, barrier: every rank of a torchrun job calls build_cache with the same records;
    each encodes a disjoint slice of what is missing into its own shards, and rank 0 merges the
    index. `barrier()` (needed when world_size > 1) synchronises the ranks.
    Images that fail to decode are skipped, logged, listed in the report and in the index
    ("failed_images"); PairCacheDataset leaves out pairs that use them.
    """
    from tqdm.auto import tqdm

    if on_mismatch not in ("rebuild", "raise"):
        raise ValueError(f"on_mismatch must be 'rebuild' or 'raise'; got {on_mismatch!r}")
    dtype = canonical_dtype(dtype)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if world_size > 1 and barrier is None:
        raise ValueError("build_cache with world_size > 1 needs barrier=")
    sync = barrier or (lambda: None)
    t0 = time.perf_counter()
    resolution = int(resolution or model.resolution)
    store_dtype = torch_dtype(dtype)
    os.makedirs(cache_dir, exist_ok=True)
    meta = cache_meta(model, resolution, flip, dtype)
    fp = fingerprint(meta)
    report = CacheReport(cache_dir=cache_dir, fingerprint=fp)

    error = None
    if rank == 0:
        # Only rank 0 touches the shared index; the others wait for it below. An error is raised
        # after the barrier, so the other ranks are not left waiting for rank 0.
        try:
            report.rebuilt = _prepare(cache_dir, meta, fp, on_mismatch)
        except CacheMismatchError as e:
            error = e
    sync()
    if error is not None:
        raise error
    index = read_index(cache_dir)
    if index.get("fingerprint") != fp:
        raise CacheMismatchError(f"latent cache {cache_dir!r} was built with different settings; rebuild it")
    taken = set(index["latent_shards"]) | set(index["text_shards"])
    present = set()
    for name in taken:
        present.update(shard_keys(os.path.join(cache_dir, name)))
    failed_before = set(index["failed_images"])

    # Unique images and captions in record order (deterministic slices per rank).
    uids: dict[str, None] = {}
    captions: dict[str, str] = {}
    for r in records:
        uids.setdefault(r.uid_w)
        uids.setdefault(r.uid_l)
        captions.setdefault(caption_key(r.caption), r.caption)
    todo_all = [u for u in uids if u not in present and u not in failed_before]
    texts_all = [k for k in captions if k not in present]
    report.images_reused = len(uids) - len(todo_all) - len(failed_before & set(uids))
    report.texts_reused = len(captions) - len(texts_all)
    report.images_failed = sorted(failed_before & set(uids))
    todo_images, todo_texts = _slice(todo_all, rank, world_size), _slice(texts_all, rank, world_size)

    part = {"fingerprint": fp, "latent_shards": [], "text_shards": [], "failed_images": [], "sha256": {}}
    writer = _ShardWriter(cache_dir, part, "latent_shards", "latents", fp, shard_bytes, rank, taken)
    sdxl = model.family == "sdxl"
    source = _DecodeCrop(_image_units(records, todo_images, images), images, resolution)
    loader = DataLoader(source, batch_size=None, num_workers=num_workers,
                        persistent_workers=False, prefetch_factor=4 if num_workers else None)
    failed_logged = 0

    def encode(batch_uids, pixels, time_ids):
        batch = torch.stack(pixels)
        if flip:
            batch = torch.cat([batch, batch.flip(-1)])
        lat = model.encode_images(batch).to("cpu", store_dtype)
        for i, uid in enumerate(batch_uids):
            writer.add(uid, lat[i].clone())
            if flip:
                writer.add(uid + FLIP, lat[len(batch_uids) + i].clone())
            if sdxl:
                # One time_ids per image: a center crop's offset in the mirrored image differs by at
                # most the one pixel that rounding put on the other side.
                writer.add(uid + TIME_IDS, time_ids[i])
        writer.maybe_flush()
        report.images_encoded += len(batch_uids)

    desc = "Caching latents" + (f" (rank {rank}/{world_size})" if world_size > 1 else "")
    with tqdm(total=len(todo_images), desc=desc, unit="img", disable=not progress) as bar:
        b_uids, b_px, b_ids = [], [], []
        for uid, px, tids, err in loader:
            bar.update(1)
            if px is None:
                if failed_logged < 5:
                    log.warning("cache: skipping image %s that does not decode: %s", uid, err)
                    failed_logged += 1
                report.images_failed.append(uid)
                part["failed_images"].append(uid)
                continue
            b_uids.append(uid)
            b_px.append(px)
            b_ids.append(tids)
            if len(b_uids) == batch_size:
                encode(b_uids, b_px, b_ids)
                b_uids, b_px, b_ids = [], [], []
        if b_uids:
            encode(b_uids, b_px, b_ids)
    writer.flush()

    writer = _ShardWriter(cache_dir, part, "text_shards", "texts", fp, shard_bytes, rank, taken)
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
    write_part(cache_dir, rank, part)
    sync()
    if rank == 0:
        merge_parts(cache_dir)
    sync()
    report.seconds = time.perf_counter() - t0
    log.info("%s", report.summary())
    return report


def _prepare(cache_dir: str, meta: dict, fp: str, on_mismatch: str) -> bool:
    """Rank 0 before any rank builds: drop orphans, fold parts of an interrupted build into the
    index, rebuild on a fingerprint change. Returns whether the cache was rebuilt."""
    _remove_orphans(cache_dir)
    index = read_index(cache_dir)
    rebuilt = False
    if index is not None and index.get("fingerprint") != fp:
        changed = _diff(index.get("meta", {}), meta)
        msg = (f"latent cache {cache_dir!r} was built with different settings "
               f"(changed: {', '.join(changed) or 'format'})")
        if on_mismatch == "raise":
            raise CacheMismatchError(msg + "; delete it or build with on_mismatch='rebuild'")
        log.warning("%s; rebuilding", msg)
        _remove_cache_files(cache_dir)
        rebuilt, index = True, None
    if index is None:
        write_index(cache_dir, {"format": FORMAT, "fingerprint": fp, "meta": meta, "latent_shards": [],
                                "text_shards": [], "failed_images": [], "sha256": {}})
    merge_parts(cache_dir)
    return rebuilt


@cli_errors
def main(argv: list[str] | None = None) -> int:
    """`python -m ppd_engine.cache.build`: build the cache for a Pick-a-Pic folder ahead of training
    (under torchrun every rank encodes its own slice; see build_cache)."""
    from ppd_engine.cli.common import (DefaultsFormatter, UsageError, add_data, add_debug, add_device, add_dtype,
                                       add_progress, data_columns, resolve_device)
    from ppd_engine.data.pickapic import format_stats, load_pairs
    from ppd_engine.models import load_diffusion_model
    from ppd_engine.training.distributed import init_distributed, key_barrier

    p = argparse.ArgumentParser(prog="python -m ppd_engine.cache.build",
                                description="Encode Pick-a-Pic images (VAE) and captions (text encoders) once "
                                            "into a sharded safetensors cache used by training.",
                                formatter_class=DefaultsFormatter)
    p.add_argument("--family", required=True, choices=["sd15", "sdxl", "cascade"],
                   help="model family (cascade: Stable Cascade Stage C, encoded by the EfficientNet of --effnet)")
    p.add_argument("--pretrained", required=True,
                   help="diffusers hub id or local pipeline folder (cascade: the StableCascadePriorPipeline)")
    p.add_argument("--prior", default="prior", help="cascade: subfolder of --pretrained holding the prior whose "
                                                    "text encoder is used: prior | prior_lite")
    p.add_argument("--effnet", default="", help="cascade: Stable Cascade's effnet_encoder.safetensors (required "
                                                "for --family cascade)")
    add_data(p, "the pairs to cache", "train", "the split whose pairs are cached")
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
    p.add_argument("--workers", type=int, default=4, help="DataLoader processes that read, decode and crop images")
    p.add_argument("--shard-mb", type=int, default=256, help="approximate shard size in MiB")
    p.add_argument("--no-rebuild", action="store_true", help="fail instead of rebuilding a cache built with other settings")
    args = p.parse_args(argv)

    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    if args.family == "cascade" and not args.effnet:
        raise UsageError("--family cascade needs --effnet (effnet_encoder.safetensors): Stage C latents are "
                         "EfficientNet features")
    # The index only: each rank reads the bytes of its own slice, row group by row group.
    pairs = load_pairs(args.data, min_pairs_per_user=args.min_pairs_per_user, max_users=args.max_users,
                       split=args.split, streaming=args.streaming,
                       columns=data_columns(args), load_images=False, progress=args.progress)
    env = init_distributed(resolve_device(args.device), "auto")
    if env.is_main:
        print(format_stats(pairs.stats))
    if args.family == "cascade":
        from ppd_engine.cascade import DEFAULT_RESOLUTION, load_cascade_model

        # The same loader the trainer's cascade family uses, so the cache's fingerprint matches.
        model = load_cascade_model(args.pretrained, prior=args.prior, effnet=args.effnet,
                                   dtype=torch_dtype(args.model_dtype), device=env.device,
                                   resolution=args.resolution or DEFAULT_RESOLUTION)
    else:
        model = load_diffusion_model(args.family, args.pretrained, dtype=torch_dtype(args.model_dtype),
                                     device=env.device)
    report = build_cache(model, pairs.records, args.cache_dir, resolution=args.resolution, flip=not args.no_flip,
                         dtype=args.dtype, batch_size=args.batch_size, shard_bytes=args.shard_mb << 20,
                         on_mismatch="raise" if args.no_rebuild else "rebuild", progress=args.progress,
                         images=pairs.image_reader(), num_workers=args.workers, rank=env.rank,
                         world_size=env.world_size, barrier=key_barrier(env, "cache"))
    print(report.summary())
    if env.initialized_here:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
