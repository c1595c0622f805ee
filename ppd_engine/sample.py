"""`python -m ppd_engine.sample`: images from a trained run for a user, an embedding file or a mix.

    python -m ppd_engine.sample --run RUN --user warm_bright --prompt "a circle" --n 8 --out out/
    python -m ppd_engine.sample --run RUN --embedding me.safetensors --prompt "a cat" --out out/
    python -m ppd_engine.sample --run RUN --mix warm_bright:0.5,cool_dark:0.5 --prompt "a ring" --out out/

Works for toy and real-model runs alike (the run's config says which model to build). Writes
OUT/<i>.png, OUT/contact_sheet.png and OUT/sample.json (the settings, for reproducing).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

from ppd_engine.cli.common import (
    DefaultsFormatter,
    UsageError,
    add_checkpoint,
    add_debug,
    add_device,
    add_progress,
    cli_errors,
    resolve_device,
)
from ppd_engine.files import save_image_atomic, write_json_atomic


def load_embedding_file(path: str | os.PathLike) -> torch.Tensor:
    """A safetensors file -> one embedding (T_in, Du).

    Accepted: a file with a single tensor (T_in, Du) or (K, T_in, Du) (first of K), a tensor named
    "embedding", or a one-user EmbeddingStore file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"--embedding {path}: expected a .safetensors file")
    try:
        tensors = load_file(str(path))
    except SafetensorError as exc:
        raise ValueError(f"--embedding {path}: not a readable safetensors file (truncated?): {exc}") from None
    if "embedding" in tensors:
        t = tensors["embedding"]
    elif len(tensors) == 1:
        t = next(iter(tensors.values()))
    else:
        raise ValueError(f"--embedding {path}: holds {len(tensors)} tensors ({', '.join(sorted(tensors)[:8])}); "
                         "name the one to use 'embedding' or keep a single tensor")
    if t.dim() == 3:
        t = t[0]
    if t.dim() != 2:
        raise ValueError(f"--embedding {path}: tensor must be (T_in, Du) or (K, T_in, Du), got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"--embedding {path}: holds NaN/Inf values")
    return t.float()


def parse_mix(spec: str) -> list[tuple[str, float]]:
    """'A:0.7,B:0.3' -> [("A", 0.7), ("B", 0.3)]."""
    out = []
    for part in spec.split(","):
        name, sep, w = part.strip().rpartition(":")
        if not sep or not name:
            raise ValueError(f"--mix {spec!r}: each item must be NAME:WEIGHT")
        try:
            weight = float(w)
        except ValueError:
            raise ValueError(f"--mix {spec!r}: weight {w!r} of {name!r} is not a number") from None
        if not math.isfinite(weight):
            raise ValueError(f"--mix {spec!r}: weight {w!r} of {name!r} is not a finite number")
        out.append((name, weight))
    if not out:
        raise ValueError("--mix needs at least one NAME:WEIGHT")
    if sum(w for _, w in out) == 0:
        raise ValueError(f"--mix {spec!r}: the weights sum to 0 (a mix is a weighted average of users)")
    return out


def contact_sheet(images: torch.Tensor, min_side: int = 128, pad: int = 2) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> a (3, H', W') grid, about square, white padding (torchvision's
    make_grid), nearest-upscaled so that tiny images stay visible."""
    from torchvision.utils import make_grid

    n, _, h, w = images.shape
    zoom = max(1, math.ceil(min_side / max(h, w)))
    tiles = images.float().clamp(0, 1).cpu().repeat_interleave(zoom, 2).repeat_interleave(zoom, 3)
    return make_grid(tiles, nrow=min(n, max(1, math.ceil(math.sqrt(n)))), padding=pad, pad_value=1.0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ppd_engine.sample",
                                description="Sample images from a trained PPD run for a user, an embedding file or a "
                                            "mix of users (classifier-free guidance over the text, optionally over "
                                            "the user).", formatter_class=DefaultsFormatter)
    p.add_argument("--run", required=True, metavar="RUN", help="run folder (RUN/config.yaml, RUN/checkpoints/)")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", metavar="NAME", help="a user of the run's embedding store (toy: its 4-shot embedding)")
    who.add_argument("--embedding", metavar="FILE", help="a .safetensors file holding one embedding (T_in, Du)")
    who.add_argument("--mix", metavar="NAME:W,NAME:W", help="weighted sum of users' embeddings, e.g. a:0.7,b:0.3")
    who.add_argument("--base", action="store_true", help="no user: the frozen base model (user branch off)")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the caption")
    p.add_argument("--n", type=int, default=8, help="number of images (seeds SEED .. SEED+n-1)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for <i>.png, contact_sheet.png, sample.json")
    p.add_argument("--negative-prompt", default="", metavar="TEXT",
                   help="caption of the unconditional branch of text guidance (default: empty, as trained)")
    p.add_argument("--height", type=int, default=None,
                   help="image height in pixels (default: the run's resolution; cascade runs: rounded up to whole "
                        "Stage C latents, 1024 px = 24 latents)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: as --height)")
    p.add_argument("--guidance", type=float, default=None,
                   help="text classifier-free guidance scale (default: what the run used: toy.guidance for toy "
                        "runs, else log.sample_guidance)")
    p.add_argument("--user-guidance", type=float, default=None,
                   help="extra guidance away from the zero (user-agnostic) embedding; 0 = off (default: what the "
                        "run used: toy.user_guidance for toy runs, else 0)")
    p.add_argument("--user-scale", type=float, default=1.0,
                   help="multiplies the user attention branch's trained strength (adapters.scale): 1 = as trained, "
                        "0 = off; the same as stock diffusers' set_ip_adapter_scale on a `ppd export`")
    p.add_argument("--steps", type=int, default=None,
                   help="sampler steps (default: what the run used: toy.sample_steps for toy runs, else "
                        "log.sample_steps)")
    p.add_argument("--scheduler", "--sampler", dest="scheduler", default="ddim", metavar="NAME",
                   help="ddim (eta 0, trailing spacing), dpm (DPM-Solver++ 2M), or any diffusers scheduler class "
                        "name (e.g. EulerDiscreteScheduler, UniPCMultistepScheduler), configured from the base's "
                        "scheduler config")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image")
    add_checkpoint(p)
    add_device(p, "where to sample")
    p.add_argument("--batch-size", type=int, default=0, help="images per UNet call (0 = all at once)")
    add_progress(p)
    add_debug(p)
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.n < 1:
        raise UsageError("--n must be >= 1")
    for flag, value in (("--guidance", args.guidance), ("--user-guidance", args.user_guidance),
                        ("--user-scale", args.user_scale)):
        if value is not None and not math.isfinite(value):
            raise UsageError(f"{flag} {value}: not a finite number (NaN/Inf would sample black images)")
    import ppd_engine.worlds  # noqa: F401  (a run of any registered world can be sampled)
    from ppd_engine.sampling import generate, scheduler_class
    from ppd_engine.training import load_run
    from ppd_engine.training.run import run_user_embedding, sampling_defaults

    scheduler_class(args.scheduler)  # a misspelt name fails before the model loads
    run = Path(args.run)
    cfg, model = load_run(run, checkpoint=args.checkpoint, device=resolve_device(args.device))
    if args.base:
        embed, source = None, "base"
    elif args.embedding:
        embed, source = load_embedding_file(args.embedding), f"file {args.embedding}"
    elif args.user:
        embed, source = run_user_embedding(run, cfg, user=args.user), f"user {args.user}"
    else:
        mix = parse_mix(args.mix)
        embed = run_user_embedding(run, cfg, mix=mix)
        source = "mix " + ", ".join(f"{w:g} x {name}" for name, w in mix)
    if embed is not None and not torch.isfinite(embed).all():
        raise ValueError(f"the embedding of {source} holds NaN/Inf values")
    # What the run itself sampled with, unless a flag says otherwise.
    defaults = sampling_defaults(cfg)
    guidance = args.guidance if args.guidance is not None else defaults["guidance"]
    steps = args.steps if args.steps is not None else defaults["steps"]
    user_guidance = args.user_guidance if args.user_guidance is not None else defaults["user_guidance"]
    if embed is None and args.user_guidance is None:
        user_guidance = 0.0  # the base model has no user to guide toward
    seeds = [args.seed + i for i in range(args.n)]
    embeds = None if embed is None else embed[None].expand(args.n, -1, -1).contiguous()
    images = generate(model, [args.prompt] * args.n, embeds, seeds, steps=steps, guidance=guidance,
                      user_guidance=user_guidance, user_scale=args.user_scale, sampler=args.scheduler,
                      negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                      batch_size=args.batch_size, progress=args.progress)
    out = Path(args.out)
    for i, img in enumerate(images):
        save_image_atomic(img, out / f"{i}.png")
    sheet = out / "contact_sheet.png"
    save_image_atomic(contact_sheet(images), sheet)
    record = {"run": str(run), "checkpoint": args.checkpoint, "who": source, "prompt": args.prompt,
              "negative_prompt": args.negative_prompt, "n": args.n, "seeds": seeds, "height": int(images.shape[2]),
              "width": int(images.shape[3]), "steps": steps, "guidance": guidance, "user_guidance": user_guidance,
              "user_scale": args.user_scale, "scheduler": args.scheduler}
    write_json_atomic(out / "sample.json", record, indent=2)
    print(f"{args.n} images for {source} ({args.prompt!r}) -> {out}  (contact sheet: {sheet})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
