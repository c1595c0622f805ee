"""One micro-batch of Diffusion-DPO: noise both images of a pair alike, run the paired forward,
apply the preference loss.

Per pair (winner w, loser l, same caption c, user u):
    t ~ U{0..T-1}, eps ~ N(0, I)                          shared by w and l (Diffusion-DPO)
    x_w^t = a_t x_w + s_t eps,  x_l^t = a_t x_l + s_t eps
    c -> "" with prob. train.empty_caption_prob            (classifier-free guidance over text)
    u -> 0  with prob. train.user_dropout                  (the user-agnostic branch: guidance over u)
    policy = base + user branch, reference = base          (one model, paired_forward)
    loss   = preference_loss(loss.name, policy, reference, target, beta, weight=w(lambda_t))

The noising, the target and the denoiser's extra inputs are the model family's
(DiffusionModel.noisy_and_target / denoiser_kwargs): DDPM add_noise with an eps or v target for
SD1.5 / SDXL, the continuous cosine schedule of Stable Cascade Stage C (ppd_engine.cascade).

The weight w(lambda_t) of a pair (`loss.weighting`):
    uniform  w = 1 (what Diffusion-DPO trains with: its w(lambda_t) is a constant folded into beta)
    min_snr  w = min(SNR(t), gamma) / SNR(t) for eps-prediction, min(SNR(t), gamma) / (SNR(t) + 1)
             for v-prediction (Min-SNR-gamma; SNR(t) = abar_t / (1 - abar_t)). It multiplies the
             logit `inside`, so high-noise pairs (small SNR) keep full weight and low-noise pairs,
             whose MSE differences are tiny and noisy, are down-weighted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from ppd_engine.training.data_order import PairDraws

_KEYS_SDXL = ("pooled", "time_ids_w", "time_ids_l")


def collate(items: list[dict], device: torch.device) -> dict:
    """Stack dataset items (see INTERFACES: latents_w/_l, text, [pooled, time_ids_w/_l], user_id)."""
    if not items:
        raise ValueError("empty micro-batch")
    out: dict = {"user_id": [it["user_id"] for it in items], "pair_id": [it.get("pair_id", "") for it in items]}
    keys = ["latents_w", "latents_l", "text"] + [k for k in _KEYS_SDXL if k in items[0]]
    for k in keys:
        missing = [i for i, it in enumerate(items) if k not in it]
        if missing:
            raise KeyError(f"dataset item {missing[0]} has no {k!r} (items need latents_w, latents_l, text)")
        out[k] = torch.stack([torch.as_tensor(it[k]) for it in items]).to(device=device, dtype=torch.float32)
    if out["latents_w"].shape != out["latents_l"].shape:
        raise ValueError(f"latents_w {tuple(out['latents_w'].shape)} and latents_l "
                         f"{tuple(out['latents_l'].shape)} differ")
    return out


def pick_user_embeds(user_ids: list[str], choice: torch.Tensor, embeddings: Mapping[str, torch.Tensor] | None,
                     shape: tuple[int, ...], device: torch.device, zero: bool = False) -> torch.Tensor:
    """(B, T_in, Du): for each pair, one of its user's K few-shot embeddings (index floor(choice*K)).

    `zero` (the non-personalized baseline) gives zeros of `shape` for every pair."""
    if zero or embeddings is None:
        return torch.zeros((len(user_ids), *shape), device=device, dtype=torch.float32)
    rows = []
    for uid, c in zip(user_ids, choice.tolist()):
        if uid not in embeddings:
            raise KeyError(f"user {uid!r} has no embedding in the store (data.embeddings)")
        e = torch.as_tensor(embeddings[uid])
        if e.dim() == 2:  # one embedding (T_in, Du)
            e = e.unsqueeze(0)
        k = min(int(c * e.shape[0]), e.shape[0] - 1)
        rows.append(e[k])
    return torch.stack(rows).to(device=device, dtype=torch.float32)


@dataclass
class StepStats:
    """Detached per-micro-batch statistics (0-dim means over its pairs), logged under their field
    names: the diffusers Diffusion-DPO vocabulary (implicit_acc, model_mse, ref_mse, reward_margin =
    mean inside) and TRL's (rewards_chosen/_rejected/_accuracies/_margins = TRL's rewards/chosen,
    rewards/rejected, rewards/accuracies, rewards/margins under the mapping of ppd_engine.losses)."""

    loss: torch.Tensor
    implicit_acc: torch.Tensor
    model_mse: torch.Tensor
    ref_mse: torch.Tensor
    reward_margin: torch.Tensor
    rewards_chosen: torch.Tensor
    rewards_rejected: torch.Tensor
    rewards_accuracies: torch.Tensor
    rewards_margins: torch.Tensor


@dataclass
class NoisedPairs:
    """The denoiser inputs of a micro-batch of B pairs, 2B rows (winners then losers) each; `cond`
    holds the family's own keyword inputs (SDXL micro-conditioning, Stage C's pooled text)."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    text: torch.Tensor
    cond: dict
    target: torch.Tensor


