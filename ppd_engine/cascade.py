"""Stable Cascade Stage C as a model family ("cascade"): the prior PPD trains, its latent encoder and
the Stage B decoder that turns its latents into images.

    model = load_cascade_model("stabilityai/stable-cascade-prior", effnet="effnet_encoder.safetensors",
                               decoder="stabilityai/stable-cascade")

What diffusers ships is used as is: `StableCascadePriorPipeline` parts (the prior `StableCascadeUNet`,
full 3.6B or `prior_lite` 1B, a `CLIPTextModelWithProjection`, its tokenizer and the
`DDPMWuerstchenScheduler`) and, for sampling, `StableCascadeDecoderPipeline` built from its
components (its `from_pretrained` fails in diffusers 0.42.1: `PaellaVQModel` lives only under
diffusers.pipelines.deprecated). What diffusers lacks is written here:

- The EfficientNet-V2-S encoder of the Stage C training latents (Stability's modules/effnet.py):
  torchvision's efficientnet_v2_s().features, a 1x1 conv to 16 channels, BatchNorm2d(affine=False).
  Input: the cache's [-1, 1] crop mapped to [0, 1], then ImageNet mean/std (Stability's
  train_c.py effnet_preprocess). 768 px -> 16 x 24 x 24, no scale factor.
- The training math of Stage C (Stability's train_c.py through its GDF): continuous t ~ U(0, 1),
  x_t = sqrt(abar(t)) x_0 + sqrt(1 - abar(t)) eps with the scheduler's cosine abar, the prior
  called with timestep_ratio = t, an eps target; text-only conditioning = the caption's last
  hidden states (clip_text), its projected pooled embedding (clip_text_pooled) and a zero image
  embedding (clip_img, (B, 1, 768)). The image encoder / feature extractor of the prior pipeline
  are not loaded: text-only conditioning only needs their output width, which the prior's config has.
- Deterministic DDIM on the same cosine abar for sampling (ppd_engine.sampling).

Timesteps: the trainer draws integers in [0, model.num_train_timesteps) (training/data_order.py);
for Stage C that is 2^24 and t = i / 2^24, uniform on the float32 grid of multiples of 2^-24 in
[0, 1) that torch.rand's float32 draws also use, and exact in float32.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ppd_engine.models import (
    DiffusionModel,
    TextConditioning,
    _freeze,
    _min_snr,
    resolve_source,
)

log = logging.getLogger(__name__)

TIMESTEP_BINS = 1 << 24
DEFAULT_RESOLUTION = 768
EFFNET_DOWNSCALE = 32       # efficientnet_v2_s().features: stride 32
EFFNET_CHANNELS = 16        # Stage C's c_in
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Part of the latent cache's fingerprint (cache_meta reads the encoder's config).
EFFNET_PREPROCESSING = {"input": "cache crop in [-1,1] -> [0,1]", "normalize": "imagenet", "version": 1}

# The shapes of the two published Stage C priors: stabilityai/stable-cascade prior/config.json (3.6B)
# and prior_lite/config.json (1B), the StageC defaults of Stability's modules/stage_c.py and its 1B
# variant (c_cond = c_hidden = 1536, nhead 24, blocks [[4, 12], [12, 4]]). Built on the meta
# device they give 3,589,103,632 and 1,030,785,040 parameters.
_STAGE_C_COMMON = dict(
    in_channels=16, out_channels=16, timestep_ratio_embedding_dim=64, patch_size=1,
    down_blocks_repeat_mappers=(1, 1), up_blocks_repeat_mappers=(1, 1),
    block_types_per_layer=(("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),) * 2,
    clip_text_in_channels=1280, clip_text_pooled_in_channels=1280, clip_image_in_channels=768, clip_seq=4,
    effnet_in_channels=None, pixel_mapper_in_channels=None, kernel_size=3, dropout=(0.1, 0.1), self_attn=True,
    timestep_conditioning_type=("sca", "crp"), switch_level=(False,),
)
PRIOR_CONFIGS = {
    "prior_lite": dict(_STAGE_C_COMMON, conditioning_dim=1536, block_out_channels=(1536, 1536),
                       num_attention_heads=(24, 24), down_num_layers_per_block=(4, 12),
                       up_num_layers_per_block=(12, 4)),
    "prior": dict(_STAGE_C_COMMON, conditioning_dim=2048, block_out_channels=(2048, 2048),
                  num_attention_heads=(32, 32), down_num_layers_per_block=(8, 24),
                  up_num_layers_per_block=(24, 8)),
}


class EffnetFileError(ValueError):
    """An EfficientNet encoder file does not have Stable Cascade's key layout or shapes."""


