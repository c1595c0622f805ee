"""The baseline a user would write instead of ppd_engine: PPD assembled from stock parts.

- the user branch is diffusers' own IP-Adapter machinery: `IPAdapterAttnProcessor2_0` on every
  cross-attention and an `ImageProjection` (linear + LayerNorm) from the user embedding to tokens;
- the reference prediction is a second UNet forward with the IP scale set to 0, under `no_grad`;
- the DPO loss is the eager PyTorch formula (the same function the tests use as reference);
- `torch.optim.AdamW` (fused where the device supports it);
- `vae_every_step=True` runs the VAE encoder on every step, as both public Diffusion-DPO scripts do;
  `False` is the same baseline with latents cached, which isolates the engine's own contribution.

The random-initialised UNet architectures here are also what the engine is benchmarked on, so both
sides always see the same model, batch and dtype.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

from ppd_engine.ops.reference import dpo_loss_reference

# Random-initialised UNet shapes. "small" is for the 2-core CPU; "sd15" / "sdxl" are the real
# architectures (no weights needed to measure speed) for GPU runs.
UNET_ARCHS: dict[str, dict] = {
    "small": dict(
        sample_size=16,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128,
        attention_head_dim=8,
        norm_num_groups=16,
    ),
    "sd15": dict(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    ),
    "sdxl": dict(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
}
TEXT_TOKENS = 77
POOLED_DIM = {"sdxl": 1280}


def build_unet(arch: str, dtype=torch.float32, device="cpu", seed: int = 0) -> UNet2DConditionModel:
    if arch not in UNET_ARCHS:
        raise ValueError(f"unknown UNet arch {arch!r}; choose from {sorted(UNET_ARCHS)}")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_ARCHS[arch])
    return unet.to(device=device, dtype=dtype).eval().requires_grad_(False)


def build_vae(arch: str, dtype=torch.float32, device="cpu", seed: int = 0) -> AutoencoderKL:
    """An SD-style VAE (8x downsampling) for the VAE-every-step baseline; tiny widths on CPU."""
    torch.manual_seed(seed)
    widths = (32, 32, 64, 64) if arch == "small" else (128, 256, 512, 512)
    vae = AutoencoderKL(
        block_out_channels=widths,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=32,
        layers_per_block=1 if arch == "small" else 2,
    )
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


@dataclass
class PairBatch:
    """B preference pairs; rows [0, B) of every (2B, ...) tensor are winners, [B, 2B) losers."""

    latents: torch.Tensor  # (2B, 4, h, w) cached latents
    pixels: torch.Tensor | None  # (2B, 3, 8h, 8w) in [-1, 1], encoded by the VAE-every-step baseline
    text: torch.Tensor  # (2B, 77, D)
    user: torch.Tensor  # (2B, T_in, Du)
    pooled: torch.Tensor | None = None  # (2B, 1280) SDXL
    time_ids: torch.Tensor | None = None  # (2B, 6) SDXL


def make_batch(arch: str, pairs: int, user_dim: int, user_tokens: int = 1, dtype=torch.float32,
               device="cpu", with_pixels: bool = False, seed: int = 0) -> PairBatch:
    g = torch.Generator().manual_seed(seed)
    cfg = UNET_ARCHS[arch]
    side = cfg["sample_size"]
    n = 2 * pairs

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    user = rnd(pairs, user_tokens, user_dim).repeat(2, 1, 1)  # a pair shares its user
    text = rnd(pairs, TEXT_TOKENS, cfg["cross_attention_dim"]).repeat(2, 1, 1)  # and its caption
    batch = PairBatch(latents=rnd(n, 4, side, side), pixels=None, text=text, user=user)
    if with_pixels:
        batch.pixels = (torch.rand(n, 3, 8 * side, 8 * side, generator=g) * 2 - 1).to(device=device, dtype=dtype)
    if cfg.get("addition_embed_type") == "text_time":
        batch.pooled = rnd(pairs, POOLED_DIM[arch]).repeat(2, 1)
        px = 8 * side
        batch.time_ids = torch.tensor([px, px, 0, 0, px, px], device=device, dtype=dtype).repeat(n, 1)
    return batch


class StockPPD:
    """PPD training step built from stock diffusers / torch parts (see module docstring)."""

    def __init__(self, unet: UNet2DConditionModel, user_dim: int, num_tokens: int = 4, lr: float = 1e-5,
                 beta: float = 5000.0, vae: AutoencoderKL | None = None, vae_every_step: bool = False,
                 autocast_dtype: torch.dtype | None = None):
        self.unet = unet
        self.vae = vae
        self.vae_every_step = vae_every_step
        if vae_every_step and vae is None:
            raise ValueError("vae_every_step=True needs a vae")
        self.beta = beta
        self.autocast_dtype = autocast_dtype
        self.scheduler = DDPMScheduler(num_train_timesteps=1000)
        device, dtype = unet.device, unet.dtype
        cross = unet.config.cross_attention_dim

        procs = {}
        self.ip_procs = []
        for name, attn in unet.attn_processors.items():
            module = unet.get_submodule(name.rsplit(".processor", 1)[0])
            if name.endswith("attn2.processor"):
                proc = IPAdapterAttnProcessor2_0(hidden_size=module.to_k.out_features, cross_attention_dim=cross,
                                                 num_tokens=(num_tokens,), scale=1.0)
                # Zero-initialised value projection: the policy starts equal to the reference,
                # as in the engine, so both sides train the same function.
                torch.nn.init.zeros_(proc.to_v_ip[0].weight)
                procs[name] = proc.to(device=device, dtype=dtype)
                self.ip_procs.append(procs[name])
            else:
                procs[name] = AttnProcessor2_0()
        unet.set_attn_processor(procs)
        proj = ImageProjection(image_embed_dim=user_dim, cross_attention_dim=cross, num_image_text_embeds=num_tokens)
        unet.encoder_hid_proj = MultiIPAdapterImageProjection([proj]).to(device=device, dtype=dtype)
        unet.register_to_config(encoder_hid_dim_type="ip_image_proj")

        self.params = [p for proc in self.ip_procs for p in proc.parameters()]
        self.params += list(unet.encoder_hid_proj.parameters())
        for p in self.params:
            p.requires_grad_(True)
        # Master weights in fp32 even when the base runs in bf16, as a careful user would.
        for p in self.params:
            p.data = p.data.float()
        fused = device.type == "cuda"
        self.opt = torch.optim.AdamW(self.params, lr=lr, fused=fused)

    def _set_scale(self, s: float):
        for proc in self.ip_procs:
            proc.scale = [s]

    def _unet(self, noisy, t, batch: PairBatch):
        # diffusers reads (B, num_images, dim): one user vector is one "image" (T_in must be 1 here).
        added = {"image_embeds": [batch.user]}
        if batch.pooled is not None:
            added.update(text_embeds=batch.pooled, time_ids=batch.time_ids)
        return self.unet(noisy, t, encoder_hidden_states=batch.text, added_cond_kwargs=added).sample

    def step(self, batch: PairBatch) -> torch.Tensor:
        if self.vae_every_step:
            with torch.no_grad():
                latents = self.vae.encode(batch.pixels).latent_dist.sample() * self.vae.config.scaling_factor
        else:
            latents = batch.latents
        pairs = latents.shape[0] // 2
        noise = torch.randn_like(latents[:pairs]).repeat(2, 1, 1, 1)
        t = torch.randint(0, 1000, (pairs,), device=latents.device).repeat(2)
        noisy = self.scheduler.add_noise(latents, noise, t)
        ctx = (torch.autocast(latents.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
               else torch.autocast(latents.device.type, enabled=False))
        with ctx:
            with torch.no_grad():
                self._set_scale(0.0)
                ref = self._unet(noisy, t, batch)
            self._set_scale(1.0)
            pred = self._unet(noisy, t, batch)
        loss = dpo_loss_reference(pred.float(), ref.float(), noise.float(), beta=self.beta)[0]
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def clone_unet(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A separate copy, so the baseline's processor swap never touches the engine's model."""
    return copy.deepcopy(unet)
