"""The toy world's rewards: simple, exactly defined image statistics a user can like or dislike.

Every reward maps images (N, 3, H, W) float in [0, 1] to (N,); luminance is
Y = 0.299 R + 0.587 G + 0.114 B and every mean runs over all pixels of one image.
"""

from __future__ import annotations

from typing import Callable

import torch

_LUMA = (0.299, 0.587, 0.114)


def _check(images: torch.Tensor) -> torch.Tensor:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"rewards expect images of shape (N, 3, H, W), got {tuple(images.shape)}")
    return images


def luminance(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, H, W) luminance Y."""
    _check(images)
    return _LUMA[0] * images[:, 0] + _LUMA[1] * images[:, 1] + _LUMA[2] * images[:, 2]


def warmth(images: torch.Tensor) -> torch.Tensor:
    """mean(R) - mean(B)."""
    _check(images)
    return images[:, 0].flatten(1).mean(1) - images[:, 2].flatten(1).mean(1)


def coolness(images: torch.Tensor) -> torch.Tensor:
    """-warmth."""
    return -warmth(images)


def brightness(images: torch.Tensor) -> torch.Tensor:
    """mean(Y)."""
    return luminance(images).flatten(1).mean(1)


def darkness(images: torch.Tensor) -> torch.Tensor:
    """-brightness."""
    return -brightness(images)


def saturation(images: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of max(R, G, B) - min(R, G, B)."""
    _check(images)
    return (images.amax(1) - images.amin(1)).flatten(1).mean(1)


def contrast(images: torch.Tensor) -> torch.Tensor:
    """Population standard deviation of Y over the image's pixels."""
    return luminance(images).flatten(1).std(1, correction=0)


REWARDS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "warmth": warmth,
    "coolness": coolness,
    "brightness": brightness,
    "darkness": darkness,
    "saturation": saturation,
    "contrast": contrast,
}


def weighted_reward(images: torch.Tensor, weights: dict[str, float]) -> torch.Tensor:
    """A user's own reward: sum_k weights[k] * REWARDS[k](images); (N, 3, H, W) -> (N,)."""
    unknown = sorted(set(weights) - set(REWARDS))
    if unknown:
        raise KeyError(f"unknown reward(s) {unknown}; known: {sorted(REWARDS)}")
    total = torch.zeros(images.shape[0], dtype=images.dtype, device=images.device)
    for name, w in weights.items():
        if w:
            total = total + float(w) * REWARDS[name](images)
    return total
