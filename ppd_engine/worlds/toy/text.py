"""A tiny frozen text encoder for toy captions: word tokens -> (T, D) hidden states.

A word-level vocabulary covers every caption the toy world writes; an unknown word maps to <unk>
(the sampling CLI accepts any prompt). The weights are random but seeded and shipped inside the
pretrained asset, because the base UNet learned to read exactly these states.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ppd_engine.worlds.toy.scenes import SHAPES

SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]
DEFAULT_VOCAB = SPECIAL + ["a", "an", "the", "on", "of", "with", "background"] + list(SHAPES)


class ToyTextEncoder(nn.Module):
    """Token and position tables (fixed, seeded) + LayerNorm; frozen (no parameter needs grad)."""

    def __init__(self, vocab: list[str] | None = None, dim: int = 32, max_tokens: int = 6, seed: int = 0):
        super().__init__()
        self.vocab = list(vocab or DEFAULT_VOCAB)
        if self.vocab[:len(SPECIAL)] != SPECIAL:
            raise ValueError(f"vocab must start with {SPECIAL}")
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_tokens = max_tokens
        g = torch.Generator().manual_seed(seed)
        self.token = nn.Embedding(len(self.vocab), dim)
        self.position = nn.Embedding(max_tokens, dim)
        with torch.no_grad():
            self.token.weight.copy_(torch.randn(len(self.vocab), dim, generator=g))
            self.position.weight.copy_(0.5 * torch.randn(max_tokens, dim, generator=g))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.requires_grad_(False)

    @property
    def dim(self) -> int:
        return self.token.embedding_dim

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """captions -> (N, max_tokens) long ids: <bos> words <eos> <pad>...; long captions are cut."""
        rows = []
        for text in captions:
            words = re.findall(r"[a-z]+", text.lower())
            ids = [self.index["<bos>"]] + [self.index.get(w, self.index["<unk>"]) for w in words]
            ids = ids[: self.max_tokens - 1] + [self.index["<eos>"]]
            ids += [self.index["<pad>"]] * (self.max_tokens - len(ids))
            rows.append(ids)
        return torch.tensor(rows, dtype=torch.long)

    @torch.no_grad()
    def forward(self, captions: list[str]) -> torch.Tensor:
        """captions (N) -> hidden states (N, max_tokens, dim)."""
        ids = self.tokenize(captions).to(self.token.weight.device)
        pos = torch.arange(self.max_tokens, device=ids.device)
        return self.norm(self.token(ids) + self.position(pos)[None])
