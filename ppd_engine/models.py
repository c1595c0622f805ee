"""Frozen text-to-image model families behind one small interface (`DiffusionModel`).

"sd15": StableDiffusionPipeline parts (one CLIP text encoder, last hidden states).
"sdxl": StableDiffusionXLPipeline parts (both CLIP text encoders: penultimate hidden states
        concatenated; pooled embedding from text_encoder_2; 6 micro-conditioning time ids).
"cascade": Stable Cascade Stage C (StableCascadePriorPipeline parts + the EfficientNet latent
        encoder; ppd_engine.cascade), continuous-time cosine schedule.
Other families are registered by the worlds that bring them (`register_family`): the toy world's
pixel-space "toy", for instance. `build_model(cfg, device)` picks the loader of cfg.model.family.

Everything is frozen (requires_grad False, eval mode): the trainer adds and trains adapters only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

_BUILTIN = ("sd15", "sdxl")


@dataclass
class TextConditioning:
    """Text encoder output for a batch of captions."""

    states: torch.Tensor            # (N, T, D) encoder_hidden_states
    pooled: torch.Tensor | None     # (N, D2) SDXL "text_embeds" / Stage C clip_text_pooled; None for SD1.5 / toy


@dataclass
class DiffusionModel:
    """A frozen denoiser with its text encoder(s), latent codec and training noise schedule."""

    family: str
    unet: torch.nn.Module
    noise_scheduler: object
    encode_text: Callable[[list[str]], TextConditioning]
    resolution: int
    vae: torch.nn.Module | None = None
    latent_scale: float = 1.0
    source: str = ""
    # VAE latent shift (SD3/Flux-style VAEs have one; SD1.5/SDXL do not).
    latent_shift: float = 0.0

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> model-space latents (N, C, H/f, W/f), float32.

        Uses the posterior mean rather than a sample so a cached latent is deterministic: the
        cache encodes each image once, and a single frozen sample would not be any more "random".
        Identity for pixel-space models (vae None).
        """
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"encode_images expects pixels of shape (N, 3, H, W); got {tuple(pixels.shape)}")
        if self.vae is None:
            return pixels.float()
        p = next(self.vae.parameters())
        latents = self.vae.encode(pixels.to(device=p.device, dtype=p.dtype)).latent_dist.mean
        return ((latents.float() - self.latent_shift) * self.latent_scale)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents (N, C, h, w) -> images (N, 3, H, W) in [0, 1], float32."""
        if self.vae is None:
            return (latents.float() / 2 + 0.5).clamp(0, 1)
        p = next(self.vae.parameters())
        z = latents.to(device=p.device, dtype=p.dtype) / self.latent_scale + self.latent_shift
        return (self.vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1)

    # ---- the training step's family-specific math (training/step.py calls these) ----------------
    @property
    def num_train_timesteps(self) -> int:
        """The step draws integer timesteps in [0, num_train_timesteps) (training/data_order.py)."""
        return int(self.noise_scheduler.config.num_train_timesteps)

    def noisy_and_target(self, latents: torch.Tensor, noise: torch.Tensor,
                         timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents, regression target, the denoiser's timestep input) for drawn timesteps."""
        sched = self.noise_scheduler
        noisy = sched.add_noise(latents, noise, timesteps)
        if sched.config.prediction_type == "v_prediction":
            return noisy, sched.get_velocity(latents, noise, timesteps), timesteps
        return noisy, noise, timesteps

    def denoiser_kwargs(self, pooled: torch.Tensor | None, time_ids: torch.Tensor | None) -> dict:
        """Per-row keyword inputs of the denoiser besides the text states (SDXL: added_cond_kwargs)."""
        added = None if pooled is None else self.added_cond(pooled, time_ids)
        return {} if added is None else {"added_cond_kwargs": added}

    def snr_weight(self, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
        """(B,) Min-SNR-gamma weight of drawn timesteps (training/step.py's module doc)."""
        sched = self.noise_scheduler
        abar = sched.alphas_cumprod.to(timesteps.device)[timesteps].double()
        return _min_snr(abar, gamma, sched.config.prediction_type == "v_prediction")

    def added_cond(self, pooled: torch.Tensor | None, time_ids: torch.Tensor | None) -> dict | None:
        """UNet `added_cond_kwargs`: SDXL -> {"text_embeds": (N, D2), "time_ids": (N, 6)}; otherwise None."""
        if self.family != "sdxl":
            return None
        if pooled is None or time_ids is None:
            raise ValueError("SDXL needs both the pooled text embedding and the time_ids (N, 6)")
        return {"text_embeds": pooled, "time_ids": time_ids}


def _min_snr(abar: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    snr = abar / (1 - abar)
    clipped = torch.clamp(snr, max=gamma)
    return (clipped / (snr + 1)).float() if v_prediction else (clipped / snr).float()


def make_time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int],
                  target_size: tuple[int, int]) -> torch.Tensor:
    """SDXL micro-conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w) as a (6,) float tensor."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


def _freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.requires_grad_(False)
    return module.eval()


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _clip_text_encoder(tokenizers: list, encoders: list, sdxl: bool) -> Callable[[list[str]], TextConditioning]:
    """Build the frozen `encode_text` closure for one (SD1.5) or two (SDXL) CLIP encoders."""

    @torch.no_grad()
    def encode_text(captions: list[str]) -> TextConditioning:
        if isinstance(captions, str):
            raise TypeError("encode_text expects a list of captions, not a single string")
        states, pooled = [], None
        for tokenizer, encoder in zip(tokenizers, encoders):
            ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(_device_of(encoder))
            if sdxl:
                out = encoder(ids, output_hidden_states=True)
                states.append(out.hidden_states[-2])
                # The pooled embedding comes from the last encoder only (CLIPTextModelWithProjection).
                pooled = out[0]
            else:
                states.append(encoder(ids)[0])
        return TextConditioning(states=torch.cat(states, dim=-1), pooled=pooled)

    return encode_text


def _looks_like_path(pretrained: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else is meant as a folder.
    return pretrained.startswith(("/", ".", "~")) or pretrained.count("/") > 1


def resolve_source(pretrained: str, what: str = "model folder") -> tuple[str, dict]:
    """(path or hub id, from_pretrained kwargs): a local folder loads offline (local_files_only); a
    path-like name that is not a folder is an error rather than a hub lookup."""
    pretrained = os.path.expanduser(str(pretrained))
    local = os.path.isdir(pretrained)
    if not local and _looks_like_path(pretrained):
        raise FileNotFoundError(f"{what} {pretrained!r} does not exist")
    _diffusers_bars_follow_the_hub()
    return pretrained, dict(local_files_only=local)


def _diffusers_bars_follow_the_hub() -> None:
    """diffusers' loading bars ignore HF_HUB_DISABLE_PROGRESS_BARS (transformers and the hub read
    it); with the bars off (--no-progress, log.progress=false) turn diffusers' off too."""
    from huggingface_hub.utils import are_progress_bars_disabled

    if are_progress_bars_disabled():
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()


