"""Pure-PyTorch references for the `ppd` ops: the ground truth in tests (run in float64), the eager
baseline in benchmarks (run in the input dtype, the way a training script writes it), and the
fallback when the compiled extension or a kernel for the device is missing.

Low-precision inputs are upcast to float32 before any arithmetic, as diffusers' and the official
Diffusion-DPO scripts do (`F.mse_loss(model_pred.float(), target.float(), ...)`); float64 inputs stay
float64. So the results are float32, or float64 for float64 inputs.
"""
from __future__ import annotations

import math

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


def dpo_loss_ref_mse_reference(model_pred: Tensor, ref_mse: Tensor, target: Tensor, weight: Tensor | None = None,
                               beta: float = 5000.0) -> tuple[Tensor, Tensor, Tensor]:
    """Eager Diffusion-DPO from precomputed reference MSEs (2B,): (loss, inside (B,), model_mse (2B,)).
    The MSE is taken in float64 (as the kernel's double sums), the loss and inside returned as float32
    like the kernel's, or float64 for float64 predictions."""
    model_mse = per_sample_mse(model_pred.double(), target.detach().double())
    inside = dpo_inside_reference(model_mse, ref_mse.detach().double(), weight, beta)
    loss = -F.logsigmoid(inside).mean()
    out = torch.float64 if model_pred.dtype == torch.float64 else torch.float32
    return loss.to(out), inside.to(out), model_mse


# ---- preference-loss variants (independent of ppd_engine.losses, written straight from the formulas) ----


def implicit_acc_reference(inside: Tensor) -> Tensor:
    return ((inside > 0).to(inside.dtype) + 0.5 * (inside == 0).to(inside.dtype)).mean()


def preference_loss_reference(name: str, model_pred: Tensor, ref_pred: Tensor | None, target: Tensor,
                              beta: float = 5000.0, weight: Tensor | None = None, **kw) -> tuple[Tensor, Tensor]:
    """(loss, inside) of the registered losses of `ppd_engine.losses`, computed the plain way."""
    model_mse, ref_mse = paired_mse_reference(model_pred, ref_pred, target)
    if name == "dspo":
        # huaishengzhu/DSPO train.py (commit 20867cf), SD1.5 branch, written out on the winners.
        inside = dpo_inside_reference(model_mse, ref_mse, weight, beta)
        b = model_mse.shape[0] // 2
        cd = _compute_dtype(model_pred)
        mw, rw, tw = model_pred[:b].to(cd), ref_pred[:b].detach().to(cd), target[:b].detach().to(cd)
        scale = (beta * (1 - torch.sigmoid(inside))).reshape(-1, *([1] * (mw.dim() - 1)))
        return ((mw - tw) - scale * (mw - rw)).pow(2).mean(), inside
    return preference_loss_from_mse_reference(name, model_mse, ref_mse, beta, weight, **kw)


def mse_to_logps(model_mse: Tensor, ref_mse: Tensor | None, weight: Tensor | None) -> tuple[Tensor, ...]:
    """The mapping of ppd_engine.losses: (chosen_logps, rejected_logps, ref_chosen_logps,
    ref_rejected_logps) = -0.5 * w * e for the policy and the reference (reference 0 when absent)."""
    w = 1.0 if weight is None else weight.detach().to(model_mse.dtype)
    em_w, em_l = model_mse.chunk(2)
    er_w, er_l = (torch.zeros_like(em_w), torch.zeros_like(em_l)) if ref_mse is None else ref_mse.chunk(2)
    return -0.5 * w * em_w, -0.5 * w * em_l, -0.5 * w * er_w, -0.5 * w * er_l


