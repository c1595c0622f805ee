"""Pretrain the toy base denoiser on the procedural scene distribution and write the asset.

    python -m ppd_engine.worlds.toy.pretrain --overwrite --threads 1   # remake the shipped asset (seeded)
    python -m ppd_engine.worlds.toy.pretrain --steps 20 --out /tmp/base.safetensors

An existing output file (the shipped asset included) is only replaced with --overwrite: a bare
command must not silently swap the base every recorded number was measured on.

Plain epsilon-prediction DDPM training on freshly rendered scenes every step (infinite data),
captions dropped to "" 10% of the time so classifier-free guidance works, and an exponential
moving average of the weights (what gets saved: it samples far better after few steps). Next to
the weights it writes <out>.json recording the command, settings, final loss, versions and the
file's sha256.
"""

from __future__ import annotations

import argparse
import copy
import math
import os

import torch
from tqdm import tqdm

from ppd_engine.worlds.toy.model import DEFAULT_ASSET, build_components, save_toy_model
from ppd_engine.worlds.toy.records import Clock, make_from_cli, refuse_overwrite, write_record
from ppd_engine.worlds.toy.scenes import make_scenes


def pretrain(out: str | os.PathLike = DEFAULT_ASSET, steps: int = 3000, batch: int = 32, lr: float = 2e-3,
             seed: int = 0, image_size: int = 16, caption_dropout: float = 0.1, ema_decay: float = 0.999,
             threads: int = 0, progress: bool = True, overwrite: bool = False) -> dict:
    """Train a fresh toy base for `steps` and save its EMA weights to `out`; returns the info dict.

    Refuses (FileExistsError, before any training) to replace an existing `out` unless `overwrite`."""
    refuse_overwrite(out, overwrite)
    if threads > 0:
        torch.set_num_threads(threads)
    unet, text, sched = build_components(image_size=image_size, seed=seed)
    unet.train()
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, min(200, steps // 10))
    # Linear warmup then cosine decay to 10%: stable start, sharper final weights.
    lr_at = lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    sched_lr = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    g = torch.Generator().manual_seed(seed)
    clock = Clock()
    losses: list[float] = []
    bar = tqdm(range(steps), desc="pretrain toy base", disable=not progress)
    for step in bar:
        images, captions = make_scenes(batch, image_size, g)
        drop = torch.rand(batch, generator=g) < caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        x0 = images * 2.0 - 1.0
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
        xt = sched.add_noise(x0, noise, t)
        pred = unet(xt, t, text(captions)).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched_lr.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1.0 - decay)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    info = {
        "steps": steps, "batch": batch, "lr": lr, "seed": seed, "image_size": image_size,
        "caption_dropout": caption_dropout, "ema_decay": ema_decay,
        "final_loss_avg100": sum(losses[-100:]) / max(1, len(losses[-100:])),
        **clock.info(), "params": sum(p.numel() for p in unet.parameters()),
    }
    import diffusers

    info["diffusers"] = diffusers.__version__
    save_toy_model(out, ema, text, info)
    return write_record(out, "python -m ppd_engine.worlds.toy.pretrain", info)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Pretrain the toy world's tiny base denoiser (seeded) and save it as safetensors.")
    p.add_argument("--out", default=str(DEFAULT_ASSET), help="output .safetensors (a .json record is written beside it)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    p.add_argument("--batch", type=int, default=32, help="scenes per step (fresh every step)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (warmup, then cosine to 10%%)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, scenes, noise and timesteps")
    p.add_argument("--image-size", type=int, default=16, help="scene side in pixels")
    p.add_argument("--caption-dropout", type=float, default=0.1, help="fraction of captions replaced by '' (for guidance)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay of the saved weights")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (the shipped asset too)")
    a = p.parse_args(argv)
    make_from_cli(p, lambda: pretrain(a.out, a.steps, a.batch, a.lr, a.seed, a.image_size, a.caption_dropout,
                                      a.ema_decay, a.threads, overwrite=a.overwrite), a.out)


if __name__ == "__main__":
    main()
