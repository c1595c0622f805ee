"""Run folders are owned: one run per folder.

A folder "holds a run" once it has a config.yaml, a metrics.jsonl or a checkpoints/ folder. A fresh
run refuses such a folder (its metrics, config and checkpoints would be replaced, and pruning would
then mix the two runs' checkpoints); `--resume RUN` continues it, and `log.overwrite=true` moves it
aside to RUN.replaced-<UTC time> (never deleted). Default names are made unique with an exclusive
mkdir, so two runs started in the same second get two folders.

Several writers of one run share a folder in one process (the CLI writes config.yaml, a world writes
its stores, then the Trainer): the first `claim_run_folder` takes it, later claims of the same
folder in this process pass, and the Trainer's `take_run_folder` ends the claim, so a second fresh
Trainer into the same folder is refused like any other run.
"""
from __future__ import annotations

import os
from pathlib import Path

from ppd_engine.files import move_aside

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints")

_claimed: set[str] = set()


class RunFolderError(ValueError):
    """A fresh run was pointed at a folder that holds another run."""


def holds_run(folder: str | os.PathLike) -> bool:
    return any((Path(folder) / m).exists() for m in RUN_MARKERS)


def _key(folder: Path) -> str:
    return str(folder.resolve())


def continues_run(resume: str, folder: str | os.PathLike) -> bool:
    """Whether `checkpoint.resume` continues the run in `folder` (latest, the folder itself, or one
    of its own checkpoints) rather than starting a new run there."""
    if resume == "latest":
        return True
    if not resume:
        return False
    own, target = Path(folder).resolve(), Path(resume).resolve()
    return target == own or own in target.parents


def claim_run_folder(folder: str | os.PathLike, *, resuming: bool, overwrite: bool) -> Path | None:
    """Make `folder` this process's run folder (created if missing). `resuming`: the run continues
    the run already there. Returns where an overwritten run was moved, else None."""
    folder = Path(folder)
    if _key(folder) in _claimed:
        return None
    moved = None
    if not resuming and holds_run(folder):
        if not overwrite:
            raise RunFolderError(
                f"{folder} holds another run (config.yaml / metrics.jsonl / checkpoints); continue it with "
                f"--resume {folder} (checkpoint.resume=latest), pick another log.run_dir, or set "
                "log.overwrite=true to move it aside")
        moved = move_aside(folder, "replaced")
    folder.mkdir(parents=True, exist_ok=True)
    _claimed.add(_key(folder))
    return moved


def take_run_folder(folder: str | os.PathLike, *, resuming: bool, overwrite: bool) -> Path | None:
    """`claim_run_folder` for the writer that fills the folder last (the Trainer): ends the claim."""
    moved = claim_run_folder(folder, resuming=resuming, overwrite=overwrite)
    _claimed.discard(_key(Path(folder)))
    return moved


def unique_run_dir(base: str | os.PathLike) -> Path:
    """`base`, or base-2, base-3, ... : the first that this call creates (exclusive mkdir), claimed."""
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 100_000):
        cand = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            os.mkdir(cand)
        except FileExistsError:
            continue
        _claimed.add(_key(cand))
        return cand
    raise RunFolderError(f"no free run folder name next to {base}")
