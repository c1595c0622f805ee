"""Image preprocessing shared by the latent cache and anything that must match it.

Diffusion-DPO's recipe: resize the shorter side to the model resolution (bilinear, antialiased),
center crop to a square, optional horizontal flip, scale to [-1, 1]. SDXL additionally conditions
on where the crop sits, so `center_crop` also returns the SDXL micro-conditioning numbers.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    import PIL.Image

# Part of the cache fingerprint: change it whenever the pixels fed to the VAE would change.
PREPROCESSING = {"resize": "shorter-side PIL bilinear", "crop": "center", "range": "[-1,1]", "version": 1}


def to_rgb(image) -> "PIL.Image.Image":
    """A PIL image (any mode) or encoded image bytes -> decoded RGB PIL image. Raises on corrupt bytes."""
    from PIL import Image

    if isinstance(image, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(image)))
        image.load()
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or encoded bytes, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


def center_crop(image, resolution: int) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resize the shorter side to `resolution`, center crop a square of that side.

    Returns (pixels (3, R, R) float32 in [-1, 1], original_size (h, w), crop_top_left (top, left)),
    the crop offset measured in the resized image as SDXL's training scripts do.
    """
    from PIL import Image

    img = to_rgb(image)
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ValueError(f"empty image of size {w}x{h}")
    if w <= h:
        new_w, new_h = resolution, max(resolution, int(resolution * h / w))
    else:
        new_w, new_h = max(resolution, int(resolution * w / h)), resolution
    img = img.resize((new_w, new_h), Image.BILINEAR)
    top, left = int(round((new_h - resolution) / 2.0)), int(round((new_w - resolution) / 2.0))
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return arr / 127.5 - 1.0, (h, w), (top, left)
