"""The reward-model flags every command that scores images shares (eval, rewards_users), and the
models they name."""

from __future__ import annotations

import argparse

from ppd_engine.cli.common import UsageError, add_dtype, resolve_device
from ppd_engine.dtypes import torch_dtype

from .rewards import (AESTHETIC_CLIP, CLIP_MODEL, HPSV2_ARCH, HPSV2_REPO, PICKSCORE_MODEL, REWARD_NAMES,
                      load_reward)


def add_reward_args(p: argparse.ArgumentParser, single: bool = False) -> None:
    g = p.add_argument_group("reward models")
    if single:
        g.add_argument("--reward", default="pickscore", choices=REWARD_NAMES,
                       help="reward that ranks the runs (default pickscore, as in the paper)")
    else:
        g.add_argument("--rewards", default="pickscore",
                       help=f"comma-separated reward models from {', '.join(REWARD_NAMES)} "
                            "(default pickscore); 'none' = judge only")
    g.add_argument("--pickscore-model", default=PICKSCORE_MODEL,
                   help=f"PickScore CLIP folder or hub id (default {PICKSCORE_MODEL})")
    g.add_argument("--pickscore-processor", default=None,
                   help="CLIPProcessor folder/hub id for PickScore (default: the model's own, or "
                        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K for the default model)")
    g.add_argument("--clip-model", default=CLIP_MODEL,
                   help=f"CLIP folder or hub id for the CLIP score (default {CLIP_MODEL})")
    g.add_argument("--aesthetic-clip", default=AESTHETIC_CLIP,
                   help=f"CLIP ViT-L/14 folder or hub id under the aesthetic MLP (default {AESTHETIC_CLIP})")
    g.add_argument("--aesthetic-weights", default=None,
                   help="LAION aesthetic MLP weights (.pth or .safetensors; e.g. "
                        "sac+logos+ava1-l14-linearMSE.pth); required for 'aesthetic'")
    g.add_argument("--hpsv2-checkpoint", default=HPSV2_REPO,
                   help="HPSv2 checkpoint file, folder, open_clip folder, or hub id "
                        f"(default {HPSV2_REPO}, file HPS_v2.1_compressed.pt); needs open_clip_torch")
    g.add_argument("--hpsv2-arch", default=HPSV2_ARCH,
                   help=f"open_clip architecture of an HPSv2 checkpoint file (default {HPSV2_ARCH})")
    g.add_argument("--reward-batch-size", type=int, default=16, help="images per reward batch (default 16)")
    add_dtype(g, "fp32", "reward model dtype")


def reward_names(args) -> list[str]:
    if getattr(args, "reward", None):
        return [args.reward]
    if args.rewards.strip().lower() == "none":
        return []
    names = [n.strip() for n in args.rewards.split(",") if n.strip()]
    bad = [n for n in names if n not in REWARD_NAMES]
    if bad:
        raise UsageError(f"--rewards: unknown {bad}; choose from {', '.join(REWARD_NAMES)}")
    return names


def load_named_reward(args, name: str):
    """One reward model from the reward-model flags of `add_reward_args`."""
    return load_reward(name, pickscore_model=args.pickscore_model, pickscore_processor=args.pickscore_processor,
                       clip_model=args.clip_model, aesthetic_clip=args.aesthetic_clip,
                       aesthetic_weights=args.aesthetic_weights, hpsv2_checkpoint=args.hpsv2_checkpoint,
                       hpsv2_arch=args.hpsv2_arch, batch_size=args.reward_batch_size,
                       device=resolve_device(args.device), dtype=torch_dtype(args.dtype))
