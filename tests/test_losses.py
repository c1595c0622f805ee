"""The preference-loss library against independent float64 formulas.

The TRL loss types are checked against `ppd_engine.ops.reference.trl_pairwise_reference`, written
from trl 1.16's trl/trainer/dpo_trainer.py (DPOTrainer._compute_loss, read from the trl-1.16.0 wheel)
and fed the log-probabilities of the mapping (`mse_to_logps`: -0.5 * w * e). trl itself exposes no
callable for these formulas (they are inline in _compute_loss), so it is not called here.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from ppd_engine.losses import (LOSSES, LossOption, PreferenceOutput, describe_losses, loss_inputs, preference_loss,
                               register_loss, validate_loss_options)
from ppd_engine.ops import reference as R

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
TRL_NAMES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
             "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
ALL = TRL_NAMES + ["dpo", "cdpo", "kto", "mapo", "orpo", "dspo", "npo"]
# Options per loss (beyond the defaults) so every option is exercised somewhere.
CASES = {
    "robust": [{}, {"label_smoothing": 0.2}],
    "cdpo": [{}, {"label_smoothing": 0.3}],
    "sigmoid": [{}, {"label_smoothing": 0.15}, {"f_divergence": "forward_kl"}, {"f_divergence": "js_divergence"},
                {"f_divergence": "alpha_divergence"}, {"f_divergence": "alpha_divergence", "f_alpha": 0.2}],
    "hinge": [{}, {"f_divergence": "js_divergence"}],
    "ipo": [{}, {"f_divergence": "forward_kl"}],
    "exo_pair": [{}, {"label_smoothing": 0.05, "f_divergence": "alpha_divergence", "f_alpha": 0.7}],
    "discopop": [{}, {"discopop_tau": 0.5, "f_divergence": "js_divergence"}],
    "sigmoid_norm": [{}, {"f_divergence": "forward_kl"}],
    "aot": [{}, {"label_smoothing": 0.1}],
    "aot_unpaired": [{}, {"label_smoothing": 0.1}],
    "kto": [{"lambda_d": 1.0, "lambda_u": 1.5}],
    "mapo": [{"beta_mapo": 0.3}],
    "orpo": [{"beta_orpo": 0.3}, {"diffusers_sign": True}],
    "npo": [{}, {"base": "bco_pair"}],
}
PARAMS = [(n, o) for n in ALL for o in CASES.get(n, [{}])]


def make_inputs(n, inner, dtype, device, beta=50.0):
    """Policy close enough to the reference that beta * delta stays O(1) (a non-saturated loss)."""
    target = torch.randn((n, *inner), device=device)
    ref = target + 0.5 * torch.randn_like(target)
    model = ref + min(0.5, 10.0 / beta) * torch.randn_like(target)
    return model.to(dtype), ref.to(dtype), target.to(dtype)


def _kw_for(name, kw, num_pairs, device):
    if name == "kto":
        return dict(kw, labels=torch.tensor([1, -1] * num_pairs, device=device)[torch.randperm(2 * num_pairs)])
    return dict(kw)


def _err(a, b):
    return (a.double() - b).abs().max().item()


def test_registry_lists_trl_and_diffusion_losses():
    assert set(ALL) <= set(LOSSES)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_pairs,beta,weighted", [(1, 5000.0, False), (1, 5000.0, True), (3, 0.1, True),
                                                     (8, 50.0, False), (3, 500.0, True)])
@pytest.mark.parametrize("name,options", PARAMS, ids=[f"{n}-{'-'.join(map(str, o.values())) or 'default'}"
                                                      for n, o in PARAMS])
def test_loss_and_grad_match_float64_reference(name, options, num_pairs, beta, weighted, dtype, device):
    """Value, inside and gradient within 2x PyTorch's own error (eager formula on the same
    low-precision inputs) plus 8 float32 ulps of the result, with no allowance for rounding the MSEs:
    the generic path must carry the float64 sums into the beta-scaled difference."""
    model, ref, target = make_inputs(2 * num_pairs, (4, 7, 9), dtype, device, beta)
    weight = torch.rand(num_pairs, device=device) + 0.5 if weighted and LOSSES[name].uses_weight else None
    kw = _kw_for(name, options, num_pairs, device)

    m = model.clone().requires_grad_()
    out = preference_loss(name, m, ref, target, beta=beta, weight=weight, **kw)
    out.loss.backward()

    m_eager = model.clone().requires_grad_()
    eager_loss, eager_inside = R.preference_loss_reference(name, m_eager, ref, target, beta=beta, weight=weight, **kw)
    eager_loss.backward()

    m64 = model.double().requires_grad_()
    w64 = None if weight is None else weight.double()
    exact_loss, exact_inside = R.preference_loss_reference(name, m64, ref.double(), target.double(), beta=beta,
                                                          weight=w64, **kw)
    exact_loss.backward()

    assert isinstance(out, PreferenceOutput) and out.loss.shape == ()
    assert out.inside.shape == ((2 * num_pairs,) if name == "kto" else (num_pairs,))
    ulps = 8 * torch.finfo(torch.float32).eps
    for what, a, e, x in (("loss", out.loss, eager_loss, exact_loss.detach()),
                          ("inside", out.inside, eager_inside, exact_inside.detach()),
                          ("grad", m.grad, m_eager.grad, m64.grad)):
        floor = ulps * x.abs().max().item() + 1e-30
        assert _err(a, x) <= 2 * _err(e, x) + floor, (
            f"{name} {what}: err {_err(a, x):.3e} vs eager {_err(e, x):.3e}, floor {floor:.3e}")
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("name", ["sigmoid", "hinge", "ipo", "robust", "cdpo", "discopop", "bco_pair"])
def test_generic_path_keeps_the_kernels_precision_at_beta_5000(name):
    """The generic path's inside equals the fused DPO kernel's (both from the same double sums) to
    float32 rounding of the result; rounding the MSEs to float32 first (issue 15) is ~1e3x off."""
    model, ref, target = make_inputs(2, (4, 64, 64), torch.float32, "cpu", beta=5000.0)
    fused = preference_loss("dpo", model, ref, target, beta=5000.0)
    generic = preference_loss(name, model, ref, target, beta=5000.0, **({"label_smoothing": 0.0}
                                                                        if name == "cdpo" else {}))
    eps = torch.finfo(torch.float32).eps
    assert (generic.inside - fused.inside).abs().max() <= 2 * eps * fused.inside.abs().max()


def test_sigmoid_fused_and_generic_agree_and_dpo_is_its_alias():
    model, ref, target = make_inputs(6, (4, 7, 9), torch.float32, "cpu")
    weight = torch.rand(3) + 0.5
    fused = preference_loss("dpo", model, ref, target, beta=40.0, weight=weight)
    sig = preference_loss("sigmoid", model, ref, target, beta=40.0, weight=weight)
    generic = preference_loss("robust", model, ref, target, beta=40.0, weight=weight)  # eps 0 = sigmoid
    assert torch.equal(fused.loss, sig.loss)
    torch.testing.assert_close(fused.loss, generic.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fused.inside, generic.inside, rtol=1e-6, atol=1e-7)


def test_robust_is_trls_unbiased_estimator_and_cdpo_the_old_robust():
    model, ref, target = make_inputs(6, (3, 5), torch.float32, "cpu", beta=10.0)
    d = preference_loss("sigmoid", model, ref, target, beta=10.0).inside.double()
    eps = 0.2
    rob = preference_loss("robust", model, ref, target, beta=10.0, label_smoothing=eps).loss
    cdpo = preference_loss("cdpo", model, ref, target, beta=10.0, label_smoothing=eps).loss
    smoothed = preference_loss("sigmoid", model, ref, target, beta=10.0, label_smoothing=eps).loss
    want_rob = ((-(1 - eps) * F.logsigmoid(d) + eps * F.logsigmoid(-d)) / (1 - 2 * eps)).mean()
    want_cdpo = (-(1 - eps) * F.logsigmoid(d) - eps * F.logsigmoid(-d)).mean()
    torch.testing.assert_close(rob.double(), want_rob, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cdpo.double(), want_cdpo, rtol=1e-5, atol=1e-6)
    assert torch.equal(cdpo, smoothed)
    assert LOSSES["robust"].options["label_smoothing"].default == 0.0  # TRL's default


def test_mixture_is_the_weighted_sum_of_its_terms_and_reports_each():
    model, ref, target = make_inputs(6, (4, 5), torch.float32, "cpu", beta=30.0)
    m = model.clone().requires_grad_()
    out = preference_loss(["sigmoid", "bco_pair", "sft"], m, ref, target, beta=30.0, loss_weights=[0.8, 0.2, 1.0],
                          label_smoothing=0.1)
    out.loss.backward()
    parts = []
    for name, w in (("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0)):
        mi = model.clone().requires_grad_()
        kw = {"label_smoothing": 0.1} if name == "sigmoid" else {}
        one = preference_loss(name, mi, ref, target, beta=30.0, **kw)
        (w * one.loss).backward()
        parts.append((name, w, one.loss, mi.grad))
        torch.testing.assert_close(out.terms[name], one.loss.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.loss, sum(w * l for _, w, l, _ in parts).detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m.grad, sum(g for *_, g in parts), rtol=1e-5, atol=1e-7)


def test_mixture_refusals():
    model, ref, target = make_inputs(4, (3,), torch.float32, "cpu")
    with pytest.raises(ValueError, match="loss_weights has 1 entries for 2 losses"):
        preference_loss(["sigmoid", "hinge"], model, ref, target, loss_weights=[1.0])
    with pytest.raises(ValueError, match="cannot mix paired and unpaired"):
        preference_loss(["sigmoid", "kto"], model, ref, target, labels=torch.tensor([1, 1, -1, -1]))
    with pytest.raises(ValueError, match="'orpo' does not use weight"):
        preference_loss(["sigmoid", "orpo"], model, ref, target, weight=torch.ones(2))


def test_trl_metrics_follow_the_mapping():
    model, ref, target = make_inputs(8, (3, 5), torch.float32, "cpu", beta=20.0)
    weight = torch.rand(4) + 0.5
    out = preference_loss("hinge", model, ref, target, beta=20.0, weight=weight)
    em, er = R.paired_mse_reference(model.double(), ref.double(), target.double())
    c, r, rc, rr = R.mse_to_logps(em, er, weight.double())
    chosen, rejected = 20.0 * (c - rc), 20.0 * (r - rr)
    torch.testing.assert_close(out.rewards_chosen.double(), chosen.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.rewards_rejected.double(), rejected.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.rewards_margins.double(), (chosen - rejected).mean(), rtol=1e-5, atol=1e-6)
    assert out.rewards_accuracies.item() == (chosen > rejected).double().mean().item()
    # TRL's margin is diffusers' reward margin (mean inside) under the mapping.
    torch.testing.assert_close(out.rewards_margins, out.inside.mean(), rtol=1e-5, atol=1e-6)


def test_weighted_sft_scales_each_pair():
    model, ref, target = make_inputs(6, (3, 5), torch.float32, "cpu")
    weight = torch.tensor([0.2, 1.0, 3.0])
    em = R.paired_mse_reference(model.double(), None, target.double())[0][:3]
    out = preference_loss("sft", model, None, target, weight=weight)
    torch.testing.assert_close(out.loss.double(), (weight.double() * em).mean(), rtol=1e-6, atol=1e-8)


def test_npo_prefers_losers():
    # Gradient descent on npo raises the winner's MSE relative to the loser's (the swapped pairs).
    model, ref, target = make_inputs(2, (64,), torch.float32, "cpu", beta=20.0)
    m = model.clone().requires_grad_()
    preference_loss("npo", m, ref, target, beta=20.0).loss.backward()
    step = m.detach() - 1e-2 * m.grad
    e0 = ((model - target) ** 2).mean(1)
    e1 = ((step - target) ** 2).mean(1)
    assert (e1[0] - e1[1]) > (e0[0] - e0[1])
    out = preference_loss("npo", model, ref, target, beta=20.0)
    torch.testing.assert_close(out.inside, -preference_loss("dpo", model, ref, target, beta=20.0).inside)


def test_dspo_gradient_matches_the_script_form():
    # The gradient also flows through sigmoid(inside), as in DSPO's train.py.
    model, ref, target = make_inputs(4, (3, 6, 5), torch.float32, "cpu", beta=50.0)
    m = model.double().requires_grad_()
    preference_loss("dspo", m, ref.double(), target.double(), beta=50.0).loss.backward()
    m2 = model.double().requires_grad_()
    R.preference_loss_reference("dspo", m2, ref.double(), target.double(), beta=50.0)[0].backward()
    torch.testing.assert_close(m.grad, m2.grad)
    m3 = model.double().requires_grad_()
    inside = R.dpo_inside_reference(*R.paired_mse_reference(m3, ref.double(), target.double()), None, 50.0)
    coef = (50.0 * (1 - torch.sigmoid(inside))).detach().reshape(-1, 1, 1, 1)
    ((m3[:2] - target[:2].double()) - coef * (m3[:2] - ref[:2].double())).pow(2).mean().backward()
    assert not torch.allclose(m.grad, m3.grad)  # detaching inside would give a different gradient


@pytest.mark.parametrize("name", ["sft", "orpo", "mapo"])
def test_reference_free_losses_accept_no_ref(name):
    model, ref, target = make_inputs(6, (3, 5), torch.float32, "cpu")
    with_ref = preference_loss(name, model, ref, target, beta=10.0)
    no_ref = preference_loss(name, model, None, target, beta=10.0)
    torch.testing.assert_close(no_ref.loss, with_ref.loss)
    assert no_ref.ref_mse is None
    em_w, em_l = no_ref.model_mse.chunk(2)
    torch.testing.assert_close(no_ref.inside, -0.5 * 10.0 * (em_w - em_l))


def test_orpo_sign_prefers_winners():
    # Gradient descent on the loss must lower the winner's MSE relative to the loser's; the script's
    # original sign (diffusers_sign=True) pushes the other way on the ratio term.
    target = torch.randn(2, 64)
    pred = (target + 0.3 * torch.randn(2, 64)).requires_grad_()
    out = preference_loss("orpo", pred, None, target, beta_orpo=100.0)
    out.loss.backward()
    step = pred.detach() - 1e-3 * pred.grad
    e_before = ((pred.detach() - target) ** 2).mean(1)
    e_after = ((step - target) ** 2).mean(1)
    assert (e_after[1] - e_after[0]) > (e_before[1] - e_before[0])
    pred.grad = None
    preference_loss("orpo", pred, None, target, beta_orpo=100.0, diffusers_sign=True).loss.backward()
    step = pred.detach() - 1e-3 * pred.grad
    e_after = ((step - target) ** 2).mean(1)
    assert (e_after[1] - e_after[0]) < (e_before[1] - e_before[0])


def test_implicit_acc_counts_ties_half():
    target = torch.randn(4, 10)
    model = target + 0.1
    # Reference equal to the policy gives inside == 0 exactly for every pair.
    out = preference_loss("dpo", model, model.clone(), target, beta=10.0)
    assert torch.equal(out.inside, torch.zeros(2))
    assert out.implicit_acc.item() == 0.5
    assert out.rewards_accuracies.item() == 0.0  # TRL counts ties as wrong


def test_register_loss_example_declares_its_option():
    @register_loss("margin_dpo")
    def margin_dpo(model_mse, ref_mse, inside, beta, weight, margin: float = 0.0):
        return -F.logsigmoid(inside - margin)

    try:
        assert LOSSES["margin_dpo"].options == {"margin": LossOption("margin", float, 0.0)}
        assert validate_loss_options("margin_dpo", {"margin": 1}) == {"margin": 1.0}
        with pytest.raises(ValueError, match=r"^loss.options.marign: not an option of margin_dpo; allowed: margin$"):
            validate_loss_options("margin_dpo", {"marign": 1.0})
        model, ref, target = make_inputs(6, (4, 5), torch.float32, "cpu", beta=30.0)
        m = model.clone().requires_grad_()
        out = preference_loss("margin_dpo", m, ref, target, beta=30.0, margin=0.25)
        out.loss.backward()
        dpo = preference_loss("dpo", model, ref, target, beta=30.0)
        torch.testing.assert_close(out.loss, -F.logsigmoid(dpo.inside - 0.25).mean(), rtol=1e-5, atol=1e-6)
        assert m.grad is not None and m.grad.abs().sum() > 0
    finally:
        LOSSES.pop("margin_dpo")


def test_unknown_options_raise_for_every_loss():
    # Issue 17 item 7: dpo silently ignored label_smoothing and unknown keywords.
    model, ref, target = make_inputs(4, (3,), torch.float32, "cpu")
    for name in ALL:
        with pytest.raises(ValueError, match=rf"loss.options.bogus: not an option of {name}"):
            preference_loss(name, model, ref, target, bogus=1.0)
    smoothed = preference_loss("dpo", model, ref, target, beta=10.0, label_smoothing=0.4)
    plain = preference_loss("dpo", model, ref, target, beta=10.0)
    assert not torch.equal(smoothed.loss, plain.loss)


def test_validate_loss_options():
    assert validate_loss_options(["sigmoid", "discopop"], {"discopop_tau": 1, "label_smoothing": 0}) == {
        "discopop_tau": 1.0, "label_smoothing": 0.0}
    assert validate_loss_options("kto", {"kl": None}) == {"kl": None}
    assert validate_loss_options("mapo", {"num_train_timesteps": 500.0}) == {"num_train_timesteps": 500}
    bad = [("sigmoid", {"label_smoothing": float("nan")}, "loss.options.label_smoothing: must be a finite number"),
           ("sigmoid", {"label_smoothing": "0.1"}, "loss.options.label_smoothing: must be float"),
           ("sigmoid", {"label_smoothing": True}, "loss.options.label_smoothing: must be float"),
           ("sigmoid", {"f_divergence": "kl"}, "loss.options.f_divergence: must be one of reverse_kl"),
           ("mapo", {"num_train_timesteps": 0.5}, "loss.options.num_train_timesteps: must be int"),
           ("orpo", {"diffusers_sign": 1}, "loss.options.diffusers_sign: must be bool"),
           ("orpo", {"diffusers_sign": 0.5}, "loss.options.diffusers_sign: must be bool"),
           (["sigmoid", "bco_pair"], {"beta_orpo": 0.1}, "not an option of sigmoid\\+bco_pair; allowed: f_alpha"),
           ("nope", {}, "unknown preference loss 'nope'; registered: aot, aot_unpaired")]
    for name, opts, msg in bad:
        with pytest.raises(ValueError, match=msg) as info:
            validate_loss_options(name, opts)
        assert "\n" not in str(info.value)


def test_describe_losses_lists_every_loss_with_options():
    text = describe_losses()
    for name in LOSSES:
        assert f"  {name}" in text
    assert "discopop: discopop_tau: float = 0.05" in text
    assert "f_divergence: str in {reverse_kl, forward_kl, js_divergence, alpha_divergence} = 'reverse_kl'" in text


def test_loss_inputs():
    assert loss_inputs(["sigmoid"], 3, "cpu") == {}
    labels = loss_inputs(["kto"], 3, "cpu")["labels"]
    assert labels.tolist() == [1, 1, 1, -1, -1, -1]
    assert loss_inputs(["dspo"], 3, "cpu") == {}  # predictions come from preference_loss itself

    @register_loss("needs_depth", inputs=("depth",))
    def needs_depth(model_mse, ref_mse, inside, beta, weight, depth=None):
        return -F.logsigmoid(inside)

    try:
        assert "depth" not in LOSSES["needs_depth"].options
        with pytest.raises(ValueError, match="loss 'needs_depth' needs input 'depth'"):
            loss_inputs(["sigmoid", "needs_depth"], 3, "cpu")
    finally:
        LOSSES.pop("needs_depth")


def test_bad_arguments_are_named():
    model, ref, target = make_inputs(4, (3,), torch.float32, "cpu")
    with pytest.raises(ValueError, match="unknown preference loss 'nope'"):
        preference_loss("nope", model, ref, target)
    with pytest.raises(ValueError, match="'dpo' needs ref_pred"):
        preference_loss("dpo", model, None, target)
    with pytest.raises(ValueError, match="'orpo' does not use weight"):
        preference_loss("orpo", model, None, target, weight=torch.ones(2))
    with pytest.raises(ValueError, match=r"first dim must be 2B .*\(3, 3\)"):
        preference_loss("hinge", model[:3], ref[:3], target[:3])
    with pytest.raises(ValueError, match=r"weight must have shape \(B,\) = \(2,\)"):
        preference_loss("ipo", model, ref, target, weight=torch.ones(4))
    with pytest.raises(ValueError, match="kto needs labels"):
        preference_loss("kto", model, ref, target)
    with pytest.raises(ValueError, match=r"labels must be \+1 or -1"):
        preference_loss("kto", model, ref, target, labels=torch.tensor([1, 0, 1, -1]))
    for name in ("robust", "sigmoid", "cdpo"):
        with pytest.raises(ValueError, match="label_smoothing"):
            preference_loss(name, model, ref, target, label_smoothing=0.7)
    with pytest.raises(ValueError, match=r"exo_pair: label_smoothing must be in \(0"):
        preference_loss("exo_pair", model, ref, target, label_smoothing=0.0)
    with pytest.raises(ValueError, match="beta must be a positive"):
        preference_loss("hinge", model, ref, target, beta=0.0)


@pytest.mark.parametrize("name", ALL)
def test_torch_compile_fullgraph(name):
    model, ref, target = make_inputs(6, (4, 5), torch.float32, "cpu", beta=20.0)
    kw = _kw_for(name, CASES.get(name, [{}])[-1], 3, "cpu")
    weight = torch.rand(3) + 0.5 if LOSSES[name].uses_weight else None

    def f(m):
        out = preference_loss(name, m, ref, target, beta=20.0, weight=weight, **kw)
        return out.loss, out.rewards_margins

    m1 = model.clone().requires_grad_()
    m2 = model.clone().requires_grad_()
    torch._dynamo.reset()
    a, ma = torch.compile(f, fullgraph=True, backend="aot_eager")(m1)
    b, mb = f(m2)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ma, mb)
    torch.testing.assert_close(m1.grad, m2.grad)
    assert math.isfinite(a.item())


@pytest.mark.parametrize("name,options", [p for p in PARAMS if p[0] != "dspo"],
                         ids=[f"{n}-{'-'.join(map(str, o.values())) or 'default'}" for n, o in PARAMS if n != "dspo"])
def test_precomputed_ref_mse_equals_ref_pred(name, options):
    """A cached reference pass hands the loss paired_mse's float64 reference MSEs instead of the
    prediction: every loss (dspo reads the prediction itself and refuses) gives the same loss,
    inside, statistics and gradient as with ref_pred, to float32 rounding."""
    from ppd_engine.ops.dpo_loss import paired_mse

    model, ref, target = make_inputs(6, (4, 7, 9), torch.float32, "cpu", beta=500.0)
    weight = torch.rand(3) + 0.5 if LOSSES[name].uses_weight else None
    kw = _kw_for(name, options, 3, "cpu")
    ref_mse = paired_mse(ref, None, target)[0]
    m1, m2 = model.clone().requires_grad_(), model.clone().requires_grad_()
    online = preference_loss(name, m1, ref, target, beta=500.0, weight=weight, **kw)
    cached = preference_loss(name, m2, None, target, beta=500.0, weight=weight, ref_mse=ref_mse, **kw)
    online.loss.backward()
    cached.loss.backward()
    for what in ("loss", "inside", "model_mse", "ref_mse", "rewards_margins"):
        a, b = getattr(online, what), getattr(cached, what)
        assert a.dtype == b.dtype, what
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"{name} {what}")
    torch.testing.assert_close(m2.grad, m1.grad, rtol=1e-5, atol=1e-9)


def test_ref_mse_refusals():
    model, ref, target = make_inputs(4, (3, 5), torch.float32, "cpu")
    ref_mse = R.per_sample_mse(ref.double(), target.double())
    with pytest.raises(ValueError, match="dspo.*needs the reference prediction ref_pred itself"):
        preference_loss("dspo", model, None, target, ref_mse=ref_mse)
    with pytest.raises(ValueError, match="ref_pred or ref_mse, not both"):
        preference_loss("dpo", model, ref, target, ref_mse=ref_mse)
    with pytest.raises(ValueError, match=r"ref_mse must have shape \(4,\) .* got \(3,\)"):
        preference_loss("hinge", model, None, target, ref_mse=ref_mse[:3])
    with pytest.raises(ValueError, match="'hinge' needs ref_pred or ref_mse"):
        preference_loss("hinge", model, None, target)
