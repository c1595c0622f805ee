"""The projection P: a user embedding (B, T_in, user_dim) -> num_tokens user tokens (B, N, token_dim).

Two kinds:

- "linear" (`LinearProjection`): with T_in = 1 it is exactly IP-Adapter's `ImageProjection`
  (Linear(user_dim -> N * token_dim), reshape to N tokens, LayerNorm), which is what makes it
  exportable to stock diffusers. With T_in > 1 (one token per VLM layer) the layers are first
  mixed by learned softmax weights (initialised to the plain mean), ELMo-style: the number of
  parameters stays that of one layer, and the mix learns which layers carry taste.
- "resampler" (`Resampler`): IP-Adapter Plus' Perceiver resampler (diffusers'
  `IPAdapterPlusImageProjection`): N learned latent queries cross-attend, `depth` times, over
  [projected input tokens; latents], then Linear + LayerNorm to token_dim. Takes any T_in and
  keeps every layer's token; exportable when depth = 4 and dim_head = 64 (what the stock loader
  rebuilds).

A zero embedding is NOT "no user": both kinds map it to a learned (bias-driven) token set, the
user-agnostic condition trained by embedding dropout. "No user" is a gate of 0 / a None embedding.
"""
from __future__ import annotations

import torch
from diffusers.models.embeddings import IPAdapterPlusImageProjection
from torch import nn

PROJECTIONS = ("linear", "resampler")


class LinearProjection(nn.Module):
    """(B, T_in, user_dim) -> (B, num_tokens, token_dim); T_in must equal `in_tokens`."""

    def __init__(self, user_dim: int, token_dim: int, num_tokens: int, in_tokens: int = 1):
        super().__init__()
        self.num_tokens = num_tokens
        self.in_tokens = in_tokens
        # Softmax logits over the input tokens; zeros = plain mean at init.
        self.layer_logits = nn.Parameter(torch.zeros(in_tokens)) if in_tokens > 1 else None
        # Names `proj` / `norm` are IP-Adapter's own, so export writes them verbatim.
        self.proj = nn.Linear(user_dim, num_tokens * token_dim)
        self.norm = nn.LayerNorm(token_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        if embeds.shape[1] != self.in_tokens:
            raise ValueError(f"linear projection built for T_in={self.in_tokens} input tokens; got user_embeds "
                             f"of shape {tuple(embeds.shape)}")
        if self.layer_logits is None:
            x = embeds[:, 0]
        else:
            w = torch.softmax(self.layer_logits.float(), 0).to(embeds.dtype)
            x = torch.einsum("btd,t->bd", embeds, w)
        x = self.proj(x)
        return self.norm(x.reshape(x.shape[0], self.num_tokens, -1))


class Resampler(IPAdapterPlusImageProjection):
    """Perceiver resampler (IP-Adapter Plus): (B, T_in, user_dim) -> (B, num_tokens, token_dim), any T_in."""

    def __init__(self, user_dim: int, token_dim: int, num_tokens: int, hidden_dim: int | None = None,
                 depth: int = 4, dim_head: int = 64, heads: int | None = None, ffn_ratio: float = 4):
        hidden_dim = hidden_dim or max(dim_head, -(-token_dim // dim_head) * dim_head)
        heads = heads or max(1, hidden_dim // dim_head)
        super().__init__(embed_dims=user_dim, output_dims=token_dim, hidden_dims=hidden_dim, depth=depth,
                         dim_head=dim_head, heads=heads, num_queries=num_tokens, ffn_ratio=ffn_ratio)
        self.hparams = dict(hidden_dim=hidden_dim, depth=depth, dim_head=dim_head, heads=heads, ffn_ratio=ffn_ratio)


def build_projection(kind: str, user_dim: int, token_dim: int, num_tokens: int, in_tokens: int = 1,
                     **resampler_kwargs) -> nn.Module:
    """A projection of `kind` ("linear" | "resampler"); resampler_kwargs: hidden_dim, depth, dim_head, heads."""
    if kind == "linear":
        if resampler_kwargs:
            raise ValueError(f"resampler options {sorted(resampler_kwargs)} given with projection='linear'")
        return LinearProjection(user_dim, token_dim, num_tokens, in_tokens)
    if kind == "resampler":
        return Resampler(user_dim, token_dim, num_tokens, **resampler_kwargs)
    raise ValueError(f"projection={kind!r}; expected one of {PROJECTIONS}")
