"""Builders for training tests and benchmarks: a DiffusionModel around a tiny random UNet (no text
encoder or VAE: the trainer needs neither), training items shaped like the cache dataset's, and
user embeddings. Identical in every process for the same seed, so multi-process tests can rebuild
them on each rank.
"""
from __future__ import annotations

import torch


def make_items(model, n: int, seed: int = 0, users: int = 3) -> list[dict]:
    """`n` random training items shaped like the cache dataset's for `model`."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.unet.config
    size = cfg.sample_size
    caps = [f"caption {i}" for i in range(3)]
    enc = model.encode_text(caps)
    items = []
    for i in range(n):
        it = {"latents_w": torch.randn(cfg.in_channels, size, size, generator=g),
              "latents_l": torch.randn(cfg.in_channels, size, size, generator=g),
              "text": enc.states[i % 3].clone(), "user_id": f"user{i % users}", "pair_id": f"p{i}"}
        if enc.pooled is not None:
            it["pooled"] = enc.pooled[i % 3].clone()
            it["time_ids_w"] = torch.tensor([40.0, 32.0, 0.0, 4.0, 32.0, 32.0])
            it["time_ids_l"] = torch.tensor([32.0, 48.0, 8.0, 0.0, 32.0, 32.0])
        items.append(it)
    return items


def make_embeddings(users: int = 3, k: int = 3, t_in: int = 2, du: int = 24, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {f"user{j}": torch.randn(k, t_in, du, generator=g) for j in range(users)}


class _HashText:
    """encode_text stand-in: a fixed random (T, D) state per caption (hash-seeded), pooled for SDXL."""

    def __init__(self, dim: int, pooled_dim: int | None, tokens: int = 7):
        self.dim, self.pooled_dim, self.tokens = dim, pooled_dim, tokens

    def __call__(self, captions):
        from ppd_engine.models import TextConditioning

        states, pooled = [], []
        for c in captions:
            g = torch.Generator().manual_seed(sum(ord(ch) * (i + 1) for i, ch in enumerate(c)) + 7)
            states.append(torch.randn(self.tokens, self.dim, generator=g))
            if self.pooled_dim:
                pooled.append(torch.randn(self.pooled_dim, generator=g))
        return TextConditioning(torch.stack(states), torch.stack(pooled) if self.pooled_dim else None)


def tiny_model(family: str = "sd15", seed: int = 0, **unet_overrides):
    """A DiffusionModel around H3's tiny random UNet (no text encoder/VAE: the trainer needs neither),
    built in milliseconds, identical in every process for the same seed."""
    from diffusers import DDPMScheduler

    from ppd_engine.models import DiffusionModel
    from ppd_engine.testing.tiny_unets import tiny_unet

    unet = tiny_unet(family, seed=seed, **unet_overrides)
    cfg = unet.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim if family == "sdxl" else None
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return DiffusionModel(family=family, unet=unet.requires_grad_(False), noise_scheduler=sched,
                          encode_text=_HashText(cfg.cross_attention_dim, pooled), resolution=cfg.sample_size * 8)
