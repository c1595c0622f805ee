"""Checkpoints: RUN/checkpoints/step-N/ written under a temp name and renamed.

A checkpoint folder holds
  adapters.safetensors          the adapters (save_user_adapters output, full tensors)
  optimizer-rank{r}.safetensors + .json   optimizer state (one file per rank when sharded; rank 0's
                                when replicated), bnb's 8-bit state tensors included
  rng-rank{r}.safetensors       torch CPU/CUDA, numpy and python RNG states of every rank, as tensors
  state.json                    step, optimizer updates, bad-step counters, data cursor, world size,
                                the sha256 of every other file ("files") and of itself ("state_sha256")
  config.yaml                   the resolved run config
Everything is safetensors / JSON / YAML; nothing is pickled. `verify_checkpoint` checks every hash;
resuming from "latest" skips (with a warning naming the file) checkpoints that fail it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ppd_engine.files import publish_folder, write_json_atomic
from ppd_engine.integrity import CorruptFileError, sha256_file

log = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step-(\d+)$")


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first (temp folders of an interrupted write are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / "state.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


def resolve_resume(resume: str, run_dir: str | os.PathLike) -> Path | None:
    """`checkpoint.resume` -> a verified checkpoint folder: '' = none, 'latest' = newest intact one in
    run_dir, a run folder = its newest intact one, a step-N folder = itself. Newer checkpoints that
    fail `verify_checkpoint` are skipped with a warning; a named step-N folder that fails it, or a
    run whose checkpoints all fail, is an error (CorruptFileError naming the file)."""
    if not resume:
        return None
    target = Path(run_dir) if resume == "latest" else Path(resume)
    if (target / "state.json").is_file():
        verify_checkpoint(target)
        return target
    found = list_checkpoints(target)
    if not found:
        if resume == "latest":
            return None  # nothing written yet: a fresh start of this run folder
        raise FileNotFoundError(f"checkpoint.resume={resume!r}: no checkpoint found under {target}/checkpoints")
    problems = []
    for _, path in reversed(found):
        try:
            verify_checkpoint(path)
        except CorruptFileError as exc:
            problems.append(str(exc))
            continue
        for p in problems:
            log.warning("skipping a corrupt checkpoint (%s); resuming from %s", p, path)
        return path
    raise CorruptFileError(f"no intact checkpoint under {target}/checkpoints: " + "; ".join(problems))


def resolve_checkpoint(run_dir: str | os.PathLike, spec: str = "latest") -> Path:
    """The `--checkpoint` of every command: 'latest' (newest of the run), 'step-N' (inside
    RUN/checkpoints), or a path to a step-N folder. Raises FileNotFoundError naming what is there."""
    run_dir = Path(run_dir)
    if spec in ("", "latest"):
        found = latest_checkpoint(run_dir)
        if found is None:
            raise FileNotFoundError(f"{run_dir} has no checkpoint yet (checkpoints/step-N/)")
        return found
    inside = run_dir / "checkpoints" / spec
    for cand in (inside, Path(spec)):
        if (cand / "state.json").is_file():
            return cand
    have = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*") if (p / "state.json").is_file())
    raise FileNotFoundError(f"--checkpoint {spec}: no such checkpoint in {run_dir} (have: {', '.join(have) or 'none'})")


# --- RNG states ---------------------------------------------------------------------------------


def rng_state_tensors() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's torch (CPU + every CUDA device), numpy and python RNG states as tensors.

    Returns (tensors, metadata); the few scalars go to the safetensors metadata (strings)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = st
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    tensors["python_state"] = torch.tensor(internal, dtype=torch.int64)
    meta = {"numpy_kind": str(kind), "numpy_pos": str(pos), "numpy_has_gauss": str(has_gauss),
            "numpy_cached": repr(float(cached)), "python_version": str(version),
            "python_gauss_next": "" if gauss_next is None else repr(float(gauss_next))}
    return tensors, meta


def restore_rng_state(path: str | os.PathLike) -> None:
    """Inverse of `rng_state_tensors` from an rng-rank{r}.safetensors file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise CorruptFileError(f"{path}: not a readable RNG state file ({exc})") from None
    missing = [k for k in ("torch_cpu", "numpy_keys", "python_state") if k not in tensors]
    if missing or not meta:
        raise CorruptFileError(f"{path}: not an RNG state file (lacks {', '.join(missing) or 'its metadata'})")
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted(k for k in tensors if k.startswith("torch_cuda_"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    np.random.set_state((meta["numpy_kind"], tensors["numpy_keys"].numpy().astype(np.uint32),
                         int(meta["numpy_pos"]), int(meta["numpy_has_gauss"]), float(meta["numpy_cached"])))
    gauss = meta["python_gauss_next"]
    random.setstate((int(meta["python_version"]), tuple(int(x) for x in tensors["python_state"].tolist()),
                     None if gauss == "" else float(gauss)))


def save_rng_state(path: str | os.PathLike) -> None:
    tensors, meta = rng_state_tensors()
    save_file(tensors, str(path), metadata=meta)


# --- folder lifecycle ---------------------------------------------------------------------------


def temp_checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """The folder every rank writes into before rank 0 renames it to step-N."""
    return Path(run_dir) / "checkpoints" / f".tmp-step-{step}"


def write_json(path: str | os.PathLike, data: dict) -> None:
    write_json_atomic(path, data, indent=1, sort_keys=True)


def read_json(path: str | os.PathLike) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path}: not valid JSON (truncated or corrupted?): {exc}") from None
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _state_digest(state: dict) -> str:
    body = {k: v for k, v in state.items() if k != "state_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_state(folder: Path, state: dict) -> None:
    """state.json of a finished checkpoint folder: `state` plus the sha256 of every other file in
    the folder (all ranks' files must be written) and of the state itself."""
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != "state.json"}
    state = {**state, "files": files}
    write_json(folder / "state.json", {**state, "state_sha256": _state_digest(state)})


def verify_checkpoint(folder: str | os.PathLike) -> dict:
    """The checkpoint's state after checking state.json's own hash and every file's sha256;
    CorruptFileError naming the first file that is missing or differs."""
    folder = Path(folder)
    state = read_json(folder / "state.json")
    if "files" not in state and "state_sha256" not in state:
        log.warning("%s records no file hashes (written before ppd_engine recorded them); not verified", folder)
        return state
    if state.get("state_sha256") != _state_digest(state) or not isinstance(state.get("files"), dict):
        raise CorruptFileError(f"{folder / 'state.json'}: content does not match its sha256 (corrupted file)")
    for name, digest in state["files"].items():
        path = folder / name
        if not path.is_file():
            raise CorruptFileError(f"{path} is missing (listed in {folder / 'state.json'})")
        if sha256_file(path) != digest:
            raise CorruptFileError(f"{path}: content does not match the sha256 in state.json (corrupted file)")
    return state


def publish_checkpoint(tmp: Path, final: Path, keep_last: int) -> None:
    """Rename the finished temp folder to its final name and delete all but the newest `keep_last`
    of the checkpoints up to it.

    The rename is the commit point: a crash before it leaves only a `.tmp-*` folder, which
    `list_checkpoints` ignores, so the previous checkpoint stays the latest complete one."""
    publish_folder(tmp, final)
    # Only checkpoints up to this one: after a resume from an older step, the newer checkpoints of
    # the abandoned continuation sort later but are not older than what was just written.
    step = int(_STEP_RE.match(final.name).group(1))
    ckpts = [c for c in list_checkpoints(final.parent.parent) if c[0] <= step]
    for _, path in ckpts[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