def load_diffusion_model(family: str, pretrained: str, dtype: torch.dtype = torch.float32,
                         device: str | torch.device = "cpu") -> DiffusionModel:
    """Load a frozen SD1.5- or SDXL-style model from a hub id or a local diffusers folder.

    A local folder loads offline (local_files_only). Weights are read from safetensors only. The VAE
    stays in float32 when `dtype` is float16 and its config asks to upcast (SDXL's VAE overflows in
    fp16). `resolution` = unet.config.sample_size * VAE downscale factor (512 for SD1.5, 1024 for SDXL).
    """
    if family not in _BUILTIN:
        raise ValueError(f"load_diffusion_model loads the diffusers families {', '.join(map(repr, _BUILTIN))}; "
                         f"got {family!r} (other families load through build_model and their registered loader)")
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    pretrained, common = resolve_source(pretrained)
    weights = dict(common, use_safetensors=True)

    unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", torch_dtype=dtype, **weights)
    vae_config = AutoencoderKL.load_config(pretrained, subfolder="vae", **common)
    vae_dtype = torch.float32 if (dtype == torch.float16 and vae_config.get("force_upcast", False)) else dtype
    vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae", torch_dtype=vae_dtype, **weights)
    scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", **common)

    tokenizers = [CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **common)]
    encoders = [CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", dtype=dtype, **weights)]
    if family == "sdxl":
        tokenizers.append(CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2", **common))
        encoders.append(CLIPTextModelWithProjection.from_pretrained(pretrained, subfolder="text_encoder_2",
                                                                    dtype=dtype, **weights))
        if unet.config.get("addition_embed_type") != "text_time":
            raise ValueError(f"{pretrained!r}: family 'sdxl' needs a UNet with addition_embed_type='text_time' "
                             f"(got {unet.config.get('addition_embed_type')!r}); is this an SD1.5-style model?")
    for m in (unet, vae, *encoders):
        _freeze(m).to(device)

    scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    shift = vae.config.get("shift_factor", None)
    return DiffusionModel(
        family=family,
        unet=unet,
        noise_scheduler=scheduler,
        encode_text=_clip_text_encoder(tokenizers, encoders, sdxl=family == "sdxl"),
        resolution=int(unet.config.sample_size) * scale_factor,
        vae=vae,
        latent_scale=float(vae.config.scaling_factor),
        source=pretrained,
        latent_shift=float(shift) if shift is not None else 0.0,
    )


# ---- the family registry --------------------------------------------------------------------------

FamilyLoader = Callable[["object", torch.dtype, "str | torch.device"], DiffusionModel]
FAMILIES: dict[str, FamilyLoader] = {}


def register_family(name: str, loader: FamilyLoader) -> None:
    """Make `model.family=<name>` buildable: `loader(cfg, dtype, device)` returns a frozen DiffusionModel."""
    FAMILIES[name] = loader


def _diffusers_loader(family: str) -> FamilyLoader:
    def load(cfg, dtype, device):
        return load_diffusion_model(family, cfg.model.pretrained, dtype=dtype, device=device)

    return load


def _cascade_loader(cfg, dtype, device):
    # Imported on use: ppd_engine.cascade builds on this module's DiffusionModel.
    from ppd_engine.cascade import DEFAULT_RESOLUTION, load_cascade_model

    return load_cascade_model(cfg.model.pretrained, prior=cfg.model.prior, effnet=cfg.model.effnet, decoder=cfg.model.decoder,
                              dtype=dtype, device=device, resolution=cfg.model.resolution or DEFAULT_RESOLUTION,
                              adapters=cfg.adapters)


for _name in _BUILTIN:
    register_family(_name, _diffusers_loader(_name))
register_family("cascade", _cascade_loader)


def build_model(cfg, device: str | torch.device = "cpu") -> DiffusionModel:
    """The frozen base DiffusionModel that `cfg` trains (model.family / model.dtype / model.resolution)."""
    from ppd_engine.dtypes import torch_dtype

    if cfg.model.family not in FAMILIES:
        from ppd_engine.world import load_installed_worlds

        load_installed_worlds()  # a world's family (e.g. toy) registers when its world is imported
    if cfg.model.family not in FAMILIES:
        raise ValueError(f"model.family={cfg.model.family!r} is not registered; have {', '.join(sorted(FAMILIES))}")
    model = FAMILIES[cfg.model.family](cfg, torch_dtype(cfg.model.dtype), device)
    if cfg.model.resolution:
        model.resolution = cfg.model.resolution
    return model
