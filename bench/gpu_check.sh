#!/usr/bin/env bash
# One-command GPU check: bash bench/gpu_check.sh OUTDIR
#
# Sized for ONE device command of at most 9 minutes on an H200 (the device tool allows 10 and
# brings back at most 8 files from one output folder). Every step has its own timeout, the
# timeouts sum to under 540 s (tests/test_gpu_check.py adds them up from the `run_step` lines
# below), and a step never runs past the script's overall budget (GPU_CHECK_BUDGET, default 530 s).
#
#   env        GPU, driver, torch/CUDA versions, which optional packages import
#   build      python setup.py build_ext --inplace against the machine's torch (stops the check on failure)
#   kernels    every ppd:: op registered in the library has a CUDA kernel, and one launches
#   tests      pytest -m cuda on the kernel test files only (KERNEL_TESTS: they import torch,
#              pytest and ppd_engine's op wrappers, nothing the GPU image lacks)
#   correct    bench/gpu_correctness.py: SD1.5/SDXL shapes vs float64, "<= 2x PyTorch's own error",
#              text gradients off and on
#   memcheck   compute-sanitizer --tool memcheck on tiny shapes of every kernel
#   bench_loss, bench_attn   loss and dual-attention benchmarks (JSON rows)
#   bench_step the SD1.5 train step, only when diffusers and bitsandbytes import
# then a summary table and one final line `VERDICT: PASS|FAIL|SKIP ...`; exit 0 for PASS and SKIP,
# 1 for FAIL. Without a GPU (this CPU workplace) it exits 0 at once with "VERDICT: SKIP (no GPU ...)".
#
# Files written into OUTDIR, and no others (the test counts them): gpu_check.log (every step's
# output), summary.md (rewritten after every step, so even a SIGKILL leaves the latest state; a
# TERM/INT trap finishes it), correctness_cuda.jsonl, dpo_loss_cuda.jsonl, dual_attention_cuda.jsonl,
# train_step_cuda_sd15.jsonl (bench_train_step's own name). The build folder and the extension stay in the checkout, not in OUTDIR.
#
# The GPU image (the device tool's KINDS.md, DESIGN.md): Python 3.12, torch 2.11 + CUDA 13, nvcc
# 13.0, ninja, compute-sanitizer, pytest, tqdm, numpy, safetensors, transformers; no diffusers and
# no bitsandbytes, so the train-step benchmark is skipped unless they are carried as wheels:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1 importlib_metadata==10.2.0 bitsandbytes==0.50.2
# (the versions this workplace's venv runs; .whl/ is git-ignored, so the device call names it in
# `carry`, and the working tree with it must stay under the tool's 64 MiB), then start the command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site && bash bench/gpu_check.sh "$OUT/gpu"
# The env step prints which optional packages import. Without pytest the tests step fails and says
# so; without tqdm a no-op stand-in is put on PYTHONPATH for the benchmarks.
# compute-sanitizer was seen refusing the device on gVisor machines ("Device not supported");
# the memcheck step then reads SKIP, not FAIL, and the verdict names it.
#
# GPU_CHECK_DEVICE=cpu rehearses every step on the CPU (the same build, CPU kernel launches, tiny
# shapes, quick benchmarks, no sanitizer) to check the script itself where no GPU is lent.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then echo "usage: bash bench/gpu_check.sh OUTDIR" >&2; exit 2; fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
PY=${PYTHON:-python3}
DEV=${GPU_CHECK_DEVICE:-cuda}
BUDGET=${GPU_CHECK_BUDGET:-530}
KERNEL_TESTS="tests/test_dpo_loss.py tests/test_dual_attention.py"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.md"
export PYTHONUNBUFFERED=1 PPD_BENCH_OUT="$OUT" PYTHONDONTWRITEBYTECODE=1
START=$(date +%s)
: > "$LOG"
STEPS=() STATUS=() SECS=() NOTES=()
FINISHED=0 GPU_NAME="" CHILD="" CURRENT=""

log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

