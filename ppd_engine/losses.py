"""Preference losses for diffusion models, as a library built on the fused ε-MSE / DPO ops.

    from ppd_engine.losses import preference_loss
    out = preference_loss("sigmoid", model_pred, ref_pred, target, beta=5000.0, weight=None)
    out.loss, out.implicit_acc, out.inside, out.model_mse, out.ref_mse, out.rewards_margins
    mix = preference_loss(["sigmoid", "bco_pair", "sft"], model_pred, ref_pred, target,
                          loss_weights=[0.8, 0.2, 1.0])              # mix.terms: each term's loss
    fdpo = preference_loss("sigmoid", model_pred, ref_pred, target, f_divergence="js_divergence")

Paired losses take (2B, ...) predictions, winners first.

The mapping to TRL's vocabulary, stated once. Let e be the per-sample ε-MSE (mean over non-batch
dims) and ω the per-pair weight (default 1). The diffusion log-ratios of a pair are

    chosen_logratios   = ℓ_w = -½·ω·(e_θ,w - e_ref,w)          rejected_logratios = ℓ_l = -½·ω·(e_θ,l - e_ref,l)

and the policy / reference "log-probabilities" are -½·ω·e_θ and -½·ω·e_ref. Every TRL loss type
is then TRL's formula (trl 1.16, trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss) on these,
with `sequence length 1` wherever TRL normalises by completion length (ipo, sigmoid_norm), and

    inside = beta * (ℓ_w - ℓ_l) = -½·beta·ω·((e_θ,w - e_ref,w) - (e_θ,l - e_ref,l))        (B,)

so "sigmoid" (alias "dpo") is Diffusion-DPO exactly. Derivation: Diffusion-DPO (Wallace et al. 2023,
eq. 14) bounds log p_θ(x_0)/p_ref(x_0) per pair by -T·ω(λ_t)·(||ε-ε_θ||² - ||ε-ε_ref||²) up to
constants shared by θ and ref; the official code (SalesforceAIResearch/DiffusionDPO) folds T and the
constant weight into beta_dpo and keeps the 0.5 of the Gaussian log-density, so its logit is
-½·beta·Δ. A per-pair ω(λ_t) (min-SNR) multiplies both halves of a pair alike. Reference-free losses
called with ref_pred=None use e_ref = 0.

The per-sample MSEs come from `ppd::paired_mse` in float64 (double sums, never rounded to the input
dtype), or for plain "sigmoid" the whole loss from `ppd::dpo_loss` (its LossSpec.fused), so the pass
over the big tensors is always the compiled kernel; what follows is a few float64 ops on (B,)
vectors. Every loss is a mean over pairs (kto: over samples).

Add a variant with `register_loss`; keyword parameters after the fixed five become its options
(validated by `validate_loss_options`, listed by `describe_losses`):

    @register_loss("margin_dpo")
    def margin_dpo(model_mse, ref_mse, inside, beta, weight, margin: float = 0.0):
        return -F.logsigmoid(inside - margin)          # per-pair loss (B,); the library takes the mean
"""
from __future__ import annotations

import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ppd_engine.ops.dpo_loss import dpo_loss, dpo_loss_ref_mse, paired_mse


@dataclass
class PreferenceOutput:
    """loss: scalar; implicit_acc: scalar, fraction of pairs with inside > 0 (ties count 0.5);
    inside: (B,) (kto: (N,), its per-sample label * beta * (log-ratio - kl)); model_mse, ref_mse:
    per-sample ε-MSE (2B,) (kto: (N,)); ref_mse is None when no reference was given.
    TRL's metrics under the mapping (scalars, means over pairs): rewards_chosen = β·ℓ_w,
    rewards_rejected = β·ℓ_l, rewards_accuracies = fraction with β·ℓ_w > β·ℓ_l (ties 0, as TRL),
    rewards_margins = β·(ℓ_w - ℓ_l). terms: each term's (unweighted) loss, by loss name."""

    loss: Tensor
    implicit_acc: Tensor
    inside: Tensor
    model_mse: Tensor
    ref_mse: Tensor | None
    rewards_chosen: Tensor | None = None
    rewards_rejected: Tensor | None = None
    rewards_accuracies: Tensor | None = None
    rewards_margins: Tensor | None = None
    terms: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class LossOption:
    """One user option of a loss: a keyword parameter of its function. `choices` from a Literal
    annotation; `nullable` when the default is None (then None is accepted)."""

    name: str
    type: type
    default: Any
    help: str = ""
    choices: tuple | None = None
    nullable: bool = False


