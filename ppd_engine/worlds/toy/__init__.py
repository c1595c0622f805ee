"""The embedded toy world: procedural scenes, rewards, users, few-shot embeddings, a tiny base model.

`python -m ppd_engine.train` with no arguments runs PPD end to end in this world on a CPU.
"""

from ppd_engine.worlds.toy.config import ToyConfig
from ppd_engine.worlds.toy.rewards import REWARDS, weighted_reward

__all__ = ["ToyConfig", "REWARDS", "weighted_reward"]
