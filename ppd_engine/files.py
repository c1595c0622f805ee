"""Atomic file writes: every store, report, image and checkpoint file goes through here.

    with atomic_path("out/report.png") as tmp:      # a unique temp name in the same folder
        image.save(tmp, format="PNG")              # replaced into place on success, unlinked on failure

A reader (or a crash) sees the old file or the new one, never half of one. The temp name is unique
per call (mkstemp), so two processes writing the same file never share a temp file. Files written
inside a checkpoint folder that is itself renamed into place need none of this (see
training/checkpoint.py): they are plain writes into the temp folder.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

TEMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temp file path next to `path`; on success it replaces `path`, on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_json_atomic(path: str | os.PathLike, obj, indent: int = 1, sort_keys: bool = False) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def save_image_atomic(image, path: str | os.PathLike) -> None:
    """A PIL image, or a (3, H, W) float tensor in [0, 1], as a PNG at `path`."""
    if not hasattr(image, "save"):
        import numpy as np
        from PIL import Image

        arr = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        image = Image.fromarray(arr, "RGB")
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def save_safetensors_atomic(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def publish_folder(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename a finished temp folder (written in full, e.g. a checkpoint) to `final`: the rename is
    the commit point. An existing `final` is moved aside first and deleted only after the new one is
    in place, so a crash leaves either folder whole, never half of one."""
    import shutil

    tmp, final = Path(tmp), Path(final)
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(f"{TEMP_PREFIX}old-{final.name}")
    if old.exists():
        shutil.rmtree(old)
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old)


def move_aside(folder: str | os.PathLike, tag: str) -> Path:
    """Rename `folder` to a sibling `<name>.<tag>-<UTC time>[-N]` that did not exist; returns it.
    Nothing is deleted: the target is made first with an exclusive mkdir (two moves in the same
    second never share a name) and the folder is renamed onto it, which is atomic."""
    import time

    folder = Path(folder)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    for n in range(1, 10_000):
        target = folder.with_name(f"{folder.name}.{tag}-{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            os.mkdir(target)
        except FileExistsError:
            continue
        os.replace(folder, target)
        return target
    raise FileExistsError(f"cannot find a free name to move {folder} aside")


def remove_orphan_temps(folder: str | os.PathLike) -> int:
    """Delete temp files a killed writer left in `folder` (not recursive); returns how many."""
    n = 0
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(f"{TEMP_PREFIX}*"):
            if p.is_file():
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    n += 1
    return n