class EfficientNetEncoder(nn.Module):
    """Stage C's latent encoder; state-dict keys backbone.*, mapper.0.weight, mapper.1.running_*."""

    def __init__(self):
        super().__init__()
        from torchvision.models import efficientnet_v2_s

        self.backbone = efficientnet_v2_s().features    # random init, no download: weights come from the file
        self.mapper = nn.Sequential(nn.Conv2d(1280, EFFNET_CHANNELS, kernel_size=1, bias=False),
                                    nn.BatchNorm2d(EFFNET_CHANNELS, affine=False))
        # What the cache fingerprint records about this encoder (filled by load_effnet).
        self.config: dict = {}

    def forward(self, pixels01: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(IMAGENET_MEAN, device=pixels01.device, dtype=pixels01.dtype).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=pixels01.device, dtype=pixels01.dtype).view(1, 3, 1, 1)
        return self.mapper(self.backbone((pixels01 - mean) / std))

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] (the cache's crops) -> (N, 16, H/32, W/32) float32."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"encode_images expects pixels of shape (N, 3, H, W); got {tuple(pixels.shape)}")
        if pixels.shape[-1] % EFFNET_DOWNSCALE or pixels.shape[-2] % EFFNET_DOWNSCALE:
            raise ValueError(f"the EfficientNet encoder needs sides that are multiples of {EFFNET_DOWNSCALE}; "
                             f"got {tuple(pixels.shape[-2:])} (set model.resolution)")
        p = next(self.parameters())
        x = (pixels.to(device=p.device, dtype=torch.float32) + 1) / 2
        return self(x.to(p.dtype)).float()


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _some(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def load_effnet(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> EfficientNetEncoder:
    """The frozen EfficientNet encoder from Stable Cascade's effnet_encoder.safetensors (any dtype)."""
    from safetensors.torch import load_file

    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.effnet={path!r} does not exist (Stable Cascade's effnet_encoder.safetensors)")
    state = load_file(path)
    enc = EfficientNetEncoder()
    want = enc.state_dict()
    # BatchNorm's num_batches_tracked counters do not change an eval-mode forward, so a file may omit them.
    optional = {k for k in want if k.endswith("num_batches_tracked")}
    missing = sorted(set(want) - set(state) - optional)
    unexpected = sorted(set(state) - set(want))
    if missing or unexpected:
        raise EffnetFileError(f"{path}: not Stable Cascade's EfficientNet encoder layout (backbone.*, mapper.0.weight, "
                              f"mapper.1.running_mean/var): missing keys {_some(missing) or 'none'}; "
                              f"unexpected keys {_some(unexpected) or 'none'}")
    wrong = [f"{k} {tuple(state[k].shape)} (want {tuple(want[k].shape)})" for k in state if state[k].shape != want[k].shape]
    if wrong:
        raise EffnetFileError(f"{path}: wrong shapes: {_some(wrong)}")
    enc.load_state_dict(state, strict=False)
    enc.config = {"class": "EfficientNetEncoder", "weights_sha256": _sha256(path), "preprocessing": EFFNET_PREPROCESSING}
    return _freeze(enc).to(device=device, dtype=dtype)


def _text_encoder(tokenizer, encoder):
    @torch.no_grad()
    def encode_text(captions: list[str]) -> TextConditioning:
        if isinstance(captions, str):
            raise TypeError("encode_text expects a list of captions, not a single string")
        tok = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt")
        device = next(encoder.parameters()).device
        out = encoder(tok.input_ids.to(device), attention_mask=tok.attention_mask.to(device), output_hidden_states=True)
        # As StableCascadePriorPipeline.encode_prompt and Stability's train_c.py: the last hidden states and
        # the projected pooled embedding, kept (N, D2) as the cache stores SDXL's (denoiser_kwargs adds the
        # prior's token axis).
        return TextConditioning(states=out.hidden_states[-1], pooled=out.text_embeds)

    return encode_text


@dataclass
class CascadeModel(DiffusionModel):
    """Stage C prior + CLIP text encoder + cosine schedule; `vae` holds the EfficientNet encoder (the
    cache's image encoder, None without model.effnet); Stage B loads on the first decode."""

    clip_img_dim: int = 768
    decoder_source: str = ""
    dtype: torch.dtype = torch.bfloat16
    decoder_steps: int = 10
    _decoder: object = field(default=None, repr=False)

    @property
    def latent_side(self) -> int:
        return int(self.resolution) // EFFNET_DOWNSCALE

    def stage_c_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """Stage C latent (h, w) for an image of about height x width pixels (None = model.resolution's
        latents): ceil(pixels / (Stage B's latent_dim_scale x the Paella VQ's upscale)), the rule of
        diffusers' StableCascadePriorPipeline (resolution_multiple 42.67 for the published stages:
        1024 px -> 24 latents -> 1024 px). The image is then Stage B's int(latents x latent_dim_scale) x VQ."""
        if height is None and width is None:
            return self.latent_side, self.latent_side
        pipe = self.decoder_pipeline()
        vq = pipe.vqgan.config
        per_latent = float(pipe.config.latent_dim_scale) * vq.up_down_scale_factor * 2 ** (vq.levels - 1)
        sizes = []
        for name, v in (("height", height), ("width", width)):
            v = int(self.resolution * per_latent / EFFNET_DOWNSCALE) if v is None else v
            if v < 1:
                raise ValueError(f"{name}={v} must be a positive number of pixels")
            sizes.append(max(1, math.ceil(v / per_latent)))
        return sizes[0], sizes[1]

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            raise ValueError("model.effnet: the cascade family encodes images with Stable Cascade's EfficientNet "
                             "encoder; set model.effnet to effnet_encoder.safetensors")
        return self.vae.encode(pixels)

    @property
    def num_train_timesteps(self) -> int:
        return TIMESTEP_BINS

    def ratio(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Drawn integer timesteps -> Stage C's continuous t in [0, 1) (exact in float32)."""
        return timesteps.to(torch.float32) / TIMESTEP_BINS

    def noisy_and_target(self, latents, noise, timesteps):
        t = self.ratio(timesteps)
        # DDPMWuerstchenScheduler.add_noise is the cosine-abar forward process itself.
        return self.noise_scheduler.add_noise(latents, noise, t), noise, t

    def denoiser_kwargs(self, pooled, time_ids) -> dict:
        if pooled is None:
            raise ValueError("Stage C needs the pooled text embedding (clip_text_pooled); the batch has none")
        return {"clip_text_pooled": pooled.unsqueeze(1),
                "clip_img": pooled.new_zeros(pooled.shape[0], 1, self.clip_img_dim)}

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """The scheduler's cosine abar(t) (clamped to [1e-4, 0.9999]) at continuous t, as add_noise uses it."""
        return self.noise_scheduler._alpha_cumprod(t, t.device)

    def snr_weight(self, timesteps, gamma):
        # SNR(t) = abar / (1 - abar) is defined for this schedule as for DDPM's; eps target.
        return _min_snr(self.alpha_bar(self.ratio(timesteps)).double(), gamma, v_prediction=False)

    def decoder_pipeline(self):
        if self._decoder is None:
            if not self.decoder_source:
                raise ValueError("model.decoder: sampling the cascade family needs the StableCascadeDecoderPipeline "
                                 "folder or hub id (Stage B + Paella VQ), e.g. stabilityai/stable-cascade")
            self._decoder = load_decoder(self.decoder_source, self.dtype, next(self.unet.parameters()).device)
        return self._decoder

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, prompts: list[str] | None = None,
                       seeds: list[int] | None = None) -> torch.Tensor:
        """Stage C latents (N, 16, h, w) -> images (N, 3, H, W) in [0, 1] through Stage B + Paella VQ,
        conditioned on the captions; decoder noise of image i from seeds[i] alone."""
        if prompts is None or seeds is None or len(prompts) != latents.shape[0] or len(seeds) != latents.shape[0]:
            raise ValueError("the Stage B decoder needs one caption and one seed per Stage C latent")
        pipe = self.decoder_pipeline()
        p = next(pipe.decoder.parameters())
        # Offset from the prior's noise seeds so the two stages never draw the same normals.
        gens = [torch.Generator().manual_seed(int(s) + (1 << 40)) for s in seeds]
        out = pipe(image_embeddings=latents.to(device=p.device, dtype=p.dtype), prompt=list(prompts),
                   num_inference_steps=self.decoder_steps, guidance_scale=0.0, generator=gens, output_type="pt")
        return out.images.float().cpu()


def load_decoder(source: str, dtype: torch.dtype, device: str | torch.device):
    """StableCascadeDecoderPipeline from its components in `source` (decoder/, vqgan/, text_encoder/,
    tokenizer/, scheduler/; latent_dim_scale from model_index.json)."""
    from diffusers import (
        DDPMWuerstchenScheduler,
        StableCascadeDecoderPipeline,
        StableCascadeUNet,
    )
    from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import (
        PaellaVQModel,
    )
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    source, common = resolve_source(source, "model.decoder folder")
    weights = dict(common, use_safetensors=True)
    index = StableCascadeDecoderPipeline.load_config(source, **common)
    pipe = StableCascadeDecoderPipeline(
        decoder=StableCascadeUNet.from_pretrained(source, subfolder="decoder", dtype=dtype, **weights),
        tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder", dtype=dtype,
                                                                 **weights),
        scheduler=DDPMWuerstchenScheduler.from_pretrained(source, subfolder="scheduler", **common),
        vqgan=PaellaVQModel.from_pretrained(source, subfolder="vqgan", dtype=dtype, **weights),
        latent_dim_scale=float(index.get("latent_dim_scale", 10.67)),
    )
    for m in (pipe.decoder, pipe.text_encoder, pipe.vqgan):
        _freeze(m).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def adapter_param_counts(config: dict, user_dim: int, num_tokens: int, projection: str = "linear") -> dict:
    """Trainable parameters of the user branch on a Stage C prior of `config`, built on the meta device
    (no weights): {"kv": the to_k_ip / to_v_ip of every attention block, "total": with the projection}."""
    from diffusers import StableCascadeUNet

    from ppd_engine.adapters import add_user_adapters

    with torch.device("meta"):
        prior = StableCascadeUNet(**config)
        handle = add_user_adapters(prior, user_dim=user_dim, num_tokens=num_tokens, projection=projection)
    named = list(handle.named_parameters())
    return {"kv": sum(p.numel() for n, p in named if "_ip." in n), "total": sum(p.numel() for _, p in named)}


def _log_published_counts(adapters) -> None:
    du = int(getattr(adapters, "user_dim", 0) or 0)
    tokens = int(getattr(adapters, "num_tokens", 4))
    projection = getattr(adapters, "projection", "linear")
    for name, config in PRIOR_CONFIGS.items():
        counts = adapter_param_counts(config, du or 1, tokens, projection)
        total = f", {counts['total']:,} with the {projection} projection from Du={du}" if du else ""
        log.info("Stage C %s (published shapes): %s trainable user K/V parameters%s", name, f"{counts['kv']:,}", total)


def load_cascade_model(pretrained: str, prior: str = "prior", effnet: str = "", decoder: str = "", dtype: torch.dtype = torch.bfloat16,
                       device: str | torch.device = "cpu", resolution: int = DEFAULT_RESOLUTION,
                       adapters=None) -> CascadeModel:
    """The frozen Stage C prior of a StableCascadePriorPipeline folder or hub id; `prior` names the
    subfolder of the prior's weights ("prior": 3.6B, "prior_lite": 1B).

    effnet: effnet_encoder.safetensors (needed to encode images, i.e. to build the latent cache).
    decoder: the StableCascadeDecoderPipeline folder / hub id (needed to sample; loaded on first use).
    adapters: the config's adapters section; the trainable-parameter counts of the two published
    priors for it are logged.
    """
    from diffusers import StableCascadePriorPipeline, StableCascadeUNet

    pretrained, common = resolve_source(pretrained)
    local = common["local_files_only"]
    if local and not os.path.isfile(os.path.join(pretrained, prior, "config.json")):
        raise FileNotFoundError(f"model.prior={prior!r}: {pretrained!r} has no {prior}/config.json "
                                f"(a StableCascadePriorPipeline folder has prior/ and, on the hub, prior_lite/)")
    if dtype == torch.float16:
        log.warning("Stable Cascade's authors report that fp16 does not work; use model.dtype=bf16")
    if resolution % EFFNET_DOWNSCALE:
        raise ValueError(f"model.resolution={resolution}: the cascade family needs a multiple of {EFFNET_DOWNSCALE}")
    weights = dict(common, dtype=dtype, use_safetensors=True)
    prior_unet = StableCascadeUNet.from_pretrained(pretrained, subfolder=prior, **weights)
    # The vision tower is not needed: text-only conditioning feeds a zero clip_img.
    pipe = StableCascadePriorPipeline.from_pretrained(pretrained, prior=prior_unet, image_encoder=None,
                                                      feature_extractor=None, **weights)
    prior, text_encoder = pipe.prior, pipe.text_encoder
    if int(prior.config.in_channels) != EFFNET_CHANNELS:
        raise ValueError(f"{pretrained!r}: prior in_channels={prior.config.in_channels}; Stage C reads the "
                         f"{EFFNET_CHANNELS}-channel EfficientNet latents (is this a Stage B decoder?)")
    for m in (prior, text_encoder):
        _freeze(m).to(device)
    encoder = load_effnet(effnet, dtype=dtype, device=device) if effnet else None
    _log_published_counts(adapters)
    return CascadeModel(
        family="cascade", unet=prior, noise_scheduler=pipe.scheduler,
        encode_text=_text_encoder(pipe.tokenizer, text_encoder), resolution=resolution, vae=encoder,
        source=pretrained, clip_img_dim=int(prior.config.clip_image_in_channels), decoder_source=str(decoder or ""),
        dtype=dtype,
    )