@dataclass(frozen=True)
class LossSpec:
    """A registered loss. `fn(model_mse, ref_mse, inside, beta, weight, **kw)` returns the per-pair
    (per-sample when unpaired) loss, or a tuple (per-item loss, inside) when it defines its own
    `inside`; the library takes the mean. `needs_ref`: ref_pred is required; `paired`: inputs are
    (2B, ...) winners-then-losers pairs; `uses_weight`: the loss depends on the per-pair weight.
    `options`: from fn's signature (see register_loss). `inputs`: extra tensors the loss receives as
    keyword arguments: "model_pred", "ref_pred", "target" are supplied by preference_loss itself,
    the others (e.g. "labels") by the caller (the training step builds them with `loss_inputs`).
    `fused(model_pred, ref_pred, target, weight, beta, **options)`: an optional one-kernel
    implementation returning (loss, inside, model_mse, ref_mse), or None when these options need
    the generic path; with precomputed reference MSEs it is called with ref_pred=None and
    `ref_mse=` (a fused function without that keyword is then skipped)."""

    name: str
    fn: Callable[..., Tensor | tuple[Tensor, Tensor]]
    needs_ref: bool = True
    paired: bool = True
    uses_weight: bool = True
    inputs: tuple[str, ...] = ()
    fused: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor] | None] | None = None
    options: dict[str, LossOption] = field(default_factory=dict)


LOSSES: dict[str, LossSpec] = {}
_FIXED = ("model_mse", "ref_mse", "inside", "beta", "weight")
_LIBRARY_INPUTS = ("model_pred", "ref_pred", "target")
_OPTION_TYPES = (bool, int, float, str)


def _option_type(annotation: Any, default: Any) -> tuple[type | None, tuple | None]:
    """(type, choices) of an annotation: float/int/bool/str, Literal[...] of one of them, or X | None."""
    if isinstance(annotation, str):  # unresolvable string annotation: try the plain names
        plain = {"float": float, "int": int, "bool": bool, "str": str}
        parts = [p.strip() for p in annotation.split("|") if p.strip() != "None"]
        annotation = plain.get(parts[0]) if len(parts) == 1 else None
    if annotation in _OPTION_TYPES:
        return annotation, None
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), choices
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _option_type(args[0], default)
        return None, None
    if annotation is inspect.Parameter.empty and isinstance(default, _OPTION_TYPES):
        return type(default), None
    return None, None


def _signature_options(fn: Callable, inputs: tuple[str, ...]) -> dict[str, LossOption]:
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # a locally defined annotation: fall back to the raw strings
        hints = {}
    params = list(inspect.signature(fn).parameters.values())
    options = {}
    for p in params[len(_FIXED):]:
        if p.name in inputs or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        if p.default is inspect.Parameter.empty:
            raise TypeError(f"register_loss: option {p.name!r} of {fn.__name__} needs a default")
        typ, choices = _option_type(hints.get(p.name, p.annotation), p.default)
        if typ is None:
            raise TypeError(f"register_loss: option {p.name!r} of {fn.__name__} must be float, int, bool or str "
                            f"(or Literal/None of them), got {p.annotation!r}")
        options[p.name] = LossOption(p.name, typ, p.default, choices=choices, nullable=p.default is None)
    return options


def register_loss(name: str, *, needs_ref: bool = True, paired: bool = True, uses_weight: bool = True,
                  inputs: Sequence[str] = (), fused: Callable | None = None):
    """Decorator registering `fn` under `name` (see LossSpec for its signature). Keyword parameters
    after (model_mse, ref_mse, inside, beta, weight) are the loss's options, typed by annotation
    (float/int/bool/str, Literal[...] for choices) or by their default; those named in `inputs` are
    tensors supplied per batch instead. Re-registering a name replaces it, so a user can override a
    built-in."""

    def deco(fn):
        names = tuple(inspect.signature(fn).parameters)
        if names[:len(_FIXED)] != _FIXED:
            raise TypeError(f"register_loss({name!r}): {fn.__name__} must start with parameters {_FIXED}, got {names}")
        LOSSES[name] = LossSpec(name, fn, needs_ref=needs_ref, paired=paired, uses_weight=uses_weight,
                                inputs=tuple(inputs), fused=fused, options=_signature_options(fn, tuple(inputs)))
        return fn

    return deco


# ---- options: validation for the config, text for --help -----------------------------------------


def _specs(name: str | Sequence[str]) -> list[LossSpec]:
    names = [name] if isinstance(name, str) else list(name)
    if not names:
        raise ValueError(f"loss.name: empty list; registered: {', '.join(sorted(LOSSES))}")
    unknown = [n for n in names if n not in LOSSES]
    if unknown:
        raise ValueError(f"loss.name: unknown preference loss {unknown[0]!r}; registered: {', '.join(sorted(LOSSES))}")
    return [LOSSES[n] for n in names]


def _convert(opt: LossOption, value: Any, where: str) -> Any:
    if value is None and opt.nullable:
        return None
    typ = opt.type
    bad = f"{where}: must be {typ.__name__}" + (" or null" if opt.nullable else "") + f", got {value!r}"
    if typ is bool:
        if not isinstance(value, bool):
            raise ValueError(bad)
        return value
    if typ is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ValueError(bad)
        return int(value)
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(bad)
        if not math.isfinite(value):
            raise ValueError(f"{where}: must be a finite number, got {value!r}")
        value = float(value)
    elif typ is str and not isinstance(value, str):
        raise ValueError(bad)
    if opt.choices is not None and value not in opt.choices:
        raise ValueError(f"{where}: must be one of {', '.join(map(str, opt.choices))}, got {value!r}")
    return value


