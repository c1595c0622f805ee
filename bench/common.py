"""Shared benchmark harness: timing with medians and percentiles, peak memory, JSON rows, tables.

Every benchmark compares a provider ("ppd" / the engine) against the baseline a user would write
instead, measured in the same process, and writes one JSON row per (provider, shape, dtype).
"""
from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(RESULTS_DIR), stderr=subprocess.DEVNULL
        ).decode().strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_mem_mb: float
    runs: int


def measure(fn: Callable[[], object], device: torch.device | str, warmup: int = 3, runs: int = 20,
            min_time_s: float = 0.0) -> Timing:
    """Median/p20/p80 wall time of `fn()` and its peak memory above the pre-call baseline.

    CUDA: CUDA-event timing and torch.cuda.max_memory_allocated. CPU: perf_counter timing, and the
    peak of torch's CPU allocations during one extra call, read from the memory profiler."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    gc.collect()
    times = []
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        start_t = time.perf_counter()
        while len(times) < runs or time.perf_counter() - start_t < min_time_s:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize(device)
            times.append(a.elapsed_time(b))
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak = cpu_peak_mb(fn)
        start_t = time.perf_counter()
        while len(times) < runs or time.perf_counter() - start_t < min_time_s:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return Timing(statistics.median(times), q[1], q[7], peak, len(times))


def measure_interleaved(fns: dict[str, Callable[[], object]], device: torch.device | str, warmup: int = 2,
                        runs: int = 5) -> dict[str, Timing]:
    """`measure` for several providers in one round-robin loop: run r times every provider once, so
    a neighbour's load on a shared machine falls on all providers alike rather than on one. Peak
    memory is read per provider, in one extra call each, as in `measure`."""
    device = torch.device(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    gc.collect()
    peaks = {}
    for name, fn in fns.items():
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            fn()
            torch.cuda.synchronize(device)
            peaks[name] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        else:
            peaks[name] = cpu_peak_mb(fn)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=10) if len(ts) >= 2 else [ts[0]] * 9
        out[name] = Timing(statistics.median(ts), q[1], q[7], peaks[name], len(ts))
    return out


def cpu_peak_mb(fn: Callable[[], object]) -> float:
    """Peak bytes allocated by torch on the CPU during one call of `fn`, via the memory profiler
    (profile_memory=True records every CPU allocation and free with its size)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak / 2**20


@dataclass
class Row:
    name: str
    provider: str
    shape: str
    dtype: str
    device: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_mem_mb: float
    commit: str = field(default_factory=git_commit)
    extra: dict = field(default_factory=dict)


def row(name: str, provider: str, shape, dtype, device, t: Timing, **extra) -> Row:
    return Row(name, provider, str(shape), str(dtype).replace("torch.", ""), device_name(device),
               round(t.median_ms, 4), round(t.p20_ms, 4), round(t.p80_ms, 4), round(t.peak_mem_mb, 2),
               extra=extra)


def write_rows(rows: list[Row], filename: str, outdir: str | None = None) -> str:
    outdir = outdir or os.environ.get("PPD_BENCH_OUT", RESULTS_DIR)
    os.makedirs(outdir, exist_ok=True)
    path = os.path.join(outdir, filename)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(asdict(r)) + "\n")
    os.replace(tmp, path)
    return path


def markdown_table(rows: list[Row], baseline: str, extra_cols: tuple[str, ...] = ()) -> str:
    """One line per (name, shape, dtype, provider), with the speed-up and memory ratio against
    the baseline provider measured in the same run."""
    base = {(r.name, r.shape, r.dtype): r for r in rows if r.provider == baseline}
    head = ["name", "shape", "dtype", "provider", "median ms", "p20", "p80", "peak MB", "speed-up", "mem ratio"]
    head += list(extra_cols)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        b = base.get((r.name, r.shape, r.dtype))
        speed = f"{b.median_ms / r.median_ms:.2f}x" if b and r.median_ms > 0 else "-"
        mem = f"{r.peak_mem_mb / b.peak_mem_mb:.2f}" if b and b.peak_mem_mb > 0 else "-"
        cells = [r.name, r.shape, r.dtype, r.provider, f"{r.median_ms:.3f}", f"{r.p20_ms:.3f}",
                 f"{r.p80_ms:.3f}", f"{r.peak_mem_mb:.1f}", speed, mem]
        cells += [str(r.extra.get(c, "")) for c in extra_cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
