"""User embeddings: a VLM writes a chain-of-thought profile of a user from few-shot preference
pairs; the hidden state(s) of its final generated token become the user's embedding.

`python -m ppd_engine.embed --help` for the command; the store lives in `ppd_engine.embed.store`."""
from .store import EmbeddingStore

__all__ = ["EmbeddingStore"]
