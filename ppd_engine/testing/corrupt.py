"""Byte flips for integrity tests: corrupt a safetensors file inside its tensor data, where a header
check (parsing, shapes, dtypes) cannot notice and only a content hash can."""
from __future__ import annotations

import os
import struct


def flip_tensor_byte(path: str | os.PathLike, where: float = 0.5) -> int:
    """XOR one byte at fraction `where` of the tensor data (after the 8-byte length and the JSON
    header) of the safetensors file `path`; returns the byte's offset."""
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        start = 8 + struct.unpack("<Q", bytes(data[:8]))[0]
        if start >= len(data):
            raise ValueError(f"{path}: holds no tensor data to corrupt")
        i = start + min(len(data) - start - 1, int((len(data) - start) * where))
        f.seek(i)
        f.write(bytes([data[i] ^ 0x5A]))
    return i
