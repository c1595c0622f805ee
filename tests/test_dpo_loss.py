"""The fused ε-MSE / Diffusion-DPO ops against the float64 PyTorch reference, on CPU and (marked) CUDA.

Error criterion (flash-attention style): in a low precision, the fused op may be at most twice as
far from the float64 result as the eager PyTorch formula run on the same low-precision inputs, plus
a few float32 ulps of the result's magnitude (both compute in float32, so either can be "lucky").
"""
import pytest
import torch

from ppd_engine import _ext
from ppd_engine.ops import dpo_loss as dpo_mod
from ppd_engine.ops import reference as R
from ppd_engine.ops.dpo_loss import dpo_loss, paired_mse

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
needs_ext = pytest.mark.skipif(not _ext.HAS_EXT, reason=f"extension not built: {_ext.LOAD_ERROR}")


def make_inputs(num_pairs, inner, dtype, device, noise=0.5):
    shape = (2 * num_pairs, *inner)
    target = torch.randn(shape, device=device)
    model = target + noise * torch.randn(shape, device=device)
    ref = target + noise * torch.randn(shape, device=device)
    return model.to(dtype), ref.to(dtype), target.to(dtype)


def ulp_floor(ref):
    return 8 * torch.finfo(torch.float32).eps * ref.abs().max().item() + 1e-30


def assert_close_to_ref(fused, eager, ref, what):
    """fused and eager computed from the same low-precision inputs; ref in float64."""
    err_fused = (fused.double() - ref).abs().max().item()
    err_eager = (eager.double() - ref).abs().max().item()
    assert err_fused <= 2 * err_eager + ulp_floor(ref), f"{what}: fused err {err_fused:.3e} vs eager {err_eager:.3e}"


def combine(outputs, coefs):
    loss, inside, model_mse, _ = outputs
    c_loss, c_inside, c_mse = coefs
    return c_loss * loss + (c_inside * inside).sum() + (c_mse * model_mse).sum()


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
# Per-sample sizes: 252 (a multiple of 4, not 8), 5 and 36963 (odd) take the CUDA kernel's scalar
# path for 16-bit dtypes; 320 and 5120 (multiples of 8) its 16-byte vector path in every dtype, 5120
# split over several chunks per row with a partial last chunk.
@pytest.mark.parametrize("num_pairs,inner,beta", [(1, (4, 7, 9), 50.0), (3, (4, 7, 9), 5000.0), (8, (4, 7, 9), 50.0),
                                                  (3, (5,), 20.0), (2, (3, 111, 111), 2000.0),
                                                  (2, (4, 8, 10), 50.0), (2, (4, 32, 40), 500.0)])
