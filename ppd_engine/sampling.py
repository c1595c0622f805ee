"""Sampling from a (user-conditioned) DiffusionModel: DDIM / DPM-Solver++ with classifier-free guidance.

    images = generate(model, prompts, user_embeds, seeds, steps=30, guidance=5.0)   # (N, 3, H, W) in [0, 1]

Guidance, with c the caption, u the user embedding and 0 the zero embedding (the branch that
embedding dropout trains, the "any user" condition):

    eps = eps(empty, u) + guidance * (eps(c, u) - eps(empty, u))
          + user_guidance * (eps(c, u) - eps(c, 0))                   # only when user_guidance > 0

so the user is present in both text branches (as IP-Adapter conditions its negative branch on the
image too) and user guidance pushes away from the user-agnostic prediction. `user_embeds=None`
samples the base model (the user branch off, gate 0), which is also what a model without
adapters does. Each sample's starting noise comes from its own seed, so an image does not depend
on what else is in the batch.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Sequence

import torch
from tqdm import tqdm

SAMPLERS = ("ddim", "dpm")


def make_scheduler(config, sampler: str = "ddim"):
    """A sampling scheduler built from a base's noise-scheduler `config`.

    "ddim" (eta 0) and "dpm" (DPM-Solver++ 2M) are the engine's own settings: "trailing" spacing
    starts at the last training timestep (pure noise), which matters at the 10-30 steps used here
    (Lin et al., "Common Diffusion Noise Schedules and Sample Steps Are Flawed"); clip_sample comes
    from the base's schedule (on for pixel-space toy models, off for latents). Any other name is a
    diffusers scheduler class (e.g. EulerDiscreteScheduler, UniPCMultistepScheduler), configured
    from `config` as is, the way a stock pipeline's scheduler is swapped."""
    cls = scheduler_class(sampler)
    cfg = dict(config)
    if sampler == "ddim":
        return cls.from_config(cfg, timestep_spacing="trailing", set_alpha_to_one=False)
    if sampler == "dpm":
        return cls.from_config(cfg, timestep_spacing="trailing", algorithm_type="dpmsolver++", solver_order=2)
    return cls.from_config(cfg)


def scheduler_class(sampler: str) -> type:
    """The diffusers class of a `make_scheduler` name; ValueError (with close names) for anything else."""
    import diffusers
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    if sampler in SAMPLERS:
        return diffusers.DDIMScheduler if sampler == "ddim" else diffusers.DPMSolverMultistepScheduler
    cls = getattr(diffusers, sampler, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        close = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and sampler.lower() in n.lower())
        hint = f"did you mean {' or '.join(close[:4])}?" if close else (
            "e.g. DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, "
            "EulerAncestralDiscreteScheduler, UniPCMultistepScheduler, PNDMScheduler")
        raise ValueError(f"scheduler {sampler!r}: choose {' | '.join(SAMPLERS)} or a diffusers scheduler class "
                         f"name; {hint}")
    return cls


