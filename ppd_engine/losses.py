"""Preference losses for diffusion models, as a library built on the fused ε-MSE / DPO ops.

    from ppd_engine.losses import preference_loss
    out = preference_loss("dpo", model_pred, ref_pred, target, beta=5000.0, weight=None)
    out.loss, out.implicit_acc, out.inside, out.model_mse, out.ref_mse

Paired losses take (2B, ...) predictions, winners first. Let e be the per-sample ε-MSE (mean over
non-batch dims) and

    inside = -0.5 * beta * weight * ((e_model_w - e_ref_w) - (e_model_l - e_ref_l))     (B,)
    h      = inside / beta

(reference-free losses called with ref_pred=None use e_ref = 0 in `inside`, so it is then the plain
policy margin). The per-sample MSEs come from `ppd::paired_mse`, or for "dpo" the whole loss from
`ppd::dpo_loss`, so the pass over the big tensors is always the compiled kernel; what follows is a
few ops on (B,) vectors. Every loss is a mean over pairs (kto: over samples).

Add a variant with `register_loss`:

    @register_loss("margin_dpo")
    def margin_dpo(model_mse, ref_mse, inside, beta, weight, margin=0.0):
        return -F.logsigmoid(inside - margin)          # per-pair loss (B,); the library takes the mean
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ppd_engine.ops.dpo_loss import dpo_loss, paired_mse


@dataclass
class PreferenceOutput:
    """loss: scalar; implicit_acc: scalar, fraction of pairs with inside > 0 (ties count 0.5);
    inside: (B,) (kto: (N,), its per-sample label * beta * (log-ratio - kl)); model_mse, ref_mse:
    per-sample ε-MSE (2B,) (kto: (N,)); ref_mse is None when no reference was given."""

    loss: Tensor
    implicit_acc: Tensor
    inside: Tensor
    model_mse: Tensor
    ref_mse: Tensor | None


@dataclass(frozen=True)
class LossSpec:
    """A registered loss. `fn(model_mse, ref_mse, inside, beta, weight, **kw)` returns the per-pair
    (per-sample when unpaired) loss, or a tuple (per-item loss, inside) when it defines its own
    `inside`; the library takes the mean. `needs_ref`: ref_pred is required; `paired`: inputs are
    (2B, ...) winners-then-losers pairs; `uses_weight`: the loss depends on weight through inside."""

    name: str
    fn: Callable[..., Tensor | tuple[Tensor, Tensor]]
    needs_ref: bool = True
    paired: bool = True
    uses_weight: bool = True


LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, *, needs_ref: bool = True, paired: bool = True, uses_weight: bool = True):
    """Decorator registering `fn` under `name` (see LossSpec for its signature). Re-registering a
    name replaces it, so a user can override a built-in."""

    def deco(fn):
        LOSSES[name] = LossSpec(name, fn, needs_ref=needs_ref, paired=paired, uses_weight=uses_weight)
        return fn

    return deco


def implicit_accuracy(inside: Tensor) -> Tensor:
    """Fraction of entries with inside > 0, ties counting 0.5 (NaN counts 0)."""
    inside = inside.detach()
    return ((inside > 0).float() + 0.5 * (inside == 0).float()).mean().float()


def _pair_inside(model_mse: Tensor, ref_mse: Tensor | None, weight: Tensor | None, beta: float) -> Tensor:
    # Same rule as the fused kernel: a non-finite MSE in a pair makes its inside NaN.
    em_w, em_l = model_mse.chunk(2)
    if ref_mse is None:
        diff, terms = em_w - em_l, em_w + em_l
    else:
        er_w, er_l = ref_mse.chunk(2)
        diff, terms = (em_w - er_w) - (em_l - er_l), em_w + er_w + em_l + er_l
    inside = -0.5 * beta * diff
    if weight is not None:
        inside = inside * weight.detach().to(inside.dtype)
    return torch.where(torch.isfinite(terms), inside, torch.full_like(inside, float("nan")))


def preference_loss(name: str, model_pred: Tensor, ref_pred: Tensor | None, target: Tensor, beta: float = 5000.0,
                    weight: Tensor | None = None, **kw) -> PreferenceOutput:
    """Compute the registered loss `name` (see LOSSES) on ε-predictions.

    Args: model_pred, ref_pred, target (2B, ...) winners first (kto: (N, ...) with labels=(N,) in
    {+1, -1}); ref_pred may be None for reference-free losses (sft, orpo, mapo); weight (B,) per-pair
    ω(λ_t) for the losses built on inside; beta > 0; **kw the loss's own options.
    Gradients flow to model_pred only.
    """
    spec = LOSSES.get(name)
    if spec is None:
        raise KeyError(f"unknown preference loss {name!r}; registered: {sorted(LOSSES)}")
    if spec.needs_ref and ref_pred is None:
        raise ValueError(f"preference loss {name!r} needs ref_pred (got None)")
    if weight is not None and not spec.uses_weight:
        raise ValueError(f"preference loss {name!r} does not use weight; pass weight=None")
    if not (isinstance(beta, (int, float)) and beta > 0 and beta != float("inf")):
        raise ValueError(f"preference_loss: beta must be a positive finite number, got {beta!r}")
    if spec.paired and model_pred.shape[0] % 2:
        raise ValueError(f"preference loss {name!r}: the first dim must be 2B (B winners, then B losers), "
                         f"got shape {tuple(model_pred.shape)}")
    if weight is not None and weight.shape != (model_pred.shape[0] // 2,):
        raise ValueError(f"preference_loss: weight must have shape (B,) = ({model_pred.shape[0] // 2},) for "
                         f"model_pred shape {tuple(model_pred.shape)}, got {tuple(weight.shape)}")

    if name == "dpo" and LOSSES["dpo"].fn is _dpo and ref_pred is not None:
        # The whole loss in one kernel; same value as the generic path below.
        loss, inside, model_mse, ref_mse = dpo_loss(model_pred, ref_pred, target, weight=weight, beta=beta)
        return PreferenceOutput(loss, implicit_accuracy(inside), inside, model_mse, ref_mse)

    model_mse, ref_mse = paired_mse(model_pred, ref_pred, target)
    # The per-pair math runs in float64 on (B,) vectors (free next to the kernel): MaPO multiplies
    # MSE differences by 1000 and DPO by beta/2, so float32 rounding here would dominate the error.
    out_dtype = model_mse.dtype
    mm64 = model_mse.double()
    rm64 = None if ref_mse is None else ref_mse.double()
    inside = _pair_inside(mm64, rm64, weight, beta) if spec.paired else None
    result = spec.fn(mm64, rm64, inside, beta, weight, **kw)
    per_item, inside = result if isinstance(result, tuple) else (result, inside)
    return PreferenceOutput(per_item.mean().to(out_dtype), implicit_accuracy(inside), inside.to(out_dtype),
                            model_mse, ref_mse)


# ---- the built-in losses; formulas of issue 2 / the official repositories -------------------------


@register_loss("dpo")
def _dpo(model_mse, ref_mse, inside, beta, weight):
    """Diffusion-DPO (Wallace et al. 2023): -logsigmoid(beta * h)."""
    return -F.logsigmoid(inside)


@register_loss("hinge")
def _hinge(model_mse, ref_mse, inside, beta, weight):
    """SLiC-style hinge: relu(1 - beta * h)."""
    return torch.relu(1 - inside)


@register_loss("ipo")
def _ipo(model_mse, ref_mse, inside, beta, weight):
    """IPO (Azar et al. 2023): (h - 1 / (2 beta))^2."""
    return (inside / beta - 1 / (2 * beta)) ** 2


@register_loss("robust")
def _robust(model_mse, ref_mse, inside, beta, weight, label_smoothing: float = 0.1):
    """Conservative DPO with label smoothing eps: -(1-eps) logsigmoid(beta h) - eps logsigmoid(-beta h)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    return -(1 - label_smoothing) * F.logsigmoid(inside) - label_smoothing * F.logsigmoid(-inside)


