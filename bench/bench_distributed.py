"""Replicated vs FSDP2-sharded adapters: step time and per-rank adapter memory, 2 gloo ranks on CPU.

    python -m bench.bench_distributed [--steps 6] [--user-dim 896] [--num-tokens 16]

Runs the real Trainer (tiny random SD1.5-style UNet, adapters widened through the user projection so
the adapter weights dominate like the real ~10^7-10^8 trained parameters do) once per mode with two
spawned processes, and prints a markdown table: median step time after the first step, and per rank
the bytes of adapter parameters, gradients and optimizer state. Used for docs/DISTRIBUTED.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile

import torch
import torch.multiprocessing as mp


def _model(user_dim: int):
    from diffusers import DDPMScheduler

    from ppd_engine.models import DiffusionModel, TextConditioning
    from ppd_engine.testing.tiny_unets import tiny_unet

    unet = tiny_unet("sd15", cross_attention_dim=64, block_out_channels=(32, 64), attention_head_dim=(2, 4))

    def encode_text(captions):
        g = torch.Generator().manual_seed(len(captions))
        return TextConditioning(torch.randn(len(captions), 7, 64, generator=g), None)

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return DiffusionModel("sd15", unet.requires_grad_(False), sched, encode_text, 128)


def _worker(rank: int, world: int, port: int, mode: str, args, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch.distributed as dist

    from ppd_engine.config import load_config
    from ppd_engine.training import Trainer
    from ppd_engine.training.distributed import local

    g = torch.Generator().manual_seed(0)
    items = [{"latents_w": torch.randn(4, 16, 16, generator=g), "latents_l": torch.randn(4, 16, 16, generator=g),
              "text": torch.randn(7, 64, generator=g), "user_id": f"u{i % 4}", "pair_id": str(i)} for i in range(64)]
    emb = {f"u{j}": torch.randn(2, 1, args.user_dim, generator=g) for j in range(4)}
    cfg = load_config(None, [
        f"dist.adapters={mode}", "train.pairs_per_step=8", "train.micro_batch=2", f"train.max_steps={args.steps}",
        "train.mixed_precision=fp32", "log.tensorboard=false", "log.progress=false", "checkpoint.every=0",
        f"adapters.num_tokens={args.num_tokens}", "optim.name=adamw8bit"])
    trainer = Trainer(cfg, _model(args.user_dim), items, emb, os.path.join(out, mode))
    times = []
    for _ in range(args.steps):
        dist.barrier()
        row = trainer.train_step()
        times.append(cfg.train.pairs_per_step / row["pairs_per_s"])
    param_b = sum(local(p.data).numel() * 4 for p in trainer.params)
    opt_b = sum(v.numel() * v.element_size() for st in trainer.optimizer.state.values() for v in st.values()
                if isinstance(v, torch.Tensor) and v.numel() > 256)  # the shared 256-entry qmaps excluded
    total = sum(p.numel() for p in trainer.adapters.parameters()) * (world if trainer.sharded else 1)
    if rank == 0:
        with open(os.path.join(out, f"{mode}.json"), "w") as fh:
            json.dump({"mode": mode, "step_s": statistics.median(times[1:]), "adapter_params": total,
                       "param_bytes": param_b, "grad_bytes": param_b, "optim_bytes": opt_b}, fh)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per mode (the first is not timed)")
    ap.add_argument("--user-dim", type=int, default=896, help="user embedding width (widens the projection)")
    ap.add_argument("--num-tokens", type=int, default=16, help="user tokens (widens the projection)")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for mode in ("replicate", "shard"):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.spawn(_worker, args=(2, port, mode, args, out), nprocs=2, join=True)
            with open(os.path.join(out, f"{mode}.json")) as fh:
                rows.append(json.load(fh))
    print(f"2 gloo ranks, CPU, {torch.__version__}; adapters {rows[0]['adapter_params']:,} params; "
          "8 pairs/step (2 micro-batches of 2 per rank); adamw8bit\n")
    print("| adapters | median step (s) | per-rank params (MiB) | grads (MiB) | optimizer state (MiB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        mib = 2 ** 20
        print(f"| {r['mode']} | {r['step_s']:.3f} | {r['param_bytes'] / mib:.2f} | {r['grad_bytes'] / mib:.2f} | "
              f"{r['optim_bytes'] / mib:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
