"""Procedural toy scenes: one shape on a background, with hue, brightness, saturation and contrast
drawn independently so every reward axis varies strongly across the base distribution.

The caption names only the shape ("a circle"); colour is left free so the base model's samples for
one caption spread over all the reward axes and preference fine-tuning has room to move them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "ring", "cross")


def caption_for(shape: str) -> str:
    """The caption of a scene showing `shape`."""
    return f"a {shape}"


CAPTIONS: tuple[str, ...] = tuple(caption_for(s) for s in SHAPES)


@dataclass
class SceneParams:
    """Per-scene parameters, each a tensor of shape (N,)."""

    shape: torch.Tensor       # long index into SHAPES
    hue: torch.Tensor         # dominant hue in [0, 1)
    hue_shift: torch.Tensor   # foreground hue offset from the background's
    sat: torch.Tensor         # saturation in [0, 1]
    value: torch.Tensor       # mid brightness (HSV value) in [0, 1]
    contrast: torch.Tensor    # foreground - background value difference, signed
    cx: torch.Tensor          # centre, in pixels
    cy: torch.Tensor
    radius: torch.Tensor      # shape size, in pixels

    def __len__(self) -> int:
        return int(self.shape.shape[0])


def sample_params(n: int, size: int, generator: torch.Generator,
                  shapes: torch.Tensor | None = None) -> SceneParams:
    """Draw `n` scene parameter sets; `shapes` (n,) long fixes the shape of each scene if given."""
    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    if shapes is None:
        shapes = torch.randint(len(SHAPES), (n,), generator=generator)
    return SceneParams(
        shape=shapes.long(),
        hue=torch.rand(n, generator=generator),
        hue_shift=u(-0.12, 0.12),
        sat=torch.rand(n, generator=generator),
        value=u(0.2, 0.8),
        contrast=u(-0.7, 0.7),
        cx=u(0.35, 0.65) * size,
        cy=u(0.35, 0.65) * size,
        radius=u(0.2, 0.32) * size,
    )


def hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Vectorised HSV -> RGB: h, s, v of shape (N,) in [0, 1] -> (N, 3) in [0, 1]."""
    h6 = (h % 1.0) * 6.0
    k = torch.stack([(5.0 + h6) % 6.0, (3.0 + h6) % 6.0, (1.0 + h6) % 6.0], dim=1)
    f = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
    return v[:, None] - v[:, None] * s[:, None] * f


def _masks(p: SceneParams, size: int) -> torch.Tensor:
    """(N, H, W) float foreground masks, 2x supersampled so small shapes keep their outline."""
    ss = 2
    coords = (torch.arange(size * ss, dtype=torch.float32) + 0.5) / ss
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    dx = xx[None] - p.cx[:, None, None]
    dy = yy[None] - p.cy[:, None, None]
    r = p.radius[:, None, None]
    dist = torch.sqrt(dx * dx + dy * dy)
    circle = dist <= r
    square = (dx.abs() <= 0.8 * r) & (dy.abs() <= 0.8 * r)
    # upward triangle: below the apex line, above the base, inside the two slanted edges
    triangle = (dy <= 0.8 * r) & (dy >= -r) & (dx.abs() <= (dy + r) * 0.6)
    ring = (dist <= r) & (dist >= 0.55 * r)
    cross = ((dx.abs() <= 0.3 * r) & (dy.abs() <= r)) | ((dy.abs() <= 0.3 * r) & (dx.abs() <= r))
    stack = torch.stack([circle, square, triangle, ring, cross], dim=1).float()  # (N, S, H', W')
    mask = stack.gather(1, p.shape[:, None, None, None].expand(-1, 1, size * ss, size * ss))[:, 0]
    return torch.nn.functional.avg_pool2d(mask[:, None], ss)[:, 0]


def render(p: SceneParams, size: int) -> torch.Tensor:
    """Render scenes to images (N, 3, size, size) in [0, 1]."""
    v_fg = torch.clamp(p.value + 0.5 * p.contrast, 0.0, 1.0)
    v_bg = torch.clamp(p.value - 0.5 * p.contrast, 0.0, 1.0)
    fg = hsv_to_rgb(p.hue + p.hue_shift, p.sat, v_fg)
    bg = hsv_to_rgb(p.hue, p.sat, v_bg)
    m = _masks(p, size)[:, None]
    return m * fg[:, :, None, None] + (1.0 - m) * bg[:, :, None, None]


def make_scenes(n: int, size: int, generator: torch.Generator,
                shapes: torch.Tensor | None = None) -> tuple[torch.Tensor, list[str]]:
    """`n` random scenes: images (n, 3, size, size) in [0, 1] and their captions."""
    p = sample_params(n, size, generator, shapes)
    return render(p, size), [CAPTIONS[i] for i in p.shape.tolist()]
