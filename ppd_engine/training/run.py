"""Reading a finished (or running) run folder back: its config and its model with trained adapters."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ppd_engine.config import Config, load_config
from ppd_engine.training.checkpoint import resolve_resume

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_model(cfg: Config, device: str | torch.device = "cpu"):
    """The frozen base DiffusionModel that `cfg` trains (model.family / model.pretrained / model.dtype).

    The toy family comes from the toy world (`ppd_engine.toyworld.model.load_toy_model`, toy.pretrained)."""
    if cfg.model.family == "toy" or cfg.world == "toy":
        from ppd_engine.toyworld.model import load_toy_model

        model = load_toy_model(cfg.toy, dtype=_DTYPES[cfg.model.dtype], device=device)
    else:
        from ppd_engine.models import load_diffusion_model

        model = load_diffusion_model(cfg.model.family, cfg.model.pretrained, dtype=_DTYPES[cfg.model.dtype],
                                     device=device)
    if cfg.model.resolution:
        model.resolution = cfg.model.resolution
    return model


def load_run(run_dir: str | os.PathLike, checkpoint: str = "latest", model=None, device: str | torch.device = "cpu"):
    """(cfg, model) of a run: the resolved RUN/config.yaml and the base model with the adapters of a
    checkpoint loaded (`checkpoint`: "latest", or a step-N folder path).

    `model`: a fresh base DiffusionModel to load into; None builds it from the config (`build_model`).
    Files are read with safetensors only."""
    from ppd_engine.adapters import load_user_adapters

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml)")
    cfg = load_config(cfg_path)
    found = resolve_resume(checkpoint, run_dir)
    if found is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint yet (checkpoints/step-N/)")
    if model is None:
        model = build_model(cfg, device)
    load_user_adapters(model.unet, found / "adapters.safetensors")
    model.unet.eval()
    return cfg, model
