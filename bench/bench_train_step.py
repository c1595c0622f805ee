"""One full PPD training step: the engine against the stock-diffusers baselines, in one run.

    python -m bench.bench_train_step --device cpu --arch small          # CPU here
    python -m bench.bench_train_step --device cuda --arch sd15          # GPU (SD1.5 architecture, 64x64 latents)

Providers (same random-initialised UNet, same batch, same dtype):
  ppd[-<strategy>-<attention>]  the engine: adapters on one frozen base, paired forward, fused DPO
                                loss (training.step.micro_step_loss), bitsandbytes AdamW8bit
  stock-cached                  bench/baselines.py StockPPD, latents from a cache
  stock-vae                     the same, with the VAE encoder run on every step (the public scripts)

Per provider: median step time, pairs/s, peak memory; for the engine, a per-phase breakdown
(data, reference forward, policy forward, loss, backward, optimiser), model FLOPs per pair counted
with torch.utils.flop_counter, and the utilisation against a matmul peak measured in the same run.
"""
from __future__ import annotations

import argparse
import time

import torch

from bench.baselines import UNET_ARCHS, StockPPD, build_unet, build_vae, clone_unet, make_batch
from bench.common import device_name, markdown_table, measure, row, write_rows

USER_DIM = 64
NUM_TOKENS = 4


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Achieved dense matmul TFLOP/s on this device now (the utilisation denominator)."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = measure(lambda: a @ b, device, warmup=3, runs=10)
    return 2 * n**3 / (t.median_ms * 1e-3) / 1e12


class EngineStep:
    """The engine's step on a bare UNet: adapters, cached latents, micro_step_loss, AdamW8bit."""

    def __init__(self, unet, strategy: str, attention: str, autocast_dtype, beta: float = 5000.0, lr: float = 1e-5,
                 checkpointing: bool = False):
        import bitsandbytes as bnb
        from diffusers import DDPMScheduler

        from ppd_engine.adapters import add_user_adapters
        from ppd_engine.models import DiffusionModel, TextConditioning

        self.handle = add_user_adapters(unet, user_dim=USER_DIM, num_tokens=NUM_TOKENS, attention=attention,
                                        dtype=torch.float32)
        unet.train()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        family = "sdxl" if unet.config.addition_embed_type == "text_time" else "sd15"
        self.model = DiffusionModel(family=family, unet=unet, noise_scheduler=DDPMScheduler(num_train_timesteps=1000),
                                    encode_text=lambda captions: TextConditioning(None, None),
                                    resolution=8 * unet.config.sample_size)
        params = list(self.handle.parameters())
        self.opt = bnb.optim.AdamW8bit(params, lr=lr, min_8bit_size=4096)
        self.strategy, self.beta, self.autocast_dtype = strategy, beta, autocast_dtype
        self.phase_times: dict[str, list[float]] = {}

    def _batch(self, b):
        from ppd_engine.training.data_order import PairDraws

        pairs = b.latents.shape[0] // 2
        dev = b.latents.device
        batch = {"latents_w": b.latents[:pairs].float(), "latents_l": b.latents[pairs:].float(),
                 "text": b.text[:pairs].float()}
        if b.pooled is not None:
            batch.update(pooled=b.pooled[:pairs].float(), time_ids_w=b.time_ids[:pairs].float(),
                         time_ids_l=b.time_ids[pairs:].float())
        draws = PairDraws(timesteps=torch.randint(0, 1000, (pairs,), device=dev),
                          noise=torch.randn_like(batch["latents_w"]),
                          drop_caption=torch.zeros(pairs, dtype=torch.bool, device=dev),
                          drop_user=torch.zeros(pairs, dtype=torch.bool, device=dev),
                          embed_choice=torch.zeros(pairs, dtype=torch.float64))
        empty_pooled = torch.zeros_like(batch["pooled"][:1]) if b.pooled is not None else None
        return batch, draws, b.user[:pairs].float(), torch.zeros_like(batch["text"][:1]), empty_pooled

    def step(self, b, hook=None):
        from ppd_engine.training.step import micro_step_loss

        batch, draws, user, empty_text, empty_pooled = self._batch(b)
        loss, _ = micro_step_loss(self.model, batch, draws, user, empty_text, empty_pooled, loss_name="dpo",
                                  beta=self.beta, weighting="uniform", snr_gamma=5.0, loss_options={},
                                  strategy=self.strategy, autocast_dtype=self.autocast_dtype, phase_hook=hook)
        if hook:
            hook("backward", "start")
        loss.backward()
        if hook:
            hook("backward", "end")
            hook("optimizer", "start")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if hook:
            hook("optimizer", "end")
        return loss.detach()


