"""How well a few-shot embedding identifies its user, measured against the users' true rewards.

- distance agreement: Spearman's rho, over all pairs of users, between the distance of their
  evaluation embeddings (cosine distance of the mean-vote tokens) and the distance of their rewards
  (1 - Pearson correlation of the two users' rewards over random scenes: the reward weights'
  distance in the units the scenes give them, where contrast's weight 4 means as much as warmth's 1);
- top-1 retrieval: for each user, fresh 4-shot draws (a stream the evaluation embeddings never
  used), each embedded and matched to the nearest evaluation embedding; the share matched to
  their own user (chance is 1 / users).
"""

from __future__ import annotations

import numpy as np
import torch

from ppd_engine.worlds.toy.dataset import ToyUserData, labelled_pairs, user_generator
from ppd_engine.worlds.toy.report import spearman
from ppd_engine.worlds.toy.scenes import make_scenes


def _mean_token(e: torch.Tensor) -> torch.Tensor:
    """Embeddings (..., N + 1, dim) -> unit mean-vote tokens (..., dim)."""
    return torch.nn.functional.normalize(e[..., -1, :].double(), dim=-1)


def reward_distances(world: dict[str, ToyUserData], image_size: int, seed: int, scenes: int = 2048) -> np.ndarray:
    """(U, U) matrix of 1 - corr(r_a, r_b) over random scenes."""
    images, _ = make_scenes(scenes, image_size, torch.Generator().manual_seed(seed + 7))
    r = torch.stack([d.user.reward(images).double() for d in world.values()])
    return (1.0 - torch.corrcoef(r)).numpy()


def identification(world: dict[str, ToyUserData], encoder, eval_embeds: dict[str, torch.Tensor], cfg) -> dict:
    """The report's `identification` section for one encoder (see the module docstring)."""
    names = list(world)
    tokens = torch.stack([_mean_token(eval_embeds[n][0]) for n in names])  # (U, dim)
    emb_d = (1.0 - tokens @ tokens.T).numpy()
    rew_d = reward_distances(world, cfg.image_size, cfg.seed)
    iu = np.triu_indices(len(names), k=1)
    hits = {}
    for i, n in enumerate(names):
        p = labelled_pairs(world[n].user, cfg.n_shots * cfg.identify_draws, cfg.image_size, cfg.label_scale,
                           user_generator(cfg.seed, n, "identify"))
        shape = (cfg.identify_draws, cfg.n_shots, *p.winners.shape[1:])
        q = _mean_token(encoder.embed(p.winners.reshape(shape), p.losers.reshape(shape)))  # (D, dim)
        hits[n] = (q @ tokens.T).argmax(1) == i
    allhits = torch.cat(list(hits.values())).double()
    return {
        "distance_spearman": spearman(emb_d[iu], rew_d[iu]),
        "top1_retrieval": allhits.mean().item(),
        "top1_retrieval_per_user": {n: h.double().mean().item() for n, h in hits.items()},
        "chance": 1.0 / len(names), "draws_per_user": cfg.identify_draws, "user_pairs": int(len(iu[0])),
    }