def validate_loss_options(name: str | Sequence[str], options: Mapping[str, Any]) -> dict[str, Any]:
    """Check and convert `options` for the loss `name` (or mixture of names): every key must be an
    option of some term, values of the declared type (finite numbers; ints and bools refuse 0.5).
    Raises ValueError with one line naming the key; returns the converted options."""
    specs = _specs(name)
    label = "+".join(s.name for s in specs)
    allowed: dict[str, LossOption] = {}
    for s in specs:
        for k, o in s.options.items():
            allowed.setdefault(k, o)
    out = {}
    for key, value in options.items():
        if key not in allowed:
            raise ValueError(f"loss.options.{key}: not an option of {label}; allowed: "
                             f"{', '.join(sorted(allowed)) or '(none)'}")
        out[key] = _convert(allowed[key], value, f"loss.options.{key}")
    return out


def describe_losses() -> str:
    """One line per registered loss: its options with types and defaults (for --help)."""
    lines = []
    for name in sorted(LOSSES):
        s = LOSSES[name]
        opts = ", ".join(f"{o.name}: {o.type.__name__}"
                         + (f" in {{{', '.join(map(str, o.choices))}}}" if o.choices else "")
                         + f" = {o.default!r}" for o in s.options.values())
        flags = [f for f, on in (("reference-free", not s.needs_ref), ("unpaired", not s.paired),
                                 ("no weight", not s.uses_weight)) if on]
        lines.append(f"  {name}" + (f" [{', '.join(flags)}]" if flags else "") + (f": {opts}" if opts else ""))
    return "preference losses (loss.name, loss.options):\n" + "\n".join(lines)


def loss_inputs(names: Sequence[str], batch_size: int, device: torch.device | str) -> dict[str, Tensor]:
    """The per-batch tensors the losses `names` declare in `inputs`, for a paired batch of
    `batch_size` pairs (winners first): "labels" = +1 for the B winners, -1 for the B losers. The
    prediction tensors are supplied by preference_loss itself. Raises ValueError naming an input the
    engine cannot supply."""
    out: dict[str, Tensor] = {}
    for spec in _specs(list(names)):
        for inp in spec.inputs:
            if inp in _LIBRARY_INPUTS or inp in out:
                continue
            if inp == "labels":
                ones = torch.ones(batch_size, device=device)
                out["labels"] = torch.cat([ones, -ones])
            else:
                raise ValueError(f"loss {spec.name!r} needs input {inp!r}, which the training step cannot supply "
                                 f"(it supplies: labels)")
    return out


# ---- the library call ----------------------------------------------------------------------------


def implicit_accuracy(inside: Tensor) -> Tensor:
    """Fraction of entries with inside > 0, ties counting 0.5 (NaN counts 0)."""
    inside = inside.detach()
    return ((inside > 0).float() + 0.5 * (inside == 0).float()).mean().float()


