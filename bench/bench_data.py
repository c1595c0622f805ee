"""Data-path throughput on the Pick-a-Pic fixture: the cache build and the training input pipeline,
DataLoader workers 0 vs N, interleaved in one run; plus the measured per-pair sizes the README's
full-scale memory figures are computed from.

  python -m bench.bench_data [--users 60] [--workers 2] [--reps 3]

Rows (bench/results/<device>/data_cpu.jsonl):
  cache_build   pairs/s of build_cache (read + decode + crop with workers, VAE + text encode) into a fresh folder
  input_read    pairs/s of StepLoader over the memory-mapped cache alone
  input_overlap pairs/s of StepLoader with a simulated 20 ms step after each read (what workers hide)
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import tracemalloc

import torch

from bench.common import Timing, markdown_table, row, write_rows


def _timing(samples_s: list[float]) -> Timing:
    ms = sorted(s * 1e3 for s in samples_s)
    q = statistics.quantiles(ms, n=5) if len(ms) > 1 else [ms[0]] * 4
    return Timing(statistics.median(ms), q[0], q[-1], 0.0, len(ms))


def traced_index(folder: str):
    """(pairs, bytes the pair index holds): traced over a second load, so the modules and caches
    the first load brings in are not counted as index memory."""
    from ppd_engine.data.pickapic import load_pairs

    load_pairs(folder, load_images=False, progress=False)
    tracemalloc.start()
    pairs = load_pairs(folder, load_images=False, progress=False)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return pairs, held


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=60, help="extra fixture users (8 pairs each)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20, help="steps read per input-pipeline measurement")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from ppd_engine.cache import PairCacheDataset, build_cache
    from ppd_engine.data.pickapic import load_pairs
    from ppd_engine.models import load_diffusion_model
    from ppd_engine.testing.pickapic_fixture import write_pickapic_fixture
    from ppd_engine.testing.tiny_pipelines import make_tiny_pipeline
    from ppd_engine.training.data_order import DataOrder, rank_slots
    from ppd_engine.training.input import StepLoader

    root = tempfile.mkdtemp(prefix="bench_data_")
    write_pickapic_fixture(os.path.join(root, "data"), seed=0, extra_users=args.users, pairs_per_extra_user=8)
    model = load_diffusion_model("sd15", make_tiny_pipeline("sd15", os.path.join(root, "sd15"), seed=0))
    pairs, index_bytes = traced_index(os.path.join(root, "data"))
    n_pairs = len(pairs.records)
    shape = f"pairs={n_pairs},res={model.resolution}"
    rows = []

    build = {0: [], args.workers: []}
    for rep in range(args.reps):
        for w in build:   # interleaved: the shared machine's load hits both variants alike
            cache = os.path.join(root, f"cache-{w}-{rep}")
            t0 = time.perf_counter()
            build_cache(model, pairs.records, cache, batch_size=16, progress=False, images=pairs.image_reader(),
                        num_workers=w)
            build[w].append(time.perf_counter() - t0)
    for w, s in build.items():
        t = _timing(s)
        rows.append(row("cache_build", f"workers={w}", shape, "fp16", "cpu", t,
                        pairs_per_s=round(n_pairs / (t.median_ms / 1e3), 1)))

    cache = os.path.join(root, "cache-0-0")
    ds = PairCacheDataset(cache, pairs.records)
    order = DataOrder(len(ds), 8, seed=0)
    slots = rank_slots(8, 4, 0, 1)
    steps = min(args.steps, order.steps_per_epoch * 4)
    for name, work_s in (("input_read", 0.0), ("input_overlap", 0.02)):
        samples = {0: [], args.workers: []}
        for _ in range(args.reps):
            for w in samples:
                loader = StepLoader(ds, order, slots, steps, torch.device("cpu"), workers=w, prefetch=2)
                loader.batches(0)   # worker start-up is paid once per run, not per step
                t0 = time.perf_counter()
                for s in range(1, steps):
                    loader.batches(s)
                    if work_s:
                        time.sleep(work_s)
                samples[w].append(time.perf_counter() - t0)
                loader.close()
        for w, s in samples.items():
            t = _timing(s)
            rows.append(row(name, f"workers={w}", shape + f",steps={steps - 1},pairs_per_step=8", "fp32", "cpu", t,
                            pairs_per_s=round(8 * (steps - 1) / (t.median_ms / 1e3), 1)))

    item = ds[0]
    sizes = {"index_bytes_per_pair": round(index_bytes / n_pairs, 1),
             "latent_bytes_per_image": item["latents_w"].numel() * 2,
             "text_bytes_per_caption": item["text"].numel() * 2,
             "latent_shape": list(item["latents_w"].shape), "text_shape": list(item["text"].shape)}
    for r in rows:
        r.extra.update(sizes)
    path = write_rows(rows, "data_cpu.jsonl", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu"))
    print(markdown_table(rows, "workers=0", extra_cols=("pairs_per_s",)))
    print("measured sizes:", sizes)
    print(f"rows -> {path}")


if __name__ == "__main__":
    main()