write_summary() {  # $1: final verdict line (empty while steps are still running)
  {
    echo "# GPU check — ${GPU_NAME:-no GPU} — $(date -u +%Y-%m-%dT%H:%MZ) — commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo
    echo "| step | status | seconds | note |"
    echo "|---|---|---|---|"
    local i
    for i in "${!STEPS[@]}"; do echo "| ${STEPS[$i]} | ${STATUS[$i]} | ${SECS[$i]} | ${NOTES[$i]} |"; done
    echo
    if [ -n "${BENCH_TABLES:-}" ]; then echo "$BENCH_TABLES"; echo; fi
    echo "${1:-VERDICT: (still running: the check was stopped before its end if this line remains)}"
  } > "$SUMMARY.tmp" && mv -f "$SUMMARY.tmp" "$SUMMARY"
}

finish() {  # $1: verdict line, $2: exit code
  [ "$FINISHED" = 1 ] && return
  FINISHED=1
  write_summary "$1"
  cat "$SUMMARY"
  echo "$1" >> "$LOG"
  exit "$2"
}

on_signal() {
  [ -n "${CHILD:-}" ] && kill -TERM "$CHILD" 2>/dev/null
  STEPS+=("${CURRENT:-(between steps)}") STATUS+=("KILLED") SECS+=("-") NOTES+=("SIG$1 at +$(( $(date +%s) - START ))s; later steps did not run")
  finish "VERDICT: FAIL (stopped by SIG$1 after $(( $(date +%s) - START )) s)" 1
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal HUP' HUP

# run_step NAME TIMEOUT_S COMMAND...: runs COMMAND under its own timeout (cut to the budget left),
# appends its output to the log, records PASS / FAIL / TIMEOUT; returns the command's status.
run_step() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ( $(date +%s) - START ) ))
  if [ "$left" -lt 5 ]; then
    STEPS+=("$name") STATUS+=("SKIP") SECS+=("0") NOTES+=("no budget left")
    write_summary; return 99
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "step $name (timeout ${limit}s): $*"
  local t0=$(date +%s) rc
  # In the background + wait: bash runs a trap only after a foreground child ends, but interrupts
  # `wait` at once, so a TERM to this script is handled now (and passed on to the step).
  timeout -k 5 "$limit" "$@" >> "$LOG" 2>&1 &
  CHILD=$! CURRENT=$name
  wait "$CHILD"
  rc=$?
  CHILD="" CURRENT=""
  local st=PASS note=""
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then st=TIMEOUT note="killed after ${limit}s"
  elif [ $rc -ne 0 ]; then st=FAIL note="exit $rc"; fi
  STEPS+=("$name") STATUS+=("$st") SECS+=("$(( $(date +%s) - t0 ))") NOTES+=("${STEP_NOTE:-$note}")
  STEP_NOTE=""
  log "step $name: $st${note:+ ($note)}"
  write_summary
  return $rc
}

skip_step() { STEPS+=("$1") STATUS+=("SKIP") SECS+=("0") NOTES+=("$2"); log "step $1: SKIP ($2)"; write_summary; }

# ---- is there a GPU? -----------------------------------------------------------------------------
if [ "$DEV" = cuda ]; then
  why=""
  if ! command -v nvidia-smi >/dev/null 2>&1; then why="nvidia-smi not found"; fi
  if [ -z "$why" ] && ! $PY -c "import torch" >/dev/null 2>&1; then why="$PY cannot import torch"; fi
  if [ -z "$why" ] && ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    why="torch.cuda.is_available() is False"
  fi
  if [ -n "$why" ]; then
    log "no GPU: $why"
    finish "VERDICT: SKIP (no GPU: $why; nothing was built, tested or measured)" 0
  fi
  GPU_NAME=$($PY -c "import torch; print(torch.cuda.get_device_name(0))" 2>/dev/null)
else
  GPU_NAME="CPU rehearsal"
fi

# ---- env -----------------------------------------------------------------------------------------
ENV_PY='
import importlib.util, platform, shutil, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "cc", f"{p.major}.{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 2**30, 1), "GiB")
for n in ("pytest", "tqdm", "numpy", "diffusers", "transformers", "bitsandbytes", "safetensors", "ninja"):
    print("package", n, "present" if importlib.util.find_spec(n) else "MISSING")