def test_dpo_forward_backward_matches_reference(device, dtype, num_pairs, inner, beta):
    model, ref, target = make_inputs(num_pairs, inner, dtype, device)
    weight = torch.rand(num_pairs, device=device) + 0.5
    # Random weights on every output, so the gradient of inside and model_mse is checked too.
    coefs = (torch.rand((), device=device) + 0.5, torch.randn(num_pairs, device=device),
             torch.randn(2 * num_pairs, device=device))

    m_fused = model.clone().requires_grad_()
    fused = dpo_loss(m_fused, ref, target, weight=weight, beta=beta)
    combine(fused, coefs).backward()

    m_eager = model.clone().requires_grad_()
    eager = R.dpo_loss_reference(m_eager, ref, target, weight, beta)
    combine(eager, coefs).backward()

    m64 = model.double().requires_grad_()
    exact = R.dpo_loss_reference(m64, ref.double(), target.double(), weight.double(), beta)
    combine(exact, tuple(c.double() for c in coefs)).backward()

    assert fused[0].shape == () and fused[1].shape == (num_pairs,) and fused[2].shape == (2 * num_pairs,)
    assert all(t.dtype == torch.float32 for t in fused)
    for name, f, e, x in zip(("loss", "inside", "model_mse", "ref_mse"), fused, eager, exact):
        assert_close_to_ref(f, e, x.detach(), name)
    assert m_fused.grad.dtype == dtype and m_fused.grad.shape == model.shape
    assert_close_to_ref(m_fused.grad, m_eager.grad, m64.grad, "grad")


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_paired_mse_matches_reference(device, dtype):
    model, ref, target = make_inputs(3, (4, 7, 9), dtype, device)
    m = model.clone().requires_grad_()
    model_mse, ref_mse = paired_mse(m, ref, target)
    g = torch.randn(6, device=device)
    (model_mse * g).sum().backward()
    m64 = model.double().requires_grad_()
    e_model, e_ref = R.paired_mse_reference(m64, ref.double(), target.double())
    (e_model * g.double()).sum().backward()
    m_eager = model.clone().requires_grad_()
    eager_model, eager_ref = R.paired_mse_reference(m_eager, ref, target)
    (eager_model * g).sum().backward()
    assert_close_to_ref(model_mse, eager_model, e_model.detach(), "model_mse")
    assert_close_to_ref(ref_mse, eager_ref, e_ref, "ref_mse")
    assert_close_to_ref(m.grad, m_eager.grad, m64.grad, "grad")
    # Unrounded float64 MSEs (the losses scale their differences by beta/2): only double rounding
    # remains, far below one float32 ulp.
    assert model_mse.dtype == ref_mse.dtype == torch.float64
    for got, exact in ((model_mse, e_model), (ref_mse, e_ref)):
        rel = ((got.detach() - exact.detach()).abs() / exact.detach()).max().item()
        assert rel <= 1e-12, f"relative error {rel:.2e} of the float64 MSEs"

    only_model, none_ref = paired_mse(model, None, target)
    assert none_ref is None
    torch.testing.assert_close(only_model, model_mse.detach())


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    # Channels-last and a strided slice: the kernel must not read them as if contiguous.
    base_m, base_r, base_t = make_inputs(3, (4, 9, 14), torch.float32, device)
    model = base_m.to(memory_format=torch.channels_last)
    ref = base_r[..., ::2]
    target = base_t[..., ::2]
    model = model[..., ::2]
    assert not (model.is_contiguous() or ref.is_contiguous() or target.is_contiguous())
    m = model.clone(memory_format=torch.preserve_format).requires_grad_()
    out = dpo_loss(m, ref, target, beta=50.0)
    out[0].backward()
    m_c = model.contiguous().requires_grad_()
    exp = dpo_loss(m_c, ref.contiguous(), target.contiguous(), beta=50.0)
    exp[0].backward()
    for a, b in zip(out, exp):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(m.grad, m_c.grad, rtol=0, atol=0)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_weight_changes_inside_linearly(device):
    model, ref, target = make_inputs(3, (4, 7, 9), torch.float32, device)
    weight = torch.tensor([0.5, 2.0, 3.0], device=device)
    _, inside_w, _, _ = dpo_loss(model, ref, target, weight=weight, beta=30.0)
    _, inside_1, _, _ = dpo_loss(model, ref, target, beta=30.0)
    torch.testing.assert_close(inside_w, inside_1 * weight, rtol=1e-6, atol=1e-6)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_give_nan_loss(device, dtype):
    for bad in (float("nan"), float("inf"), float("-inf")):
        model, ref, target = make_inputs(3, (4, 7, 9), dtype, device)
        model[1, 2, 3, 4] = bad  # winner of pair 1
        m = model.requires_grad_()
        loss, inside, _, _ = dpo_loss(m, ref, target, beta=50.0)
        assert torch.isnan(loss), bad
        assert torch.isnan(inside[1]) and torch.isfinite(inside[[0, 2]]).all()
        loss.backward()  # must not raise
        model2, ref2, target2 = make_inputs(2, (5,), dtype, device)
        target2[3, 0] = bad  # a loser's target: both MSEs of pair 1
        assert torch.isnan(dpo_loss(model2, ref2, target2, beta=50.0)[0])


