"""Policy and reference predictions of a Diffusion-DPO pair batch from ONE copy of the model.

The reference model of PPD's DPO loss is the frozen base, i.e. the same model with the user
branch gated off, so no second copy is kept. For B pairs the batch has 2B rows (winners first,
then losers; a pair shares t, noise, caption and user).

    policy_pred, ref_pred = paired_forward(unet, noisy_latents, timesteps, text, user_embeds)

Strategies:
- "sequential": the reference rows under torch.no_grad() (no autograd graph), then the policy
  rows with grad. (no_grad rather than inference_mode: the text K/V cached during the reference
  pass are reused by the policy pass's graph, and inference tensors cannot be saved for backward;
  no_grad also keeps ref_pred usable by ops that save it.)
- "stacked": policy and reference rows as one 4B batch (better device utilisation at small B);
  the reference rows skip the user branch altogether (it runs for the first 2B rows only) and
  ref_pred is detached. Memory: autograd still holds the frozen layers' activations of all 4B
  rows (an op saves whole tensors, not row ranges), so stacked costs about 2x the activation
  memory of sequential; it buys fewer, larger kernel launches, not memory.

`policy_forward` runs the policy rows alone, for steps whose reference MSEs were computed before
training (train.reference=cached, ppd_engine/training/reference.py).

Text K/V sharing (UNet2DConditionModel): each cross-attention computes K/V of the caption once per
call of paired_forward and reuses them for all four evaluations; when winners and losers carry the
same text states (checked with torch.equal), only the B distinct rows are projected. Stable Cascade
attends over [image; text] tokens, so its K/V depend on the image and are never shared.

Gradient checkpointing (`unet.enable_gradient_checkpointing()`) works with both: the processors
replay the forward's user tokens and cached K/V when re-run during backward (see
`UserState.inputs`); run backward before the next grad-enabled forward of the same model.

Both strategies equal two independent calls of the model (policy under `user_conditioning`,
reference without) to float tolerance, outputs and adapter gradients (tests/test_paired.py).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from .adapters.families import call_model, family_of
from .adapters.handle import get_user_adapters, user_conditioning

STRATEGIES = ("sequential", "stacked")


@contextlib.contextmanager
def shared_text_kv(model: nn.Module, text_rows: int | None):
    """Inside the block, each cross-attention of `model` projects text K/V once and reuses them.

    text_rows: number of distinct caption rows Bt at the head of the batch (query row b uses text
    row b % Bt), or None for "every row is its own caption". A no-op for families whose K/V mix
    in image tokens (Stable Cascade)."""
    state = get_user_adapters(model).state
    saved = (state.text_cache, state.text_rows)
    state.text_cache, state.text_rows = {}, text_rows
    try:
        yield
    finally:
        state.text_cache, state.text_rows = saved


def _double_rows(value, rows: int):
    """Repeat per-row tensors (leading dim == rows) twice along dim 0, recursing into dicts."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == rows:
        return torch.cat([value, value])
    if isinstance(value, dict):
        return {k: _double_rows(v, rows) for k, v in value.items()}
    return value


def _text_kv_context(model: nn.Module, encoder_hidden_states: torch.Tensor, pairs: int, share_text_kv: bool):
    """shared_text_kv over the pair batch: only the B distinct caption rows when winners and losers
    carry the same text states (checked with torch.equal)."""
    rows = 2 * pairs
    cacheable = share_text_kv and family_of(model).cache_text_kv and not encoder_hidden_states.requires_grad
    if not cacheable:
        return contextlib.nullcontext()
    same = torch.equal(encoder_hidden_states[:pairs], encoder_hidden_states[pairs:])
    return shared_text_kv(model, pairs if same else rows)


def _check_rows(noisy_latents: torch.Tensor, **tensors) -> int:
    """B of a (2B, ...) pair batch, after checking every per-row tensor has 2B rows."""
    rows = noisy_latents.shape[0]
    if rows % 2:
        raise ValueError(f"noisy_latents has {rows} rows; a pair batch has 2B rows (winners then losers)")
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.ndim > 0 and t.shape[0] != rows:
            raise ValueError(f"{name} has {t.shape[0]} rows, noisy_latents has {rows}")
    return rows // 2


def _dropout_mask(model: nn.Module, handle, user_embeds, pairs: int, device) -> torch.Tensor | bool:
    """Embedding dropout (training mode, handle.dropout > 0): one mask per pair, shared by w and l."""
    if user_embeds is not None and model.training and handle.dropout > 0:
        return handle.drop_mask(pairs, device=device).repeat(2)
    return False