print("tools", {t: bool(shutil.which(t)) for t in ("nvcc", "ninja", "compute-sanitizer", "nvidia-smi")})
'
run_step env 15 bash -c "nvidia-smi 2>/dev/null | head -15; $PY -c '$ENV_PY'"
has() { $PY -c "import importlib.util, sys; sys.exit(0 if all(importlib.util.find_spec(n) for n in sys.argv[1:]) else 1)" "$@"; }
if ! has tqdm; then  # the benchmarks show progress bars; a stand-in keeps them running without the wheel
  mkdir -p /tmp/ppd_gpu_check_shims
  printf 'def tqdm(it=None, *a, **k):\n    return it\n' > /tmp/ppd_gpu_check_shims/tqdm.py
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/tmp/ppd_gpu_check_shims"
  log "tqdm missing: a no-op stand-in is on PYTHONPATH"
fi

# ---- build (stops the check on failure) ----------------------------------------------------------
# The same command in the CPU rehearsal: where torch is a CUDA build and nvcc is found, the CUDA
# kernels compile (for TORCH_CUDA_ARCH_LIST's default archs) and their registration is checked below.
if ! run_step build 90 env "MAX_JOBS=$(nproc)" $PY setup.py build_ext --inplace; then
  tail -30 "$LOG"
  finish "VERDICT: FAIL (the extension did not build; see gpu_check.log)" 1
fi

# ---- every ppd:: op has a kernel on this device, and one launches ----------------------------------
KERNELS_PY="
import sys, torch
from ppd_engine import _ext
if not _ext.HAS_EXT:
    sys.exit(f'extension does not load: {_ext.LOAD_ERROR}')
