"""Tiny random denoisers of the three families PPD supports, built from configs (no weights, no hub).

`tiny_unet(family, **overrides)` returns a model in eval mode whose forward takes a fraction of a
second on a laptop CPU with 16x16 latents; `tiny_unet_inputs(model, batch)` builds matching random
inputs, so tests and benchmarks of different parts exercise the same shapes.

Families:
  "sd15"    UNet2DConditionModel, SD1.5 layout (cross-attention in every resolution and the mid block)
  "sdxl"    UNet2DConditionModel, SDXL layout (addition_embed_type="text_time", linear projections,
            two transformer layers in the inner level, no attention in the outer level)
  "cascade" StableCascadeUNet, the Stable Cascade Stage C prior (attention over [image; text] tokens)
"""
from __future__ import annotations

import torch

FAMILIES = ("sd15", "sdxl", "cascade")

_SD15 = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 48),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=40,
    attention_head_dim=(2, 3),  # diffusers' historical name: this is the number of heads
)

_SDXL = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=48,
    attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 2),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    # pooled text width (24) + 6 micro-conditioning ids x addition_time_embed_dim
    projection_class_embeddings_input_dim=24 + 6 * 8,
)

_CASCADE = dict(
    in_channels=8,
    out_channels=8,
    timestep_ratio_embedding_dim=16,
    patch_size=1,
    conditioning_dim=32,
    block_out_channels=(24, 48),
    num_attention_heads=(2, 4),
    down_num_layers_per_block=(1, 1),
    up_num_layers_per_block=(1, 1),
    down_blocks_repeat_mappers=(1, 1),
    up_blocks_repeat_mappers=(1, 1),
    block_types_per_layer=(
        ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),
        ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),
    ),
    clip_text_in_channels=20,
    clip_text_pooled_in_channels=20,
    clip_image_in_channels=20,
    clip_seq=2,
    effnet_in_channels=None,
    pixel_mapper_in_channels=None,
    kernel_size=3,
    dropout=(0.0, 0.0),
    self_attn=True,
    timestep_conditioning_type=("sca", "crp"),
    switch_level=(False,),
)


def tiny_unet(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random denoiser of `family` ("sd15", "sdxl", "cascade"), fp32, eval mode.

    `overrides` replace entries of the family's config (e.g. `cross_attention_dim=64`)."""
    from diffusers import StableCascadeUNet, UNet2DConditionModel

    configs = {"sd15": (_SD15, UNet2DConditionModel), "sdxl": (_SDXL, UNet2DConditionModel),
               "cascade": (_CASCADE, StableCascadeUNet)}
    if family not in configs:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    config, cls = configs[family]
    torch.manual_seed(seed)
    model = cls(**{**config, **overrides})
    if family == "cascade":
        # Stage C zero-initialises its output projection; random weights make identity tests able
        # to fail (a zero output would hide any difference upstream).
        with torch.no_grad():
            for p in model.clf.parameters():
                p.normal_(0, 0.05)
    return model.eval()


def tiny_unet_inputs(model: torch.nn.Module, batch: int, size: int = 16, text_len: int = 7,
                     generator: torch.Generator | None = None) -> tuple[tuple, dict]:
    """Random (args, kwargs) for `model(*args, **kwargs)` with `batch` rows and size x size latents.

    For UNet2DConditionModel: args = (sample, timestep, encoder_hidden_states), kwargs holds
    added_cond_kwargs when the config uses "text_time". For StableCascadeUNet: args = (sample,
    timestep_ratio, clip_text_pooled) and kwargs = {clip_text, clip_img}."""
    g = generator
    cfg = model.config
    if type(model).__name__ == "StableCascadeUNet":
        sample = torch.randn(batch, cfg.in_channels, size, size, generator=g)
        ratio = torch.rand(batch, generator=g)
        pooled = torch.randn(batch, 1, cfg.clip_text_pooled_in_channels, generator=g)
        clip_text = torch.randn(batch, text_len, cfg.clip_text_in_channels, generator=g)
        clip_img = torch.randn(batch, 1, cfg.clip_image_in_channels, generator=g)
        return (sample, ratio, pooled), {"clip_text": clip_text, "clip_img": clip_img}
    sample = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    timestep = torch.randint(0, 1000, (batch,), generator=g)
    ehs = torch.randn(batch, text_len, cfg.cross_attention_dim, generator=g)
    kwargs = {}
    if cfg.addition_embed_type == "text_time":
        pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled_dim, generator=g),
            "time_ids": torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]], dtype=torch.float32)
            .repeat(batch, 1) + torch.randint(0, 4, (batch, 6), generator=g),
        }
    return (sample, timestep, ehs), kwargs



def tiny_batch(model: torch.nn.Module, rows: int, size: int = 16, text_len: int = 7,
               generator: torch.Generator | None = None) -> dict:
    """Random inputs for `call_model` (ppd_engine.adapters.families), one family-independent layout:
    dict(noisy_latents, timesteps, encoder_hidden_states, kwargs); kwargs holds the family's extra
    per-row inputs (added_cond_kwargs for SDXL; clip_text_pooled / clip_img for Stage C)."""
    (sample, t, third), extra = tiny_unet_inputs(model, rows, size, text_len, generator)
    if type(model).__name__ == "StableCascadeUNet":
        return {"noisy_latents": sample, "timesteps": t, "encoder_hidden_states": extra["clip_text"],
                "kwargs": {"clip_text_pooled": third, "clip_img": extra["clip_img"]}}
    return {"noisy_latents": sample, "timesteps": t, "encoder_hidden_states": third, "kwargs": dict(extra)}


def tiny_pair_batch(model: torch.nn.Module, pairs: int, size: int = 16, text_len: int = 7,
                    generator: torch.Generator | None = None) -> dict:
    """`tiny_batch` with 2 * pairs rows in `paired_forward`'s layout (winners first): a pair shares
    its timestep, text conditioning and extra inputs; the latents differ."""
    batch = tiny_batch(model, 2 * pairs, size, text_len, generator)

    def share(x):
        if isinstance(x, dict):
            return {k: share(v) for k, v in x.items()}
        return x[:pairs].repeat((2,) + (1,) * (x.ndim - 1))

    return {"noisy_latents": batch["noisy_latents"], "timesteps": share(batch["timesteps"]),
            "encoder_hidden_states": share(batch["encoder_hidden_states"]), "kwargs": share(batch["kwargs"])}
