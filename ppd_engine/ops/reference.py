"""Pure-PyTorch references for the `ppd` ops: the ground truth in tests (run in float64), the eager
baseline in benchmarks (run in the input dtype, the way a training script writes it), and the
fallback when the compiled extension or a kernel for the device is missing.

Low-precision inputs are upcast to float32 before any arithmetic, as diffusers' and the official
Diffusion-DPO scripts do (`F.mse_loss(model_pred.float(), target.float(), ...)`); float64 inputs stay
float64. So the results are float32, or float64 for float64 inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# ---- ε-MSE and Diffusion-DPO ------------------------------------------------------------------------


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean of (pred - target)^2 over all non-batch dims: (N, ...) -> (N,)."""
    cd = _compute_dtype(pred)
    err = F.mse_loss(pred.to(cd), target.to(cd), reduction="none")
    return err.reshape(err.shape[0], -1).mean(dim=1)


def paired_mse_reference(model_pred: Tensor, ref_pred: Tensor | None, target: Tensor) -> tuple[Tensor, Tensor | None]:
    """Per-sample ε-MSE of the policy and (if given) the reference prediction, (N,) each. Only
    model_pred is differentiable: ref_pred and target are treated as constants."""
    target = target.detach()
    model_mse = per_sample_mse(model_pred, target)
    ref_mse = None if ref_pred is None else per_sample_mse(ref_pred.detach(), target)
    return model_mse, ref_mse


def dpo_inside_reference(model_mse: Tensor, ref_mse: Tensor | None, weight: Tensor | None, beta: float) -> Tensor:
    """inside = -0.5 * beta * weight * ((e_model_w - e_ref_w) - (e_model_l - e_ref_l)), (B,).

    ref_mse None means reference-free (reference terms are zero). A non-finite MSE in a pair makes
    its inside NaN, so NaN/Inf inputs surface as a NaN loss instead of a finite one (an Inf winner
    MSE would otherwise give inside = -inf and loss = +inf, or inside = +inf and loss = 0)."""
    em_w, em_l = model_mse.chunk(2)
    if ref_mse is None:
        diff = em_w - em_l
        terms = em_w + em_l
    else:
        er_w, er_l = ref_mse.chunk(2)
        diff = (em_w - er_w) - (em_l - er_l)
        terms = em_w + er_w + em_l + er_l
    w = 1.0 if weight is None else weight.detach().to(diff.dtype)
    inside = -0.5 * beta * w * diff
    return torch.where(torch.isfinite(terms), inside, torch.full_like(inside, float("nan")))


def dpo_loss_reference(model_pred: Tensor, ref_pred: Tensor, target: Tensor, weight: Tensor | None = None,
                       beta: float = 5000.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Eager Diffusion-DPO: (loss, inside (B,), model_mse (2B,), ref_mse (2B,)), rows [0, B) winners.
    loss = mean(-logsigmoid(inside))."""
    model_mse, ref_mse = paired_mse_reference(model_pred, ref_pred, target)
    inside = dpo_inside_reference(model_mse, ref_mse, weight, beta)
    loss = -F.logsigmoid(inside).mean()
    return loss, inside, model_mse, ref_mse


# ---- preference-loss variants (independent of ppd_engine.losses, written straight from the formulas) ----


def implicit_acc_reference(inside: Tensor) -> Tensor:
    return ((inside > 0).to(inside.dtype) + 0.5 * (inside == 0).to(inside.dtype)).mean()


def preference_loss_reference(name: str, model_pred: Tensor, ref_pred: Tensor | None, target: Tensor,
                              beta: float = 5000.0, weight: Tensor | None = None, **kw) -> tuple[Tensor, Tensor]:
    """(loss, inside) of the registered losses of `ppd_engine.losses`, computed the plain way."""
    model_mse, ref_mse = paired_mse_reference(model_pred, ref_pred, target)
    return preference_loss_from_mse_reference(name, model_mse, ref_mse, beta, weight, **kw)


def preference_loss_from_mse_reference(name: str, model_mse: Tensor, ref_mse: Tensor | None, beta: float = 5000.0,
                                       weight: Tensor | None = None, **kw) -> tuple[Tensor, Tensor]:
    """The same losses from per-sample MSEs (N,): isolates the error of rounding the MSEs."""
    if name == "kto":
        labels = kw["labels"].to(model_mse.dtype)
        g = ref_mse - model_mse  # log-likelihood ratio, log p ≈ -MSE
        kl = kw.get("kl")
        kl = g.mean().detach().clamp(min=0) if kl is None else torch.as_tensor(kl, dtype=g.dtype)
        z = labels * beta * (g - kl)
        lam = torch.where(labels > 0, kw.get("lambda_d", 1.0), kw.get("lambda_u", 1.0)).to(g.dtype)
        return (lam * (1 - torch.sigmoid(z))).mean(), z
    inside = dpo_inside_reference(model_mse, ref_mse, weight, beta)
    h = inside / beta
    em_w, em_l = model_mse.chunk(2)
    if name == "dpo":
        loss = -F.logsigmoid(beta * h)
    elif name == "hinge":
        loss = torch.relu(1 - beta * h)
    elif name == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    elif name == "robust":
        eps = kw.get("label_smoothing", 0.1)
        loss = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif name == "sft":
        loss = em_w
    elif name == "orpo":
        log_odds = em_w - em_l if kw.get("diffusers_sign", False) else em_l - em_w
        return em_w.mean() - kw.get("beta_orpo", 0.1) * F.logsigmoid(log_odds).mean(), inside
    elif name == "mapo":
        s = kw.get("snr_value", 0.5)
        steps = kw.get("num_train_timesteps", 1000)
        log_odds = (s * em_w) / (torch.exp(s * em_w) - 1) - (s * em_l) / (torch.exp(s * em_l) - 1)
        return em_w.mean() - kw.get("beta_mapo", 0.1) * F.logsigmoid(log_odds * steps).mean(), inside
    else:
        raise KeyError(name)
    return loss.mean(), inside



# ---- dual cross-attention ---------------------------------------------------------------------------


def dual_cross_attention_reference(q: Tensor, k_text: Tensor, v_text: Tensor, k_user: Tensor, v_user: Tensor,
                                   user_scale: Tensor | float, softmax_scale: float | None = None) -> Tensor:
    """softmax(q k_text^T s) v_text + user_scale[b] * softmax(q k_user^T s) v_user, as two SDPA calls.

    q: (B, H, Lq, D); k_text/v_text: (Bt, H, Lt, D) with Bt dividing B (query batch b uses text batch
    b % Bt, so the text tensors are repeated to B here); k_user/v_user: (B, H, Lu, D); user_scale:
    float or (B,) tensor. Returns (B, H, Lq, D). Unlike the loss references this computes in the
    inputs' dtype: it is the baseline a user writes (SDPA accumulates in fp32 internally anyway) and
    the fallback path, and the tests pass float64 to get the ground truth."""
    batch = q.shape[0]
    if k_text.shape[0] != batch:
        reps = batch // k_text.shape[0]
        k_text, v_text = k_text.repeat(reps, 1, 1, 1), v_text.repeat(reps, 1, 1, 1)
    text = F.scaled_dot_product_attention(q, k_text, v_text, scale=softmax_scale)
    user = F.scaled_dot_product_attention(q, k_user, v_user, scale=softmax_scale)
    if isinstance(user_scale, Tensor):
        user_scale = user_scale.to(user.dtype).reshape(-1, 1, 1, 1)
    return text + user_scale * user
