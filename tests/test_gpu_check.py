"""bench/gpu_check.sh, read and dry-run where no GPU is lent.

The GPU check runs as one device command: at most 10 minutes (the script budgets 9), at most 8
files brought back from one output folder. These tests read the script for both limits, run it here
(no GPU: it must exit 0 with a "no GPU" verdict), and check that the kernel test files it runs
import nothing the GPU image lacks."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")
TEXT = open(SCRIPT).read()
CODE = "\n".join(line for line in TEXT.splitlines() if not line.lstrip().startswith("#"))

# Importable on this machine; diffusers and bitsandbytes are absent on the GPU image (the device
# tool's KINDS.md lists the image's packages), the others are blocked too because the kernel tests
# and the correctness script should need nothing but torch and pytest.
ABSENT_ON_GPU_IMAGE = ("diffusers", "transformers", "bitsandbytes", "accelerate", "safetensors", "tqdm", "yaml",
                       "pyarrow", "PIL", "numpy", "tokenizers", "open_clip", "tensorboard")


def step_timeouts():
    """{step: largest timeout} over the `run_step NAME SECONDS` lines (a step with a CPU-rehearsal
    and a CUDA variant counts once, at its larger limit)."""
    steps = {}
    for name, limit in re.findall(r"^\s*(?:if ! )?run_step (\w+) (\d+) ", CODE, flags=re.M):
        steps[name] = max(steps.get(name, 0), int(limit))
    return steps


def test_step_timeouts_fit_one_device_command():
    steps = step_timeouts()
    assert {"build", "kernels", "tests", "correct", "memcheck", "bench_loss", "bench_attn", "bench_step"} <= set(steps)
    assert sum(steps.values()) < 540, steps  # 9 minutes of the device tool's 600 s per command
    budget = int(re.search(r"^BUDGET=\$\{GPU_CHECK_BUDGET:-(\d+)\}", CODE, flags=re.M).group(1))
    assert budget < 540


def output_files():
    names = set(re.findall(r'"\$OUT/([^"/$]+)"', CODE))
    names |= set(re.findall(r"--out ([\w.\-]+)", CODE))
    # bench_train_step names its own rows file: train_step_<device>_<arch>.jsonl.
    if "bench.bench_train_step" in CODE:
        names.add("train_step_cuda_sd15.jsonl")
    return names


def test_writes_at_most_eight_files_and_no_subfolders():
    names = output_files()
    assert {"gpu_check.log", "summary.md", "correctness_cuda.jsonl"} <= names
    assert len(names) <= 8, sorted(names)
    assert not any("/" in n for n in names)
    # Nothing else is pointed into OUTDIR: no mkdir below it, no other redirections into it.
    assert not re.search(r'mkdir[^\n]*\$OUT/', CODE)
    assert "PPD_BENCH_OUT=\"$OUT\"" in CODE  # benchmark rows land in OUTDIR itself


def run_dry(tmp_path, extra_path=None):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    # This machine has no nvidia-smi; keep a stray one off PATH all the same.
    env["PATH"] = os.pathsep.join(([str(extra_path)] if extra_path else []) +
                                  [p for p in env["PATH"].split(os.pathsep) if not os.path.exists(os.path.join(p, "nvidia-smi"))])
    proc = subprocess.run(["bash", SCRIPT, str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return proc, out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is visible: this is the no-GPU path")
def test_dry_run_without_gpu_exits_zero_with_no_gpu_verdict(tmp_path):
    proc, out = run_dry(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("VERDICT: SKIP (no GPU"), last
    files = sorted(os.listdir(out))
    assert files == ["gpu_check.log", "summary.md"]
    assert open(out / "summary.md").read().strip().splitlines()[-1] == last


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is visible: this is the no-GPU path")
def test_dry_run_with_nvidia_smi_but_no_cuda_torch_still_skips(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho fake\n")
    (fake / "nvidia-smi").chmod(0o755)
    proc, _ = run_dry(tmp_path, extra_path=fake)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "VERDICT: SKIP (no GPU: torch.cuda.is_available() is False" in proc.stdout.strip().splitlines()[-1]


BLOCKER = """
import sys, importlib.abc
ABSENT = set(sys.argv[1].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"{name} is absent on the GPU image (blocked by tests/test_gpu_check.py)")
sys.meta_path.insert(0, Block())
sys.argv = sys.argv[:1] + sys.argv[2:]
"""


def test_kernel_tests_and_correctness_script_import_nothing_absent_on_the_gpu_image():
    files = re.search(r'^KERNEL_TESTS="([^"]+)"', CODE, flags=re.M).group(1).split()
    assert files and all(os.path.exists(os.path.join(ROOT, f)) for f in files)
    code = BLOCKER + "import pytest\nsys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', *sys.argv[1:]]))"
    proc = subprocess.run([sys.executable, "-c", code, ",".join(ABSENT_ON_GPU_IMAGE), *files], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"\d+ tests? collected", proc.stdout), proc.stdout[-2000:]
    for module in ("bench.gpu_correctness", "bench.run_suite", "bench.bench_dual_attention"):
        code = BLOCKER + f"import {module}"
        blocked = ABSENT_ON_GPU_IMAGE
        proc = subprocess.run([sys.executable, "-c", code, ",".join(blocked)], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, f"{module}: {proc.stderr[-2000:]}"


def test_correctness_script_passes_on_cpu_tiny(tmp_path):
    """The same script the GPU check runs at SD1.5/SDXL shapes, at tiny shapes on the CPU kernels."""
    from ppd_engine import _ext

    if not _ext.has_kernel("dual_cross_attention", "cpu"):
        pytest.skip("extension not built")
    from bench import gpu_correctness

    assert gpu_correctness.main(["--device", "cpu", "--tiny", "--out", str(tmp_path / "rows.jsonl")]) == 0
    rows = (tmp_path / "rows.jsonl").read_text().splitlines()
    assert len(rows) > 20 and all('"ok": true' in r for r in rows)
