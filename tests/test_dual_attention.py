"""ppd::dual_cross_attention against the float64 two-SDPA reference: forward, every gradient, odd
shapes, low precision relative to PyTorch's own error, gate-0 exactness, strided inputs, opcheck,
torch.compile. CUDA variants are marked and skipped without a GPU."""
import math

import pytest
import torch

from ppd_engine import _ext
from ppd_engine.ops import reference
from ppd_engine.ops.dual_attention import dual_attention_supported, dual_cross_attention

HAS_CPU_KERNEL = _ext.has_kernel("dual_cross_attention", "cpu")
needs_cpu_kernel = pytest.mark.skipif(not HAS_CPU_KERNEL, reason=f"extension not built: {_ext.LOAD_ERROR}")
DEVICES = [pytest.param("cpu", marks=needs_cpu_kernel), pytest.param("cuda", marks=pytest.mark.cuda)]


def make_inputs(B, Bt, H, Lq, Lt, Lu, D, dtype=torch.float32, device="cpu", diffusers_layout=True, zero_row=True):
    """Fresh random inputs. diffusers_layout gives q / k / v as (B, L, H, D) memory seen as (B, H, L, D)."""
    def t(b, L):
        if diffusers_layout:
            return torch.randn(b, L, H * D, device=device, dtype=dtype).view(b, L, H, D).transpose(1, 2)
        return torch.randn(b, H, L, D, device=device, dtype=dtype)

    q, kt, vt, ku, vu = t(B, Lq), t(Bt, Lt), t(Bt, Lt), t(B, Lu), t(B, Lu)
    us = torch.rand(B, device=device) + 0.5
    if zero_row and B > 1:
        us[1] = 0.0  # a reference (gate-0) row inside the batch
    return q, kt, vt, ku, vu, us


def ref64(q, kt, vt, ku, vu, us, scale=None):
    # contiguous: PyTorch's CPU float64 SDPA backward is ~10x slower on transposed views.
    q, kt, vt, ku, vu = (x.double().contiguous() for x in (q, kt, vt, ku, vu))
    return reference.dual_cross_attention_reference(q, kt, vt, ku, vu, us.double(), scale)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def grads_of(fn, inputs, grad_out):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [x.grad for x in leaves]