def _prefill_text_kv(model: nn.Module, encoder_hidden_states: torch.Tensor) -> None:
    """Project every cross-attention's text K/V into the shared cache before the policy call.

    In paired_forward the reference call fills the cache; without it, the policy call's forward
    would project K/V while a gradient-checkpointing re-run in backward finds the cache full and
    skips the projections. Selective checkpointing replays saved matmul outputs in call order, so the
    two op sequences must match. K/V of the frozen text projections are constants of the adapters'
    gradient, so no_grad changes nothing else."""
    handle = get_user_adapters(model)
    inputs = handle.state.inputs()
    with torch.no_grad():
        for name, proc in handle.processors.items():
            if proc.cache_text_kv:
                attn = model.get_submodule(name)
                states = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross \
                    else encoder_hidden_states
                proc._text_kv(attn, states, inputs)


def policy_forward(model: nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                   encoder_hidden_states: torch.Tensor, user_embeds: torch.Tensor | None,
                   added_cond_kwargs: dict | None = None, gate: float | torch.Tensor = 1.0,
                   share_text_kv: bool = True, phase_hook: Callable[[str, str], None] | None = None,
                   **unet_kwargs) -> torch.Tensor:
    """The policy rows of paired_forward alone, (2B, C, H, W) with grad: for a step whose reference
    MSEs were computed beforehand (train.reference=cached). Same arguments as paired_forward; the
    phase hook sees "policy"."""
    handle = get_user_adapters(model)
    pairs = _check_rows(noisy_latents, timesteps=timesteps, encoder_hidden_states=encoder_hidden_states,
                        user_embeds=user_embeds)
    hook = phase_hook or (lambda phase, event: None)
    drop = _dropout_mask(model, handle, user_embeds, pairs, noisy_latents.device)
    with _text_kv_context(model, encoder_hidden_states, pairs, share_text_kv):
        hook("policy", "start")
        if handle.state.text_cache is not None:  # inside shared_text_kv
            _prefill_text_kv(model, encoder_hidden_states)
        with user_conditioning(model, user_embeds, gate, drop=drop):
            policy = call_model(model, noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs,
                                **unet_kwargs)
        hook("policy", "end")
    return policy


def paired_forward(model: nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                   encoder_hidden_states: torch.Tensor, user_embeds: torch.Tensor | None,
                   strategy: str = "sequential", added_cond_kwargs: dict | None = None,
                   gate: float | torch.Tensor = 1.0, share_text_kv: bool = True,
                   phase_hook: Callable[[str, str], None] | None = None,
                   **unet_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy and reference predictions, (2B, C, H, W) each, from one model.

    Args:
        noisy_latents: (2B, C, H, W), winners then losers.
        timesteps: (2B,) (a pair shares t); for StableCascadeUNet the timestep ratios.
        encoder_hidden_states: (2B, T, D) text states; StableCascadeUNet: `clip_text`.
        user_embeds: (2B, T_in, Du) or (2B, Du) (a pair shares its user), or None (policy = base).
        strategy: "sequential" or "stacked" (see the module docstring).
        added_cond_kwargs: UNet2DConditionModel micro-conditioning (SDXL "text_time"), rows 2B.
        gate: user-branch gate of the policy rows (float or (2B,)).
        share_text_kv: compute each cross-attention's text K/V once for the four evaluations.
        phase_hook: called as hook(phase, "start"|"end") around "reference", "policy" (sequential)
            or "stacked", e.g. to time phases with CUDA events.
        unet_kwargs: passed to every call; StableCascadeUNet needs clip_text_pooled (2B, 1, D) and
            clip_img (2B, 1, D) here.

    Embedding dropout (training mode, handle.dropout > 0) draws one mask per pair. ref_pred carries
    no autograd graph.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}; expected one of {STRATEGIES}")
    handle = get_user_adapters(model)
    pairs = _check_rows(noisy_latents, timesteps=timesteps, encoder_hidden_states=encoder_hidden_states,
                        user_embeds=user_embeds)
    rows = 2 * pairs
    hook = phase_hook or (lambda phase, event: None)
    drop = _dropout_mask(model, handle, user_embeds, pairs, noisy_latents.device)

    with _text_kv_context(model, encoder_hidden_states, pairs, share_text_kv):
        if strategy == "sequential":
            hook("reference", "start")
            with torch.no_grad(), user_conditioning(model, None):
                ref = call_model(model, noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs,
                                 **unet_kwargs)
            hook("reference", "end")
            hook("policy", "start")
            with user_conditioning(model, user_embeds, gate, drop=drop):
                policy = call_model(model, noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs,
                                    **unet_kwargs)
            hook("policy", "end")
            return policy, ref

        hook("stacked", "start")
        state = handle.state
        with user_conditioning(model, user_embeds, gate, drop=drop):
            # The user tokens cover the first 2B rows; the reference half runs the text path only.
            saved_prefix, state.prefix_rows = state.prefix_rows, True
            try:
                out = call_model(model, torch.cat([noisy_latents, noisy_latents]), _double_rows(timesteps, rows),
                                 torch.cat([encoder_hidden_states, encoder_hidden_states]),
                                 _double_rows(added_cond_kwargs, rows), **_double_rows(unet_kwargs, rows))
            finally:
                state.prefix_rows = saved_prefix
        hook("stacked", "end")
        return out[:rows], out[rows:].detach()
