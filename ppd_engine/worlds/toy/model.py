"""The toy base model: a tiny pixel-space UNet2DConditionModel + the toy text encoder.

No VAE: the denoiser works on pixels scaled to [-1, 1], so "latents" are images. Everything is
stored in one safetensors file (UNet weights under `unet.`, text encoder under `text.`, configs in
the metadata) so the shipped asset is a single small file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file

from ppd_engine.files import save_safetensors_atomic
from ppd_engine.worlds.toy.records import read_metadata
from ppd_engine.worlds.toy.text import ToyTextEncoder

ASSET_DIR = Path(__file__).resolve().parent / "assets"
DEFAULT_ASSET = ASSET_DIR / "toy_base.safetensors"
FORMAT = "ppd_toy_base/1"


def unet_config(image_size: int = 16, text_dim: int = 32) -> dict:
    """UNet2DConditionModel kwargs of the toy denoiser (~1M parameters).

    Cross-attention at 8x8, 4x4 and the mid block: the user adapters attach to those layers, and
    the global colour attributes users care about are visible at every scale. Only 16 channels at
    full resolution: flat-coloured scenes need little there, and it is where the CPU time goes.
    (diffusers reads `attention_head_dim` as the number of heads here: 4 heads per layer.)
    """
    return dict(
        sample_size=image_size, in_channels=3, out_channels=3,
        block_out_channels=(16, 32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_dim, attention_head_dim=4, norm_num_groups=8,
    )


def scheduler_config() -> dict:
    """DDPM training schedule; the cosine schedule keeps small pixel images from being
    destroyed too early, which matters at 16x16. clip_sample: the samplers clamp the predicted
    clean image to [-1, 1], as pixel-space DDPM does; without it the first few-step DDIM updates
    from near-zero signal (alpha_bar(999) ~ 2e-9) amplify eps errors into coloured noise."""
    return dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                prediction_type="epsilon", clip_sample=True, clip_sample_range=1.0)


def build_components(image_size: int = 16, text_dim: int = 32, seed: int = 0
                     ) -> tuple[UNet2DConditionModel, ToyTextEncoder, DDPMScheduler]:
    """Fresh (untrained, seeded) UNet, text encoder and noise scheduler."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(image_size, text_dim))
    text = ToyTextEncoder(dim=text_dim, seed=seed)
    return unet, text, DDPMScheduler(**scheduler_config())


def save_toy_model(path: str | os.PathLike, unet: UNet2DConditionModel, text: ToyTextEncoder,
                   info: dict | None = None) -> None:
    """Write UNet + text encoder (+ configs and `info`) to one safetensors file, atomically."""
    tensors = {f"unet.{k}": v.detach().float().contiguous().cpu() for k, v in unet.state_dict().items()}
    tensors.update({f"text.{k}": v.detach().float().contiguous().cpu() for k, v in text.state_dict().items()})
    meta = {
        "format": FORMAT,
        "unet_config": json.dumps(dict(unet.config)),
        "text_config": json.dumps({"vocab": text.vocab, "dim": text.dim, "max_tokens": text.max_tokens}),
        "scheduler_config": json.dumps(scheduler_config()),
        "info": json.dumps(info or {}),
    }
    save_safetensors_atomic(tensors, path, metadata=meta)


def load_toy_components(path: str | os.PathLike | None = None
                        ) -> tuple[UNet2DConditionModel, ToyTextEncoder, DDPMScheduler, dict]:
    """Read a file written by `save_toy_model` -> (unet, text encoder, scheduler, info)."""
    path = Path(path) if path else DEFAULT_ASSET
    meta = read_metadata(path, FORMAT, "toy base model", "python -m ppd_engine.worlds.toy.pretrain")
    tensors = load_file(str(path))
    ucfg = {k: v for k, v in json.loads(meta["unet_config"]).items() if not k.startswith("_")}
    unet = UNet2DConditionModel(**ucfg)
    unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")}, strict=True)
    tcfg = json.loads(meta["text_config"])
    text = ToyTextEncoder(vocab=tcfg["vocab"], dim=tcfg["dim"], max_tokens=tcfg["max_tokens"])
    text.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("text.")}, strict=True)
    scheduler = DDPMScheduler(**json.loads(meta["scheduler_config"]))
    return unet, text, scheduler, json.loads(meta.get("info", "{}"))


def make_diffusion_model(unet: UNet2DConditionModel, text: ToyTextEncoder, scheduler: DDPMScheduler,
                         source: str = "", dtype: torch.dtype = torch.float32,
                         device: str | torch.device = "cpu"):
    """Wrap toy components as the engine's `DiffusionModel` (family "toy", frozen, eval mode)."""
    # Imported here: ppd_engine.models dispatches family "toy" back to this module.
    from ppd_engine.models import DiffusionModel, TextConditioning

    unet = unet.to(device=device)
    if dtype != torch.float32:  # diffusers warns on any .to(dtype=...), even a no-op one
        unet = unet.to(dtype=dtype)
    unet = unet.eval().requires_grad_(False)
    text = text.to(device=device).eval()

    def encode_text(captions: list[str]) -> TextConditioning:
        return TextConditioning(states=text(list(captions)).to(dtype), pooled=None)

    return DiffusionModel(family="toy", unet=unet, noise_scheduler=scheduler, encode_text=encode_text,
                          resolution=int(unet.config.sample_size), vae=None, latent_scale=1.0,
                          source=str(source))


def load_toy_model(pretrained=None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The toy base as a `DiffusionModel` (family "toy").

    `pretrained`: a path to a file written by `save_toy_model`, a `ToyConfig` (its `pretrained` key,
    checked against its `image_size`), or empty/None for the shipped asset (assets/toy_base.safetensors).
    """
    from ppd_engine.worlds.toy.config import ToyConfig

    size = None
    if isinstance(pretrained, ToyConfig):
        size, pretrained = pretrained.image_size, pretrained.pretrained
    path = Path(pretrained) if pretrained else DEFAULT_ASSET
    unet, text, scheduler, _ = load_toy_components(path)
    if size is not None and int(unet.config.sample_size) != size:
        raise ValueError(f"toy.image_size={size} but the base model {path} was trained at "
                         f"{unet.config.sample_size}x{unet.config.sample_size}")
    return make_diffusion_model(unet, text, scheduler, source=str(path), dtype=dtype, device=device)
