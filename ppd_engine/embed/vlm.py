"""Load a VLM (LLaVA-OneVision by default) and its processor from a hub id or a local folder."""
from __future__ import annotations

import torch

DEFAULT_MODEL = "llava-hf/llava-onevision-qwen2-7b-ov-hf"
SMALL_MODEL = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_vlm(source: str, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32):
    """(model in eval mode on `device`, processor with left padding) from `source`.

    LLaVA-OneVision checkpoints load as `LlavaOnevisionForConditionalGeneration`; other image-text
    models (e.g. Qwen2-VL, for the judge) through `AutoModelForImageTextToText`. Remote code is never
    executed: only architectures shipped with transformers load."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, LlavaOnevisionForConditionalGeneration

    dtype = parse_dtype(dtype)
    config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    cls = LlavaOnevisionForConditionalGeneration if config.model_type == "llava_onevision" else AutoModelForImageTextToText
    model = cls.from_pretrained(source, dtype=dtype, trust_remote_code=False).to(device).eval()
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=False)
    # Batched decoding needs every prompt to end at the same column, so pad on the left.
    processor.tokenizer.padding_side = "left"
    return model, processor
