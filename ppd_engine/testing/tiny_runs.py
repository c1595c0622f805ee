"""A finished run folder on a tiny SD1.5/SDXL pipeline, written the way training writes one.

RUN/config.yaml (model.pretrained = the tiny pipeline folder), RUN/checkpoints/step-N/
{adapters.safetensors, state.json} with random (non-zero) adapters, RUN/embeddings.safetensors with
a few users. For tests of what reads runs (sample, export, from_run) without training one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ppd_engine.testing.tiny_pipelines import make_tiny_pipeline


def make_tiny_run(run_dir: str | os.PathLike, family: str = "sd15", *, pipeline_dir: str | os.PathLike | None = None,
                  projection: str = "linear", in_tokens: int = 3, user_dim: int = 6, scale: float = 1.0,
                  users: tuple[str, ...] = ("alice", "bob"), step: int = 2, seed: int = 0,
                  overrides: tuple[str, ...] = ()) -> Path:
    """Write a run of `family` into `run_dir` and return it (the pipeline is built in
    RUN/../pipe-<family> unless `pipeline_dir` names an existing one)."""
    from ppd_engine.adapters import add_user_adapters, save_user_adapters
    from ppd_engine.config import load_config, save_config
    from ppd_engine.embed.store import EmbeddingStore
    from ppd_engine.models import load_diffusion_model

    run_dir = Path(run_dir)
    if pipeline_dir is None:
        pipeline_dir = run_dir.parent / f"pipe-{family}"
        if not (Path(pipeline_dir) / "model_index.json").is_file():
            make_tiny_pipeline(family, str(pipeline_dir), seed=seed)
    cfg = load_config(None, [f"model.family={family}", f"model.pretrained={pipeline_dir}",
                             f"adapters.projection={projection}", f"adapters.scale={scale}", *overrides],
                      runnable=False)
    model = load_diffusion_model(family, str(pipeline_dir))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        handle = add_user_adapters(model.unet, user_dim=user_dim, num_tokens=cfg.adapters.num_tokens,
                                   projection=projection, scale=scale, in_tokens=in_tokens)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():  # trained-looking adapters: the user branch visibly acts
            for p in handle.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        embeds = {u: torch.randn(2, in_tokens, user_dim, generator=g) for u in users}
    ckpt = run_dir / "checkpoints" / f"step-{step}"
    ckpt.mkdir(parents=True, exist_ok=True)
    save_user_adapters(model.unet, ckpt / "adapters.safetensors")
    (ckpt / "state.json").write_text(json.dumps({"step": step, "updates": step, "personalized": True}))
    save_config(cfg, run_dir / "config.yaml")
    save_config(cfg, ckpt / "config.yaml")
    store = EmbeddingStore(str(run_dir / "embeddings.safetensors"))
    store.append_many([(u, e, None) for u, e in embeds.items()])
    return run_dir
