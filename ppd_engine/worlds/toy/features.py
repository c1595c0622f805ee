"""A generic image feature extractor for the few-shot encoder: a small conv autoencoder trained to
reconstruct toy scenes, and nothing else.

    python -m ppd_engine.worlds.toy.features --overwrite --threads 1   # remake the shipped asset (seeded)

It plays the part of the VLM's vision tower: it has seen many images of the world, never a
preference, a reward definition or a user. What it keeps in its bottleneck is whatever explains
the most pixel error, so colour (which moves every pixel) dominates it and shape and position come
second; nobody told it which colour statistics any user cares about. This module (and what it
imports) must not reach ppd_engine.worlds.toy.rewards or .users; tests/test_toy_encoder.py walks
the imports.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from ppd_engine.files import save_safetensors_atomic
from ppd_engine.worlds.toy.records import Clock, make_from_cli, read_metadata, refuse_overwrite, write_record
from ppd_engine.worlds.toy.scenes import make_scenes

FEATURES_ASSET = Path(__file__).resolve().parent / "assets" / "toy_features.safetensors"
FORMAT = "ppd_toy_features/1"


class SceneAutoencoder(nn.Module):
    """16x16 RGB in [0, 1] -> `latent` numbers -> 16x16 RGB; two stride-2 convs each way."""

    def __init__(self, image_size: int = 16, latent: int = 16, width: int = 32):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size {image_size} must be a multiple of 4 (two stride-2 stages)")
        self.config = {"image_size": image_size, "latent": latent, "width": width}
        s = image_size // 4
        self.encoder = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Linear(2 * width * s * s, latent))
        self.decoder = nn.Sequential(
            nn.Linear(latent, 2 * width * s * s), nn.SiLU(), nn.Unflatten(1, (2 * width, s, s)),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, 3, 3, padding=1), nn.Sigmoid())

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(..., 3, H, W) in [0, 1] -> (..., latent)."""
        size = self.config["image_size"]
        if images.dim() < 4 or tuple(images.shape[-3:]) != (3, size, size):
            raise ValueError(f"feature extractor expects images (..., 3, {size}, {size}), got {tuple(images.shape)}")
        lead = images.shape[:-3]
        z = self.encoder(images.reshape(-1, 3, size, size).float())
        return z.reshape(*lead, z.shape[-1])

    def describe(self, images: torch.Tensor) -> torch.Tensor:
        """The few-shot encoder's image descriptor: (..., 3, H, W) in [0, 1] -> (..., 2 * width).

        Channel means and standard deviations over space of the encoder's 8x8 stage (the feature
        statistics style transfer uses to describe an image's look). The bottleneck alone, being
        linear in what differs between two images, cannot tell "more light/dark contrast" from
        "foreground brighter than background": a linear probe of seen users' training labels on
        bottleneck differences scored 0.50-0.62 for the contrast users, on these statistics (8 axes) 0.84-0.88.
        """
        size = self.config["image_size"]
        if images.dim() < 4 or tuple(images.shape[-3:]) != (3, size, size):
            raise ValueError(f"feature extractor expects images (..., 3, {size}, {size}), got {tuple(images.shape)}")
        lead = images.shape[:-3]
        h = self.encoder[:4](images.reshape(-1, 3, size, size).float())  # (M, width, size/2, size/2)
        return torch.cat([h.mean((2, 3)), h.std((2, 3))], 1).reshape(*lead, 2 * h.shape[1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(images))


def train_features(out: str | os.PathLike = FEATURES_ASSET, steps: int = 1500, batch: int = 128, lr: float = 2e-3,
                   latent: int = 16, width: int = 32, seed: int = 0, image_size: int = 16, threads: int = 0,
                   progress: bool = True, overwrite: bool = False) -> dict:
    """Train the autoencoder on fresh scenes every step (pixel MSE) and save it to `out`; returns the record."""
    refuse_overwrite(out, overwrite)
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    net = SceneAutoencoder(image_size, latent, width)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    clock, losses = Clock(), []
    bar = tqdm(range(steps), desc="train toy features", disable=not progress)
    for step in bar:
        images, _ = make_scenes(batch, image_size, g)
        loss = torch.nn.functional.mse_loss(net(images), images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.5f}")
    info = {"steps": steps, "batch": batch, "lr": lr, "seed": seed, **net.config,
            "trained_on": "reconstruction of freshly rendered toy scenes (pixel MSE); no labels, rewards or users",
            "final_loss_avg100": sum(losses[-100:]) / max(1, len(losses[-100:])), **clock.info(),
            "params": sum(p.numel() for p in net.parameters())}
    tensors = {k: v.detach().float().contiguous() for k, v in net.state_dict().items()}
    save_safetensors_atomic(tensors, out, metadata={"format": FORMAT, "config": json.dumps(net.config),
                                                    "info": json.dumps(info)})
    return write_record(out, "python -m ppd_engine.worlds.toy.features", info)


def load_features(path: str | os.PathLike | None = None) -> SceneAutoencoder:
    """The frozen feature extractor written by `train_features` (default: the shipped asset)."""
    path = Path(path) if path else FEATURES_ASSET
    meta = read_metadata(path, FORMAT, "toy feature extractor", "python -m ppd_engine.worlds.toy.features")
    net = SceneAutoencoder(**json.loads(meta["config"]))
    net.load_state_dict(load_file(str(path)), strict=True)
    return net.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train the toy world's generic image feature extractor (a scene "
                                            "autoencoder; no rewards, no users) and save it as safetensors.")
    p.add_argument("--out", default=str(FEATURES_ASSET), help="output .safetensors (a .json record is written beside it)")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    p.add_argument("--batch", type=int, default=128, help="scenes per step (fresh every step)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (cosine to 0)")
    p.add_argument("--latent", type=int, default=16, help="bottleneck size: the features")
    p.add_argument("--width", type=int, default=32, help="conv channels of the first stage")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and scenes")
    p.add_argument("--image-size", type=int, default=16, help="scene side in pixels")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (the shipped asset too)")
    a = p.parse_args(argv)
    make_from_cli(p, lambda: train_features(a.out, a.steps, a.batch, a.lr, a.latent, a.width, a.seed, a.image_size,
                                            a.threads, overwrite=a.overwrite), a.out)


if __name__ == "__main__":
    main()
