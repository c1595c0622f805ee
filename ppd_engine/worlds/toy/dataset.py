"""The toy world's data: labelled preference pairs per user, few-shot shots, and the training Dataset.

For every user (seen and unseen) the world draws, from its own seeded stream:
- `shots`: N = 4 held-out labelled pairs — the only thing its evaluation embedding is built from;
- for seen users only, `pairs_per_user` labelled training pairs; K few-shot embeddings for
  training come from random N-subsets of these (different subsets of the same user);
- `heldout`: `heldout_pairs` labelled pairs never trained on, the held-out sets of log.eval_every.
Both images of a pair show the same shape (so share a caption) and differ in colour, like two
generations for one prompt; the label is Bradley-Terry on the user's own reward (noisy).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from ppd_engine.training.heldout import HeldOutSet
from ppd_engine.worlds.toy.config import ToyConfig
from ppd_engine.worlds.toy.fewshot import PairDifferenceEncoder
from ppd_engine.worlds.toy.scenes import SHAPES, make_scenes
from ppd_engine.worlds.toy.users import User, bradley_terry_labels, get_user


@dataclass
class LabelledPairs:
    """Winner/loser images (P, 3, H, W) in [0, 1], their shared captions, and label quality."""

    winners: torch.Tensor
    losers: torch.Tensor
    captions: list[str]
    agreement: float   # fraction of labels agreeing with the noiseless reward order

    def __len__(self) -> int:
        return int(self.winners.shape[0])


@dataclass
class ToyUserData:
    user: User
    split: str               # "seen" | "unseen"
    shots: LabelledPairs     # the N held-out few-shot pairs
    train: LabelledPairs | None
    heldout: LabelledPairs | None = None  # never trained on: the held-out evaluation's pairs


def user_generator(seed: int, name: str, stream: str) -> torch.Generator:
    """A generator that depends only on (seed, user name, stream), not on the order of users."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(f"{name}/{stream}".encode())) % (2**63))


def labelled_pairs(user: User, n: int, size: int, label_scale: float, g: torch.Generator) -> LabelledPairs:
    """`n` same-shape pairs labelled by `user` (Bradley-Terry with sharpness `label_scale`)."""
    shapes = torch.randint(len(SHAPES), (n,), generator=g)
    a, captions = make_scenes(n, size, g, shapes)
    b, _ = make_scenes(n, size, g, shapes)
    a_wins = bradley_terry_labels(user, a, b, label_scale, g)
    m = a_wins[:, None, None, None]
    winners, losers = torch.where(m, a, b), torch.where(m, b, a)
    agree = (user.reward(winners) >= user.reward(losers)).float().mean().item()
    return LabelledPairs(winners, losers, captions, agree)


def build_world(cfg: ToyConfig) -> dict[str, ToyUserData]:
    """Every configured user's shots (and, for seen users, training pairs); seen users first."""
    overlap = sorted(set(cfg.seen_users) & set(cfg.unseen_users))
    if overlap:
        raise ValueError(f"toy.seen_users and toy.unseen_users overlap: {overlap}")
    if not cfg.seen_users:
        raise ValueError("toy.seen_users is empty: PPD needs at least one user to train on")
    if cfg.pairs_per_user < cfg.n_shots:
        raise ValueError(f"toy.pairs_per_user={cfg.pairs_per_user} must be >= toy.n_shots={cfg.n_shots}")
    world: dict[str, ToyUserData] = {}
    for split, names in (("seen", cfg.seen_users), ("unseen", cfg.unseen_users)):
        for name in names:
            user = get_user(name)
            shots = labelled_pairs(user, cfg.n_shots, cfg.image_size, cfg.label_scale,
                                   user_generator(cfg.seed, name, "shots"))
            train = None
            if split == "seen":
                train = labelled_pairs(user, cfg.pairs_per_user, cfg.image_size, cfg.label_scale,
                                       user_generator(cfg.seed, name, "train"))
            heldout = None
            if cfg.heldout_pairs:
                heldout = labelled_pairs(user, cfg.heldout_pairs, cfg.image_size, cfg.label_scale,
                                         user_generator(cfg.seed, name, "heldout"))
            world[name] = ToyUserData(user, split, shots, train, heldout)
    return world


def few_shot_embeddings(world: dict[str, ToyUserData], encoder: PairDifferenceEncoder, cfg: ToyConfig
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(training, evaluation) embeddings.

    training: seen user -> (K, T_in, Du), each from a random n_shots subset of its training pairs.
    evaluation: every user -> (1, T_in, Du) from its held-out shots (what a new user would give).
    """
    train, evaluation = {}, {}
    for name, d in world.items():
        evaluation[name] = encoder.embed(d.shots.winners, d.shots.losers)[None]
        if d.train is None:
            continue
        g = user_generator(cfg.seed, name, "subsets")
        idx = torch.stack([torch.randperm(len(d.train), generator=g)[: cfg.n_shots]
                           for _ in range(cfg.embeddings_per_user)])  # (K, n_shots)
        train[name] = encoder.embed(d.train.winners[idx], d.train.losers[idx])
    return train, evaluation


class ToyPairDataset(Dataset):
    """Seen users' training pairs as trainer items (INTERFACES "Training dataset items"); with
    part="heldout", the held-out pairs of the users of `split` ("seen" | "unseen"; None = all).

    latents_w / latents_l: (3, H, W) pixels in [-1, 1] (the toy model has no VAE);
    text: (T, D) caption states from the frozen toy text encoder; user_id; pair_id.
    """

    def __init__(self, world: dict[str, ToyUserData], encode_text, part: str = "train", split: str | None = None):
        self.index: list[tuple[str, int]] = []
        self.part = part
        self.data = {n: getattr(d, part) for n, d in world.items()
                     if getattr(d, part) is not None and split in (None, d.split)}
        for name, pairs in self.data.items():
            self.index.extend((name, i) for i in range(len(pairs)))
        captions = sorted({c for p in self.data.values() for c in p.captions})
        states = encode_text(captions).states.float().cpu()
        self.text = {c: states[i] for i, c in enumerate(captions)}

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        name, j = self.index[i]
        p = self.data[name]
        return {
            "latents_w": p.winners[j] * 2.0 - 1.0,
            "latents_l": p.losers[j] * 2.0 - 1.0,
            "text": self.text[p.captions[j]],
            "user_id": name,
            "pair_id": f"{name}/{j}" if self.part == "train" else f"{name}/{self.part}/{j}",
        }


def heldout_sets(world: dict[str, ToyUserData], encode_text, embeddings: dict[str, torch.Tensor]
                 ) -> dict[str, HeldOutSet]:
    """The trainer's eval_sets: "seen" and "unseen" users' held-out pairs (a split without users or
    held-out pairs is left out), each user read through `embeddings` (its evaluation embedding)."""
    return {split: HeldOutSet(ToyPairDataset(world, encode_text, "heldout", split), embeddings)
            for split in ("seen", "unseen")
            if any(d.split == split and d.heldout is not None for d in world.values())}
