"""Content hashes of what the engine writes, and the one error for a file that is not what was written.

    sha256_file(path)            the whole file (checkpoint files: recorded in state.json)
    tensors_sha256(tensors)      the tensors only (names, dtypes, shapes, bytes): a safetensors file
                                 records this in its own metadata, which is inside the file and so
                                 cannot hold a hash of the whole file
"""
from __future__ import annotations

import hashlib
import os

TENSORS_SHA256 = "ppd_tensors_sha256"  # safetensors metadata key


class CorruptFileError(ValueError):
    """A file that cannot be read back as written (truncated, flipped bytes, wrong format); the
    message names the file."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def tensors_sha256(tensors: dict) -> str:
    """sha256 over every tensor's name, dtype, shape and raw bytes, in name order."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        # A copy: .numpy() on the tensor itself would pin its storage (FSDP must free the unsharded
        # parameters it aliases after a checkpoint).
        h.update(t.reshape(-1).view(torch.uint8).clone().numpy())
    return h.hexdigest()
