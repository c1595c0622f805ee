"""A tiny random LLaVA-OneVision saved into a folder, for tests and CPU benchmarks (no downloads).

`make_tiny_llava(folder)` builds a `LlavaOnevisionForConditionalGeneration` from a tiny Qwen2 text
config and a tiny SigLIP vision config, a byte-level BPE tokenizer trained offline with `tokenizers`
(ChatML and image/video special tokens included, as the real checkpoints have), and the real
`LlavaOnevisionProcessor` (torchvision image processor), and writes all of it with
`save_pretrained`. Loading it back goes through the same code path as a real hub checkpoint, so
tests exercise the real loader.

Shapes (arch="tiny"): images are resized to 32x32 with 8x8 patches, so each image in a multi-image
prompt costs 16 + 1 (newline) = 17 tokens; the LM has 2 layers of width 64, so `layers=all` gives
3 states. arch="qwen2-0.5b" builds the real llava-onevision-qwen2-0.5b shapes (SigLIP-so400m at
384 px, Qwen2-0.5B with its full vocabulary) with random weights, for GPU throughput benchmarks
without downloading anything; its text is gibberish but every matmul has the real size.
"""
from __future__ import annotations

import os

import torch

# ChatML markers (Qwen2 family) plus the placeholders LLaVA-OneVision's processor expands.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
TEXT_WIDTH = 64
NUM_LAYERS = 2
IMAGE_SIDE = 32
PATCH = 8

# A small corpus so the BPE learns the words our prompts use; the weights are random anyway, so
# only tokenisation coverage matters (byte-level BPE can encode any string regardless).
_CORPUS = """
You are an expert in image aesthetics who predicts what a particular user prefers.
The user compared pairs of images generated for a caption and picked the one they preferred.
Describe each image's style, visual quality and aesthetics, explain the differences, and summarise
the differences between preferred and dispreferred images into a user profile.
Pair Caption Preferred image Dispreferred image Differences User Profile Prediction of user preference
a photo of a cat sitting on a red sofa, digital art, oil painting, watercolor, cinematic lighting,
portrait of an astronaut riding a horse on the moon, highly detailed, 4k, trending, fantasy castle
1 2 3 4 5 6 7 8 9 0 : . , ! ? ( ) [ ] " ' - system user assistant
"""


def _train_tokenizer(vocab_size: int = 700):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from ppd_engine.embed.prompt import DEFAULT_TEMPLATE

    # Training on the default prompt makes its words single tokens, which keeps test prompts short.
    with open(DEFAULT_TEMPLATE, encoding="utf-8") as f:
        corpus = [_CORPUS, f.read()]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    return tok


# Published shapes of llava-onevision-qwen2-0.5b-ov (config.json of the checkpoint).
_ARCHS = {
    "tiny": dict(text=dict(hidden_size=TEXT_WIDTH, intermediate_size=96, num_hidden_layers=NUM_LAYERS,
                           num_attention_heads=4, num_key_value_heads=2),
                 vision=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                             image_size=IMAGE_SIDE, patch_size=PATCH),
                 vocab=None),
    "qwen2-0.5b": dict(text=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                 num_attention_heads=14, num_key_value_heads=2, rope_theta=1000000.0),
                       vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                   num_attention_heads=16, image_size=384, patch_size=14),
                       vocab=151936),
}


def make_tiny_llava(folder: str, seed: int = 0, arch: str = "tiny") -> str:
    """Build and save a random LLaVA-OneVision (model + processor) into `folder`; return it.

    arch: "tiny" (tests, CPU) or "qwen2-0.5b" (real 0.5B shapes, random weights)."""
    model, processor = build_tiny_llava(seed=seed, arch=arch)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_tiny_llava(seed: int = 0, arch: str = "tiny", device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32):
    """(model in eval mode, processor) of a random LLaVA-OneVision, built directly on `device`
    (GPU benchmarks skip the multi-GB save and reload of the 0.5B shapes)."""
    if arch not in _ARCHS:
        raise ValueError(f"arch must be one of {sorted(_ARCHS)}, got {arch!r}")
    spec = _ARCHS[arch]
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        PreTrainedTokenizerFast,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<image>", "<video>"],
        padding_side="left",
    )
    # A model vocabulary larger than the tokenizer's is fine (the extra rows are never produced
    # as inputs); it gives the LM head its real size.
    vocab = spec["vocab"] or len(tokenizer)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}

    text = Qwen2Config(
        vocab_size=vocab,
        max_position_embeddings=32768,
        **spec["text"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    vision = SiglipVisionConfig(vision_use_head=False, **spec["vision"])
    side, patch = spec["vision"]["image_size"], spec["vision"]["patch_size"]
    pinpoints = [[side, side], [side, 2 * side], [2 * side, side], [2 * side, 2 * side]]
    config = LlavaOnevisionConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaOnevisionForConditionalGeneration(config).to(dtype).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.bos_token_id = None

    size = {"height": side, "width": side}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        num_image_tokens=(side // patch) ** 2,
        vision_feature_select_strategy="full",
    )
    processor.tokenizer.padding_side = "left"
    return model, processor
