"""Runs the benchmark suite on one device and prints one summary table at the end.

    python -m bench.run_suite --device cpu            # what `make bench` runs (CPU sizes)
    python -m bench.run_suite --device cuda --out D   # every benchmark at GPU sizes (logs per benchmark)
    python -m bench.run_suite --summarize D           # only the tables of the JSON rows in D
                                                      # (bench/gpu_check.sh runs the benchmarks itself,
                                                      # under its own timeouts, and then this)

Each benchmark is its own process (a crash or a timeout in one does not lose the others) and writes
JSON rows into the output folder; the summary is rebuilt from those rows, so it shows exactly what
the files hold.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (module, extra args on CPU, extra args on CUDA, time limit in seconds)
SUITE = [
    ("bench.bench_dpo_loss", ["--quick"], [], 300),
    ("bench.bench_dual_attention", ["--quick"], [], 300),
    ("bench.bench_train_step", ["--arch", "small"], ["--arch", "sd15"], 600),
    ("bench.bench_embed", [], [], 300),
    ("bench.bench_data", [], [], 300),
]


def summarize(outdir: str) -> str:
    """Markdown summary of every JSON row under `outdir`, one table per benchmark file."""
    from bench.common import Row, markdown_table

    parts = []
    for path in sorted(glob.glob(os.path.join(outdir, "*.jsonl"))):
        rows, checks = [], []
        with open(path) as f:
            for line in f:
                if line.strip():
                    d = json.loads(line)
                    # bench/gpu_correctness.py's rows (check/ok) are not timing rows.
                    (checks if "check" in d and "ok" in d else rows).append(d)
        if checks:
            bad = [c for c in checks if not c["ok"]]
            parts.append(f"### {os.path.basename(path)}: {len(checks) - len(bad)}/{len(checks)} correctness "
                         "checks within bounds\n")
            parts += [f"- FAILED {c['check']} {c['case']} {c['dtype']} {c['tensor']}: err {c['err']:.3e} > "
                      f"bound {c['bound']:.3e} {c.get('note', '')}" for c in bad[:20]]
            parts.append("")
        rows = [Row(**d) for d in rows]
        if not rows:
            continue
        providers = [r.provider for r in rows]
        # The baseline is the provider that is not the engine's ("ppd"), first seen.
        baseline = next((p for p in providers if not p.startswith("ppd")), providers[0])
        parts.append(f"### {os.path.basename(path)} — {rows[0].device} (baseline: {baseline})\n")
        parts.append(markdown_table(rows, baseline))
        parts.append("")
    return "\n".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run the suite")
    ap.add_argument("--out", default=None, help="folder for JSON rows, logs and summary.md "
                    "(default: bench/results/<device>)")
    ap.add_argument("--summarize", metavar="DIR", default=None,
                    help="print the tables of the JSON rows already in DIR and exit (runs nothing)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these benchmark modules (e.g. bench_dpo_loss)")
    args = ap.parse_args(argv)
    if args.summarize:
        print(summarize(os.path.abspath(args.summarize)))
        return 0

    outdir = os.path.abspath(args.out or os.path.join(HERE, "results", args.device))
    os.makedirs(outdir, exist_ok=True)
    env = dict(os.environ, PPD_BENCH_OUT=outdir, PYTHONUNBUFFERED="1")
    status = []
    for module, cpu_args, cuda_args, limit in SUITE:
        name = module.split(".")[-1]
        if args.only and name not in args.only:
            continue
        if not os.path.exists(os.path.join(ROOT, *module.split(".")) + ".py"):
            status.append(f"- {name}: not present in this checkout, skipped")
            continue
        cmd = [sys.executable, "-m", module, "--device", args.device] + (cuda_args if args.device == "cuda" else cpu_args)
        print(f"\n=== {' '.join(cmd[2:])}", flush=True)
        t0 = time.time()
        with open(os.path.join(outdir, f"{name}.log"), "w") as log:
            try:
                proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, timeout=limit)
                out, rc = proc.stdout, proc.returncode
            except subprocess.TimeoutExpired as exc:
                out, rc = (exc.stdout or "") if isinstance(exc.stdout, str) else "", "timeout"
            log.write(out)
        print(out[-4000:], flush=True)
        status.append(f"- {name}: {'ok' if rc == 0 else f'FAILED ({rc})'} in {time.time() - t0:.0f} s")

    summary = "## Benchmark summary\n\n" + "\n".join(status) + "\n\n" + summarize(outdir)
    with open(os.path.join(outdir, "summary.md"), "w") as f:
        f.write(summary)
    print("\n" + summary)
    return 0 if all(": ok" in s or "skipped" in s for s in status) else 1


if __name__ == "__main__":
    sys.exit(main())