@register_loss("sft", needs_ref=False, uses_weight=False)
def _sft(model_mse, ref_mse, inside, beta, weight):
    """Supervised fine-tuning on the winners: mean ε-MSE of rows [0, B)."""
    return model_mse.chunk(2)[0]


@register_loss("orpo", needs_ref=False, uses_weight=False)
def _orpo(model_mse, ref_mse, inside, beta, weight, beta_orpo: float = 0.1, diffusers_sign: bool = False):
    """Diffusion-ORPO, after diffusers' examples/research_projects/diffusion_orpo
    (train_diffusion_orpo_sdxl_lora.py): loss = mean(e_w) - beta_orpo * mean(logsigmoid(log_odds)).

    The sign question: that script sets log_odds = e_w - e_l. With log p ≈ -MSE, minimising
    -logsigmoid(e_w - e_l) RAISES the winner's MSE relative to the loser's, i.e. it prefers losers;
    it was raised on huggingface/diffusers PR #7465 ("Shouldn't the log_odds be
    -(model_losses_w - model_losses_l)?"). We use log_odds = e_l - e_w, which prefers winners;
    `diffusers_sign=True` reproduces the script as written. `beta_orpo` is the script's weight
    (default 0.1); `beta` only scales the reported `inside`."""
    em_w, em_l = model_mse.chunk(2)
    log_odds = em_w - em_l if diffusers_sign else em_l - em_w
    # Written per pair so the library's mean gives mean(e_w) - beta_orpo * mean(logsigmoid(...)).
    return em_w - beta_orpo * F.logsigmoid(log_odds)


