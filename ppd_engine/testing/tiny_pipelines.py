"""Tiny random SD1.5-style and SDXL-style pipelines, built offline and saved with `save_pretrained`.

Tests load them back through `ppd_engine.models.load_diffusion_model`, the same code path that loads
real weights, so the loader is exercised without downloading anything. The models are random and
small enough that a UNet forward at 16x16 latents takes milliseconds on a CPU.

Shapes (both families): 32x32 images, VAE downscale 2 -> 4x16x16 latents, 77-token captions.
SD1.5-style: text states (77, 32). SDXL-style: text states (77, 32 + 32), pooled (16,), time_ids (6,).
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

TINY_RESOLUTION = 32
MAX_TOKENS = 77

# A few merges on top of the byte alphabet give the BPE something to do on typical captions.
_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("o", "f</w>"), ("i", "n"),
           ("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte-level alphabet: printable bytes map to themselves, the rest to unused code points."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_clip_tokenizer_files(folder: str) -> tuple[str, str, int]:
    """Write a byte-level CLIP BPE vocab.json + merges.txt into `folder`; returns (vocab, merges, vocab_size)."""
    alphabet = _bytes_to_unicode()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    tokens += ["".join(m).replace("</w>", "") + ("</w>" if m[1].endswith("</w>") else "") for m in _MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    os.makedirs(folder, exist_ok=True)
    vocab_path = os.path.join(folder, "vocab.json")
    merges_path = os.path.join(folder, "merges.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(merges_path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in _MERGES:
            f.write(f"{a} {b}\n")
    return vocab_path, merges_path, len(vocab)


def _tokenizer(files_dir: str):
    from transformers import CLIPTokenizer

    vocab_path, merges_path, _ = write_tiny_clip_tokenizer_files(files_dir)
    tok = CLIPTokenizer(vocab=vocab_path, merges=merges_path)
    tok.model_max_length = MAX_TOKENS
    return tok


def _text_config(vocab_size: int, hidden: int, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    kw = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=37, num_hidden_layers=3,
              num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=vocab_size - 2,
              eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, hidden_act="gelu")
    if projection_dim is not None:
        kw["projection_dim"] = projection_dim
    return CLIPTextConfig(**kw)


def _vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                         latent_channels=4, norm_num_groups=8, layers_per_block=1,
                         sample_size=TINY_RESOLUTION, scaling_factor=scaling_factor)


def _unet(cross_attention_dim: int, sdxl_pooled_dim: int | None = None):
    from diffusers import UNet2DConditionModel

    kw = dict(sample_size=TINY_RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
              block_out_channels=(16, 32), norm_num_groups=8,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
              cross_attention_dim=cross_attention_dim, attention_head_dim=4)
    if sdxl_pooled_dim is not None:
        # SDXL's add-embedding: 6 micro-conditioning ids x addition_time_embed_dim + the pooled text.
        kw.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=8 * 6 + sdxl_pooled_dim, use_linear_projection=True)
    return UNet2DConditionModel(**kw)


def _scheduler():
    from diffusers import DDPMScheduler

    # Stable Diffusion's training schedule.
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)


def make_tiny_pipeline(family: str, folder: str, seed: int = 0) -> str:
    """Build a tiny random pipeline of `family` ("sd15" | "sdxl") and save it into `folder`.

    The layout is the diffusers one (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    scheduler/, and text_encoder_2/ + tokenizer_2/ for SDXL), weights in safetensors. The global RNG
    is left untouched. Returns `folder`.
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if family not in ("sd15", "sdxl"):
        raise ValueError(f"family must be one of 'sd15', 'sdxl'; got {family!r}")
    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as tok_dir:
        torch.manual_seed(seed)
        tokenizer = _tokenizer(tok_dir)
        vocab_size = len(tokenizer)
        if family == "sd15":
            from diffusers import StableDiffusionPipeline

            text_encoder = CLIPTextModel(_text_config(vocab_size, 32))
            pipe = StableDiffusionPipeline(vae=_vae(0.18215), text_encoder=text_encoder, tokenizer=tokenizer,
                                           unet=_unet(32), scheduler=_scheduler(), safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
        else:
            from diffusers import StableDiffusionXLPipeline

            text_encoder = CLIPTextModel(_text_config(vocab_size, 32))
            text_encoder_2 = CLIPTextModelWithProjection(_text_config(vocab_size, 32, projection_dim=16))
            pipe = StableDiffusionXLPipeline(vae=_vae(0.13025), text_encoder=text_encoder,
                                             text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                             tokenizer_2=_tokenizer(tok_dir), unet=_unet(64, sdxl_pooled_dim=16),
                                             scheduler=_scheduler(), add_watermarker=False)
        pipe.save_pretrained(folder, safe_serialization=True)
    return folder