def phase_breakdown(engine: EngineStep, batch, device: torch.device, runs: int) -> dict[str, float]:
    """Median milliseconds per phase of the engine step (synchronised wall clock per phase)."""
    starts: dict[str, float] = {}
    times: dict[str, list[float]] = {}

    def hook(phase, event):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        if event == "start":
            starts[phase] = now
        else:
            times.setdefault(phase, []).append((now - starts[phase]) * 1e3)

    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        engine._batch(batch)
        times.setdefault("data", []).append((time.perf_counter() - t0) * 1e3)
        engine.step(batch, hook)
    return {k: round(sorted(v)[len(v) // 2], 3) for k, v in times.items()}


def flops_per_pair(engine: EngineStep, batch) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        engine.step(batch)
    return fc.get_total_flops() / (batch.latents.shape[0] // 2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    ap.add_argument("--arch", default=None, choices=sorted(UNET_ARCHS),
                    help="UNet architecture (default: small on CPU, sd15 on CUDA)")
    ap.add_argument("--pairs", type=int, nargs="*", default=None,
                    help="pairs per step to measure (default: 1 4 on CPU, 4 16 on CUDA)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="compute dtype (default: float32 on CPU, bfloat16 autocast on CUDA)")
    ap.add_argument("--runs", type=int, default=None, help="timed steps per provider (default 5 CPU, 20 CUDA)")
    ap.add_argument("--variants", default="sequential:sdpa,stacked:sdpa,sequential:auto,sequential:auto:ckpt",
                    help="engine variants as strategy:attention[:ckpt] (ckpt = gradient checkpointing), "
                         "comma separated")
    ap.add_argument("--no-vae", action="store_true", help="skip the VAE-every-step baseline")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU intra-op threads (default 1: on a shared 2-core machine two OpenMP threads "
                         "stall whenever the other core is busy, which swamps the differences measured)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no GPU is visible")
    arch = args.arch or ("small" if device.type == "cpu" else "sd15")
    pair_sizes = args.pairs or ([1, 4] if device.type == "cpu" else [4, 16])
    dtype_name = args.dtype or ("float32" if device.type == "cpu" else "bfloat16")
    autocast = torch.bfloat16 if dtype_name == "bfloat16" else None
    runs = args.runs or (5 if device.type == "cpu" else 20)
    variants = [v.split(":") for v in args.variants.split(",") if v]

    peak = matmul_peak_tflops(device, torch.bfloat16 if autocast else torch.float32)
    print(f"{device_name(device)}: matmul peak {peak:.2f} TFLOP/s ({dtype_name}); arch {arch}")
    base = build_unet(arch, device=device)
    rows = []
    for pairs in pair_sizes:
        batch = make_batch(arch, pairs, USER_DIM, device=device, with_pixels=not args.no_vae)
        shape = f"{arch} pairs={pairs} latents={tuple(batch.latents.shape[1:])}"
        providers = []
        for strategy, attention, *ckpt in variants:
            name = f"ppd-{strategy}-{attention}" + ("-ckpt" if ckpt else "")
            providers.append((name, EngineStep(clone_unet(base), strategy, attention, autocast, checkpointing=bool(ckpt))))
        providers.append(("stock-cached", StockPPD(clone_unet(base), USER_DIM, NUM_TOKENS, autocast_dtype=autocast)))
        if not args.no_vae:
            vae = build_vae(arch, device=device)
            providers.append(("stock-vae", StockPPD(clone_unet(base), USER_DIM, NUM_TOKENS, vae=vae,
                                                    vae_every_step=True, autocast_dtype=autocast)))
        for name, prov in providers:
            t = measure(lambda: prov.step(batch), device, warmup=2, runs=runs)
            extra = {"pairs_per_s": round(pairs / (t.median_ms * 1e-3), 3)}
            if name.startswith("ppd"):
                fpp = flops_per_pair(prov, batch)
                extra.update(flops_per_pair=f"{fpp:.3e}",
                             utilisation=f"{fpp * pairs / (t.median_ms * 1e-3) / (peak * 1e12):.1%}",
                             phases_ms=phase_breakdown(prov, batch, device, runs=max(3, runs // 2)))
            rows.append(row("train_step", name, shape, dtype_name, device, t, **extra))
            print(f"  {shape:40s} {name:28s} {t.median_ms:9.2f} ms  {extra['pairs_per_s']:8.2f} pairs/s  "
                  f"peak {t.peak_mem_mb:8.1f} MB  {extra.get('phases_ms', '')}", flush=True)

    path = write_rows(rows, f"train_step_{device.type}_{arch}.jsonl")
    print()
    print(markdown_table(rows, "stock-cached", extra_cols=("pairs_per_s", "utilisation")))
    print(f"\nmatmul peak measured in this run: {peak:.2f} TFLOP/s; rows written to {path}")


if __name__ == "__main__":
    main()