@register_loss("mapo", needs_ref=False, uses_weight=False)
def _mapo(model_mse, ref_mse, inside, beta, weight, beta_mapo: float = 0.1, snr_value: float = 0.5,
          num_train_timesteps: int = 1000):
    """MaPO (Hong et al. 2024), after mapo-t2i/mapo utils.py `compute_loss`:
    log_odds = f(s e_w) - f(s e_l) with f(x) = x / (exp(x) - 1), s = snr_value (default 0.5);
    loss = mean(e_w) - beta_mapo * mean(logsigmoid(T * log_odds)), T = num_train_timesteps (the
    scheduler's, 1000), beta_mapo default 0.1 as in its args.py. f is decreasing, so a lower winner
    MSE raises log_odds: this sign prefers winners. `beta` only scales the reported `inside`."""
    em_w, em_l = model_mse.chunk(2)

    def f(x):
        # x / expm1(x) is accurate for small x; its limit at 0 is 1.
        return torch.where(x == 0, torch.ones_like(x), x / torch.expm1(x))

    log_odds = f(snr_value * em_w) - f(snr_value * em_l)
    return em_w - beta_mapo * F.logsigmoid(log_odds * num_train_timesteps)


@register_loss("kto", paired=False, uses_weight=False)
def _kto(model_mse, ref_mse, inside, beta, weight, labels: Tensor | None = None, lambda_d: float = 1.0,
         lambda_u: float = 1.0, kl: Tensor | float | None = None):
    """Diffusion-KTO (Li et al. 2024), after jacklishufan/diffusion-kto train_kto_sd_v1.5.py with its
    default `sigmoid` value function: unpaired samples (N, ...) with labels (N,) in {+1, -1};
    g = e_ref - e_model (log-likelihood ratio, log p ≈ -MSE), z = label * beta * (g - kl),
    loss = mean(lambda_y * (1 - sigmoid(z))), lambda_y = lambda_d for desirable, lambda_u otherwise.
    kl defaults to the batch mean of g, detached and clamped at 0 (the script all-reduces it across
    processes first; pass `kl=` to supply that value). `beta` is the script's `beta_dpo`. Returns z as
    `inside`, so implicit_acc is the script's `acc`."""
    if labels is None:
        raise ValueError("kto needs labels=(N,) with +1 (desirable) / -1 (undesirable)")
    if labels.shape != model_mse.shape:
        raise ValueError(f"kto: labels must have shape ({model_mse.shape[0]},), got {tuple(labels.shape)}")
    lab = labels.to(device=model_mse.device, dtype=model_mse.dtype)
    # A data-dependent check; skipped while torch.compile traces so kto stays one graph.
    if not torch.compiler.is_compiling() and not bool(((lab == 1) | (lab == -1)).all()):
        raise ValueError("kto: labels must be +1 or -1")
    g = ref_mse - model_mse
    kl = g.detach().mean().clamp(min=0) if kl is None else torch.as_tensor(kl, dtype=g.dtype, device=g.device)
    z = lab * beta * (g - kl)
    lam = torch.where(lab > 0, torch.full_like(lab, lambda_d), torch.full_like(lab, lambda_u))
    return lam * (1 - torch.sigmoid(z)), z


# ---- options a loss declares (read from its signature) -------------------------------------------

_FIXED = ("model_mse", "ref_mse", "inside", "beta", "weight")
_INPUTS = {"labels"}  # supplied by the training step, not by the user


def loss_options(name: str) -> dict[str, inspect.Parameter]:
    """The user options of loss `name`: its keyword parameters after the fixed five."""
    sig = inspect.signature(LOSSES[name].fn)
    return {n: p for n, p in sig.parameters.items() if n not in _FIXED and n not in _INPUTS
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _option_type(p: inspect.Parameter):
    ann = p.annotation
    if isinstance(ann, str):
        ann = {"float": float, "int": int, "bool": bool, "str": str}.get(ann, None)
    if ann in (float, int, bool, str):
        return ann
    return type(p.default) if p.default is not inspect.Parameter.empty and p.default is not None else None


def validate_loss_options(name, options) -> dict:
    """Check `options` against what the loss(es) declare; returns them converted, or raises
    ValueError naming the option and the allowed ones."""
    import math

    names = [name] if isinstance(name, str) else list(name)
    declared: dict[str, inspect.Parameter] = {}
    for n in names:
        if n not in LOSSES:
            raise ValueError(f"loss.name: {n!r} is not registered; registered: {', '.join(sorted(LOSSES))}")
        declared.update(loss_options(n))
    out = {}
    for key, value in dict(options).items():
        if key not in declared:
            raise ValueError(f"loss.options.{key}: not an option of {'/'.join(names)}; allowed: "
                             f"{', '.join(sorted(declared)) or 'none'}")
        tp = _option_type(declared[key])
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"loss.options.{key}: {value!r} is not a finite number")
            value = float(value)
        elif tp is int:
            if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
                raise ValueError(f"loss.options.{key}: {value!r} is not an integer")
            value = int(value)
        elif tp is bool and not isinstance(value, bool):
            raise ValueError(f"loss.options.{key}: {value!r} is not true/false")
        out[key] = value
    return out


def describe_losses() -> str:
    """One line per registered loss with its options and defaults (for --help)."""
    lines = []
    for n in sorted(LOSSES):
        opts = ", ".join(f"{k}={p.default!r}" for k, p in loss_options(n).items())
        lines.append(f"  {n:<10} {opts}")
    return "\n".join(lines)