def test_bad_input_messages():
    model, ref, target = make_inputs(2, (3, 5), torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"2B .*shape \(3, 3, 5\)"):
        dpo_loss(model[:3], ref[:3], target[:3])
    with pytest.raises(ValueError, match=r"ref_pred shape \(4, 3, 4\) does not match target shape \(4, 3, 5\)"):
        dpo_loss(model, ref[..., :4], target)
    with pytest.raises(ValueError, match=r"model_pred dtype torch.bfloat16 does not match target dtype torch.float32"):
        dpo_loss(model.bfloat16(), ref, target)
    with pytest.raises(ValueError, match=r"model_pred is on meta but target is on cpu"):
        dpo_loss(model.to("meta"), ref, target)
    for beta in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta must be a positive finite number"):
            dpo_loss(model, ref, target, beta=beta)
    with pytest.raises(ValueError, match=r"weight must have shape \(B,\) = \(2,\) .* got \(3,\)"):
        dpo_loss(model, ref, target, weight=torch.ones(3))
    with pytest.raises(ValueError, match="must be a float tensor"):
        dpo_loss(model.long(), ref.long(), target.long())
    with pytest.raises(ValueError, match="non-empty batch"):
        paired_mse(model[:0], None, target[:0])


@needs_ext
def test_kernel_checks_match_python_checks():
    # Direct op calls (C++ TORCH_CHECK) also name the shapes.
    model, ref, target = make_inputs(2, (3, 5), torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"must be 2B .*\[3, 3, 5\]"):
        torch.ops.ppd.dpo_loss(model[:3], ref[:3], target[:3], None, 5.0)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(B,\) = \(2,\)"):
        torch.ops.ppd.dpo_loss(model, ref, target, torch.ones(5), 5.0)
    with pytest.raises(RuntimeError, match="beta must be a positive finite number"):
        torch.ops.ppd.dpo_loss(model, ref, target, None, -1.0)
    with pytest.raises(RuntimeError, match=r"ref_pred shape \[4, 3, 4\] does not match target shape \[4, 3, 5\]"):
        torch.ops.ppd.paired_mse(model, ref[..., :4], target)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    model, ref, target = make_inputs(3, (2, 5, 7), torch.float32, device)
    weight = torch.rand(3, device=device) + 0.5
    m = model.requires_grad_()
    torch.library.opcheck(torch.ops.ppd.dpo_loss.default, (m, ref, target, weight, 40.0))
    torch.library.opcheck(torch.ops.ppd.dpo_loss.default, (m.bfloat16(), ref.bfloat16(), target.bfloat16(), None, 40.0))
    torch.library.opcheck(torch.ops.ppd.paired_mse.default, (m, ref, target))
    torch.library.opcheck(torch.ops.ppd.paired_mse.default, (m, None, target))
    inside = dpo_loss(model.detach(), ref, target, weight=weight, beta=40.0)[1]
    g = torch.tensor(0.7, device=device)
    torch.library.opcheck(torch.ops.ppd.dpo_loss_backward.default,
                          (g, torch.randn(3, device=device), None, inside, weight, model.detach(), target, 40.0))
    torch.library.opcheck(torch.ops.ppd.mse_backward.default, (torch.randn(6, device=device), model.detach(), target))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    from ppd_engine.losses import preference_loss

    def step(model, ref, target, weight):
        loss, inside, _, _ = dpo_loss(model, ref, target, weight=weight, beta=50.0)
        out = preference_loss("hinge", model, ref, target, beta=50.0, weight=weight)
        return loss + 0.5 * out.loss + 0.1 * inside.sum()

    model, ref, target = make_inputs(3, (4, 7, 9), torch.float32, device)
    weight = torch.rand(3, device=device) + 0.5
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    m1 = model.clone().requires_grad_()
    m2 = model.clone().requires_grad_()
    out_c = compiled(m1, ref, target, weight)
    out_e = step(m2, ref, target, weight)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(m1.grad, m2.grad)


