"""One full PPD training step: the engine against the stock-diffusers baselines, in one run.

    python -m bench.bench_train_step --device cpu --arch small          # CPU here
    python -m bench.bench_train_step --device cuda --arch sd15          # GPU (SD1.5 architecture, 64x64 latents)

Providers (same random-initialised UNet, same batch, same dtype), measured interleaved (round
robin, one step of each in turn) so a shared machine's load falls on all of them alike:
  ppd-default                   the engine with its default configuration (config schema defaults:
                                cached reference, sequential, SDPA attention, feed-forward checkpointing)
  ppd-<strategy>-<attention>[-online][-ckpt|-sac|-ff][-compile]
                                variants: adapters on one frozen base, paired or policy-only forward,
                                fused DPO loss (training.step.micro_step_loss), bitsandbytes AdamW8bit
  stock-cached                  bench/baselines.py StockPPD, latents from a cache
  stock-vae                     the same, with the VAE encoder run on every step (the public scripts)

Per provider: median step time, pairs/s, peak memory; for the engine, a per-phase breakdown
(data, reference forward, policy forward, loss, backward, optimiser), model FLOPs per pair counted
with torch.utils.flop_counter, and the utilisation against a matmul peak measured in the same run.
At the end: each engine provider's speed-up and memory ratio against stock-cached, the goal verdict
for ppd-default, and the whole-sweep cost of k runs sharing one reference pass (pre-pass timed in
the same loop) against k stock runs.
"""
from __future__ import annotations

import argparse
import functools
import time

import torch

from bench.baselines import UNET_ARCHS, StockPPD, build_unet, build_vae, clone_unet, make_batch
from bench.common import device_name, markdown_table, measure, measure_interleaved, row, write_rows

USER_DIM = 64
NUM_TOKENS = 4


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Achieved dense matmul TFLOP/s on this device now (the utilisation denominator)."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = measure(lambda: a @ b, device, warmup=3, runs=10)
    return 2 * n**3 / (t.median_ms * 1e-3) / 1e12


def engine_defaults() -> dict:
    """The engine's default step configuration, read from the config schema (so `ppd-default` follows
    the defaults when they change)."""
    from ppd_engine.config.schema import AdaptersConfig, TrainConfig

    t, a = TrainConfig(), AdaptersConfig()
    return {"strategy": t.paired_strategy, "attention": a.attention, "reference": t.reference,
            "checkpointing": t.checkpoint_policy if t.gradient_checkpointing else None, "compile": t.compile}


def parse_variant(spec: str) -> tuple[str, dict]:
    """'default' or strategy:attention[:flag...] with flags online (reference every step; cached is
    the default), ckpt / sac / ff (full / selective / feed-forward gradient checkpointing; none of
    them = no checkpointing), compile -> (provider name, EngineStep keyword arguments)."""
    if spec == "default":
        return "ppd-default", engine_defaults()
    strategy, attention, *flags = spec.split(":")
    unknown = set(flags) - {"online", "ckpt", "sac", "ff", "compile"}
    if unknown:
        raise SystemExit(f"--variants: unknown flag(s) {sorted(unknown)} in {spec!r}")
    kw = {"strategy": strategy, "attention": attention, "reference": "online" if "online" in flags else "cached",
          "checkpointing": {"ckpt": "full", "sac": "selective", "ff": "feedforward"}.get(
              next((f for f in flags if f in ("ckpt", "sac", "ff")), ""), None),
          "compile": "compile" in flags}
    if strategy == "stacked":
        kw["reference"] = "online"  # the trainer's rule: stacked batches the reference with the policy
    name = f"ppd-{strategy}-{attention}" + ("-online" if "online" in flags else "")
    name += "".join(f"-{f}" for f in ("ckpt", "sac", "ff", "compile") if f in flags)
    return name, kw


