"""Reward models that score (image, prompt) pairs: PickScore, CLIP score, LAION aesthetic, HPSv2.

All share `RewardModel.score(images, prompts) -> Tensor (N,)`: batched, no grad, a progress bar,
float32 on the CPU. Every model is loaded from a local folder/file or a hub id through the same
code path (tests save tiny random models with `save_pretrained` and load them back).

Score conventions (the ones the public models and papers report):
- PickScore (Kirstain et al. 2023): `logit_scale.exp() * cos(text, image)` with the PickScore
  CLIP-H checkpoint (about 20-23 for good images).
- CLIP score: `100 * max(cos(text, image), 0)`, the torchmetrics `CLIPScore` convention
  (torchmetrics docs, multimodal/clip_score) rather than Hessel et al.'s `2.5 * max(cos, 0)`.
- LAION aesthetic predictor (christophschuhmann/improved-aesthetic-predictor): a linear-stack MLP
  on the L2-normalised CLIP ViT-L/14 image embedding, about 1-10.
- HPSv2 (Wu et al. 2023): `cos(text, image)` of the HPSv2 fine-tuned open_clip ViT-H-14, as the
  authors' score.py reports it (no logit scale; about 0.2-0.35).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
# PickScore's repo ships the weights only; its authors load the processor from the base CLIP-H.
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_MODEL = "openai/clip-vit-large-patch14"
AESTHETIC_CLIP = "openai/clip-vit-large-patch14"
HPSV2_REPO = "xswu/HPSv2"
HPSV2_FILE = "HPS_v2.1_compressed.pt"
HPSV2_ARCH = "ViT-H-14"


class RewardModel(ABC):
    """Scores images against prompts. Subclasses implement `_score_batch` for one batch."""

    name: str = "reward"
    uses_prompts: bool = True

    def __init__(self, batch_size: int = 16, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.dtype = dtype

    @torch.no_grad()
    def score(self, images: Sequence, prompts: Sequence[str] | None = None,
              progress: bool = True) -> torch.Tensor:
        """images: N PIL images; prompts: N strings (ignored by prompt-free rewards) -> (N,) float32."""
        images = list(images)
        if self.uses_prompts:
            if prompts is None:
                raise ValueError(f"{self.name} needs one prompt per image")
            prompts = list(prompts)
            if len(prompts) != len(images):
                raise ValueError(f"{self.name}: {len(images)} images but {len(prompts)} prompts")
        out = []
        starts = range(0, len(images), self.batch_size)
        for s in tqdm(starts, desc=self.name, unit="batch", disable=not progress or len(starts) < 2):
            imgs = [im.convert("RGB") for im in images[s:s + self.batch_size]]
            ps = prompts[s:s + self.batch_size] if self.uses_prompts else None
            out.append(self._score_batch(imgs, ps).float().cpu())
        if not out:
            return torch.zeros(0)
        return torch.cat(out)

    @abstractmethod
    def _score_batch(self, images: list, prompts: list[str] | None) -> torch.Tensor:
        """One batch -> (B,)."""


def _pooled(out) -> torch.Tensor:
    # transformers 5 returns a BaseModelOutputWithPooling (projected embedding in pooler_output);
    # transformers 4 returned the projected tensor itself.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class _HFClipReward(RewardModel):
    """A transformers `CLIPModel` + `CLIPProcessor` pair; subclasses turn cosines into scores."""

    def __init__(self, source: str, processor_source: str | None = None, **kw):
        super().__init__(**kw)
        from transformers import CLIPModel, CLIPProcessor

        self.source = str(source)
        self.processor = CLIPProcessor.from_pretrained(str(processor_source or source))
        self.model = CLIPModel.from_pretrained(self.source).to(self.device, self.dtype).eval()
        tok_max = getattr(self.processor.tokenizer, "model_max_length", 77) or 77
        self.max_length = min(int(tok_max), self.model.config.text_config.max_position_embeddings)

    def image_embeds(self, images: list) -> torch.Tensor:
        """(B,) PIL -> (B, P) L2-normalised float32 image embeddings."""
        px = self.processor(images=images, return_tensors="pt")["pixel_values"]
        emb = _pooled(self.model.get_image_features(pixel_values=px.to(self.device, self.dtype)))
        return F.normalize(emb.float(), dim=-1)

    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """(B,) strings -> (B, P) L2-normalised float32 text embeddings (truncated to the context)."""
        tok = self.processor(text=list(prompts), padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        emb = _pooled(self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                   attention_mask=tok["attention_mask"].to(self.device)))
        return F.normalize(emb.float(), dim=-1)

    def cosine(self, images: list, prompts: list[str]) -> torch.Tensor:
        return (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)


class PickScore(_HFClipReward):
    """PickScore: `logit_scale.exp() * cos(text, image)` (the CLIP logit, per pair)."""

    name = "pickscore"

    def __init__(self, source: str = PICKSCORE_MODEL, processor_source: str | None = None, **kw):
        if processor_source is None and source == PICKSCORE_MODEL:
            processor_source = PICKSCORE_PROCESSOR
        super().__init__(source, processor_source, **kw)

    def _score_batch(self, images, prompts):
        return self.model.logit_scale.float().exp() * self.cosine(images, prompts)


class CLIPScore(_HFClipReward):
    """CLIP score: `100 * max(cos(text, image), 0)` (torchmetrics convention)."""

    name = "clipscore"

    def __init__(self, source: str = CLIP_MODEL, processor_source: str | None = None, **kw):
        super().__init__(source, processor_source, **kw)

    def _score_batch(self, images, prompts):
        return 100.0 * self.cosine(images, prompts).clamp(min=0)


class AestheticMLP(nn.Module):
    """The public LAION improved-aesthetic-predictor head: five linear layers (no activations,
    so effectively linear) with dropout between the first four; module names match the public
    `.pth` (`layers.0`, `layers.2`, `layers.4`, `layers.6`, `layers.7`)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, input_size) L2-normalised CLIP image embeddings -> (N, 1) scores."""
        return self.layers(x)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors` or a torch file (weights_only; `{"state_dict": ...}` unwrapped)."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return sd


class LaionAesthetic(_HFClipReward):
    """LAION aesthetic score: `AestheticMLP(normalize(CLIP image embedding))`; prompts are ignored."""

    name = "aesthetic"
    uses_prompts = False

    def __init__(self, weights: str | os.PathLike, clip_source: str = AESTHETIC_CLIP,
                 processor_source: str | None = None, **kw):
        if not Path(weights).is_file():
            raise FileNotFoundError(
                f"aesthetic predictor weights not found: {weights} (the public file is "
                "sac+logos+ava1-l14-linearMSE.pth from christophschuhmann/improved-aesthetic-predictor)")
        sd = load_state_dict_file(weights)
        w0 = sd.get("layers.0.weight")
        if w0 is None:
            raise ValueError(f"{weights}: no 'layers.0.weight' (keys: {sorted(sd)[:8]}...); "
                             "not an improved-aesthetic-predictor state dict")
        super().__init__(clip_source, processor_source, **kw)
        proj = self.model.config.projection_dim
        if w0.shape[1] != proj:
            raise ValueError(f"{weights}: MLP input size {w0.shape[1]} != CLIP projection_dim {proj} "
                             "(the public predictor needs CLIP ViT-L/14, 768)")
        self.mlp = AestheticMLP(w0.shape[1])
        self.mlp.load_state_dict(sd)
        self.mlp = self.mlp.to(self.device).eval()

    def _score_batch(self, images, prompts):
        return self.mlp(self.image_embeds(images)).squeeze(-1)


def _resolve_hpsv2(source: str) -> tuple[str, str | None]:
    """-> (open_clip model name, checkpoint file or None when the model name carries its weights)."""
    p = Path(source)
    if p.is_file():
        return "", str(p)
    if p.is_dir():
        if (p / "open_clip_config.json").is_file():
            return f"local-dir:{p}", None
        found = sorted(p.glob("HPS_v2*.pt")) + sorted(p.glob("*.safetensors")) + sorted(p.glob("*.pt"))
        if not found:
            raise FileNotFoundError(f"{p}: no open_clip_config.json, HPS_v2*.pt or *.safetensors inside")
        return "", str(found[0])
    from huggingface_hub import hf_hub_download
    return "", hf_hub_download(source, HPSV2_FILE)


class HPSv2(RewardModel):
    """HPSv2: cosine of the HPSv2-tuned open_clip (ViT-H-14) image and text embeddings.

    `source`: a checkpoint file (the authors' `HPS_v2*.pt`, `{"state_dict": ...}`, or .safetensors)
    built on `arch`; a folder holding such a file; an open_clip folder with `open_clip_config.json`
    (any architecture); or a hub repo id (downloads `HPS_v2.1_compressed.pt`). Needs the
    `open_clip_torch` extra (`pip install ppd_engine[eval]`).
    """

    name = "hpsv2"

    def __init__(self, source: str = HPSV2_REPO, arch: str = HPSV2_ARCH, **kw):
        super().__init__(**kw)
        try:
            import open_clip
        except ImportError as e:
            raise ImportError("HPSv2 needs open_clip: pip install 'ppd_engine[eval]'") from e
        model_name, ckpt = _resolve_hpsv2(str(source))
        if ckpt is not None:
            model_name = arch
            # The base CLIP weights are overwritten by the HPSv2 checkpoint, so none are fetched.
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
            # open_clip's loader unwraps {"state_dict"}, strips "module." and reads safetensors;
            # weights_only keeps torch.load from unpickling code.
            open_clip.load_checkpoint(model, ckpt, weights_only=True)
        else:
            model, _, preprocess = open_clip.create_model_and_transforms(model_name)
        self.model = model.to(self.device, self.dtype).eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)

    def _score_batch(self, images, prompts):
        px = torch.stack([self.preprocess(im) for im in images]).to(self.device, self.dtype)
        tok = self.tokenizer(list(prompts)).to(self.device)
        img = F.normalize(self.model.encode_image(px).float(), dim=-1)
        txt = F.normalize(self.model.encode_text(tok).float(), dim=-1)
        return (img * txt).sum(-1)


REWARD_NAMES = ("pickscore", "clipscore", "aesthetic", "hpsv2")


def load_reward(name: str, *, pickscore_model: str = PICKSCORE_MODEL,
                pickscore_processor: str | None = None, clip_model: str = CLIP_MODEL,
                aesthetic_clip: str = AESTHETIC_CLIP, aesthetic_weights: str | None = None,
                hpsv2_checkpoint: str = HPSV2_REPO, hpsv2_arch: str = HPSV2_ARCH,
                batch_size: int = 16, device: str = "cpu",
                dtype: torch.dtype = torch.float32) -> RewardModel:
    """Build one reward model by name (one of REWARD_NAMES) from the given sources."""
    kw = dict(batch_size=batch_size, device=device, dtype=dtype)
    if name == "pickscore":
        return PickScore(pickscore_model, pickscore_processor, **kw)
    if name == "clipscore":
        return CLIPScore(clip_model, **kw)
    if name == "aesthetic":
        if aesthetic_weights is None:
            raise ValueError("the aesthetic reward needs --aesthetic-weights (the predictor's .pth/.safetensors)")
        return LaionAesthetic(aesthetic_weights, aesthetic_clip, **kw)
    if name == "hpsv2":
        return HPSv2(hpsv2_checkpoint, hpsv2_arch, **kw)
    raise ValueError(f"unknown reward {name!r}; choose from {', '.join(REWARD_NAMES)}")
