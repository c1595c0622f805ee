"""A tiny random Stable Cascade, saved the way the real one is published, for the real loaders.

    paths = make_tiny_cascade(root)   # {"prior": folder, "decoder": folder, "effnet": file}

- prior/: a StableCascadePriorPipeline (tiny StableCascadeUNet prior with 16 input channels, a
  tiny CLIPTextModelWithProjection (hidden 32, pooled 16) with the offline tokenizer of
  tiny_pipelines, DDPMWuerstchenScheduler), saved with save_pretrained.
- decoder/: the StableCascadeDecoderPipeline layout (decoder/ = a tiny Stage B StableCascadeUNet
  reading 16-channel effnet latents, vqgan/ = a tiny PaellaVQModel, text_encoder/, tokenizer/,
  scheduler/, model_index.json with latent_dim_scale 2).
- effnet.safetensors: a randomly initialised EfficientNet-V2-S encoder in the published key layout
  (backbone.*, mapper.0.weight, mapper.1.running_mean/var), stored in fp16 to halve the 80 MB.

Shapes: 128 px images -> 16 x 4 x 4 Stage C latents -> 8 x 8 Stage B latents -> 32 px samples.
"""

from __future__ import annotations

import os
import tempfile

import torch

TINY_CASCADE_RESOLUTION = 128
TINY_CASCADE_SAMPLE_SIZE = 32
TEXT_HIDDEN, TEXT_POOLED, CLIP_IMG = 32, 16, 24


def _stage_b(pooled_dim: int):
    from diffusers import StableCascadeUNet

    return StableCascadeUNet(
        in_channels=4, out_channels=4, timestep_ratio_embedding_dim=16, patch_size=1, conditioning_dim=32,
        block_out_channels=(16, 32), num_attention_heads=(2, 4), down_num_layers_per_block=(1, 1),
        up_num_layers_per_block=(1, 1), down_blocks_repeat_mappers=(1, 1), up_blocks_repeat_mappers=(1, 1),
        block_types_per_layer=(("SDCascadeResBlock", "SDCascadeTimestepBlock"),
                               ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock")),
        clip_text_in_channels=None, clip_text_pooled_in_channels=pooled_dim, clip_image_in_channels=None,
        clip_seq=2, effnet_in_channels=16, pixel_mapper_in_channels=3, kernel_size=3, dropout=(0.0, 0.0),
        self_attn=True, timestep_conditioning_type=("sca",), switch_level=None)


def _vqgan():
    from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import (
        PaellaVQModel,
    )

    return PaellaVQModel(in_channels=3, out_channels=3, up_down_scale_factor=2, levels=2, bottleneck_blocks=1,
                         embed_dim=16, latent_channels=4, num_vq_embeddings=32, scale_factor=0.3764)


def save_tiny_effnet(path: str, seed: int = 0, rename: tuple[str, str] | None = None) -> str:
    """A random EfficientNetEncoder saved in the published layout; `rename=(old, new)` renames one key
    (a file the loader must refuse). BatchNorm statistics are randomised so loading them is visible."""
    from safetensors.torch import save_file

    from ppd_engine.cascade import EfficientNetEncoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = EfficientNetEncoder()
        state = {}
        for k, v in enc.state_dict().items():
            if k.endswith("running_mean"):
                v = torch.randn_like(v) * 0.1
            elif k.endswith("running_var"):
                v = torch.rand_like(v) + 0.5
            if k.endswith("num_batches_tracked"):
                continue
            state[k] = v.half() if v.is_floating_point() else v
    if rename is not None:
        state[rename[1]] = state.pop(rename[0])
    save_file(state, path)
    return path


def make_tiny_cascade(root: str, seed: int = 0) -> dict[str, str]:
    """Write prior/, decoder/ and effnet.safetensors under `root`; returns their paths. Global RNG untouched."""
    from diffusers import (
        DDPMWuerstchenScheduler,
        StableCascadeDecoderPipeline,
        StableCascadePriorPipeline,
    )
    from transformers import CLIPTextModelWithProjection

    from ppd_engine.testing.tiny_pipelines import _text_config, _tokenizer
    from ppd_engine.testing.tiny_unets import tiny_unet

    paths = {"prior": os.path.join(root, "prior"), "decoder": os.path.join(root, "decoder"),
             "effnet": os.path.join(root, "effnet.safetensors")}
    os.makedirs(root, exist_ok=True)
    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as tok_dir:
        torch.manual_seed(seed)
        tokenizer = _tokenizer(tok_dir)
        text_encoder = CLIPTextModelWithProjection(_text_config(len(tokenizer), TEXT_HIDDEN, projection_dim=TEXT_POOLED))
        prior = tiny_unet("cascade", seed=seed, in_channels=16, out_channels=16, clip_text_in_channels=TEXT_HIDDEN,
                          clip_text_pooled_in_channels=TEXT_POOLED, clip_image_in_channels=CLIP_IMG)
        StableCascadePriorPipeline(tokenizer=tokenizer, text_encoder=text_encoder, prior=prior,
                                   scheduler=DDPMWuerstchenScheduler()).save_pretrained(paths["prior"])
        StableCascadeDecoderPipeline(decoder=_stage_b(TEXT_POOLED), tokenizer=tokenizer, text_encoder=text_encoder,
                                     scheduler=DDPMWuerstchenScheduler(), vqgan=_vqgan(),
                                     latent_dim_scale=2.0).save_pretrained(paths["decoder"])
    save_tiny_effnet(paths["effnet"], seed=seed)
    return paths
