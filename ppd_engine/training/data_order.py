"""Which pairs a step sees, and the per-pair random draws — both pure functions of (seed, step).

Every random choice of a step (its pairs, and for each pair its timestep, noise, caption and user
dropouts, which of the user's K embeddings) is derived from the seed, the step number and the pair's
slot within the step, never from a running RNG. So a resumed run redraws exactly what the
uninterrupted run drew, and a 2-rank run draws for each pair exactly what a 1-rank run draws for it
(the ranks just split the slots): the multi-process equivalence and bitwise resume rest on this.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_PERM, _PAIR, _NOISE = 1, 2, 3  # stream ids keep the seed families apart


def mix_seed(*words: int) -> int:
    """A 63-bit seed from non-negative integers (numpy's SeedSequence hashing: nearby inputs give
    unrelated seeds). Words are hashed whole: seeds 0 and 2^32 draw differently."""
    state = np.random.SeedSequence([int(w) for w in words]).generate_state(1, np.uint64)
    return int(state[0]) & ((1 << 63) - 1)


@dataclass(frozen=True)
class DataOrder:
    """Epoch permutations of `n_items` dataset indices, cut into steps of `pairs_per_step` (last partial
    step of an epoch dropped, as the data loader's drop_last would)."""

    n_items: int
    pairs_per_step: int
    seed: int

    def __post_init__(self):
        if self.n_items < self.pairs_per_step:
            raise ValueError(f"train.pairs_per_step={self.pairs_per_step} is larger than the dataset "
                             f"({self.n_items} pairs); lower it")

    @property
    def steps_per_epoch(self) -> int:
        return self.n_items // self.pairs_per_step

    def perm_seed(self, epoch: int) -> int:
        return mix_seed(self.seed, _PERM, epoch)

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.perm_seed(epoch))
        return torch.randperm(self.n_items, generator=g)

    def cursor(self, step: int) -> dict:
        """Where global step `step` (0-based) starts: epoch, position in the epoch's permutation, its seed."""
        epoch, within = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "position": within * self.pairs_per_step, "perm_seed": self.perm_seed(epoch)}

    def step_indices(self, step: int) -> list[int]:
        """The `pairs_per_step` dataset indices of global step `step`, in slot order."""
        cur = self.cursor(step)
        perm = self.permutation(cur["epoch"])
        return perm[cur["position"]:cur["position"] + self.pairs_per_step].tolist()


def rank_slots(pairs_per_step: int, micro_batch: int, rank: int, world: int) -> list[list[int]]:
    """Slots of a step handled by `rank`, one list per micro-batch: rank r takes the r-th contiguous
    block of pairs_per_step / world slots and walks it micro_batch at a time."""
    if pairs_per_step % (micro_batch * world):
        raise ValueError(f"train.pairs_per_step={pairs_per_step} must be a multiple of train.micro_batch x "
                         f"world size = {micro_batch} x {world}")
    per_rank = pairs_per_step // world
    start = rank * per_rank
    return [list(range(start + m, start + m + micro_batch)) for m in range(0, per_rank, micro_batch)]


@dataclass
class PairDraws:
    """Random draws of a micro-batch of B pairs (winner and loser share all of them)."""

    timesteps: torch.Tensor      # (B,) long
    noise: torch.Tensor          # (B, C, h, w) float32
    drop_caption: torch.Tensor   # (B,) bool
    drop_user: torch.Tensor      # (B,) bool
    embed_choice: torch.Tensor   # (B,) float in [0, 1): picks one of a user's K embeddings


def draw_pairs(seed: int, step: int, slots: list[int], latent_shape: tuple[int, ...], num_timesteps: int,
               empty_caption_prob: float, user_dropout: float, device: torch.device) -> PairDraws:
    """The draws of `slots` of global step `step`; each pair from its own generator (see module doc)."""
    ts, drops_c, drops_u, choice, noise = [], [], [], [], []
    for slot in slots:
        g = torch.Generator().manual_seed(mix_seed(seed, _PAIR, step, slot))
        ts.append(int(torch.randint(0, num_timesteps, (1,), generator=g)))
        u = torch.rand(3, generator=g, dtype=torch.float64)
        drops_c.append(bool(u[0] < empty_caption_prob))
        drops_u.append(bool(u[1] < user_dropout))
        choice.append(float(u[2]))
        gn = torch.Generator(device=device).manual_seed(mix_seed(seed, _NOISE, step, slot))
        noise.append(torch.randn(latent_shape, generator=gn, device=device, dtype=torch.float32))
    return PairDraws(
        timesteps=torch.tensor(ts, dtype=torch.long, device=device),
        noise=torch.stack(noise),
        drop_caption=torch.tensor(drops_c, dtype=torch.bool, device=device),
        drop_user=torch.tensor(drops_u, dtype=torch.bool, device=device),
        embed_choice=torch.tensor(choice, dtype=torch.float64),
    )