def _halves(model_mse: Tensor, ref_mse: Tensor | None, weight: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(ℓ_w, ℓ_l, finite) of the mapping; `finite` is False for pairs with a non-finite MSE."""
    em_w, em_l = model_mse.chunk(2)
    if ref_mse is None:
        d_w, d_l, terms = em_w, em_l, em_w + em_l
    else:
        er_w, er_l = ref_mse.chunk(2)
        d_w, d_l, terms = em_w - er_w, em_l - er_l, em_w + er_w + em_l + er_l
    w = 0.5 if weight is None else 0.5 * weight.detach().to(d_w.dtype)
    return -w * d_w, -w * d_l, torch.isfinite(terms)


def logratios(model_mse: Tensor, ref_mse: Tensor | None, weight: Tensor | None) -> tuple[Tensor, Tensor]:
    """TRL's (chosen_logratios, rejected_logratios) (B,) under the mapping; NaN for non-finite pairs
    (the fused kernel's rule: a NaN/Inf input surfaces as a NaN loss, never a finite one)."""
    lw, ll, finite = _halves(model_mse, ref_mse, weight)
    nan = torch.full_like(lw, float("nan"))
    return torch.where(finite, lw, nan), torch.where(finite, ll, nan)


def _pair_inside(model_mse: Tensor, ref_mse: Tensor | None, weight: Tensor | None, beta: float) -> Tensor:
    # Formed as one difference of the four MSEs (as the kernel does), then scaled.
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


def needs_reference_prediction(name: str | Sequence[str]) -> bool:
    """True when a term of the loss reads the reference prediction itself (e.g. dspo), so reference
    MSEs alone (a cached reference pass) cannot serve it."""
    return any("ref_pred" in s.inputs for s in _specs(name))


def _check_call(specs: list[LossSpec], model_pred: Tensor, ref_pred: Tensor | None, weight: Tensor | None,
                beta: float, loss_weights: Sequence[float] | None, options: Mapping[str, Any],
                ref_mse: Tensor | None = None) -> None:
    label = "+".join(s.name for s in specs)
    if ref_mse is not None:
        if ref_pred is not None:
            raise ValueError("preference_loss: pass ref_pred or ref_mse, not both")
        if ref_mse.shape != (model_pred.shape[0],):
            raise ValueError(f"preference_loss: ref_mse must have shape ({model_pred.shape[0]},) for model_pred "
                             f"shape {tuple(model_pred.shape)}, got {tuple(ref_mse.shape)}")
    for s in specs:
        if "ref_pred" in s.inputs and ref_pred is None:
            raise ValueError(f"preference loss {s.name!r} needs the reference prediction ref_pred itself "
                             "(its MSEs are not enough; use train.reference=online)")
        if s.needs_ref and ref_pred is None and ref_mse is None:
            raise ValueError(f"preference loss {s.name!r} needs ref_pred or ref_mse (got None)")
        if weight is not None and not s.uses_weight:
            raise ValueError(f"preference loss {s.name!r} does not use weight; pass weight=None")
    if len({s.paired for s in specs}) > 1:
        raise ValueError(f"preference loss {label}: cannot mix paired and unpaired (kto) losses")
    if loss_weights is not None and len(loss_weights) not in (0, len(specs)):
        raise ValueError(f"preference loss {label}: loss_weights has {len(loss_weights)} entries for "
                         f"{len(specs)} losses")
    if not (isinstance(beta, (int, float)) and beta > 0 and beta != float("inf")):
        raise ValueError(f"preference_loss: beta must be a positive finite number, got {beta!r}")
    if specs[0].paired and model_pred.shape[0] % 2:
        raise ValueError(f"preference loss {label!r}: the first dim must be 2B (B winners, then B losers), "
                         f"got shape {tuple(model_pred.shape)}")
    if weight is not None and weight.shape != (model_pred.shape[0] // 2,):
        raise ValueError(f"preference_loss: weight must have shape (B,) = ({model_pred.shape[0] // 2},) for "
                         f"model_pred shape {tuple(model_pred.shape)}, got {tuple(weight.shape)}")
    accepted = {k for s in specs for k in (*s.options, *s.inputs)}
    for key in options:
        if key not in accepted:
            raise ValueError(f"loss.options.{key}: not an option of {label}; allowed: "
                             f"{', '.join(sorted(accepted)) or '(none)'}")


def _own(spec: LossSpec, kw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if k in spec.options or k in spec.inputs}


def official_beta(beta: float, units: str, num_train_timesteps: int) -> float:
    """beta in the official code's units (what `preference_loss` takes) from beta in `units`.

    The PPD paper (after Diffusion-DPO eq. 14) writes the per-pair loss as

        -log σ(-β_paper · T · ω(λ_t) · Δ),   Δ = (e_θ,w - e_ref,w) - (e_θ,l - e_ref,l)

    with T the scheduler's training timesteps, and the official code as -log σ(-½ · β_official ·
    ω · Δ) on the same per-sample mean ε-MSEs e (the module docstring's `inside`). Equal logits for
    every Δ and ω need ½ · β_official = β_paper · T, so

        β_official = 2 · T · β_paper          (T = 1000: β_paper 2.5 is SD1.5's β_official 5000;
                                               the paper's grid [0.1, 2] is β_official 200 … 4000)

    ω(λ_t) (loss.weighting) multiplies both forms alike, so the conversion holds for min_snr too.
    """
    if units == "official":
        return float(beta)
    if units == "paper":
        if num_train_timesteps <= 0:
            raise ValueError(f"loss.beta_units=paper needs the scheduler's training timesteps, got {num_train_timesteps}")
        return 2.0 * num_train_timesteps * float(beta)
    raise ValueError(f"loss.beta_units: {units!r} is not one of official, paper")


def preference_loss(name: str | Sequence[str], model_pred: Tensor, ref_pred: Tensor | None, target: Tensor,
                    beta: float = 5000.0, weight: Tensor | None = None,
                    loss_weights: Sequence[float] | None = None, ref_mse: Tensor | None = None,
                    **options) -> PreferenceOutput:
    """Compute the registered loss `name` (see LOSSES), or the mixture sum_i loss_weights[i] * loss_i
    of a list of names (TRL's loss_type list with loss_weights; default weights 1), on ε-predictions.

    Args: model_pred, ref_pred, target (2B, ...) winners first (kto: (N, ...) with labels=(N,) in
    {+1, -1}); ref_pred may be None for reference-free losses (sft, orpo, mapo), or when `ref_mse`
    (2B,) gives the reference's per-sample ε-MSEs precomputed (a cached reference pass; every loss
    but those reading the prediction itself, dspo); weight (B,) per-pair
    ω(λ_t); beta > 0; **options the losses' own options (and declared inputs such as labels): an
    unknown key raises, and each term of a mixture receives only the options it declares.
    Gradients flow to model_pred only.
    """
    specs = _specs(name)
    _check_call(specs, model_pred, ref_pred, weight, beta, loss_weights, options, ref_mse)
    lw = list(loss_weights) if loss_weights else [1.0] * len(specs)

    fusable = specs[0].fused is not None and (
        ref_pred is not None or (ref_mse is not None and "ref_mse" in inspect.signature(specs[0].fused).parameters))
    if len(specs) == 1 and fusable:
        extra = {} if ref_mse is None else {"ref_mse": ref_mse}
        fused = specs[0].fused(model_pred, ref_pred, target, weight, beta, **extra, **_own(specs[0], options))
        if fused is not None:
            loss, inside, model_mse, ref_mse = fused
            loss = loss * lw[0] if loss_weights else loss
            return _output(specs, loss, {specs[0].name: fused[0]}, inside, model_mse.float(), ref_mse.float(),
                           model_mse.double(), ref_mse.double(), weight, beta, options)

    lib = {"model_pred": model_pred, "ref_pred": ref_pred, "target": target}
    if ref_mse is None:
        model_mse, ref_mse = paired_mse(model_pred, ref_pred, target)  # float64 (see paired_mse)
    else:
        model_mse = paired_mse(model_pred, None, target)[0]
        ref_mse = ref_mse.detach().double()
    mm64 = model_mse.double()
    rm64 = None if ref_mse is None else ref_mse.double()
    base_inside = _pair_inside(mm64, rm64, weight, beta) if specs[0].paired else None
    total, terms, inside = None, {}, None
    for spec, w_i in zip(specs, lw):
        kw = _own(spec, options)
        kw.update({k: lib[k] for k in spec.inputs if k in _LIBRARY_INPUTS})
        result = spec.fn(mm64, rm64, base_inside, beta, weight, **kw)
        per_item, term_inside = result if isinstance(result, tuple) else (result, base_inside)
        term = per_item.mean()
        terms[spec.name] = term.to(torch.float32)
        total = term * w_i if total is None else total + term * w_i
        inside = term_inside if inside is None else inside
    return _output(specs, total.to(torch.float32), terms, inside.to(torch.float32), model_mse.float(),
                   None if ref_mse is None else ref_mse.float(), mm64, rm64, weight, beta, options)


def _output(specs, loss, terms, inside, model_mse, ref_mse, mm64, rm64, weight, beta, options) -> PreferenceOutput:
    if specs[0].paired:
        lw_, ll_ = logratios(mm64, rm64, weight)
        chosen, rejected = beta * lw_, beta * ll_
    else:  # kto: winners are the desirable samples, rewards beta * (e_ref - e_model) / 2 per sample
        labels = options["labels"].to(mm64.device)
        g = -0.5 * (mm64 - (rm64 if rm64 is not None else 0.0)) * beta
        pos, neg = (labels > 0).double(), (labels < 0).double()
        chosen = (g * pos).sum() / pos.sum().clamp(min=1) * torch.ones_like(g[:1])
        rejected = (g * neg).sum() / neg.sum().clamp(min=1) * torch.ones_like(g[:1])
        lw_ = ll_ = None
    f32 = torch.float32
    if specs[0].paired:
        acc = (chosen > rejected).to(f32).mean()
    else:
        acc = ((labels.to(mm64.dtype) * g) > 0).to(f32).mean()
    return PreferenceOutput(loss, implicit_accuracy(inside), inside, model_mse, ref_mse,
                            rewards_chosen=chosen.detach().mean().to(f32),
                            rewards_rejected=rejected.detach().mean().to(f32),
                            rewards_accuracies=acc.detach(),
                            rewards_margins=(chosen - rejected).detach().mean().to(f32),
                            terms={k: v.detach().to(f32) for k, v in terms.items()})


# ---- the built-in losses: TRL's pairwise loss types (trl 1.16) under the mapping ------------------

FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]


def _scores(model_mse, ref_mse, weight, f_divergence: str, f_alpha: float) -> tuple[Tensor, Tensor]:
    """TRL's chosen/rejected scores: f'(exp ℓ) of the log-ratios for the f-divergence (f-DPO,
    Wang et al. 2023); reverse_kl gives the log-ratios themselves. alpha_divergence clamps its
    exponent at 80 as TRL does for float32, and falls back to reverse_kl when |f_alpha - 1| < 1e-6."""
    lw, ll = logratios(model_mse, ref_mse, weight)
    if f_divergence == "reverse_kl" or (f_divergence == "alpha_divergence" and abs(f_alpha - 1.0) < 1e-6):
        return lw, ll
    if f_divergence == "forward_kl":
        return -torch.expm1(-lw), -torch.expm1(-ll)
    if f_divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(lw), math.log(2) + F.logsigmoid(ll)
    if f_divergence == "alpha_divergence":
        a = f_alpha - 1.0
        return torch.expm1(torch.clamp(a * lw, max=80.0)) / a, torch.expm1(torch.clamp(a * ll, max=80.0)) / a
    raise ValueError(f"f_divergence must be one of {typing.get_args(FDivergence)}, got {f_divergence!r}")


def _delta_inside(model_mse, ref_mse, inside, beta, weight, f_divergence, f_alpha) -> Tensor:
    """beta * (chosen_score - rejected_score): `inside` itself for reverse_kl (one difference of the
    four MSEs, the most accurate form), the f-divergence's scores otherwise."""
    if f_divergence == "reverse_kl":
        return inside
    cw, cl = _scores(model_mse, ref_mse, weight, f_divergence, f_alpha)
    return beta * (cw - cl)


def _check_smoothing(name: str, eps: float, hi: float = 0.5, lo_open: bool = False) -> None:
    if not (0.0 < eps if lo_open else 0.0 <= eps) or not eps < hi:
        raise ValueError(f"{name}: label_smoothing must be in {'(' if lo_open else '['}0, {hi}), got {eps}")


def _fused_sigmoid(model_pred, ref_pred, target, weight, beta, label_smoothing: float = 0.0,
                   f_divergence: str = "reverse_kl", f_alpha: float = 0.5, ref_mse: Tensor | None = None):
    # Plain Diffusion-DPO is one kernel (the same value as the generic path); other options are not.
    if label_smoothing != 0.0 or f_divergence != "reverse_kl":
        return None
    if ref_pred is None:
        loss, inside, model_mse = dpo_loss_ref_mse(model_pred, ref_mse, target, weight=weight, beta=beta)
        return loss, inside, model_mse, ref_mse.detach().double()
    return dpo_loss(model_pred, ref_pred, target, weight=weight, beta=beta)


def _sigmoid(model_mse, ref_mse, inside, beta, weight, label_smoothing: float = 0.0,
             f_divergence: FDivergence = "reverse_kl", f_alpha: float = 0.5):
    """TRL `sigmoid` = Diffusion-DPO: -logsigmoid(beta * delta). label_smoothing > 0 gives
    conservative DPO (cdpo); trl 1.16's sigmoid has no smoothing, the default 0 is that."""
    _check_smoothing("sigmoid", label_smoothing)
    x = _delta_inside(model_mse, ref_mse, inside, beta, weight, f_divergence, f_alpha)
    return -(1 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x), x


register_loss("sigmoid", fused=_fused_sigmoid)(_sigmoid)
register_loss("dpo", fused=_fused_sigmoid)(_sigmoid)  # the Diffusion-DPO name, an alias


@register_loss("sigmoid_norm")
def _sigmoid_norm(model_mse, ref_mse, inside, beta, weight, f_divergence: FDivergence = "reverse_kl",
                  f_alpha: float = 0.5):
    """TRL `sigmoid_norm` with sequence length 1 (an image is one 'token'): the sigmoid loss."""
    x = _delta_inside(model_mse, ref_mse, inside, beta, weight, f_divergence, f_alpha)
    return -F.logsigmoid(x), x


@register_loss("cdpo")
def _cdpo(model_mse, ref_mse, inside, beta, weight, label_smoothing: float = 0.1,
          f_divergence: FDivergence = "reverse_kl", f_alpha: float = 0.5):
    """Conservative DPO (Mitchell 2023; before 0.4 of this engine, `robust`):
    -(1-eps) logsigmoid(beta delta) - eps logsigmoid(-beta delta)."""
    return _sigmoid(model_mse, ref_mse, inside, beta, weight, label_smoothing, f_divergence, f_alpha)


@register_loss("robust")
def _robust(model_mse, ref_mse, inside, beta, weight, label_smoothing: float = 0.0,
            f_divergence: FDivergence = "reverse_kl", f_alpha: float = 0.5):
    """TRL `robust`, the unbiased robust-DPO estimator (Chowdhury et al. 2024):
    [-(1-eps) logsigmoid(beta delta) + eps logsigmoid(-beta delta)] / (1 - 2 eps)."""
    _check_smoothing("robust", label_smoothing)
    x = _delta_inside(model_mse, ref_mse, inside, beta, weight, f_divergence, f_alpha)
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps), x


@register_loss("hinge")
def _hinge(model_mse, ref_mse, inside, beta, weight, f_divergence: FDivergence = "reverse_kl", f_alpha: float = 0.5):
    """TRL `hinge` (SLiC): relu(1 - beta * delta)."""
    x = _delta_inside(model_mse, ref_mse, inside, beta, weight, f_divergence, f_alpha)
    return torch.relu(1 - x), x


@register_loss("ipo")
def _ipo(model_mse, ref_mse, inside, beta, weight, f_divergence: FDivergence = "reverse_kl", f_alpha: float = 0.5):
    """TRL `ipo` with sequence length 1: (delta - 1 / (2 beta))^2 (Azar et al. 2023, eq. 17)."""
    x = _delta_inside(model_mse, ref_mse, inside, beta, weight, f_divergence, f_alpha)
    return (x / beta - 1 / (2 * beta)) ** 2, x


@register_loss("exo_pair")
def _exo_pair(model_mse, ref_mse, inside, beta, weight, label_smoothing: float = 1e-3,
              f_divergence: FDivergence = "reverse_kl", f_alpha: float = 0.5):
    """TRL `exo_pair` (EXO, Ji et al. 2024, eq. 16): KL(q || p) over {chosen, rejected} with
    q = softmax of beta * scores and p = (1 - eps, eps). TRL refuses eps = 0 and recommends 1e-3,
    which is the default here (TRL's label_smoothing default 0 would be refused)."""
    _check_smoothing("exo_pair", label_smoothing, hi=1.0, lo_open=True)
    x = _delta_inside(model_mse, ref_mse, inside, beta, weight, f_divergence, f_alpha)
    eps = label_smoothing
    return (torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps))
            + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(eps))), x


