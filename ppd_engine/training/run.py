"""Reading a finished (or running) run folder back: its config and its model with trained adapters."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ppd_engine.config import load_config
from ppd_engine.models import build_model
from ppd_engine.training.checkpoint import resolve_checkpoint, verify_checkpoint


def load_run(run_dir: str | os.PathLike, checkpoint: str = "latest", model=None, device: str | torch.device = "cpu"):
    """(cfg, model) of a run: the resolved RUN/config.yaml and the base model with the adapters of a
    checkpoint loaded (`checkpoint`: "latest", "step-N" inside the run, or a step-N folder path).

    `model`: a fresh base DiffusionModel to load into; None builds it from the config (`build_model`).
    Files are read with safetensors only."""
    from ppd_engine.adapters import load_user_adapters

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml)")
    cfg = load_config(cfg_path)
    found = resolve_checkpoint(run_dir, checkpoint)
    verify_checkpoint(found)  # a corrupt checkpoint is refused naming the file, never sampled from
    if model is None:
        model = build_model(cfg, device)
    load_user_adapters(model.unet, found / "adapters.safetensors")
    model.unet.eval()
    return cfg, model