def noised_pairs(model, batch: dict, draws: PairDraws, empty_text: torch.Tensor,
                 empty_pooled: torch.Tensor | None) -> NoisedPairs:
    """Caption dropout, noising and the regression target of a micro-batch: everything but the user
    branch, so the training step and the cached reference pass (training/reference.py) feed the
    model the same tensors for the same draws."""
    device = batch["latents_w"].device
    drop_c = draws.drop_caption.view(-1, 1, 1)
    text = torch.where(drop_c, empty_text.to(device).expand_as(batch["text"]), batch["text"])
    pooled = time_ids = None
    if "pooled" in batch:
        pooled = torch.where(draws.drop_caption.view(-1, 1), empty_pooled.to(device).expand_as(batch["pooled"]),
                             batch["pooled"])
        pooled = torch.cat([pooled, pooled])
    if "time_ids_w" in batch:
        time_ids = torch.cat([batch["time_ids_w"], batch["time_ids_l"]])
    # The family's own inputs (SDXL micro-conditioning, Stage C's pooled text and zero image embedding).
    cond = model.denoiser_kwargs(pooled, time_ids)

    latents = torch.cat([batch["latents_w"], batch["latents_l"]])
    noise = torch.cat([draws.noise, draws.noise])
    noisy, target, timesteps = model.noisy_and_target(latents, noise, torch.cat([draws.timesteps, draws.timesteps]))
    return NoisedPairs(noisy, timesteps, torch.cat([text, text]), cond, target)


def micro_step_loss(model, batch: dict, draws: PairDraws, user_embeds: torch.Tensor, empty_text: torch.Tensor,
                    empty_pooled: torch.Tensor | None, *, loss_name: str | list[str], beta: float, weighting: str,
                    snr_gamma: float, loss_options: dict, strategy: str, autocast_dtype: torch.dtype | None,
                    phase_hook=None, loss_weights: list[float] | None = None,
                    ref_mse: torch.Tensor | None = None) -> tuple[torch.Tensor, StepStats]:
    """The preference loss of one micro-batch of B pairs (scalar, with graph) and its statistics.

    batch: collated items (latents_w/_l (B, C, h, w), text (B, T, D), SDXL / Stage C pooled (B, D2),
    SDXL time_ids_w/_l (B, 6)); user_embeds (B, T_in, Du), rows already zeroed for dropout;
    empty_text (1, T, D) / empty_pooled (1, D2): the empty caption's conditioning.
    phase_hook(phase, "start"|"end"), if given, brackets the forward phases (see paired_forward)
    and "loss", so a benchmark can time them. loss_name may be a list (a mixture, weighted by
    loss_weights; None or empty = all 1). ref_mse (2B,) float64: the reference's per-sample MSEs
    for these draws, precomputed (train.reference=cached); then only the policy rows run.
    """
    from ppd_engine.losses import loss_inputs, preference_loss
    from ppd_engine.paired import paired_forward, policy_forward

    device = batch["latents_w"].device
    b = batch["latents_w"].shape[0]
    x = noised_pairs(model, batch, draws, empty_text, empty_pooled)
    target = x.target
    users = torch.cat([user_embeds, user_embeds])
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        if ref_mse is None:
            policy, ref = paired_forward(model.unet, x.noisy, x.timesteps, x.text, users, strategy=strategy,
                                         phase_hook=phase_hook, **x.cond)
        else:
            policy = policy_forward(model.unet, x.noisy, x.timesteps, x.text, users, phase_hook=phase_hook,
                                    **x.cond)
            ref = None
    hook = phase_hook or (lambda phase, event: None)
    hook("loss", "start")

    names = [loss_name] if isinstance(loss_name, str) else list(loss_name)
    kw = dict(loss_options)
    weight = None
    if weighting == "min_snr":
        weight = model.snr_weight(draws.timesteps, snr_gamma)
    # fp32 for all three: the target (the drawn noise) is exact in fp32 and rounding it to bf16 to
    # match the autocast predictions would perturb every per-sample MSE; the upcast is tiny next to
    # the UNet passes.
    policy, target = policy.float(), target.float()
    ref = None if ref is None else ref.float()
    # The per-batch tensors the losses declare (kto: labels, each winner desirable, each loser not).
    kw.update(loss_inputs(names, b, device))
    out = preference_loss(names if len(names) > 1 else names[0], policy, ref, target,
                          beta=beta, weight=weight, loss_weights=loss_weights or None, ref_mse=ref_mse, **kw)
    stats = StepStats(
        loss=out.loss.detach(),
        implicit_acc=out.implicit_acc.detach().float(),
        model_mse=out.model_mse.detach().float().mean(),
        ref_mse=(out.ref_mse.detach().float().mean() if out.ref_mse is not None
                 else torch.full((), float("nan"), device=device)),
        reward_margin=out.inside.detach().float().mean(),
        rewards_chosen=out.rewards_chosen,
        rewards_rejected=out.rewards_rejected,
        rewards_accuracies=out.rewards_accuracies,
        rewards_margins=out.rewards_margins,
    )
    hook("loss", "end")
    return out.loss, stats
