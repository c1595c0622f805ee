#!/usr/bin/env bash
# One-script GPU check: bench/gpu_check.sh [OUTDIR]
#
# On a machine with an NVIDIA GPU and PyTorch already installed (no network needed) it
#   1. builds the extension for the local GPU (pip install --no-build-isolation -e ., all cores),
#   2. runs the CUDA-marked tests,
#   3. runs the benchmark suite at GPU sizes,
# and writes logs, JSON rows and summary.md to OUTDIR (default bench/results/gpu-<date>/), printing the
# summary table last. Every GPU number in this repository comes from a file this script wrote; the
# GPU's name is in env.txt and in every JSON row. Budget: under 8 minutes on an H100.
#
# Without a GPU it says so and exits 0 after skipping the GPU parts. Python packages the GPU image
# lacks (diffusers, bitsandbytes on this workplace's image) can be carried as wheels: see the note
# printed when one is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/results/gpu-$(date -u +%Y%m%d-%H%M)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
start=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - start ))s] $*"; }

if ! command -v nvidia-smi >/dev/null 2>&1 || ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  msg="No NVIDIA GPU visible (nvidia-smi missing or torch.cuda.is_available() is False): skipped the CUDA build, the CUDA tests and the GPU benchmarks. Nothing was measured."
  echo "$msg" | tee "$OUT/summary.md"
  exit 0
fi

{ nvidia-smi; $PY -c "import torch; p = torch.cuda.get_device_properties(0); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('gpu', p.name, p.multi_processor_count, 'SMs', round(p.total_memory / 2**30, 1), 'GiB')"; } > "$OUT/env.txt" 2>&1
stamp "GPU: $(grep '^gpu' "$OUT/env.txt")"

missing=$($PY - <<'PYEOF'
import importlib.util
need = ["diffusers", "transformers", "safetensors", "bitsandbytes", "pytest", "yaml", "tqdm", "pyarrow"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PYEOF
)
if [ -n "$missing" ]; then
  stamp "missing Python packages: $missing — carry them as wheels (see the device tool's README); the parts that need them will fail and say so"
fi

stamp "building the extension for the local GPU"
MAX_JOBS=$(nproc) timeout 300 $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
build_rc=$?
grep -h "\[ppd_engine\] building" "$OUT/build.log" | tail -1
$PY -c "import ppd_engine._ext as e; print('cuda kernels:', {op: e.has_kernel(op, 'cuda') for op in ('dpo_loss', 'paired_mse', 'dual_cross_attention')})" 2>&1 | tee -a "$OUT/build.log"

stamp "CUDA tests"
timeout 240 $PY -m pytest -m cuda -q -p no:cacheprovider tests > "$OUT/cuda_tests.log" 2>&1
tests_rc=$?
tail -3 "$OUT/cuda_tests.log"

stamp "benchmarks"
timeout 420 $PY -m bench.run_suite --device cuda --out "$OUT" > "$OUT/suite.log" 2>&1
suite_rc=$?

{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%MZ) — $(grep '^gpu' "$OUT/env.txt")"
  echo
  echo "- build: rc=$build_rc; CUDA tests: rc=$tests_rc ($(tail -1 "$OUT/cuda_tests.log")); suite: rc=$suite_rc; total $(( $(date +%s) - start )) s"
  [ -n "$missing" ] && echo "- missing packages: $missing"
  echo
  [ -f "$OUT/summary.md" ] && cat "$OUT/summary.md"
} > "$OUT/gpu_summary.md"
cat "$OUT/gpu_summary.md"