# (B, Bt, H, Lq, Lt, Lu, D): single key/query, 77 + 3 text keys, odd everything, text shared by Bt | B.
SHAPES = [
    (1, 1, 1, 1, 1, 1, 40),
    (3, 1, 2, 37, 80, 3, 40),
    (2, 2, 3, 19, 77, 16, 64),
    (4, 2, 2, 13, 80, 5, 80),
    (3, 3, 1, 9, 77, 4, 128),
    (2, 1, 2, 11, 77, 2, 160),
    (1, 1, 1, 4095, 77, 4, 64),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_forward_and_grads_match_float64(device, shape):
    inputs = make_inputs(*shape, device=device)
    go = torch.randn_like(inputs[0])
    assert dual_attention_supported(inputs[0], inputs[1], inputs[3])
    out, grads = grads_of(dual_cross_attention, inputs, go)
    ref, ref_grads = grads_of(ref64, inputs, go)
    assert out.dtype == torch.float32 and out.shape == inputs[0].shape
    assert max_err(out, ref) < 2e-5 * max(1.0, ref.abs().max().item())
    for name, g, r in zip(("q", "k_text", "v_text", "k_user", "v_user", "user_scale"), grads, ref_grads):
        tol = 2e-5 * max(1.0, r.abs().max().item())
        assert max_err(g, r) < tol, f"grad {name}: {max_err(g, r)} >= {tol}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_pytorch_error(device, dtype):
    """flash-attention's criterion: our error vs float64 at most ~2x that of PyTorch's own SDPA
    composition run in the same dtype (plus a hair for ties at the rounding level)."""
    shape = (3, 1, 2, 301, 80, 4, 80)
    inputs = make_inputs(*shape, dtype=dtype, device=device)
    go = torch.randn_like(inputs[0])
    ours, our_grads = grads_of(dual_cross_attention, inputs, go)
    torch_lp, torch_grads = grads_of(reference.dual_cross_attention_reference, inputs, go)
    ref, ref_grads = grads_of(ref64, inputs, go)
    eps = torch.finfo(dtype).eps
    assert ours.dtype == dtype
    assert max_err(ours, ref) <= 2 * max_err(torch_lp, ref) + eps
    for name, g, t, r in zip(("q", "k_text", "v_text", "k_user", "v_user", "user_scale"), our_grads, torch_grads,
                             ref_grads):
        bound = 2 * max_err(t, r) + eps * r.abs().max().item()
        assert max_err(g, r) <= bound, f"grad {name}: {max_err(g, r)} > {bound}"


@pytest.mark.parametrize("device", DEVICES)
def test_gate_zero_row_is_exactly_text_attention(device):
    q, kt, vt, ku, vu, us = make_inputs(3, 1, 2, 29, 77, 4, 40, device=device)
    us[1] = 0.0
    out = dual_cross_attention(q, kt, vt, ku, vu, us)
    # Any finite user K/V leaves the gate-0 row bit-identical, and only that row.
    out2 = dual_cross_attention(q, kt, vt, ku * 50, vu * 1e4, us)
    assert torch.equal(out[1], out2[1])
    assert not torch.equal(out[0], out2[0])
    text = reference.dual_cross_attention_reference(q.double(), kt.double(), vt.double(), ku.double(), vu.double(),
                                                    0.0)
    assert max_err(out[1], text[1]) < 2e-5
    # ... and sends no gradient to the user K/V of that row.
    ku_l, vu_l = ku.clone().requires_grad_(), vu.clone().requires_grad_()
    dual_cross_attention(q, kt, vt, ku_l, vu_l, us).sum().backward()
    assert torch.count_nonzero(ku_l.grad[1]) == 0 and torch.count_nonzero(vu_l.grad[1]) == 0
    assert torch.count_nonzero(vu_l.grad[0]) > 0


@pytest.mark.parametrize("device", DEVICES)
def test_layouts_scale_forms_and_output_layout(device):
    q, kt, vt, ku, vu, us = make_inputs(2, 1, 3, 17, 77, 4, 40, device=device)
    out = dual_cross_attention(q, kt, vt, ku, vu, 0.7)
    # q came from a (B, L, H*D) projection: the output shares that layout, so the processor's
    # transpose + reshape back to (B, L, H*D) is a view.
    assert out.transpose(1, 2).is_contiguous()
    contig = [x.contiguous() for x in (q, kt, vt, ku, vu)]
    assert torch.equal(dual_cross_attention(*contig, torch.tensor(0.7, device=device)), out)
    assert torch.equal(dual_cross_attention(*contig, torch.full((2,), 0.7, device=device)), out)
    # A sliced (non-dense) query and an explicit softmax scale.
    big = torch.randn(2, 3, 40, 48, device=device)
    qs = big[:, :, 3:20, 5:45]
    got = dual_cross_attention(qs, kt, vt, ku, vu, us, softmax_scale=0.3)
    assert max_err(got, ref64(qs, kt, vt, ku, vu, us, 0.3)) < 2e-5


def test_user_scale_gradient_and_broadcast_scalar():
    if not HAS_CPU_KERNEL:
        pytest.skip("extension not built")
    q, kt, vt, ku, vu, _ = make_inputs(3, 1, 2, 23, 77, 3, 64)
    s = torch.tensor(0.8, requires_grad=True)
    dual_cross_attention(q, kt, vt, ku, vu, s).square().sum().backward()
    s64 = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    ref64(q, kt, vt, ku, vu, s64.expand(3)).square().sum().backward()
    assert abs(s.grad.item() - s64.grad.item()) < 1e-4 * abs(s64.grad.item())


def test_fallback_for_float64_matches_reference():
    q, kt, vt, ku, vu, us = make_inputs(2, 1, 2, 7, 5, 2, 8, dtype=torch.float64)
    assert not dual_attention_supported(q, kt, ku)
    inputs = (q, kt, vt, ku, vu, us)
    go = torch.randn_like(q)
    out, grads = grads_of(dual_cross_attention, inputs, go)
    ref, ref_grads = grads_of(ref64, inputs, go)
    assert max_err(out, ref) < 1e-12
    assert all(max_err(g, r) < 1e-12 for g, r in zip(grads, ref_grads))


def test_bad_inputs_name_the_argument():
    q, kt, vt, ku, vu, us = make_inputs(2, 1, 2, 7, 5, 2, 8)
    with pytest.raises(ValueError, match="k_user batch"):
        dual_cross_attention(q, kt, vt, ku[:1], vu[:1], us)
    with pytest.raises(ValueError, match="v_text shape"):
        dual_cross_attention(q, kt, vt[:, :, :3], ku, vu, us)
    with pytest.raises(ValueError, match="k_text batch 2 must divide q batch 3"):
        q3, kt2, vt2, ku3, vu3, us3 = make_inputs(3, 2, 2, 7, 5, 2, 8)
        dual_cross_attention(q3, kt2, vt2, ku3, vu3, us3)
    with pytest.raises(ValueError, match="user_scale"):
        dual_cross_attention(q, kt, vt, ku, vu, torch.ones(3))
    with pytest.raises(ValueError, match="head_dim"):
        dual_cross_attention(q, kt[..., :4], vt[..., :4], ku, vu, us)
    if HAS_CPU_KERNEL:  # the C++ checks, for callers of the raw op
        with pytest.raises(RuntimeError, match="user_scale must be"):
            torch.ops.ppd.dual_cross_attention(q, kt, vt, ku, vu, torch.ones(5), 0.3)
        with pytest.raises(RuntimeError, match="dtype"):
            torch.ops.ppd.dual_cross_attention(q, kt.double(), vt, ku, vu, us, 0.3)


def opcheck_inputs(device):
    q, kt, vt, ku, vu, us = make_inputs(3, 1, 2, 11, 9, 3, 16, device=device)
    for x in (q, ku, vu):
        x.requires_grad_()
    return q, kt, vt, ku, vu, us


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    q, kt, vt, ku, vu, us = opcheck_inputs(device)
    kt.requires_grad_()  # exercises the text-gradient path of the autograd formula too
    torch.library.opcheck(torch.ops.ppd.dual_cross_attention.default, (q, kt, vt, ku, vu, us, 0.25))
    out, lt, lu = torch.ops.ppd.dual_cross_attention(q.detach(), kt.detach(), vt, ku.detach(), vu.detach(), us, 0.25)
    go = torch.randn_like(out)
    for text_grads in (False, True):
        # No autograd of its own, so the schema and fake-kernel checks are the ones that apply.
        torch.library.opcheck(torch.ops.ppd.dual_cross_attention_backward.default,
                              (go, q.detach(), kt.detach(), vt, ku.detach(), vu.detach(), us, lt, lu, 0.25, text_grads),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    q, kt, vt, ku, vu, us = make_inputs(2, 1, 2, 13, 77, 4, 40, device=device)

    def step(q, kt, vt, ku, vu, us):
        return dual_cross_attention(q * 1.5, kt, vt, ku, vu, us).square().mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [x.clone().requires_grad_() for x in (q, ku, vu)]
    loss = compiled(leaves[0], kt, vt, leaves[1], leaves[2], us)
    loss.backward()
    eager_leaves = [x.clone().requires_grad_() for x in (q, ku, vu)]
    eager = step(eager_leaves[0], kt, vt, eager_leaves[1], eager_leaves[2], us)
    eager.backward()
    assert torch.allclose(loss, eager, rtol=1e-6, atol=0)
    for a, b in zip(leaves, eager_leaves):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_in_query_propagates(device):
    q, kt, vt, ku, vu, us = make_inputs(2, 1, 1, 5, 7, 2, 8, device=device)
    q = q.clone()
    q[0, 0, 2, 3] = float("nan")
    out = dual_cross_attention(q, kt, vt, ku, vu, us)
    assert torch.isnan(out[0, 0, 2]).all()
    assert torch.isfinite(out[0, 0, :2]).all() and torch.isfinite(out[1]).all()


@pytest.mark.cuda
def test_cuda_matches_cpu_kernel():
    inputs = make_inputs(3, 1, 8, 1025, 77, 4, 40, dtype=torch.bfloat16)
    cpu = dual_cross_attention(*inputs)
    gpu = dual_cross_attention(*[x.cuda() for x in inputs])
    ref = ref64(*inputs)
    assert max_err(gpu.cpu(), ref) <= 2 * max_err(cpu, ref) + torch.finfo(torch.bfloat16).eps


def test_scale_default_is_inverse_sqrt_head_dim():
    q, kt, vt, ku, vu, us = make_inputs(1, 1, 1, 6, 5, 2, 40)
    assert torch.equal(dual_cross_attention(q, kt, vt, ku, vu, us),
                       dual_cross_attention(q, kt, vt, ku, vu, us, softmax_scale=1 / math.sqrt(40)))


@needs_cpu_kernel
@pytest.mark.parametrize("threads", [2, 3])
def test_cpu_kernel_multithreaded_matches_float64(threads):
    """conftest runs tests on one thread; the OpenMP split over (b, h, query blocks) and the
    reductions of the user K/V gradients across threads are checked here."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        inputs = make_inputs(3, 1, 2, 301, 77, 4, 40)
        go = torch.randn_like(inputs[0])
        out, grads = grads_of(dual_cross_attention, inputs, go)
        ref, ref_grads = grads_of(ref64, inputs, go)
        assert max_err(out, ref) < 2e-5 * max(1.0, ref.abs().max().item())
        for name, g, r in zip(("q", "k_text", "v_text", "k_user", "v_user", "user_scale"), grads, ref_grads):
            assert max_err(g, r) < 2e-5 * max(1.0, r.abs().max().item()), f"grad {name}"
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch,heads", [(0, 2), (2, 0)])
def test_empty_batch_or_heads_forward_and_backward(device, batch, heads):
    """B = 0 or H = 0 launches nothing (a zero grid dimension is an invalid CUDA launch) and returns
    empty gradients of the right shapes."""
    q = torch.randn(batch, heads, 5, 16, device=device, requires_grad=True)
    kt = torch.randn(1, heads, 3, 16, device=device, requires_grad=True)
    vt = torch.randn(1, heads, 3, 16, device=device)
    ku = torch.randn(batch, heads, 2, 16, device=device, requires_grad=True)
    vu = torch.randn(batch, heads, 2, 16, device=device, requires_grad=True)
    us = torch.ones(batch, device=device, requires_grad=True)
    out = dual_cross_attention(q, kt, vt, ku, vu, us)
    assert out.shape == q.shape
    out.sum().backward()
    for x in (q, kt, ku, vu, us):
        assert x.grad.shape == x.shape and torch.count_nonzero(x.grad) == 0
    if HAS_CPU_KERNEL or device == "cuda":  # the raw backward op, text gradients off and on
        o, lt, lu = torch.ops.ppd.dual_cross_attention(q.detach(), kt.detach(), vt, ku.detach(), vu.detach(),
                                                       us.detach(), 0.25)
        for text_grads in (False, True):
            grads = torch.ops.ppd.dual_cross_attention_backward(torch.zeros_like(o), q.detach(), kt.detach(), vt,
                                                                ku.detach(), vu.detach(), us.detach(), lt, lu, 0.25,
                                                                text_grads)
            assert grads[0].shape == q.shape and grads[3].shape == ku.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch,heads", [(65537, 1), (1, 65537)])
def test_batch_or_heads_past_the_cuda_grid_limit(device, batch, heads):
    """More than 65535 batches or heads (CUDA's grid.y / grid.z limit) are launched in chunks, not
    refused: the rows past the first chunk get the same answer as the reference."""
    q, kt, vt, ku, vu, us = make_inputs(batch, 1, heads, 2, 3, 2, 4, device=device, diffusers_layout=False)
    kt.requires_grad_()
    go = torch.randn_like(q)
    out, grads = grads_of(dual_cross_attention, (q, kt, vt, ku, vu, us), go)
    ref, ref_grads = grads_of(ref64, (q, kt, vt, ku, vu, us), go)
    assert max_err(out, ref) < 2e-5 * max(1.0, ref.abs().max().item())
    assert max_err(out[-3:], ref[-3:]) < 2e-5 * max(1.0, ref.abs().max().item())
    for name, g, r in zip(("q", "k_text", "v_text", "k_user", "v_user", "user_scale"), grads, ref_grads):
        assert max_err(g, r) < 5e-5 * max(1.0, r.abs().max().item()), f"grad {name}"


def test_cuda_shared_memory_mirror_stages_kv_in_the_input_dtype():
    """ppd_engine.ops.dual_attention mirrors the CUDA kernel's shared-memory formulas (it decides when
    the kernel takes the inputs). K/V tiles are in the input dtype: 16-bit inputs halve them, with a
    row stride of 2 mod 4 elements (an odd number of 4-byte words, so column reads are conflict-free)."""
    from ppd_engine.ops.dual_attention import _cuda_smem_bytes

    def a16(n):  # the K/V tiles' bytes are rounded up to 16 so the fp32 part stays aligned
        return (n + 15) // 16 * 16

    lk, d = 81, 160
    per_warp_fwd = 4 * (d + lk)  # kRows x (D + Lk) floats
    assert _cuda_smem_bytes(77, 4, d, False, False, 4) == a16(2 * lk * 161 * 4) + 4 * 2 * per_warp_fwd
    assert _cuda_smem_bytes(77, 4, d, False, False, 2) == a16(2 * lk * 162 * 2) + 4 * 2 * per_warp_fwd
    per_warp_bwd = 4 * (2 * d + 2 * lk)
    for text_grads, lacc in ((False, 4), (True, lk)):
        want = a16(2 * lk * 162 * 2) + 4 * (2 * lacc * 161 + 2 * per_warp_bwd)
        assert _cuda_smem_bytes(77, 4, d, text_grads, True, 2) == want
    for d, stride in ((40, 42), (64, 66), (80, 82), (7, 10), (2, 2)):  # 16-bit: smallest S >= D, S = 2 (mod 4)
        assert _cuda_smem_bytes(1, 1, d, False, False, 2) == a16(2 * 2 * stride * 2) + 4 * 2 * 4 * (d + 2)


def frozen_text_grads(fn, inputs, grad_out):
    """Gradients as training takes them: text K/V frozen (no grad, so the kernel runs with
    text_grads=False and skips the text dk/dv), q, user K/V and user_scale trainable."""
    q, kt, vt, ku, vu, us = inputs
    leaves = [x.detach().clone().requires_grad_() for x in (q, ku, vu, us)]
    out = fn(leaves[0], kt, vt, leaves[1], leaves[2], leaves[3])
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_text_kv_backward_matches_float64(device, dtype):
    """The path training uses (text_grads=False): dq, dk_user, dv_user, d user_scale against float64;
    fp32 to 2e-5 relative, bf16 within twice PyTorch's own error."""
    inputs = make_inputs(4, 1, 3, 203, 77, 4, 40, dtype=dtype, device=device)
    assert not inputs[1].requires_grad and dual_attention_supported(inputs[0], inputs[1], inputs[3])
    go = torch.randn_like(inputs[0])
    out, grads = frozen_text_grads(dual_cross_attention, inputs, go)
    torch_lp, torch_grads = frozen_text_grads(reference.dual_cross_attention_reference, inputs, go)
    ref, ref_grads = frozen_text_grads(ref64, inputs, go)
    for name, g, t, r in zip(("q", "k_user", "v_user", "user_scale"), grads, torch_grads, ref_grads):
        if dtype == torch.float32:
            bound = 2e-5 * max(1.0, r.abs().max().item())
        else:
            bound = 2 * max_err(t, r) + torch.finfo(dtype).eps * r.abs().max().item()
        assert max_err(g, r) <= bound, f"grad {name}: {max_err(g, r)} > {bound}"


def cuda_rows_per_block(batch, heads, lq, warps, sms, rows_per_warp=4):
    """csrc/cuda/dual_attention.cu's pick_rows: 4 row groups per warp, halved while the grid would
    leave SMs idle (fewer than 2 blocks per SM)."""
    rows = warps * rows_per_warp * 4
    while rows > warps * rows_per_warp and batch * heads * -(-lq // rows) < 2 * sms:
        rows //= 2
    return rows


@pytest.mark.cuda
@pytest.mark.parametrize("text_grads", [False, True])
def test_cuda_backward_with_several_row_groups_per_warp(text_grads):
    """Enough query tiles that the kernel keeps 4 row groups per warp (all warps stepping together
    through the block's rows, the last step with idle warps and a partial group), so the dk/dv
    accumulation across steps is exercised; fp32 against float64."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    batch, heads, warps = 2, 8, 8  # D=40, 81 keys: 8 warps' shared memory fits on every GPU since sm_70
    lq = 128 * -(-2 * sms // (batch * heads)) + 37
    assert cuda_rows_per_block(batch, heads, lq, warps, sms) == 128
    inputs = make_inputs(batch, 1, heads, lq, 77, 4, 40, device="cuda")
    go = torch.randn_like(inputs[0])
    if text_grads:
        out, grads = grads_of(dual_cross_attention, inputs, go)
        _, ref_grads = grads_of(ref64, inputs, go)
        names = ("q", "k_text", "v_text", "k_user", "v_user", "user_scale")
    else:
        out, grads = frozen_text_grads(dual_cross_attention, inputs, go)
        _, ref_grads = frozen_text_grads(ref64, inputs, go)
        names = ("q", "k_user", "v_user", "user_scale")
    for name, g, r in zip(names, grads, ref_grads):
        tol = 2e-5 * max(1.0, r.abs().max().item())
        assert max_err(g, r) < tol, f"grad {name}: {max_err(g, r)} >= {tol}"


def test_cuda_rows_per_block_mirror_keeps_four_groups_per_warp_at_test_size():
    """The premise of the CUDA several-row-groups test, checked where it can run: at that size the
    launch heuristic keeps 4 row groups per warp on GPUs from 80 to 160 SMs."""
    for sms in (80, 108, 132, 148, 160):
        lq = 128 * -(-2 * sms // 16) + 37
        assert cuda_rows_per_block(2, 8, lq, 8, sms) == 128
        assert cuda_rows_per_block(1, 1, 4095, 8, sms) == 32  # the existing long test: one group per warp
