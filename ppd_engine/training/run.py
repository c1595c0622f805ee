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
    # runnable=False: a finished run is read, not run (e.g. its tracker need not be installed here).
    cfg = load_config(cfg_path, runnable=False)
    found = resolve_checkpoint(run_dir, checkpoint)
    verify_checkpoint(found)  # a corrupt checkpoint is refused naming the file, never sampled from
    if model is None:
        model = build_model(cfg, device)
    load_user_adapters(model.unet, found / "adapters.safetensors")
    model.unet.eval()
    return cfg, model


def embedding_store_path(run_dir: str | os.PathLike, cfg) -> Path:
    """The run's user-embedding store: data.embeddings, else RUN/embeddings.safetensors (toy runs)."""
    candidates = [Path(cfg.data.embeddings)] if cfg.data.embeddings else []
    candidates.append(Path(run_dir) / "embeddings.safetensors")
    for c in candidates:
        if c.exists():  # a store is a folder (ppd_engine.embed.store)
            return c
    raise FileNotFoundError(f"no user-embedding store for run {run_dir} (looked at {', '.join(map(str, candidates))})")


def run_user_embedding(run_dir: str | os.PathLike, cfg, user: str | None = None,
                       mix: list[tuple[str, float]] | None = None) -> torch.Tensor:
    """(T_in, Du) embedding of one user of the run's store (the first of its K, as the sample grid
    uses), or the weighted sum of a mix [(name, weight), ...]."""
    from ppd_engine.embed.store import EmbeddingStore

    if (user is None) == (mix is None):
        raise ValueError("give exactly one of user= or mix=")
    store = EmbeddingStore(str(embedding_store_path(run_dir, cfg)))
    items = [(user, 1.0)] if user is not None else mix
    for name, _ in items:
        if name not in store:
            raise KeyError(f"user {name!r} is not in {store.path}; users: {', '.join(store.users()[:20])}"
                           f"{' ...' if len(store) > 20 else ''}")
    return sum(w * store.get(name)[0].float() for name, w in items)


def sampling_defaults(cfg) -> dict:
    """guidance, user_guidance and steps the run itself sampled with: a world's own section when it
    records them (the toy world's toy.guidance / toy.user_guidance / toy.sample_steps), else the
    sample grid's log.sample_guidance / log.sample_steps (which uses no user guidance)."""
    section = getattr(cfg, cfg.world, None) if cfg.world else None
    return {"guidance": float(getattr(section, "guidance", cfg.log.sample_guidance)),
            "user_guidance": float(getattr(section, "user_guidance", 0.0)),
            "steps": int(getattr(section, "sample_steps", cfg.log.sample_steps))}