@register_loss("discopop")
def _discopop(model_mse, ref_mse, inside, beta, weight, discopop_tau: float = 0.05,
              f_divergence: FDivergence = "reverse_kl", f_alpha: float = 0.5):
    """TRL `discopop` (DiscoPOP, Chris Lu et al. 2024, eq. 5): with z = beta * delta and
    m = sigmoid(z / tau), (1 - m) * -logsigmoid(z) + m * exp(-z)."""
    if not discopop_tau > 0:
        raise ValueError(f"discopop: discopop_tau must be > 0, got {discopop_tau}")
    x = _delta_inside(model_mse, ref_mse, inside, beta, weight, f_divergence, f_alpha)
    m = torch.sigmoid(x / discopop_tau)
    return -F.logsigmoid(x) * (1 - m) + torch.exp(-x) * m, x


@register_loss("nca_pair")
def _nca_pair(model_mse, ref_mse, inside, beta, weight):
    """TRL `nca_pair` (NCA, Chen et al. 2024): -logsigmoid(r_w) - ½ logsigmoid(-r_w) - ½ logsigmoid(-r_l),
    r = beta * logratio."""
    lw, ll = logratios(model_mse, ref_mse, weight)
    rw, rl = beta * lw, beta * ll
    return -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)


@register_loss("bco_pair")
def _bco_pair(model_mse, ref_mse, inside, beta, weight):
    """TRL `bco_pair`: -logsigmoid(beta ℓ_w) - logsigmoid(-beta ℓ_l)."""
    lw, ll = logratios(model_mse, ref_mse, weight)
    return -F.logsigmoid(beta * lw) - F.logsigmoid(-beta * ll)


