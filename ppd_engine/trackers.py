"""Experiment trackers of `log.report_to`: TensorBoard, wandb, MLflow, through their own libraries.

    trackers = start_trackers(resolve_trackers("tensorboard,wandb"), run_dir, project, start_step)
    for t in trackers: t.store_init_configuration(flat_hparams(config_dict)); t.log({...}, step)

The interface is accelerate's tracker interface (store_init_configuration / log / finish), but
accelerate's classes are not used: they need accelerate's process state (`PartialState`), which
would set up its own process group beside the trainer's. tensorboard writes RUN/tb (purged past
the resume step); wandb logs under RUN/wandb (WANDB_MODE=offline works without an account);
mlflow uses MLflow's own tracking URI and its rules (MLFLOW_TRACKING_URI; MLflow 3 refuses a
plain-folder store unless MLFLOW_ALLOW_FILE_STORE=true).

A resumed run continues its tracker runs: the wandb and MLflow run ids are kept in
RUN/trackers.json, and a run resumed in the same folder (start_step > 0) logs into the same runs
from its resume step on, instead of opening new ones.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

from ppd_engine.files import write_json_atomic

log = logging.getLogger(__name__)

# tracker -> the package it needs
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def resolve_trackers(report_to: str, check_installed: bool = True) -> list[str]:
    """'none' | 'all' | a tracker | a comma list -> the tracker names. 'all' = every installed one.

    Raises ValueError for an unknown name, or (check_installed) a requested tracker whose package
    is missing: a run asked to be tracked must not silently go untracked."""
    names = [n.strip() for n in str(report_to).split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    if "all" in names or "none" in names:
        if len(names) > 1:
            raise ValueError(f"{report_to!r}: 'all' and 'none' stand alone, not in a list")
        return [t for t, pkg in TRACKERS.items() if _installed(pkg)] if check_installed else list(TRACKERS)
    for n in names:
        if n not in TRACKERS:
            raise ValueError(f"{n!r} is not a tracker; choose none | {' | '.join(TRACKERS)} | all, or a comma list")
        if check_installed and not _installed(TRACKERS[n]):
            raise ValueError(f"{n} is requested but the {TRACKERS[n]} package is not installed "
                             f"(pip install {TRACKERS[n]}), or set log.report_to=none")
    return list(dict.fromkeys(names))


def flat_hparams(tree: dict, prefix: str = "") -> dict:
    """A nested config dict as flat `section.key` -> bool | int | float | str hyper-parameters
    (lists and None as their text: what every tracker accepts)."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat_hparams(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


class _TensorBoard:
    name = "tensorboard"
    run_id = None

    def __init__(self, run_dir: Path, project: str, start_step: int, resume_id: str | None = None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run drops the events the crashed run wrote past its checkpoint.
        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1)

    def store_init_configuration(self, values: dict) -> None:
        # The hparams plugin's summaries go into the run's own event file (add_hparams would open a
        # second, time-stamped run folder); the config also as text, readable in the Text tab.
        from torch.utils.tensorboard.summary import hparams

        for event in hparams(values, {}):
            self.writer.file_writer.add_summary(event)
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in values.items()), 0)

    def log(self, values: dict, step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def log_image(self, tag: str, grid, step: int) -> None:
        self.writer.add_image(tag, grid, step)

    def finish(self) -> None:
        self.writer.close()


class _WandB:
    name = "wandb"

    def __init__(self, run_dir: Path, project: str, start_step: int, resume_id: str | None = None):
        import wandb

        self.wandb = wandb
        # resume="allow": the id's run continues where it is known (online), or a new offline
        # segment with the same id is written that `wandb sync` joins to it.
        self.run = wandb.init(project=project, name=run_dir.name, dir=str(run_dir), id=resume_id,
                              resume="allow" if resume_id else None)
        self.run_id = self.run.id

    def store_init_configuration(self, values: dict) -> None:
        self.run.config.update(values, allow_val_change=True)

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def log_image(self, tag: str, grid, step: int) -> None:
        self.run.log({tag: self.wandb.Image(_hwc_uint8(grid))}, step=step)

    def finish(self) -> None:
        self.run.finish()


class _MLflow:
    name = "mlflow"

    def __init__(self, run_dir: Path, project: str, start_step: int, resume_id: str | None = None):
        import mlflow

        self.mlflow = mlflow
        self.run = None
        if resume_id:
            try:
                self.run = mlflow.start_run(run_id=resume_id)
            except mlflow.exceptions.MlflowException as e:   # another tracking server, or a deleted run
                log.warning("mlflow run %s of %s cannot be continued (%s); starting a new one",
                            resume_id, run_dir, str(e).splitlines()[0])
        if self.run is None:
            mlflow.set_experiment(project)
            self.run = mlflow.start_run(run_name=run_dir.name)
        self.run_id = self.run.info.run_id

    def store_init_configuration(self, values: dict) -> None:
        # MLflow caps a parameter's text; longer values (a long prompt list) are cut, not dropped.
        params = {k: str(v)[:500] for k, v in values.items()}
        # Parameters cannot change in MLflow: a continued run logs the keys it lacks, and a value
        # the resumed config changed (checkpoint.resume at least) as a tag resumed.<key>.
        have = self.run.data.params if self.run.data.params else {}
        self.mlflow.log_params({k: v for k, v in params.items() if k not in have})
        changed = {f"resumed.{k}": v for k, v in params.items() if k in have and have[k] != v}
        if changed:
            self.mlflow.set_tags(changed)

    def log(self, values: dict, step: int) -> None:
        self.mlflow.log_metrics({k.replace("/", "."): v for k, v in values.items()}, step=step)

    def log_image(self, tag: str, grid, step: int) -> None:
        self.mlflow.log_image(_hwc_uint8(grid), key=tag, step=step)

    def finish(self) -> None:
        self.mlflow.end_run()


_CLASSES = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


def _hwc_uint8(grid):
    import numpy as np

    return (grid.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


IDS_FILE = "trackers.json"


def start_trackers(names: list[str], run_dir: str | os.PathLike, project: str, start_step: int) -> list:
    """Started trackers for `names` (on the process that logs only), each with store_init_configuration,
    log(values, step), log_image(tag, (3, H, W) in [0, 1], step) and finish(). With start_step > 0
    (a resumed run) the runs recorded in RUN/trackers.json are continued."""
    run_dir = Path(run_dir)
    ids_path = run_dir / IDS_FILE
    known = {}
    if start_step > 0 and ids_path.is_file():
        try:
            known = json.loads(ids_path.read_text(encoding="utf-8"))
        except ValueError:
            log.warning("%s is not JSON; the resumed run starts new tracker runs", ids_path)
    trackers = [_CLASSES[n](run_dir, project, start_step, known.get(n)) for n in names]
    ids = {**known, **{t.name: t.run_id for t in trackers if t.run_id}}
    if ids:
        write_json_atomic(ids_path, ids, indent=1)
    return trackers
