"""Loads the compiled op library once. Importing it registers the `ppd::*` ops with the dispatcher.

`HAS_EXT` is False when the extension was not built (e.g. a pure-Python checkout); the op wrappers
then fall back to the PyTorch references in `ppd_engine.ops.reference`, so the engine still runs.
"""
import torch

try:
    from ppd_engine import _C  # noqa: F401  (import for its side effect: op registration)

    HAS_EXT = True
    LOAD_ERROR = None
except ImportError as exc:  # not built, or built against another torch
    HAS_EXT = False
    LOAD_ERROR = exc


def has_kernel(op_name: str, device_type: str) -> bool:
    """Whether `ppd::<op_name>` has a kernel registered for this device type ("cpu" / "cuda")."""
    if not HAS_EXT:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"ppd::{op_name}", key)