@register_loss("sppo_hard")
def _sppo_hard(model_mse, ref_mse, inside, beta, weight):
    """TRL `sppo_hard` (SPPO with hard probabilities): (ℓ_w - 1/(2 beta))^2 + (ℓ_l + 1/(2 beta))^2."""
    lw, ll = logratios(model_mse, ref_mse, weight)
    return (lw - 0.5 / beta) ** 2 + (ll + 0.5 / beta) ** 2


def _smoothed_sigmoid(x, eps):
    return -F.logsigmoid(x) * (1 - eps) - F.logsigmoid(-x) * eps


@register_loss("aot")
def _aot(model_mse, ref_mse, inside, beta, weight, label_smoothing: float = 0.0):
    """TRL `aot` (AOT, Melnyk et al. 2024): the batch's policy log-odds (log p_w - log p_l) and
    reference log-odds are each sorted, and the label-smoothed sigmoid loss is applied to
    beta * (sorted policy - sorted reference). Policy log-probabilities are -½ω e_θ (mapping)."""
    _check_smoothing("aot", label_smoothing)
    w = 0.5 if weight is None else 0.5 * weight.detach().to(model_mse.dtype)
    em_w, em_l = model_mse.chunk(2)
    pol = -w * (em_w - em_l)
    ref = torch.zeros_like(pol) if ref_mse is None else -w * (ref_mse.chunk(2)[0] - ref_mse.chunk(2)[1])
    delta = torch.sort(pol, dim=0).values - torch.sort(ref, dim=0).values
    return _smoothed_sigmoid(beta * delta, label_smoothing)


