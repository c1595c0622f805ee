"""Builds ppd_engine._C: the C++ CPU kernels always, the CUDA kernels when torch is a CUDA build
and nvcc is found (PPD_SKIP_CUDA=1 turns them off for fast local iteration).

Environment knobs: PPD_SKIP_CUDA=1, DEBUG=1 (debug info, no -O3), MAX_JOBS (ninja parallelism),
TORCH_CUDA_ARCH_LIST (defaults to the visible GPU's capability, or "8.0;9.0" when none is visible,
with "+PTX" on the newest entry so a newer GPU JIT-compiles the embedded PTX instead of failing with
"no kernel image is available"; an explicit TORCH_CUDA_ARCH_LIST is used as given), CUDA_HOME.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _has_cuda_headers(root):
    return bool(root) and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))


def find_cuda_home():
    """The real toolkit folder. torch guesses dirname(dirname(which nvcc)), which is wrong when the
    nvcc on PATH is a wrapper script (e.g. /usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _has_cuda_headers(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        guess = os.path.dirname(os.path.dirname(real))
        if _has_cuda_headers(guess):
            return guess
        # A shell wrapper: read the path it execs.
        try:
            with open(real, "r", errors="ignore") as f:
                for tok in f.read().split():
                    if tok.endswith("/bin/nvcc") and os.path.isfile(tok):
                        cand = os.path.dirname(os.path.dirname(tok))
                        if _has_cuda_headers(cand):
                            return cand
        except OSError:
            pass
    for cand in sorted(glob.glob("/usr/local/cuda*"), reverse=True):
        if _has_cuda_headers(cand) and os.path.isfile(os.path.join(cand, "bin", "nvcc")):
            return cand
    return None


def nvidia_wheel_includes():
    """Include folders of the nvidia-* wheels torch depends on: cuBLAS/cuSPARSE headers live there
    when the toolkit on disk has only the runtime's."""
    dirs = []
    for sp in sys.path:
        root = os.path.join(sp, "nvidia")
        if os.path.isdir(root):
            dirs += sorted(d for d in glob.glob(os.path.join(root, "*", "include")) if os.path.isdir(d))
    return list(dict.fromkeys(dirs))


skip_cuda = os.environ.get("PPD_SKIP_CUDA", "0") == "1"
cuda_home = None if skip_cuda else find_cuda_home()
if cuda_home:
    # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import time.
    os.environ["CUDA_HOME"] = cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

debug = os.environ.get("DEBUG", "0") == "1"
use_cuda = (not skip_cuda) and torch.version.cuda is not None and cuda_home is not None

if use_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}+PTX"
    else:
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"

cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))) if use_cuda else []

# Python's own CFLAGS carry -g; -g0 (last wins) keeps release builds free of debug info.
opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
# py_limited_api=True makes torch define Py_LIMITED_API itself.
cxx_flags = opt + ["-fopenmp", "-std=c++20"]
nvcc_flags = (["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]) + [
    "-std=c++20",
    "--use_fast_math",
    "--expt-relaxed-constexpr",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
]
define_macros = [("PPD_WITH_CUDA", "1")] if use_cuda else []
ext_kwargs = dict(
    name="ppd_engine._C",
    sources=cpp_sources + cuda_sources,
    include_dirs=[os.path.join(HERE, "csrc")] + (nvidia_wheel_includes() if use_cuda else []),
    extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags} if use_cuda else {"cxx": cxx_flags},
    extra_link_args=["-fopenmp"],
    define_macros=define_macros,
    py_limited_api=True,
)
ext = CUDAExtension(**ext_kwargs) if use_cuda else CppExtension(**ext_kwargs)

kernels = [os.path.basename(s) for s in cpp_sources + cuda_sources]
print(
    f"[ppd_engine] building _C with {'CPU + CUDA' if use_cuda else 'CPU only'} kernels: {', '.join(kernels)}"
    + (f" (CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})" if use_cuda else "")
    + ("" if use_cuda else f" (reason: {'PPD_SKIP_CUDA=1' if skip_cuda else 'torch is CPU-only' if torch.version.cuda is None else 'nvcc not found'})"),
    flush=True,
)

# The Makefile installs the Python package with PPD_NO_EXT=1 and then builds the extension in place
# (`setup.py build_ext --inplace`), so ninja can rebuild incrementally from a persistent build/.
setup(
    ext_modules=[] if os.environ.get("PPD_NO_EXT") == "1" else [ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
