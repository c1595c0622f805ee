"""The record written beside every shipped toy asset: how it was made, on what, and its sha256.

Shared by the base (pretrain.py) and the few-shot feature extractor (features.py), both remade by a
command that refuses to replace an existing file unless told to: a bare command must not silently
swap an asset every recorded number was measured on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from ppd_engine.files import write_json_atomic


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def refuse_overwrite(out: str | os.PathLike, overwrite: bool) -> None:
    """FileExistsError (before any training) if `out` exists and `overwrite` is not set."""
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it or --out to write elsewhere")


class Clock:
    """Wall and CPU time of a making run, and how busy the (shared) machine was when it started."""

    def __init__(self):
        self.wall0, self.cpu0, self.load0 = time.time(), time.process_time(), os.getloadavg()[0]

    def info(self) -> dict:
        return {"wall_s": round(time.time() - self.wall0, 1), "cpu_s": round(time.process_time() - self.cpu0, 1),
                "threads": torch.get_num_threads(), "load_avg_at_start": round(self.load0, 2)}


def write_record(out: str | os.PathLike, made_by: str, info: dict) -> dict:
    """Write <out>.json: `info` + the command, versions and the file's sha256; returns the record."""
    rec = {"made_by": made_by, "argv": sys.argv[1:], **info,
           "torch": torch.__version__, "python": platform.python_version(),
           "sha256": sha256_of(out), "file": Path(out).name}
    write_json_atomic(Path(str(out) + ".json"), rec, indent=2)
    return rec


def read_metadata(path: Path, fmt: str, what: str, remake: str) -> dict:
    """The safetensors metadata of asset `path`, checked to be of format `fmt`; errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found at {path} (create it with `{remake}`)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != fmt:
        raise ValueError(f"{path} is not a {what} (metadata format {meta.get('format')!r}, expected {fmt!r})")
    return meta


def make_from_cli(parser: argparse.ArgumentParser, make: Callable[[], dict], out: str) -> None:
    """Run a making command: a refused overwrite is a usage error (exit 2); print the record."""
    from ppd_engine.cli.common import setup_logging

    setup_logging()
    try:
        rec = make()
    except FileExistsError as e:
        parser.error(str(e))
    print(json.dumps(rec, indent=2))
    print(f"wrote {out}")