def _latent_shape(model, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
    """(channels, h, w) of the sampled latents for an image of height x width pixels (None = the model's side)."""
    channels = int(model.unet.config.in_channels)
    height, width = height or int(model.resolution), width or int(model.resolution)
    vae = 1 if model.vae is None else 2 ** (len(model.vae.config.block_out_channels) - 1)
    unet = 2 ** (len(model.unet.config.block_out_channels) - 1)
    for name, v in (("height", height), ("width", width)):
        if v < 1 or v % (vae * unet):
            raise ValueError(f"{name}={v} must be a positive multiple of {vae * unet} for this model "
                             f"(VAE factor {vae} x UNet downsampling {unet})")
    return channels, height // vae, width // vae


def initial_noise(seeds: Sequence[int], channels: int, height: int, width: int | None = None) -> torch.Tensor:
    """(N, channels, height, width) float32 standard normal noise, sample i drawn from seeds[i] alone
    (width defaults to height). The same numbers a stock pipeline draws for one image with
    `generator=torch.Generator().manual_seed(seeds[i])`."""
    width = height if width is None else width
    return torch.stack([torch.randn(channels, height, width, generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds])


def _has_adapters(unet) -> bool:
    from ppd_engine.adapters import get_user_adapters

    try:
        get_user_adapters(unet)
        return True
    except ValueError:
        return False


@torch.no_grad()
def generate(model, prompts: list[str], user_embeds: torch.Tensor | None, seeds: list[int], steps: int = 30,
             guidance: float = 5.0, user_guidance: float = 0.0, user_scale: float = 1.0, *,
             sampler: str = "ddim", negative_prompt: str = "", height: int | None = None, width: int | None = None,
             batch_size: int = 0, progress: bool = False) -> torch.Tensor:
    """Sample N images.

    Args:
        model: a DiffusionModel (toy, sd15, sdxl or cascade); its unet may carry user adapters.
        prompts: N captions.
        user_embeds: (N, T_in, Du) few-shot user embeddings, or None for the base model.
        seeds: N ints; sample i starts from noise drawn with seeds[i] only.
        steps: sampler steps. guidance: text classifier-free guidance scale (1 = off, one pass less).
        user_guidance: extra guidance away from the zero-embedding (user-agnostic) branch; 0 = off.
        user_scale: multiplies the user attention branch's trained strength (the adapters' scale s)
            for this call: 1 = as trained, 0 = off; the same as stock diffusers'
            `set_ip_adapter_scale` on an export, where s is folded into the weights.
        sampler: "ddim" (eta 0), "dpm" (DPM-Solver++ 2M) or a diffusers scheduler class name
            (`make_scheduler`). negative_prompt: the caption of the unconditional branch ("" = the
            empty caption that caption dropout trains). height, width: image size in pixels (None =
            the model's resolution; cascade: rounded up to whole Stage C latents, see
            CascadeModel.stage_c_size). batch_size: samples per UNet call (0 = all N at once).
            progress: show a tqdm bar over the batches.
    Returns:
        (N, 3, H, W) float32 images in [0, 1], on the CPU.
    """
    n = len(prompts)
    if len(seeds) != n:
        raise ValueError(f"got {n} prompts but {len(seeds)} seeds")
    if n == 0:
        raise ValueError("generate needs at least one prompt")
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    if user_embeds is not None:
        if user_embeds.dim() != 3 or user_embeds.shape[0] != n:
            raise ValueError(f"user_embeds must be (N={n}, T_in, Du); got {tuple(user_embeds.shape)}")
        if not _has_adapters(model.unet):
            raise ValueError("user_embeds given but the model's unet has no user adapters (load a run)")
    if user_guidance and user_embeds is None:
        raise ValueError("user_guidance needs user_embeds")
    scheduler_class(sampler)  # a bad name fails before any work
    if getattr(model, "family", None) == "cascade":
        # Stage C latents for the size asked (default: its training latent size); Stage B's output
        # size follows from them.
        shape = (int(model.unet.config.in_channels), *model.stage_c_size(height, width))
    else:
        shape = _latent_shape(model, height, width)
    bs = batch_size if batch_size > 0 else n
    chunks = range(0, n, bs)
    out = []
    for start in tqdm(chunks, desc="sampling", disable=not progress, leave=False):
        sl = slice(start, start + bs)
        ue = None if user_embeds is None else user_embeds[sl]
        out.append(_generate_batch(model, list(prompts[sl]), ue, list(seeds[sl]), steps, guidance,
                                   user_guidance, user_scale, sampler, negative_prompt, shape, height, width))
    return torch.cat(out)


def _branches(model, prompts, user_embeds, guidance, user_guidance, negative_prompt=""):
    """The guidance branches stacked into one denoiser batch: [cond | negative (text CFG) | cond with
    zero user (user CFG)]. Returns (k, text states, pooled or None, user rows or None), k*N rows each."""
    n = len(prompts)
    cond = model.encode_text(prompts)
    states, pooled, embeds = [cond.states], [cond.pooled], [user_embeds]
    if guidance != 1.0:
        empty = model.encode_text([negative_prompt] * n)
        states.append(empty.states)
        pooled.append(empty.pooled)
        embeds.append(user_embeds)
    if user_guidance != 0.0:
        states.append(cond.states)
        pooled.append(cond.pooled)
        embeds.append(torch.zeros_like(user_embeds))
    user = None if user_embeds is None else torch.cat(embeds)
    return len(states), torch.cat(states), None if cond.pooled is None else torch.cat(pooled), user


def _guided(pred: torch.Tensor, k: int, guidance: float, user_guidance: float) -> torch.Tensor:
    """Combine the k stacked branch predictions (module doc)."""
    parts = pred.chunk(k)
    out = parts[0]
    if guidance != 1.0:
        out = parts[1] + guidance * (parts[0] - parts[1])
    if user_guidance != 0.0:
        out = out + user_guidance * (parts[0] - parts[-1])
    return out


def _user_context(unet, user):
    """The user branch on for the stacked rows, or gated off (the base model)."""
    from ppd_engine.adapters import user_conditioning

    if user is not None:
        return user_conditioning(unet, user, gate=1.0, drop=False)
    if _has_adapters(unet):
        return user_conditioning(unet, None)
    return contextlib.nullcontext()


def _generate_batch(model, prompts, user_embeds, seeds, steps, guidance, user_guidance, user_scale, sampler,
                    negative_prompt, shape, height, width):
    if getattr(model, "family", None) == "cascade":
        return _generate_cascade_batch(model, prompts, user_embeds, seeds, steps, guidance, user_guidance,
                                       user_scale, sampler, negative_prompt, shape)
    unet = model.unet
    p = next(unet.parameters())
    device, dtype = p.device, p.dtype
    n = len(prompts)
    sched = make_scheduler(model.noise_scheduler.config, sampler)
    sched.set_timesteps(steps, device=device)
    channels, h, w = shape
    latents = initial_noise(seeds, channels, h, w).to(device=device, dtype=torch.float32) * sched.init_noise_sigma
    # Stochastic schedulers (ancestral, SDE) draw step noise: from the first seed, so a call repeats.
    step_kwargs = {}
    if "generator" in inspect.signature(sched.step).parameters:
        step_kwargs["generator"] = torch.Generator(device=device).manual_seed(int(seeds[0]))

    k, text, pooled, user = _branches(model, prompts, user_embeds, guidance, user_guidance, negative_prompt)
    text = text.to(device=device, dtype=dtype)
    added = None
    if pooled is not None:
        from ppd_engine.models import make_time_ids

        size = (height or int(model.resolution), width or int(model.resolution))  # SDXL's micro-conditioning
        time_ids = make_time_ids(size, (0, 0), size).to(device=device, dtype=dtype).expand(k * n, 6)
        added = model.added_cond(pooled.to(device=device, dtype=dtype), time_ids)
    if user is not None:
        user = user.to(device=device, dtype=torch.float32)

    with _adapter_scale(unet, user_scale, user is not None), _user_context(unet, user):
        for t in sched.timesteps:
            x = sched.scale_model_input(latents, t).repeat(k, 1, 1, 1).to(dtype)
            kwargs = {"added_cond_kwargs": added} if added is not None else {}
            eps = unet(x, t, encoder_hidden_states=text, return_dict=False, **kwargs)[0].float()
            latents = sched.step(_guided(eps, k, guidance, user_guidance), t, latents, return_dict=False,
                                 **step_kwargs)[0]
    return model.decode_latents(latents).float().cpu()


def _generate_cascade_batch(model, prompts, user_embeds, seeds, steps, guidance, user_guidance, user_scale,
                            sampler, negative_prompt, shape):
    """Stable Cascade: the Stage C prior under the user branch with deterministic DDIM on the
    scheduler's cosine abar over t = 1 -> 0 (the prior pipeline's linspace), then Stage B + VQ
    (model.decode_latents). The prior pipeline's own sampler is stochastic DDPM; DDIM keeps
    "ddim" meaning the same deterministic sampler as for UNet2D."""
    from ppd_engine.adapters.families import call_model

    if sampler != "ddim":
        raise ValueError(f"sampler={sampler!r}: the cascade family samples Stage C with 'ddim' only")
    unet = model.unet
    p = next(unet.parameters())
    device, dtype = p.device, p.dtype
    n = len(prompts)
    latents = initial_noise(seeds, *shape).to(device=device)
    k, text, pooled, user = _branches(model, prompts, user_embeds, guidance, user_guidance, negative_prompt)
    text = text.to(device=device, dtype=dtype)
    extra = model.denoiser_kwargs(pooled.to(device=device, dtype=dtype), None)
    if user is not None:
        user = user.to(device=device, dtype=torch.float32)
    ts = torch.linspace(1.0, 0.0, steps + 1, device=device)
    with _adapter_scale(unet, user_scale, user is not None), _user_context(unet, user):
        for t, t_prev in zip(ts[:-1], ts[1:]):
            ratio = t.expand(k * n).to(dtype)
            eps = call_model(unet, latents.repeat(k, 1, 1, 1).to(dtype), ratio, text, **extra).float()
            eps = _guided(eps, k, guidance, user_guidance)
            abar, abar_prev = model.alpha_bar(t.view(1)), model.alpha_bar(t_prev.view(1))
            x0 = (latents - (1 - abar).sqrt() * eps) / abar.sqrt()
            latents = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps
    return model.decode_latents(latents, prompts=list(prompts), seeds=list(seeds))


@contextlib.contextmanager
def _adapter_scale(unet, scale: float, active: bool):
    """Temporarily multiply the adapters' scale by `scale` (a no-op without a user)."""
    if not active or scale == 1.0:
        yield
        return
    from ppd_engine.adapters import get_user_adapters

    handle = get_user_adapters(unet)
    saved = handle.scale
    handle.scale = saved * float(scale)
    try:
        yield
    finally:
        handle.scale = saved
