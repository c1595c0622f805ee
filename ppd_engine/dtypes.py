"""The one dtype table: every config key and CLI flag that names a dtype reads it through here.

Canonical spellings are fp32 | bf16 | fp16; torch's names (float32, bfloat16, float16, half) are
accepted as aliases so configs written by earlier versions and habits from other tools keep working.
"""
from __future__ import annotations

import torch

CANONICAL = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}


def canonical_dtype(name: str) -> str:
    """'bfloat16' -> 'bf16'; raises ValueError naming the allowed spellings."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in CANONICAL:
        raise ValueError(f"{name!r} is not a dtype; choose one of: {' | '.join(CANONICAL)} "
                         f"(aliases: {', '.join(ALIASES)})")
    return key


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16."""
    if isinstance(name, torch.dtype):
        return name
    return CANONICAL[canonical_dtype(name)]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bf16'."""
    for k, v in CANONICAL.items():
        if v == dtype:
            return k
    raise ValueError(f"{dtype} has no entry in the dtype table ({', '.join(CANONICAL)})")