class EngineStep:
    """The engine's step on a bare UNet: adapters, cached latents, micro_step_loss, AdamW8bit.

    reference="cached": the reference MSEs of a batch are computed once by the inference-only pass
    of training/reference.py (first call, a warm-up) and handed to the step, as the trainer does;
    `reference_pass` times that pass alone. The draws (t, noise) are fixed per batch so the cached
    MSEs belong to the step's draws."""

    def __init__(self, unet, strategy: str, attention: str, autocast_dtype, beta: float = 5000.0, lr: float = 1e-5,
                 checkpointing: str | None = None, reference: str = "online", compile: bool = False):
        import bitsandbytes as bnb
        from diffusers import DDPMScheduler

        from ppd_engine.adapters import add_user_adapters
        from ppd_engine.models import DiffusionModel, TextConditioning
        from ppd_engine.training.activation_checkpointing import enable_checkpointing, unsave_frozen_conv_inputs

        self.handle = add_user_adapters(unet, user_dim=USER_DIM, num_tokens=NUM_TOKENS, attention=attention,
                                        dtype=torch.float32)
        unet.train()
        unsave_frozen_conv_inputs(unet)  # as the trainer does
        if checkpointing:
            enable_checkpointing(unet, checkpointing)
        if compile:
            unet.compile()
        family = "sdxl" if unet.config.addition_embed_type == "text_time" else "sd15"
        self.model = DiffusionModel(family=family, unet=unet, noise_scheduler=DDPMScheduler(num_train_timesteps=1000),
                                    encode_text=lambda captions: TextConditioning(None, None),
                                    resolution=8 * unet.config.sample_size)
        params = list(self.handle.parameters())
        self.opt = bnb.optim.AdamW8bit(params, lr=lr, min_8bit_size=4096)
        self.strategy, self.beta, self.autocast_dtype = strategy, beta, autocast_dtype
        self.reference = reference
        self._draws: dict[int, object] = {}
        self._ref_mse: dict[int, torch.Tensor] = {}

    def _batch(self, b):
        from ppd_engine.training.data_order import PairDraws

        pairs = b.latents.shape[0] // 2
        dev = b.latents.device
        batch = {"latents_w": b.latents[:pairs].float(), "latents_l": b.latents[pairs:].float(),
                 "text": b.text[:pairs].float()}
        if b.pooled is not None:
            batch.update(pooled=b.pooled[:pairs].float(), time_ids_w=b.time_ids[:pairs].float(),
                         time_ids_l=b.time_ids[pairs:].float())
        if id(b) not in self._draws:
            g = torch.Generator(device=dev).manual_seed(0)
            self._draws[id(b)] = PairDraws(
                timesteps=torch.randint(0, 1000, (pairs,), device=dev, generator=g),
                noise=torch.randn(batch["latents_w"].shape, device=dev, generator=g),
                drop_caption=torch.zeros(pairs, dtype=torch.bool, device=dev),
                drop_user=torch.zeros(pairs, dtype=torch.bool, device=dev),
                embed_choice=torch.zeros(pairs, dtype=torch.float64))
        empty_pooled = torch.zeros_like(batch["pooled"][:1]) if b.pooled is not None else None
        return batch, self._draws[id(b)], b.user[:pairs].float(), torch.zeros_like(batch["text"][:1]), empty_pooled

    def reference_pass(self, b) -> torch.Tensor:
        """The cached-reference pre-pass over this batch: (2B,) float64 reference MSEs."""
        from ppd_engine.training.reference import reference_mse
        from ppd_engine.training.step import noised_pairs

        batch, draws, _, empty_text, empty_pooled = self._batch(b)
        return reference_mse(self.model, noised_pairs(self.model, batch, draws, empty_text, empty_pooled),
                             self.autocast_dtype)

    def step(self, b, hook=None):
        from ppd_engine.training.step import micro_step_loss

        batch, draws, user, empty_text, empty_pooled = self._batch(b)
        ref_mse = None
        if self.reference == "cached":
            if id(b) not in self._ref_mse:
                self._ref_mse[id(b)] = self.reference_pass(b)
            ref_mse = self._ref_mse[id(b)]
        loss, _ = micro_step_loss(self.model, batch, draws, user, empty_text, empty_pooled, loss_name="dpo",
                                  beta=self.beta, weighting="uniform", snr_gamma=5.0, loss_options={},
                                  strategy=self.strategy, autocast_dtype=self.autocast_dtype, phase_hook=hook,
                                  ref_mse=ref_mse)
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


SWEEP_RUNS = (1, 4, 8)
GOAL = {"cpu": (1.2, 0.7), "cuda": (2.0, 0.6)}  # (speed-up >=, memory ratio <=) against stock-cached


