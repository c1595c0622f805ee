"""Adding the user branch to a model (`add_user_adapters`) and conditioning a call (`user_conditioning`)."""
from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from typing import Iterator

import torch
from torch import nn

from .attention import ATTENTION_MODES, UserCrossAttnProcessor, UserState, _import_fused
from .families import PROJECTION_NAME, family_of
from .projection import PROJECTIONS, build_projection

logger = logging.getLogger(__name__)

_HANDLE_ATTR = "_ppd_user_adapters"


class UserAdapters:
    """Handle on the user branch added to one model (returned by `add_user_adapters`).

    The modules themselves live inside the model (the projection as `model.ppd_user_proj`, one
    `UserCrossAttnProcessor` per patched attention as its `.processor`), so `.to()`, FSDP and
    the model's own `named_parameters()` see them; the handle knows which ones they are.

    Attributes:
        config: dict with user_dim, num_tokens, in_tokens, projection (+ resampler options),
            token_dim, scale, dropout, attention, family, model_class and `modules` (patched names).
        dropout: probability of zeroing a sample's embedding in training (see `user_conditioning`).
        scale: inference strength of the user branch; multiplies every gate.
    """

    def __init__(self, projection: nn.Module, processors: "OrderedDict[str, nn.Module]", state: UserState,
                 config: dict):
        self.projection = projection
        self.processors = processors
        self.state = state
        self.config = config

    @property
    def dropout(self) -> float:
        return self.config["dropout"]

    @property
    def scale(self) -> float:
        return self.config["scale"]

    @scale.setter
    def scale(self, value: float) -> None:
        self.config["scale"] = float(value)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) with the model-level names (those of `model.named_parameters()`)."""
        for n, p in self.projection.named_parameters():
            yield f"{PROJECTION_NAME}.{n}", p
        for module_name, proc in self.processors.items():
            for n, p in proc.named_parameters():
                yield f"{module_name}.processor.{n}", p

    def parameters(self) -> Iterator[nn.Parameter]:
        """The trainable parameters: projection, then to_k_ip / to_v_ip of every patched attention."""
        for _, p in self.named_parameters():
            yield p

    def state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict((n, p.detach()) for n, p in self.named_parameters())

    def parameter_counts(self) -> "OrderedDict[str, int]":
        """Trainable parameter count per group: the projection, then each block that holds patched layers."""
        counts: OrderedDict[str, int] = OrderedDict()
        counts["projection"] = sum(p.numel() for p in self.projection.parameters())
        for module_name, proc in self.processors.items():
            parts = module_name.split(".")
            group = ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") else parts[0]
            counts[group] = counts.get(group, 0) + sum(p.numel() for p in proc.parameters())
        return counts

    def project(self, user_embeds: torch.Tensor) -> torch.Tensor:
        """(B, T_in, user_dim) or (B, user_dim) -> user tokens (B, num_tokens, token_dim)."""
        return self.projection(_as_3d(user_embeds, self.config["user_dim"]).to(self._proj_dtype()))

    def drop_mask(self, batch: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """(batch,) bool: rows whose embedding the dropout zeroes (each with probability `dropout`)."""
        return torch.rand(batch, device=device, generator=generator) < self.dropout

    def _proj_dtype(self) -> torch.dtype:
        return next(self.projection.parameters()).dtype


def _as_3d(user_embeds: torch.Tensor, user_dim: int) -> torch.Tensor:
    if user_embeds.ndim == 2:
        user_embeds = user_embeds[:, None]
    if user_embeds.ndim != 3 or user_embeds.shape[-1] != user_dim:
        raise ValueError(f"user_embeds must be (B, T_in, {user_dim}) or (B, {user_dim}); "
                         f"got {tuple(user_embeds.shape)}")
    return user_embeds


def get_user_adapters(model: nn.Module) -> UserAdapters:
    """The handle of the user branch of `model` (error if none was added)."""
    handle = getattr(model, _HANDLE_ATTR, None)
    if handle is None:
        raise ValueError(f"{type(model).__name__} has no user adapters; call add_user_adapters(model, ...) first")
    return handle


def add_user_adapters(model: nn.Module, user_dim: int, num_tokens: int = 4, projection: str = "linear",
                      scale: float = 1.0, dropout: float = 0.0, in_tokens: int = 1, attention: str = "sdpa",
                      resampler: dict | None = None, dtype: torch.dtype | None = None) -> UserAdapters:
    """Add the user branch to `model` in place, freeze everything else, and return the handle.

    Args:
        model: a diffusers UNet2DConditionModel (SD1.5 / SDXL layouts) or StableCascadeUNet.
        user_dim: width of the user embedding.
        num_tokens: user tokens N the projection produces (IP-Adapter uses 4; export needs 4 for "linear").
        projection: "linear" (IP-Adapter ImageProjection; T_in = in_tokens, mixed when > 1) or
            "resampler" (IP-Adapter Plus Perceiver; any T_in).
        scale: strength of the user branch; multiplies the gate (change later via `handle.scale`).
        dropout: per-sample probability of zeroing the embedding while the model is in training mode.
        in_tokens: T_in the linear projection expects (one token per VLM layer when > 1).
        attention: "sdpa" (two SDPA calls, bit-exact text path), "fused" (the `ppd::dual_cross_attention`
            op where it supports the shapes; error if it cannot be imported) or "auto" (fused when
            importable and supported, else SDPA). The fused path matches the base within dtype
            tolerance for gate-0 rows, not bit-for-bit; a None embedding / all-zero gate always
            takes the stock SDPA path.
        resampler: options of the resampler: hidden_dim, depth (4), dim_head (64), heads.
        dtype: dtype of the adapter weights (default: the model's), e.g. float32 adapters on a
            bf16 base; the user K/V are cast to the attention's dtype.
    """
    if getattr(model, _HANDLE_ATTR, None) is not None:
        raise ValueError(f"{type(model).__name__} already has user adapters")
    if projection not in PROJECTIONS:
        raise ValueError(f"projection={projection!r}; expected one of {PROJECTIONS}")
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention={attention!r}; expected one of {ATTENTION_MODES}")
    if attention == "fused" and _import_fused()[0] is None:
        raise ImportError(f"attention='fused' needs ppd_engine.ops.dual_attention: {_import_fused()[1]}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout}; expected 0 <= dropout < 1")
    if projection == "linear" and resampler:
        raise ValueError("resampler options given with projection='linear'")
    family = family_of(model)
    targets = family.targets(model)
    if not targets:
        raise ValueError(f"{type(model).__name__} has no attention layers to add a user branch to")
    token_dim = family.token_dim(model)

    model.requires_grad_(False)
    ref = next(model.parameters())
    dtype = dtype or ref.dtype
    proj = build_projection(projection, user_dim, token_dim, num_tokens, in_tokens, **(resampler or {}))
    proj.to(device=ref.device, dtype=dtype)
    model.add_module(PROJECTION_NAME, proj)

    state = UserState(attention)
    processors: OrderedDict[str, nn.Module] = OrderedDict()
    for name, attn in targets:
        if type(attn.processor).__name__ != "AttnProcessor2_0":
            # The gate-0 path copies AttnProcessor2_0; any other stock processor would not be matched bit-for-bit.
            logger.warning("%s used %s; the user processor reproduces AttnProcessor2_0", name,
                           type(attn.processor).__name__)
        proc = UserCrossAttnProcessor(attn, token_dim, state, family.cache_text_kv).to(device=ref.device, dtype=dtype)
        attn.set_processor(proc)
        processors[name] = proc

    config = {
        "format": "ppd_user_adapters/1",
        "user_dim": int(user_dim), "num_tokens": int(num_tokens), "in_tokens": int(in_tokens),
        "projection": projection, "resampler": getattr(proj, "hparams", None),
        "token_dim": token_dim, "dtype": str(dtype).removeprefix("torch."),
        "scale": float(scale), "dropout": float(dropout), "attention": attention,
        "family": family.name, "model_class": type(model).__name__, "modules": list(processors),
    }
    handle = UserAdapters(proj, processors, state, config)
    # object.__setattr__: a plain attribute, not a submodule (the handle is not an nn.Module).
    object.__setattr__(model, _HANDLE_ATTR, handle)

    counts = handle.parameter_counts()
    logger.info("user adapters on %s (%d layers, %s projection): %s trainable params [%s]",
                type(model).__name__, len(processors), projection, f"{sum(counts.values()):,}",
                ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    return handle


@contextlib.contextmanager
def user_conditioning(model: nn.Module, user_embeds: torch.Tensor | None, gate: float | torch.Tensor = 1.0,
                      drop: bool | torch.Tensor | None = None):
    """Condition the model's calls inside the block on a user.

    Args:
        user_embeds: (B, T_in, user_dim), (B, user_dim), or None (the base model: branch off).
        gate: float or (B,) tensor; row b adds gate[b] * scale * user attention. 0 gives exactly
            the base output for that row (bit-identical in fp32 with attention="sdpa").
        drop: embedding dropout. None: apply `dropout` when the model is in training mode; False:
            never; True: always (with probability `dropout`); a (B,) bool tensor: zero exactly
            those rows (paired_forward passes one mask per pair). A zeroed embedding is the
            learned user-agnostic condition, not the base.
    """
    handle = get_user_adapters(model)
    state = handle.state
    tokens, gate_vec = _tokens_and_gate(handle, model, user_embeds, gate, drop)
    saved = (state.tokens, state.gate)
    state.tokens, state.gate = tokens, gate_vec
    try:
        yield handle
    finally:
        state.tokens, state.gate = saved


def _tokens_and_gate(handle: UserAdapters, model: nn.Module, user_embeds, gate, drop):
    if user_embeds is None:
        return None, None
    embeds = _as_3d(user_embeds, handle.config["user_dim"])
    batch = embeds.shape[0]
    # fp32 at least (a bf16 gate of 0.7 would be coarse); fp64 models keep an fp64 gate.
    gate_dtype = torch.promote_types(embeds.dtype, torch.float32)
    if isinstance(gate, torch.Tensor):
        if gate.shape not in ((batch,), ()):
            raise ValueError(f"gate must be a float or a ({batch},) tensor for {batch} user_embeds rows; "
                             f"got shape {tuple(gate.shape)}")
        gate_vec = gate.to(device=embeds.device, dtype=gate_dtype).expand(batch) * handle.scale
        if not bool(gate_vec.any()):
            return None, None
    else:
        if float(gate) * handle.scale == 0.0:
            return None, None
        gate_vec = torch.full((batch,), float(gate) * handle.scale, device=embeds.device, dtype=gate_dtype)

    if drop is None:
        drop = model.training and handle.dropout > 0
    if isinstance(drop, torch.Tensor):
        if drop.shape != (batch,):
            raise ValueError(f"drop mask must be ({batch},) bool; got shape {tuple(drop.shape)}")
        mask = drop.to(embeds.device)
    elif drop and handle.dropout > 0:
        mask = handle.drop_mask(batch, embeds.device)
    else:
        mask = None
    if mask is not None:
        embeds = embeds * (~mask).to(embeds.dtype).view(-1, 1, 1)
    return handle.project(embeds), gate_vec
