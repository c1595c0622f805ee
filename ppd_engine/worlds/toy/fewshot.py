"""Few-shot preference encoder: a user's N labelled pairs (images only) -> embedding (T_in, Du).

It plays the role the VLM embedder plays for real users: it looks at the winner and loser images
of N = 4 pairs and summarises what the user seems to prefer. It never sees a user's reward
weights — an unseen user is embedded exactly like a seen one, from 4 labelled pairs.

Each image is described by four colour statistics a person (or a VLM) would name: colour
temperature (R - B), brightness and its spread (luminance mean and standard deviation) and
colourfulness (chroma). Few statistics matter: from only 4 pairs, every extra nuisance dimension
adds noise to the summary (a fifth one, tint, lowered the expected cosine between a 4-shot summary
and the user's many-pair direction from ~0.67 to ~0.61 in a simulation over random shot sets).
A pair is described by the difference winner - loser, whitened over the scene distribution (ZCA:
the statistics are correlated through HSV value, so per-feature scaling alone still lets shared
variation dominate), then scaled to unit length so each labelled pair casts one vote of equal
weight: a pair that happens to differ hugely in a direction the user does not care about would
otherwise swamp the others. Tokens: one per pair plus their mean, lifted to Du dimensions by a
fixed random orthogonal map (the adapters' own projection learns what to read from them).
"""

from __future__ import annotations

import torch

from ppd_engine.worlds.toy.rewards import luminance
from ppd_engine.worlds.toy.scenes import make_scenes

FEATURE_NAMES = ("temperature", "mean_y", "std_y", "chroma")


def image_features(images: torch.Tensor) -> torch.Tensor:
    """Colour statistics of images (..., 3, H, W) in [0, 1] -> (..., F) with F = len(FEATURE_NAMES)."""
    if images.dim() < 4 or images.shape[-3] != 3:
        raise ValueError(f"expected images (..., 3, H, W), got {tuple(images.shape)}")
    lead = images.shape[:-3]
    x = images.reshape(-1, 3, images.shape[-2], images.shape[-1])
    r, b = x[:, 0].flatten(1), x[:, 2].flatten(1)
    y = luminance(x).flatten(1)
    chroma = (x.amax(1) - x.amin(1)).flatten(1)
    feats = torch.stack([(r - b).mean(1), y.mean(1), y.std(1, correction=0), chroma.mean(1)], dim=1)
    return feats.reshape(*lead, len(FEATURE_NAMES))


class FewShotEncoder:
    """Deterministic (seeded) few-shot encoder; `embed(w, l)` -> (n_shots + 1, dim)."""

    def __init__(self, image_size: int, dim: int = 32, seed: int = 0, calibration_scenes: int = 1024):
        g = torch.Generator().manual_seed(seed)
        # Whiten feature differences over the scene distribution (ZCA: C^-1/2, the whitening that
        # keeps each axis closest to its own statistic) so no statistic dominates by its units or
        # by what it shares with the others.
        a, _ = make_scenes(calibration_scenes, image_size, g)
        b, _ = make_scenes(calibration_scenes, image_size, g)
        diff = (image_features(a) - image_features(b)).double()
        evals, evecs = torch.linalg.eigh(torch.cov(diff.T))
        self.whiten = (evecs @ torch.diag(evals.clamp_min(1e-8).rsqrt()) @ evecs.T).float()  # (F, F)
        f = len(FEATURE_NAMES)
        if dim < f:
            raise ValueError(f"few-shot embedding dim {dim} must be >= the {f} image features")
        q, _ = torch.linalg.qr(torch.randn(dim, f, generator=g))
        self.lift = q  # (dim, F) with orthonormal columns: keeps the geometry of the differences
        self.dim = dim

    def embed(self, images_w: torch.Tensor, images_l: torch.Tensor) -> torch.Tensor:
        """Winners and losers (..., N, 3, H, W) in [0, 1] -> embeddings (..., N + 1, dim).

        Leading dims batch independent users / subsets.
        """
        if images_w.shape != images_l.shape:
            raise ValueError(f"winner/loser shapes differ: {tuple(images_w.shape)} vs {tuple(images_l.shape)}")
        if images_w.dim() < 4:
            raise ValueError(f"expected (..., N, 3, H, W) pair images, got {tuple(images_w.shape)}")
        d = (image_features(images_w.float()) - image_features(images_l.float())) @ self.whiten
        d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-6)  # identical images: a zero vote
        tokens = torch.cat([d, d.mean(-2, keepdim=True)], dim=-2)  # (..., N + 1, F)
        return tokens @ self.lift.T