def report_ratios(rows, pairs: int, device: torch.device) -> list[str]:
    """Speed-up and memory ratio of every engine provider against stock-cached of the same run, the
    goal verdict for ppd-default, and its whole-sweep cost (k runs sharing one reference pass)."""
    by = {r.provider: r for r in rows if r.shape.split()[1] == f"pairs={pairs}"}
    base = by["stock-cached"]
    speed_goal, mem_goal = GOAL[device.type]
    lines = [f"pairs={pairs}: against stock-cached ({base.median_ms:.1f} ms, {base.peak_mem_mb:.1f} MB), "
             "same run, interleaved"]
    for name, r in by.items():
        if not name.startswith("ppd"):
            continue
        speed, mem = base.median_ms / r.median_ms, r.peak_mem_mb / base.peak_mem_mb
        r.extra.update(speedup=round(speed, 3), mem_ratio=round(mem, 3))
        met = speed >= speed_goal and mem <= mem_goal
        lines.append(f"  {name:32s} {speed:5.2f}x pairs/s  {mem:5.2f}x memory"
                     + (f"   goal (>= {speed_goal}x, <= {mem_goal}x): {'MET' if met else 'not met'}"
                        if name == "ppd-default" else ""))
    d = by.get("ppd-default")
    if d is not None and "prepass_ms" in d.extra:
        # k runs of S steps on the same batch schedule: engine = one pre-pass + k policy-only runs.
        sweep = {k: round(k * base.median_ms / (k * d.median_ms + d.extra["prepass_ms"]), 3) for k in SWEEP_RUNS}
        d.extra["sweep_speedup"] = sweep
        lines.append(f"  whole sweep (k runs, one shared reference pass of {d.extra['prepass_ms']:.1f} ms per step's "
                     "pairs): " + ", ".join(f"k={k}: {v:.2f}x" for k, v in sweep.items()))
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    ap.add_argument("--arch", default=None, choices=sorted(UNET_ARCHS),
                    help="UNet architecture (default: small on CPU, sd15 on CUDA)")
    ap.add_argument("--pairs", type=int, nargs="*", default=None,
                    help="pairs per step to measure (default: 1 4 on CPU, 4 16 on CUDA)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="compute dtype (default: float32 on CPU, bfloat16 autocast on CUDA)")
    ap.add_argument("--runs", type=int, default=None, help="timed steps per provider (default 7 CPU, 20 CUDA)")
    ap.add_argument("--variants", default="default,sequential:sdpa:online,sequential:auto,sequential:auto:online,"
                                          "sequential:sdpa,sequential:auto:ff,sequential:sdpa:sac,sequential:sdpa:ckpt,"
                                          "sequential:auto:ckpt,stacked:sdpa",
                    help="engine variants, comma separated: 'default' (the engine's defaults, row ppd-default) or "
                         "strategy:attention[:online][:ckpt|:sac|:ff][:compile] (online = reference forward every "
                         "step instead of the cached pass; ckpt/sac/ff = full/selective/feed-forward gradient "
                         "checkpointing, none = no checkpointing)")
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
    runs = args.runs or (7 if device.type == "cpu" else 20)
    variants = [parse_variant(v) for v in args.variants.split(",") if v]

    peak = matmul_peak_tflops(device, torch.bfloat16 if autocast else torch.float32)
    print(f"{device_name(device)}: matmul peak {peak:.2f} TFLOP/s ({dtype_name}); arch {arch}; "
          f"engine defaults {engine_defaults()}")
    base = build_unet(arch, device=device)
    rows, report = [], []
    for pairs in pair_sizes:
        batch = make_batch(arch, pairs, USER_DIM, device=device, with_pixels=not args.no_vae)
        shape = f"{arch} pairs={pairs} latents={tuple(batch.latents.shape[1:])}"
        providers = {}
        for name, kw in variants:
            t0 = time.perf_counter()
            providers[name] = EngineStep(clone_unet(base), autocast_dtype=autocast, **kw)
            providers[name].step(batch)  # first call: compile (if asked) and the cached reference pass
            if kw["compile"]:
                print(f"  {name}: first step (compilation) {time.perf_counter() - t0:.1f} s", flush=True)
        providers["stock-cached"] = StockPPD(clone_unet(base), USER_DIM, NUM_TOKENS, autocast_dtype=autocast)
        if not args.no_vae:
            vae = build_vae(arch, device=device)
            providers["stock-vae"] = StockPPD(clone_unet(base), USER_DIM, NUM_TOKENS, vae=vae, vae_every_step=True,
                                              autocast_dtype=autocast)
        fns = {name: functools.partial(prov.step, batch) for name, prov in providers.items()}
        # The pre-pass of the default configuration, timed in the same loop as the steps.
        if "ppd-default" in providers and providers["ppd-default"].reference == "cached":
            fns["prepass"] = functools.partial(providers["ppd-default"].reference_pass, batch)
        timings = measure_interleaved(fns, device, warmup=2, runs=runs)
        prepass = timings.pop("prepass", None)
        for name, prov in providers.items():
            t = timings[name]
            extra = {"pairs_per_s": round(pairs / (t.median_ms * 1e-3), 3), "interleaved": True}
            if name.startswith("ppd"):
                fpp = flops_per_pair(prov, batch)
                extra.update(flops_per_pair=f"{fpp:.3e}",
                             utilisation=f"{fpp * pairs / (t.median_ms * 1e-3) / (peak * 1e12):.1%}",
                             phases_ms=phase_breakdown(prov, batch, device, runs=max(3, runs // 2)),
                             reference=prov.reference)
            if name == "ppd-default":
                extra["config"] = engine_defaults()
                if prepass is not None:
                    extra["prepass_ms"] = round(prepass.median_ms, 3)
            rows.append(row("train_step", name, shape, dtype_name, device, t, **extra))
            print(f"  {shape:40s} {name:32s} {t.median_ms:9.2f} ms  {extra['pairs_per_s']:8.2f} pairs/s  "
                  f"peak {t.peak_mem_mb:8.1f} MB  {extra.get('phases_ms', '')}", flush=True)
        report += report_ratios(rows, pairs, device)

    path = write_rows(rows, f"train_step_{device.type}_{arch}.jsonl")
    print()
    print(markdown_table(rows, "stock-cached", extra_cols=("pairs_per_s", "utilisation")))
    print()
    print("\n".join(report))
    print(f"\nmatmul peak measured in this run: {peak:.2f} TFLOP/s; rows written to {path}")


if __name__ == "__main__":
    main()
