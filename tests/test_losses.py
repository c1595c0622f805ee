"""The preference-loss library against the independent float64 formulas in ppd_engine.ops.reference."""
import pytest
import torch
import torch.nn.functional as F

from ppd_engine.losses import LOSSES, PreferenceOutput, preference_loss, register_loss
from ppd_engine.ops import reference as R

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
BUILTIN = ["dpo", "hinge", "ipo", "robust", "sft", "kto", "mapo", "orpo"]
# Per-loss beta and options chosen so the losses sit in their non-saturated range for these shapes.
CASES = {
    "dpo": (50.0, {}),
    "hinge": (50.0, {}),
    "ipo": (50.0, {}),
    "robust": (50.0, {"label_smoothing": 0.2}),
    "sft": (50.0, {}),
    "kto": (50.0, {"lambda_d": 1.0, "lambda_u": 1.5}),
    "mapo": (50.0, {"beta_mapo": 0.3}),
    "orpo": (50.0, {"beta_orpo": 0.3}),
}


def make_inputs(n, inner, dtype, device):
    target = torch.randn((n, *inner), device=device)
    model = target + 0.5 * torch.randn_like(target)
    ref = target + 0.5 * torch.randn_like(target)
    return model.to(dtype), ref.to(dtype), target.to(dtype)


def test_registry_lists_builtins():
    assert set(BUILTIN) <= set(LOSSES)


def _err(a, b):
    return (a.double() - b).abs().max().item()


def _rounding_floor(name, e_model, e_ref, beta, weight, kw):
    """Max first-order effect on (loss, inside) of a one-ulp float32 error on every MSE."""
    e = torch.cat([e_model, e_ref])
    ulp = (torch.nextafter(e.float(), torch.tensor(float("inf"), device=e.device)) - e.float()).double()

    def f(x):
        loss, inside = R.preference_loss_from_mse_reference(name, *x.chunk(2), beta=beta, weight=weight, **kw)
        return torch.cat([loss.reshape(1), inside])

    jac = torch.autograd.functional.jacobian(f, e).abs() @ ulp
    return jac[0].item(), jac[1:].max().item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_pairs", [1, 3, 8])
@pytest.mark.parametrize("name", BUILTIN)
def test_loss_and_grad_match_float64_reference(name, num_pairs, dtype, device):
    beta, kw = CASES[name]
    model, ref, target = make_inputs(2 * num_pairs, (4, 7, 9), dtype, device)
    weight = None
    if LOSSES[name].uses_weight:
        weight = torch.rand(num_pairs, device=device) + 0.5
    if name == "kto":
        kw = dict(kw, labels=torch.tensor([1, -1] * num_pairs, device=device)[torch.randperm(2 * num_pairs)])

    m = model.clone().requires_grad_()
    out = preference_loss(name, m, ref, target, beta=beta, weight=weight, **kw)
    out.loss.backward()

    m_eager = model.clone().requires_grad_()
    eager_loss, eager_inside = R.preference_loss_reference(name, m_eager, ref, target, beta=beta, weight=weight, **kw)
    eager_loss.backward()

    m64 = model.double().requires_grad_()
    kw64 = {k: (v.double() if torch.is_tensor(v) and k != "labels" else v) for k, v in kw.items()}
    w64 = None if weight is None else weight.double()
    exact_loss, exact_inside = R.preference_loss_reference(name, m64, ref.double(), target.double(), beta=beta,
                                                          weight=w64, **kw64)
    exact_loss.backward()

    assert isinstance(out, PreferenceOutput)
    assert out.loss.shape == () and out.model_mse.shape == (2 * num_pairs,) and out.ref_mse.shape == (2 * num_pairs,)
    assert out.inside.shape == ((2 * num_pairs,) if name == "kto" else (num_pairs,))
    # The library's MSEs are float32 by contract: one float32 ulp on each exact MSE, propagated to
    # first order (|jacobian| @ ulp, amplified by beta/2, or by 1000 in MaPO), is a floor no
    # float32-MSE implementation can beat.
    e_model, e_ref = R.paired_mse_reference(m64.detach(), ref.double(), target.double())
    round_loss, round_inside = _rounding_floor(name, e_model, e_ref, beta, w64, kw64)
    ulps = 8 * torch.finfo(torch.float32).eps
    for what, a, e, x, r in (("loss", out.loss, eager_loss, exact_loss.detach(), round_loss),
                             ("inside", out.inside, eager_inside, exact_inside.detach(), round_inside),
                             ("grad", m.grad, m_eager.grad, m64.grad, 0.0)):
        floor = ulps * x.abs().max().item() + r + 1e-30
        assert _err(a, x) <= 2 * _err(e, x) + floor, (
            f"{name} {what}: err {_err(a, x):.3e} vs eager {_err(e, x):.3e}, floor {floor:.3e}")
    if name != "hinge" or out.loss > 0:  # a satisfied hinge has zero gradient
        assert m.grad.abs().sum() > 0
    torch.testing.assert_close(out.implicit_acc.double(), R.implicit_acc_reference(exact_inside.detach()))