@register_loss("aot_unpaired")
def _aot_unpaired(model_mse, ref_mse, inside, beta, weight, label_smoothing: float = 0.0):
    """TRL `aot_unpaired`: sorted ℓ_w minus sorted ℓ_l, then the label-smoothed sigmoid loss."""
    _check_smoothing("aot_unpaired", label_smoothing)
    lw, ll = logratios(model_mse, ref_mse, weight)
    delta = torch.sort(lw, dim=0).values - torch.sort(ll, dim=0).values
    return _smoothed_sigmoid(beta * delta, label_smoothing)


@register_loss("apo_zero")
def _apo_zero(model_mse, ref_mse, inside, beta, weight):
    """TRL `apo_zero` (APO, D'Oosterlinck et al. 2024, eq. 7): 1 - sigmoid(beta ℓ_w) + sigmoid(beta ℓ_l)."""
    lw, ll = logratios(model_mse, ref_mse, weight)
    return 1 - torch.sigmoid(beta * lw) + torch.sigmoid(beta * ll)


@register_loss("apo_down")
def _apo_down(model_mse, ref_mse, inside, beta, weight):
    """TRL `apo_down` (APO eq. 8): sigmoid(beta ℓ_w) + 1 - sigmoid(beta (ℓ_w - ℓ_l))."""
    lw, _ = logratios(model_mse, ref_mse, weight)
    return torch.sigmoid(beta * lw) + 1 - torch.sigmoid(inside)