def test_fallback_without_kernel_matches(monkeypatch):
    model, ref, target = make_inputs(3, (4, 7, 9), torch.float32, "cpu")
    fused = dpo_loss(model, ref, target, beta=50.0)
    monkeypatch.setattr(dpo_mod, "_HAS_KERNEL", {})
    m = model.clone().requires_grad_()
    fallback = dpo_loss(m, ref, target, beta=50.0)
    fallback[0].backward()
    assert m.grad is not None
    for a, b in zip(fused, fallback):
        # Both compute in float32 (the kernel sums in double), so allow float32-level differences.
        torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=1e-4)


def test_paired_mse_fallback_keeps_float64(monkeypatch):
    model, ref, target = make_inputs(3, (4, 7, 9), torch.float32, "cpu")
    monkeypatch.setattr(dpo_mod, "_HAS_KERNEL", {})
    model_mse, ref_mse = paired_mse(model, ref, target)
    exact = R.paired_mse_reference(model.double(), ref.double(), target.double())
    assert model_mse.dtype == torch.float64
    torch.testing.assert_close(model_mse, exact[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(ref_mse, exact[1], rtol=1e-12, atol=0)


def test_float64_uses_reference_path():
    model, ref, target = make_inputs(2, (3, 4), torch.float64, "cpu")
    loss, inside, model_mse, ref_mse = dpo_loss(model, ref, target, beta=20.0)
    assert loss.dtype == torch.float64
    exact = R.dpo_loss_reference(model, ref, target, None, 20.0)
    torch.testing.assert_close(loss, exact[0])


@needs_ext
@pytest.mark.parametrize("threads", [2, 3])
def test_cpu_kernel_multithreaded_matches_reference(threads):
    """conftest runs tests on one thread; the OpenMP split over samples and chunks is checked here."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model, ref, target = make_inputs(5, (4, 33, 37), torch.float32, "cpu")
        m = model.clone().requires_grad_()
        out = dpo_loss(m, ref, target, beta=500.0)
        out[0].backward()
        m64 = model.double().requires_grad_()
        exact = R.dpo_loss_reference(m64, ref.double(), target.double(), None, 500.0)
        exact[0].backward()
        for name, f, x in zip(("loss", "inside", "model_mse", "ref_mse"), out, exact):
            torch.testing.assert_close(f.double(), x.detach(), rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(m.grad.double(), m64.grad, rtol=1e-4, atol=1e-9)
    finally:
        torch.set_num_threads(saved)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_more_samples_than_cuda_grid_y(device):
    """2B = 65538 samples (over CUDA's 65535 limit of grid.y, which the rows used to occupy): the CUDA
    kernels put rows on grid.x; every output and the gradient match the float64 reference."""
    model, ref, target = make_inputs(32769, (5,), torch.float32, device)
    m = model.clone().requires_grad_()
    loss, inside, model_mse, ref_mse = dpo_loss(m, ref, target, beta=20.0)
    loss.backward()
    m64 = model.double().requires_grad_()
    e_loss, e_inside, e_model, e_ref = R.dpo_loss_reference(m64, ref.double(), target.double(), None, 20.0)
    e_loss.backward()
    for got, want in ((loss, e_loss), (inside, e_inside), (model_mse, e_model), (ref_mse, e_ref), (m.grad, m64.grad)):
        assert (got.double() - want.detach()).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())
    mse, _ = paired_mse(model, None, target)
    assert mse.shape == (65538,) and (mse.double() - e_model.detach()).abs().max().item() < 1e-6


# ---- dpo_loss_ref_mse: the loss from cached reference MSEs (train.reference=cached) ------------------


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_pairs,inner,beta", [(1, (4, 7, 9), 50.0), (3, (5,), 5000.0), (8, (4, 7, 9), 50.0),
                                                  (2, (3, 111, 111), 2000.0)])
def test_dpo_loss_ref_mse_matches_reference(device, dtype, num_pairs, inner, beta):
    from ppd_engine.ops.dpo_loss import dpo_loss_ref_mse

    model, ref, target = make_inputs(num_pairs, inner, dtype, device)
    weight = torch.rand(num_pairs, device=device) + 0.5
    coefs = (torch.rand((), device=device) + 0.5, torch.randn(num_pairs, device=device),
             torch.randn(2 * num_pairs, device=device))
    # The reference MSEs a cached pre-pass stores: paired_mse's float64 of the low-precision ref_pred.
    ref_mse = paired_mse(ref, None, target)[0]
    assert ref_mse.dtype == torch.float64

    m_fused = model.clone().requires_grad_()
    fused = dpo_loss_ref_mse(m_fused, ref_mse, target, weight=weight, beta=beta)
    combine((*fused, None), coefs).backward()

    m_eager = model.clone().requires_grad_()
    eager = R.dpo_loss_reference(m_eager, ref, target, weight, beta)
    combine(eager, coefs).backward()

    m64 = model.double().requires_grad_()
    exact = R.dpo_loss_ref_mse_reference(m64, R.per_sample_mse(ref.double(), target.double()), target.double(),
                                         weight.double(), beta)
    combine((*exact, None), tuple(c.double() for c in coefs)).backward()

    assert [t.dtype for t in fused] == [torch.float32, torch.float32, torch.float64]
    for name, f, e, x in zip(("loss", "inside", "model_mse"), fused, eager, exact):
        assert_close_to_ref(f, e, x.detach(), name)
    assert m_fused.grad.dtype == dtype
    assert_close_to_ref(m_fused.grad, m_eager.grad, m64.grad, "grad")

    # Against the fused op with the prediction itself: the same sums, so fp32-rounding equal.
    m_pred = model.clone().requires_grad_()
    with_pred = dpo_loss(m_pred, ref, target, weight=weight, beta=beta)
    combine(with_pred, coefs).backward()
    torch.testing.assert_close(fused[0], with_pred[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fused[1], with_pred[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m_fused.grad, m_pred.grad, rtol=1e-5, atol=1e-8)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_dpo_loss_ref_mse_opcheck_and_nan(device):
    model, ref, target = make_inputs(3, (2, 5, 7), torch.float32, device)
    ref_mse = paired_mse(ref, None, target)[0]
    weight = torch.rand(3, device=device) + 0.5
    op = torch.ops.ppd.dpo_loss_ref_mse.default
    torch.library.opcheck(op, (model.requires_grad_(), ref_mse, target, weight, 40.0))
    torch.library.opcheck(op, (model.detach().bfloat16(), ref_mse, target.bfloat16(), None, 40.0))
    bad = ref_mse.clone()
    bad[4] = float("inf")  # pair 1's loser
    loss, inside, _ = op(model.detach(), bad, target, None, 40.0)
    assert torch.isnan(loss) and torch.isnan(inside[1]) and torch.isfinite(inside[0])


def test_dpo_loss_ref_mse_bad_inputs_and_fallback(monkeypatch):
    from ppd_engine.ops.dpo_loss import dpo_loss_ref_mse

    model, ref, target = make_inputs(2, (3, 5), torch.float32, "cpu")
    ref_mse = R.per_sample_mse(ref.double(), target.double())
    with pytest.raises(ValueError, match=r"ref_mse must have shape \(2B,\) = \(4,\) .* got \(3,\)"):
        dpo_loss_ref_mse(model, ref_mse[:3], target)
    with pytest.raises(ValueError, match="ref_mse must be a float tensor"):
        dpo_loss_ref_mse(model, ref_mse.long(), target)
    if _ext.HAS_EXT:
        with pytest.raises(RuntimeError, match="ref_mse must be float64"):
            torch.ops.ppd.dpo_loss_ref_mse(model, ref_mse.float(), target, None, 5.0)
    fused = dpo_loss_ref_mse(model, ref_mse, target, beta=50.0)
    monkeypatch.setattr(dpo_mod, "_HAS_KERNEL", {})
    m = model.clone().requires_grad_()
    fallback = dpo_loss_ref_mse(m, ref_mse, target, beta=50.0)
    fallback[0].backward()
    assert m.grad is not None and fallback[2].dtype == torch.float64
    for a, b in zip(fused, fallback):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-7)