def trl_delta_score(lr_c: Tensor, lr_r: Tensor, f_divergence: str = "reverse_kl", f_alpha: float = 0.5) -> Tensor:
    """TRL's delta_score = chosen_scores - rejected_scores: f'(t) at t = exp(logratio) for the
    f-divergence (trl 1.16 dpo_trainer.py, the f_divergence_type branches)."""
    if f_divergence == "reverse_kl" or (f_divergence == "alpha_divergence" and abs(f_alpha - 1) < 1e-6):
        s_c, s_r = lr_c, lr_r
    elif f_divergence == "forward_kl":  # f'(t) = 1 - 1/t at t = exp(logratio)
        s_c, s_r = 1 - torch.exp(-lr_c), 1 - torch.exp(-lr_r)
    elif f_divergence == "js_divergence":  # f'(t) = log(2t / (t + 1))
        s_c = torch.log(2 * torch.exp(lr_c) / (torch.exp(lr_c) + 1))
        s_r = torch.log(2 * torch.exp(lr_r) / (torch.exp(lr_r) + 1))
    elif f_divergence == "alpha_divergence":  # f'(t) = (t^(a-1) - 1) / (a - 1), exponent clamped at 80
        a = f_alpha - 1
        s_c = (torch.exp(torch.clamp(a * lr_c, max=80.0)) - 1) / a
        s_r = (torch.exp(torch.clamp(a * lr_r, max=80.0)) - 1) / a
    else:
        raise KeyError(f_divergence)
    return s_c - s_r


def trl_pairwise_reference(loss_type: str, chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor,
                           ref_rejected_logps: Tensor, beta: float, label_smoothing: float = 0.0,
                           discopop_tau: float = 0.05, f_divergence: str = "reverse_kl",
                           f_alpha: float = 0.5) -> Tensor:
    """Per-pair loss (B,) of TRL's DPOTrainer for one loss type, written from trl 1.16's
    trl/trainer/dpo_trainer.py (DPOTrainer._compute_loss) for sequences of length 1 (so ipo and
    sigmoid_norm divide by 1) and without WPO weighting. sft is TRL's -mean(chosen log-prob)."""
    lr_c = chosen_logps - ref_chosen_logps
    lr_r = rejected_logps - ref_rejected_logps
    d = trl_delta_score(lr_c, lr_r, f_divergence, f_alpha)
    eps = label_smoothing
    if loss_type in ("sigmoid", "sigmoid_norm"):
        return -F.logsigmoid(beta * d)
    if loss_type == "hinge":
        return torch.relu(1 - beta * d)
    if loss_type == "ipo":
        return (d - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        q_w, q_l = torch.sigmoid(beta * d), torch.sigmoid(-beta * d)
        return q_w * (torch.log(q_w) - math.log(1 - eps)) + q_l * (torch.log(q_l) - math.log(eps))
    if loss_type == "nca_pair":
        r_c, r_r = beta * lr_c, beta * lr_r
        return -F.logsigmoid(r_c) - 0.5 * F.logsigmoid(-r_c) - 0.5 * F.logsigmoid(-r_r)
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(beta * d) + eps * F.logsigmoid(-beta * d)) / (1 - 2 * eps)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * lr_c) - F.logsigmoid(-beta * lr_r)
    if loss_type == "sppo_hard":
        return (lr_c - 0.5 / beta) ** 2 + (lr_r + 0.5 / beta) ** 2
    if loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            x = (chosen_logps - rejected_logps).sort(dim=0).values - (ref_chosen_logps - ref_rejected_logps).sort(
                dim=0).values
        else:
            x = lr_c.sort(dim=0).values - lr_r.sort(dim=0).values
        return -(1 - eps) * F.logsigmoid(beta * x) - eps * F.logsigmoid(-beta * x)
    if loss_type == "apo_zero":
        return (1 - torch.sigmoid(beta * lr_c)) + torch.sigmoid(beta * lr_r)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * lr_c) + (1 - torch.sigmoid(beta * (lr_c - lr_r)))
    if loss_type == "discopop":
        z = beta * d
        mod = torch.sigmoid(z / discopop_tau)
        return -F.logsigmoid(z) * (1 - mod) + torch.exp(-z) * mod
    if loss_type == "sft":
        return -chosen_logps.mean().expand_as(chosen_logps)
    raise KeyError(loss_type)