@register_loss("sft", needs_ref=False)
def _sft(model_mse, ref_mse, inside, beta, weight):
    """Supervised fine-tuning on the winners: ω·e_θ,w, the standard (min-SNR-weighted when ω is)
    diffusion loss. Under the mapping TRL's `sft` (-mean log p of the chosen) is ½·ω·e_θ,w, half of
    this; a loss weight of 0.5 reproduces TRL's scale exactly."""
    em_w = model_mse.chunk(2)[0]
    return em_w if weight is None else em_w * weight.detach().to(em_w.dtype)


# ---- losses from the diffusion literature --------------------------------------------------------


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


@register_loss("kto", paired=False, uses_weight=False, inputs=("labels",))
def _kto(model_mse, ref_mse, inside, beta, weight, labels: Tensor | None = None, lambda_d: float = 1.0,
         lambda_u: float = 1.0, kl: float | None = None):
    """Diffusion-KTO (Li et al. 2024), after jacklishufan/diffusion-kto train_kto_sd_v1.5.py with its
    default `sigmoid` value function: unpaired samples (N, ...) with labels (N,) in {+1, -1};
    g = e_ref - e_model (log-likelihood ratio, log p ≈ -MSE), z = label * beta * (g - kl),
    loss = mean(lambda_y * (1 - sigmoid(z))), lambda_y = lambda_d for desirable, lambda_u otherwise.
    kl defaults to the batch mean of g, detached and clamped at 0 (the script all-reduces it across
    processes first; pass `kl=` (a float or 0-dim tensor) to supply that value). `beta` is the
    script's `beta_dpo`. Returns z as `inside`, so implicit_acc is the script's `acc`."""
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


@register_loss("dspo", inputs=("model_pred", "ref_pred", "target"))
def _dspo(model_mse, ref_mse, inside, beta, weight, model_pred: Tensor | None = None,
          ref_pred: Tensor | None = None, target: Tensor | None = None):
    """DSPO, Direct Score Preference Optimization (Zhu et al., ICLR 2025), its SD1.5 score-matching
    form after huaishengzhu/DSPO train.py (commit 20867cf): per winner, the mean over elements of
    ((ε_θ,w - ε) - beta * (1 - sigmoid(inside)) * (ε_θ,w - ε_ref,w))^2, with inside the DPO logit.
    It needs the predictions themselves, not only their MSEs, so it declares them as inputs; the
    gradient also flows through sigmoid(inside), as in the script (only ε_ref is detached). The
    script's SDXL branch (a data-dependent switch of form) is not reproduced."""
    b = model_mse.shape[0] // 2
    cd = torch.float32 if model_pred.dtype != torch.float64 else torch.float64
    mw = model_pred[:b].to(cd)
    rw = ref_pred[:b].detach().to(cd)
    tw = target[:b].detach().to(cd)
    coef = (beta * (1 - torch.sigmoid(inside))).to(cd).reshape(b, *([1] * (mw.dim() - 1)))
    err = (mw - tw) - coef * (mw - rw)
    return err.pow(2).reshape(b, -1).mean(dim=1).to(model_mse.dtype)


@register_loss("npo")
def _npo(model_mse, ref_mse, inside, beta, weight,
         base: Literal["sigmoid", "hinge", "ipo", "bco_pair", "nca_pair", "apo_zero", "sppo_hard"] = "sigmoid"):
    """Diffusion-NPO (Wang et al., ICLR 2025): negative preference optimization trains a model that
    PREFERS the losers (for the negative branch of classifier-free guidance) by running a preference
    loss (`base`, default sigmoid = Diffusion-DPO) on swapped pairs."""
    def swap(x):
        return None if x is None else torch.cat(x.chunk(2)[::-1])

    sm, sr = swap(model_mse), swap(ref_mse)
    result = LOSSES[base].fn(sm, sr, -inside, beta, weight)
    return result if isinstance(result, tuple) else (result, -inside)
