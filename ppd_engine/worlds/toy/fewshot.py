"""Few-shot preference encoder: a user's N labelled pairs (images only) -> embedding (N + 1, dim).

It plays the role the VLM embedder plays for real users: it looks at the winner and loser images of
N = 4 pairs and summarises what the user seems to prefer. It never sees a reward definition, a
user's weights or a reward value, and neither does its feature extractor (features.py: a scene
autoencoder trained on reconstruction only). This module must not import
ppd_engine.worlds.toy.rewards or .users, directly or through anything it imports;
tests/test_toy_encoder.py walks the imports. The hand-made encoder over the reward statistics,
which does know what to look for, is oracle.py: an upper bound, never the headline.

The aggregation has no learned part. Each image becomes a feature vector (channel statistics of
the autoencoder's feature maps); a pair becomes the
difference winner - loser, expressed in the principal axes of such differences over random scene
pairs and whitened there (so no feature dominates by its scale or by what it shares with others),
keeping only the leading `components` axes: from 4 pairs, every extra nuisance axis adds noise to
the summary. Each difference is then scaled to unit length so each labelled pair casts one vote of
equal weight (a pair that happens to differ hugely along an axis the user does not care about would
otherwise swamp the others). Tokens: one per pair plus their mean, lifted to `dim` by a fixed random
orthogonal map (the adapters' own projection learns what to read from them).
"""

from __future__ import annotations

from typing import Callable

import torch

from ppd_engine.worlds.toy.scenes import make_scenes


class PairDifferenceEncoder:
    """Whitened, unit-length feature differences of N pairs + their mean, lifted to `dim` dimensions.

    `features`: images (M, 3, H, W) in [0, 1] -> (M, F). `components`: principal axes kept (<= F).
    """

    def __init__(self, features: Callable[[torch.Tensor], torch.Tensor], image_size: int, components: int,
                 dim: int = 32, seed: int = 0, calibration_scenes: int = 2048):
        if dim < components:
            raise ValueError(f"few-shot embedding dim {dim} must be >= the {components} kept feature axes")
        self.features = features
        g = torch.Generator().manual_seed(seed)
        a, _ = make_scenes(calibration_scenes, image_size, g)
        b, _ = make_scenes(calibration_scenes, image_size, g)
        with torch.no_grad():
            diff = (features(a) - features(b)).double()
        if not 1 <= components <= diff.shape[1]:
            raise ValueError(f"components={components} must lie in [1, {diff.shape[1]}] (the feature size)")
        evals, evecs = torch.linalg.eigh(torch.cov(diff.T))  # ascending
        # Share of the difference variance the kept axes explain, for the record.
        self.explained = float(evals.flip(0)[:components].sum() / evals.sum())
        evals, evecs = evals.flip(0)[:components], evecs.flip(1)[:, :components]
        self.whiten = (evecs * evals.clamp_min(1e-12).rsqrt()).float()  # (F, components)
        q, _ = torch.linalg.qr(torch.randn(dim, components, generator=g))
        self.lift = q  # (dim, components), orthonormal columns: keeps the geometry of the votes
        self.dim = dim

    def votes(self, images_w: torch.Tensor, images_l: torch.Tensor) -> torch.Tensor:
        """Winners and losers (..., N, 3, H, W) in [0, 1] -> unit votes (..., N, components)."""
        if images_w.shape != images_l.shape:
            raise ValueError(f"winner/loser shapes differ: {tuple(images_w.shape)} vs {tuple(images_l.shape)}")
        if images_w.dim() < 4:
            raise ValueError(f"expected (..., N, 3, H, W) pair images, got {tuple(images_w.shape)}")
        lead, img = images_w.shape[:-3], images_w.shape[-3:]
        with torch.no_grad():
            fw = self.features(images_w.reshape(-1, *img).float())
            fl = self.features(images_l.reshape(-1, *img).float())
        d = ((fw - fl) @ self.whiten).reshape(*lead, -1)
        return d / d.norm(dim=-1, keepdim=True).clamp_min(1e-6)  # identical images: a zero vote

    def embed(self, images_w: torch.Tensor, images_l: torch.Tensor) -> torch.Tensor:
        """Winners and losers (..., N, 3, H, W) in [0, 1] -> embeddings (..., N + 1, dim).

        Leading dims batch independent users / subsets."""
        d = self.votes(images_w, images_l)
        tokens = torch.cat([d, d.mean(-2, keepdim=True)], dim=-2)  # (..., N + 1, components)
        return tokens @ self.lift.T


class FewShotEncoder(PairDifferenceEncoder):
    """The generic encoder: PairDifferenceEncoder over the frozen scene autoencoder's feature
    statistics (`SceneAutoencoder.describe`). 8 axes: chosen on the seen users' training labels
    only (mean cosine between a 4-shot summary and the user's 512-pair summary, and 4-shot
    retrieval among seen users: 0.51 / 0.31 at 3 axes, 0.57 / 0.48 at 6, 0.53 / 0.52 at 8; the
    oracle's 0.70 / 0.57), never on the evaluation users."""

    def __init__(self, image_size: int, components: int = 8, dim: int = 32, seed: int = 0,
                 calibration_scenes: int = 2048, features_path: str = ""):
        from ppd_engine.worlds.toy.features import load_features

        net = load_features(features_path or None)
        if net.config["image_size"] != image_size:
            raise ValueError(f"toy.image_size={image_size} but the feature extractor was trained at "
                             f"{net.config['image_size']}")
        super().__init__(net.describe, image_size, components, dim, seed, calibration_scenes)
