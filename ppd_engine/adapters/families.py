"""What differs between the denoiser families the user branch can be added to.

A family answers three questions: which attention modules get a user branch, how wide the user
tokens are (the width their `to_k_ip` / `to_v_ip` read), and how the model is called with a batch
(paired_forward needs to call any family the same way).

- "unet2d": diffusers `UNet2DConditionModel` (SD1.5-like and SDXL-like, incl. "text_time"
  micro-conditioning). Every text cross-attention (`...attn2`) gets a branch; tokens have the
  width of `config.cross_attention_dim`, exactly as IP-Adapter's, so the text K/V of those
  layers depend only on the caption and can be cached across the evaluations of a pair.
- "cascade": diffusers `StableCascadeUNet` (Stable Cascade Stage C). Each `SDCascadeAttnBlock`
  attends over [image tokens; mapped CLIP tokens] in ONE softmax; the user branch is a second,
  separately normalised attention from the same queries over the user tokens, which have the
  width of `config.conditioning_dim` (the width of the CLIP tokens before each block's
  `kv_mapper`). Its K/V contain image tokens, so nothing there is cacheable per caption.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

# The projection lives under this child name of the model, so that `.to()`, FSDP and
# `named_parameters()` treat it like the processors (which diffusers registers as children).
PROJECTION_NAME = "ppd_user_proj"


@dataclass(frozen=True)
class Family:
    name: str
    targets: Callable[[nn.Module], list[tuple[str, nn.Module]]]
    token_dim: Callable[[nn.Module], int]
    cache_text_kv: bool


def _unet2d_targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from diffusers.models.attention_processor import Attention

    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, Attention) and m.is_cross_attention and not n.startswith(PROJECTION_NAME)]


def _unet2d_token_dim(model: nn.Module) -> int:
    dim = model.config.cross_attention_dim
    if not isinstance(dim, int):
        # Per-block widths would need one projection per width; no released checkpoint does this.
        if len(set(dim)) != 1:
            raise ValueError(f"cross_attention_dim={tuple(dim)} differs per block; the user branch needs one width")
        dim = dim[0]
    return int(dim)


def _cascade_targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from diffusers.models.unets.unet_stable_cascade import SDCascadeAttnBlock

    return [(f"{n}.attention", m.attention) for n, m in model.named_modules() if isinstance(m, SDCascadeAttnBlock)]


FAMILIES = {
    "UNet2DConditionModel": Family("unet2d", _unet2d_targets, _unet2d_token_dim, cache_text_kv=True),
    "StableCascadeUNet": Family("cascade", _cascade_targets, lambda m: int(m.config.conditioning_dim),
                                cache_text_kv=False),
}


def family_of(model: nn.Module) -> Family:
    """The Family of `model`, by class (subclasses included); a clear error for anything else."""
    for cls in type(model).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    raise TypeError(f"user adapters support {sorted(FAMILIES)}; got {type(model).__name__}")


def call_model(model: nn.Module, sample: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor,
               added_cond_kwargs: dict | None = None, **kwargs) -> torch.Tensor:
    """One denoiser call with the family's own signature; returns the prediction tensor.

    UNet2DConditionModel: model(sample, timesteps, encoder_hidden_states=text, added_cond_kwargs, **kwargs).
    StableCascadeUNet:    model(sample, timestep_ratio=timesteps, clip_text_pooled=kwargs["clip_text_pooled"],
                                clip_text=text, clip_img=kwargs.get("clip_img"), ...); Stage C needs
                          `clip_text_pooled` (B, 1, D) and, for the text tokens to be used at all, `clip_img`.
    """
    if family_of(model).name == "cascade":
        if "clip_text_pooled" not in kwargs:
            raise TypeError("StableCascadeUNet needs clip_text_pooled=(B, 1, D) in the keyword arguments")
        if added_cond_kwargs is not None:
            raise TypeError("added_cond_kwargs is a UNet2DConditionModel argument; StableCascadeUNet takes none")
        return model(sample, timesteps, clip_text=text, return_dict=False, **kwargs)[0]
    return model(sample, timesteps, encoder_hidden_states=text, added_cond_kwargs=added_cond_kwargs,
                 return_dict=False, **kwargs)[0]
