"""The embedded toy world: procedural scenes, rewards, users, few-shot embeddings, a tiny base model.

`python -m ppd_engine.train` with no arguments runs PPD end to end in this world on a CPU.
Nothing is re-exported from rewards here: importing the few-shot encoder (which runs this file)
must not load the rewards (tests/test_toy_encoder.py).
"""

from ppd_engine.worlds.toy.config import ToyConfig

__all__ = ["ToyConfig"]