# ppd name -> (TRL loss type, how ppd's options map onto it)
_TRL_NAMES = {"sigmoid": "sigmoid", "dpo": "sigmoid", "sigmoid_norm": "sigmoid_norm", "hinge": "hinge", "ipo": "ipo",
              "exo_pair": "exo_pair", "nca_pair": "nca_pair", "robust": "robust", "bco_pair": "bco_pair",
              "sppo_hard": "sppo_hard", "aot": "aot", "aot_unpaired": "aot_unpaired", "apo_zero": "apo_zero",
              "apo_down": "apo_down", "discopop": "discopop"}
_TRL_DEFAULT_SMOOTHING = {"exo_pair": 1e-3, "cdpo": 0.1}


def preference_loss_from_mse_reference(name: str, model_mse: Tensor, ref_mse: Tensor | None, beta: float = 5000.0,
                                       weight: Tensor | None = None, **kw) -> tuple[Tensor, Tensor]:
    """The same losses from per-sample MSEs (N,): isolates the error of rounding the MSEs. The TRL
    loss types go through `mse_to_logps` and `trl_pairwise_reference`."""
    if name == "kto":
        labels = kw["labels"].to(model_mse.dtype)
        g = ref_mse - model_mse  # log-likelihood ratio, log p ≈ -MSE
        kl = kw.get("kl")
        kl = g.mean().detach().clamp(min=0) if kl is None else torch.as_tensor(kl, dtype=g.dtype)
        z = labels * beta * (g - kl)
        lam = torch.where(labels > 0, kw.get("lambda_d", 1.0), kw.get("lambda_u", 1.0)).to(g.dtype)
        return (lam * (1 - torch.sigmoid(z))).mean(), z
    inside = dpo_inside_reference(model_mse, ref_mse, weight, beta)
    em_w, em_l = model_mse.chunk(2)
    logps = mse_to_logps(model_mse, ref_mse, weight)
    trl_kw = {k: kw[k] for k in ("label_smoothing", "discopop_tau", "f_divergence", "f_alpha") if k in kw}
    trl_kw.setdefault("label_smoothing", _TRL_DEFAULT_SMOOTHING.get(name, 0.0))
    if name in _TRL_NAMES:
        if name in ("sigmoid", "dpo") and trl_kw["label_smoothing"] > 0:
            name = "cdpo"
        else:
            c, r, rc, rr = logps
            if trl_kw.get("f_divergence", "reverse_kl") != "reverse_kl":  # the logit the loss uses
                inside = beta * trl_delta_score(c - rc, r - rr, trl_kw["f_divergence"], trl_kw.get("f_alpha", 0.5))
            return trl_pairwise_reference(_TRL_NAMES[name], *logps, beta, **trl_kw).mean(), inside
    if name == "cdpo":  # conservative DPO (TRL < 1.0 spelled it sigmoid + label_smoothing); reverse KL only
        eps = trl_kw["label_smoothing"]
        c, r, rc, rr = logps
        x = beta * ((c - rc) - (r - rr))
        return (-(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)).mean(), inside
    if name == "npo":  # Diffusion-NPO: the base loss on swapped pairs
        swap = lambda x: None if x is None else torch.cat(x.chunk(2)[::-1])  # noqa: E731
        base = kw.get("base", "sigmoid")
        return preference_loss_from_mse_reference(base, swap(model_mse), swap(ref_mse), beta, weight)[0], -inside
    if name == "sft":  # ppd's sft is the standard weighted ε-MSE, twice TRL's sft under the mapping
        return 2 * trl_pairwise_reference("sft", *logps, beta).mean() if weight is None else (
            weight.to(em_w.dtype) * em_w).mean(), inside
    if name == "orpo":
        log_odds = em_w - em_l if kw.get("diffusers_sign", False) else em_l - em_w
        return em_w.mean() - kw.get("beta_orpo", 0.1) * F.logsigmoid(log_odds).mean(), inside
    if name == "mapo":
        s = kw.get("snr_value", 0.5)
        steps = kw.get("num_train_timesteps", 1000)
        log_odds = (s * em_w) / (torch.exp(s * em_w) - 1) - (s * em_l) / (torch.exp(s * em_l) - 1)
        return em_w.mean() - kw.get("beta_mapo", 0.1) * F.logsigmoid(log_odds * steps).mean(), inside
    raise KeyError(name)


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
