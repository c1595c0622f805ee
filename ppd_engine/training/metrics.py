"""What a run reports: RUN/metrics.jsonl (one line per step; with log.eval_every the eval/<set>/<stat>
held-out numbers join their step's line, and a line of them alone is step 0), the trackers of log.report_to
(ppd_engine/trackers.py: TensorBoard, wandb, MLflow), the tqdm bar and sample grids. Only rank 0
writes; the numbers are already averaged over ranks.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import torch

from ppd_engine.files import save_image_atomic, write_text_atomic

METRIC_KEYS = ("loss", "implicit_acc", "model_mse", "ref_mse", "reward_margin", "grad_norm", "lr",
               "pairs_per_s", "peak_mem_mb")


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated accelerator memory (MiB) on CUDA; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except (ImportError, OSError):
        return float("nan")


def truncate_metrics(path: Path, after_step: int) -> None:
    """Drop lines with step > after_step (a resumed run rewrites what the crashed run logged past
    its last checkpoint, so the file stays one trajectory)."""
    if not path.is_file():
        return
    keep = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                if json.loads(line)["step"] <= after_step:
                    keep.append(line)
            except (ValueError, KeyError):
                continue  # a line cut short by the crash
    write_text_atomic(path, "".join(keep))


class MetricsLogger:
    """metrics.jsonl + the trackers of `report_to` + tqdm bar, for rank 0 (other ranks get a silent one).

    `hparams`: the resolved config (a nested dict), logged to every tracker at start. While the bar
    is shown, log records go through tqdm (logging_redirect_tqdm) so they do not break its line."""

    def __init__(self, run_dir: str | os.PathLike, total_steps: int, start_step: int, enabled: bool,
                 report_to: str, progress: bool, hparams: dict | None = None, project: str = "ppd_engine"):
        from ppd_engine.trackers import flat_hparams, resolve_trackers, start_trackers

        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.trackers: list = []
        self.bar = None
        self._redirect = contextlib.ExitStack()
        if not enabled:
            return
        self.trackers = start_trackers(resolve_trackers(report_to), run_dir, project, start_step)
        if hparams is not None:
            for t in self.trackers:
                t.store_init_configuration(flat_hparams(hparams))
        if progress:
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._redirect.enter_context(logging_redirect_tqdm())
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(clean) + "\n")
        step = row["step"]
        if self.trackers:
            values = {f"train/{k}": row[k] for k in METRIC_KEYS + ("skipped", "bad_steps_total")
                      if isinstance(row.get(k), (int, float)) and math.isfinite(row[k])}
            # Held-out rows (training/heldout.py) already carry their tracker names: eval/<set>/<stat>.
            values.update({k: v for k, v in row.items() if k.startswith("eval/") and isinstance(v, (int, float))
                           and math.isfinite(v)})
            for t in self.trackers:
                t.log(values, step=step)
        if self.bar is not None and "loss" in row:  # the step-0 held-out row is no training step
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['implicit_acc']:.2f}",
                                 lr=f"{row['lr']:.2e}", pairs_s=f"{row['pairs_per_s']:.1f}", refresh=False)
            self.bar.update(1)

    def image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        """A (3, H, W) image in [0, 1] to every tracker."""
        for t in self.trackers if self.enabled else ():
            t.log_image(tag, grid, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self._redirect.close()
        for t in self.trackers:
            t.finish()


def save_grid_png(images: torch.Tensor, nrow: int, path: str | os.PathLike) -> torch.Tensor:
    """Tile (N, 3, H, W) images in [0, 1] into rows of `nrow` (torchvision's make_grid, 2 px white
    padding) and write a PNG (temp name + rename). Returns the (3, H', W') grid."""
    from torchvision.utils import make_grid

    grid = make_grid(images.float().cpu(), nrow=nrow, padding=2, pad_value=1.0)
    save_image_atomic(grid, path)
    return grid
