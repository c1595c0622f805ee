"""Toy users: each one is a weight vector over REWARDS, with Bradley-Terry preference labels.

Every default seen user has its opposite among the seen users (warm_bright / cool_dark,
warm_dark / cool_bright, vivid / muted, high_contrast / flat, bright_vivid / dark_muted), so no
single non-personalized model can please everyone and the population as a whole has no net taste:
with a lopsided population (net +4 on contrast) the adapters learned a shared push along it that
swamped every user whose taste opposes it. Contrast has a
smaller spread than the other rewards across the scene distribution (std ~0.06 vs ~0.2), so its
weights are larger to give it a comparable say.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ppd_engine.worlds.toy.rewards import weighted_reward


@dataclass(frozen=True)
class User:
    """A toy user: `weights` over REWARDS define its own reward; `description` is for people."""

    name: str
    weights: dict[str, float]
    description: str

    def reward(self, images: torch.Tensor) -> torch.Tensor:
        """Own reward of images (N, 3, H, W) in [0, 1] -> (N,)."""
        return weighted_reward(images, self.weights)


_ALL = [
    User("warm_bright", {"warmth": 1.0, "brightness": 1.0}, "warm and bright"),
    User("cool_dark", {"coolness": 1.0, "darkness": 1.0}, "cool and dark"),
    User("warm_dark", {"warmth": 1.0, "darkness": 1.0}, "warm and dark"),
    User("cool_bright", {"coolness": 1.0, "brightness": 1.0}, "cool and bright"),
    User("vivid", {"saturation": 1.0, "contrast": 2.0}, "saturated, contrasty"),
    User("muted", {"saturation": -1.0, "contrast": -2.0}, "greyish, flat"),
    User("high_contrast", {"contrast": 4.0}, "strong light/dark contrast"),
    User("bright_vivid", {"brightness": 1.0, "saturation": 1.0}, "bright and saturated"),
    User("flat", {"contrast": -4.0}, "weak light/dark contrast"),
    User("dark_muted", {"darkness": 1.0, "saturation": -1.0}, "dark and greyish"),
    # Meant as unseen users: their tastes mix axes the seen users cover, in new combinations.
    User("sunset", {"warmth": 1.0, "saturation": 1.0}, "warm and saturated"),
    User("night", {"darkness": 1.0, "contrast": 3.0}, "dark with contrast"),
    User("pastel", {"brightness": 1.0, "saturation": -1.0}, "bright and greyish"),
    User("cool_vivid", {"coolness": 1.0, "saturation": 1.0}, "cool and saturated"),
]

USERS: dict[str, User] = {u.name: u for u in _ALL}


def get_user(name: str) -> User:
    """Look a user up by name, with an error listing the known ones."""
    try:
        return USERS[name]
    except KeyError:
        raise KeyError(f"unknown toy user {name!r}; known users: {', '.join(USERS)}") from None


def bradley_terry_labels(user: User, images_a: torch.Tensor, images_b: torch.Tensor,
                         scale: float, generator: torch.Generator) -> torch.Tensor:
    """Draw noisy labels: (N,) bool, True where the user prefers a over b.

    P(a preferred) = sigmoid(scale * (r(a) - r(b))) with r the user's own reward, so close calls
    are often labelled against the reward, as real human labels are.
    """
    if images_a.shape != images_b.shape:
        raise ValueError(f"pair images differ in shape: {tuple(images_a.shape)} vs {tuple(images_b.shape)}")
    p = torch.sigmoid(scale * (user.reward(images_a) - user.reward(images_b)))
    return torch.rand(p.shape, generator=generator) < p