def test_dpo_fast_path_equals_generic_formula():
    model, ref, target = make_inputs(6, (4, 7, 9), torch.float32, "cpu")
    weight = torch.rand(3) + 0.5
    out = preference_loss("dpo", model, ref, target, beta=40.0, weight=weight)
    # robust with eps = 0 is DPO computed through paired_mse and the generic path.
    generic = preference_loss("robust", model, ref, target, beta=40.0, weight=weight, label_smoothing=0.0)
    torch.testing.assert_close(out.loss, generic.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.inside, generic.inside, rtol=1e-5, atol=1e-5)


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


def test_register_loss_example():
    @register_loss("margin_dpo")
    def margin_dpo(model_mse, ref_mse, inside, beta, weight, margin=0.0):
        return -F.logsigmoid(inside - margin)

    try:
        model, ref, target = make_inputs(6, (4, 5), torch.float32, "cpu")
        m = model.clone().requires_grad_()
        out = preference_loss("margin_dpo", m, ref, target, beta=30.0, margin=0.25)
        out.loss.backward()
        dpo = preference_loss("dpo", model, ref, target, beta=30.0)
        torch.testing.assert_close(out.loss, -F.logsigmoid(dpo.inside - 0.25).mean(), rtol=1e-5, atol=1e-6)
        assert m.grad is not None and m.grad.abs().sum() > 0
    finally:
        LOSSES.pop("margin_dpo")


def test_bad_arguments_are_named():
    model, ref, target = make_inputs(4, (3,), torch.float32, "cpu")
    with pytest.raises(KeyError, match="unknown preference loss 'nope'"):
        preference_loss("nope", model, ref, target)
    with pytest.raises(ValueError, match="'dpo' needs ref_pred"):
        preference_loss("dpo", model, None, target)
    with pytest.raises(ValueError, match="'sft' does not use weight"):
        preference_loss("sft", model, None, target, weight=torch.ones(2))
    with pytest.raises(ValueError, match=r"first dim must be 2B .*\(3, 3\)"):
        preference_loss("hinge", model[:3], ref[:3], target[:3])
    with pytest.raises(ValueError, match=r"weight must have shape \(B,\) = \(2,\)"):
        preference_loss("ipo", model, ref, target, weight=torch.ones(4))
    with pytest.raises(ValueError, match="kto needs labels"):
        preference_loss("kto", model, ref, target)
    with pytest.raises(ValueError, match=r"labels must be \+1 or -1"):
        preference_loss("kto", model, ref, target, labels=torch.tensor([1, 0, 1, -1]))
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss("robust", model, ref, target, label_smoothing=0.7)
    with pytest.raises(ValueError, match="beta must be a positive"):
        preference_loss("hinge", model, ref, target, beta=0.0)


def test_torch_compile_fullgraph_kto():
    model, ref, target = make_inputs(6, (4, 5), torch.float32, "cpu")
    labels = torch.tensor([1, -1, 1, 1, -1, -1])

    def f(m):
        return preference_loss("kto", m, ref, target, beta=20.0, labels=labels).loss

    m1 = model.clone().requires_grad_()
    m2 = model.clone().requires_grad_()
    a = torch.compile(f, fullgraph=True, backend="aot_eager")(m1)
    b = f(m2)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(m1.grad, m2.grad)