ops = sorted(n.split('::', 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith('ppd::'))
# Registration needs no GPU: the rehearsal checks the CUDA kernels too when they were built.
devices = ['$DEV'] + (['cuda'] if '$DEV' == 'cpu' and torch.version.cuda else [])
print('ppd ops:', ', '.join(ops))
for dev in devices:
    missing = [op for op in ops if not _ext.has_kernel(op, dev)]
    if not ops or missing:
        sys.exit(f'no {dev} kernel for: {missing or \"(no ppd ops registered)\"}')
    print('all', len(ops), 'ppd ops have a', dev, 'kernel')
x = torch.randn(4, 33, device='$DEV')
m, _ = torch.ops.ppd.paired_mse(x, None, torch.zeros_like(x))
assert (m.double() - x.double().square().mean(1)).abs().max().item() < 1e-5
print('paired_mse launched on $DEV and matched')
"
if ! run_step kernels 20 $PY -c "$KERNELS_PY"; then
  finish "VERDICT: FAIL (a ppd:: op has no $DEV kernel, or the library does not load: see gpu_check.log)" 1
fi

# ---- kernel tests ----------------------------------------------------------------------------------
if has pytest; then
  MARK=cuda; [ "$DEV" = cpu ] && MARK="not slow"
  run_step tests 90 $PY -m pytest -q -p no:cacheprovider -rfE -m "$MARK" $KERNEL_TESTS
  TEST_LINE=$(grep -E '(passed|failed|skipped|error).* in [0-9.]+s' "$LOG" | tail -1 | tr -d '=|')
  NOTES[${#NOTES[@]}-1]="${NOTES[${#NOTES[@]}-1]} ${TEST_LINE}"
  write_summary
else
  STEPS+=(tests) STATUS+=(FAIL) SECS+=(0) NOTES+=("pytest does not import: carry pytest, pluggy, iniconfig wheels (see the header)")
  write_summary
fi

# ---- correctness at the real shapes, then memcheck on tiny ones ------------------------------------
if [ "$DEV" = cpu ]; then
  run_step correct 60 $PY -m bench.gpu_correctness --device cpu --tiny --out correctness_cuda.jsonl
else
  run_step correct 75 $PY -m bench.gpu_correctness --device cuda --out correctness_cuda.jsonl
fi
# GPU_CHECK_SANITIZER names another sanitizer command (the rehearsal runs memcheck only when it is set).
SANITIZER=${GPU_CHECK_SANITIZER:-}
if [ -z "$SANITIZER" ] && [ "$DEV" = cuda ]; then
  SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
fi
if [ -z "$SANITIZER" ]; then
  if [ "$DEV" = cpu ]; then skip_step memcheck "CPU rehearsal"
  else STEPS+=(memcheck) STATUS+=(FAIL) SECS+=(0) NOTES+=("compute-sanitizer not found"); write_summary; fi
else
  logpos=$(stat -c %s "$LOG")
  # No caching allocator: out-of-bounds accesses inside one of its pooled blocks are invisible to memcheck.
  run_step memcheck 70 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 3 \
    --print-limit 20 $PY -m bench.gpu_correctness --device "$DEV" --tiny
  last=$(( ${#STATUS[@]} - 1 ))
  if [ "${STATUS[$last]}" != PASS ] && tail -c +$(( logpos + 1 )) "$LOG" | grep -q "Device not supported"; then
    STATUS[$last]=SKIP NOTES[$last]="compute-sanitizer refused the device (as seen on gVisor machines): memory errors not checked"
    log "step memcheck: SKIP (compute-sanitizer: Device not supported)"
    write_summary
  fi
fi

# ---- benchmarks ------------------------------------------------------------------------------------
QUICK=(); [ "$DEV" = cpu ] && QUICK=(--quick --sizes tiny sd15_256px)  # the rehearsal: small sizes only
# --no-compile: the eager_compiled rows (one Inductor/Triton compile per case) would spend most of
# this step's 40 s; the fused-vs-eager comparison is what the check measures.
run_step bench_loss 40 $PY -m bench.bench_dpo_loss --device "$DEV" --no-compile "${QUICK[@]}" --out dpo_loss_cuda.jsonl
ATTN_RUNS=(--runs 20); [ "$DEV" = cpu ] && ATTN_RUNS=(--quick --layers sd15_down1)
run_step bench_attn 40 $PY -m bench.bench_dual_attention --device "$DEV" "${ATTN_RUNS[@]}" --out dual_attention_cuda.jsonl
if has diffusers bitsandbytes; then
  ARCH=sd15; [ "$DEV" = cpu ] && ARCH=small
  run_step bench_step 70 $PY -m bench.bench_train_step --device "$DEV" --arch "$ARCH" --pairs 4 --runs 5 --no-vae \
    --variants sequential:sdpa,sequential:fused
else
  skip_step bench_step "diffusers/bitsandbytes do not import: carry their wheels to measure the train step"
fi
# ---- summary ---------------------------------------------------------------------------------------
run_step summary 15 $PY -m bench.run_suite --summarize "$OUT"
BENCH_TABLES=$(timeout 15 $PY -m bench.run_suite --summarize "$OUT" 2>/dev/null)
failed=() skipped=()
for i in "${!STEPS[@]}"; do
  case "${STATUS[$i]}" in FAIL|TIMEOUT|KILLED) failed+=("${STEPS[$i]}");; SKIP) skipped+=("${STEPS[$i]}");; esac
done
skipnote=""; [ ${#skipped[@]} -gt 0 ] && skipnote="; skipped: ${skipped[*]}"
total=$(( $(date +%s) - START ))
if [ "$DEV" = cpu ]; then
  label="rehearsal on the CPU, no GPU measured"
  [ ${#failed[@]} -eq 0 ] && finish "VERDICT: SKIP ($label: every step ran; ${total} s$skipnote)" 0
  finish "VERDICT: FAIL ($label: failed: ${failed[*]}; ${total} s)" 1
fi
[ ${#failed[@]} -eq 0 ] && finish "VERDICT: PASS ($GPU_NAME: ${#STEPS[@]} steps, ${total} s$skipnote)" 0
finish "VERDICT: FAIL ($GPU_NAME: failed: ${failed[*]}; ${total} s$skipnote)" 1
