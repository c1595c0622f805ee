"""Fused dual cross-attention (`ppd::dual_cross_attention`): text attention plus a scaled, separately
normalised user attention for the same queries, in one pass over Q.

    out = softmax(q k_textᵀ s) v_text + user_scale[b] · softmax(q k_userᵀ s) v_user

This is the attention of an IP-Adapter-style decoupled cross-attention: the ~77 text keys and the few
user keys sit in one tile with a segmented softmax, so Q is read once and the output written once
(two SDPA calls read Q twice and write, reread and sum two outputs).

Shapes: q (B, H, Lq, D); k_text / v_text (Bt, H, Lt, D) with Bt dividing B, query batch b using text
batch b % Bt (the paired forward shares one text K/V across policy/reference × winner/loser rows
without copies); k_user / v_user (B, H, Lu, D); user_scale a float or a (B,) tensor (a per-sample
gate: 0 gives exactly the text attention for that row). Inputs may be non-contiguous (diffusers'
`(B, L, H*D).view(B, L, H, D).transpose(1, 2)`): the kernels index through strides, and the output
takes q's memory layout, so `out.transpose(1, 2).reshape(B, L, H*D)` is free for such a q.

Precision: fp32 / bf16 / fp16 inputs, fp32 accumulation, exact (non-online) softmax per segment.
Gradients: q, k_user, v_user always; k_text / v_text only when they require grad (frozen text
projections normally don't, and skipping them saves the text dk/dv reduction); user_scale when it is
a tensor that requires grad. The backward recomputes the probabilities from two saved fp32
log-sum-exp rows (B, H, Lq) instead of saving anything of size Lq × keys.

Kernels: CPU (C++, OpenMP, AVX2 micro-kernels) and CUDA (one block per query tile, K/V of both
segments in shared memory). `dual_attention_supported` says whether one handles given inputs; when
none does (no extension, float64, head_dim > 256 on CUDA, more keys than shared memory holds),
`dual_cross_attention` computes the same thing with two SDPA calls
(`reference.dual_cross_attention_reference`), so callers never need to branch.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ppd_engine import _ext
from ppd_engine.ops import reference

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Looked up once at import: dynamo cannot trace the dispatcher query, but it can read a dict.
_HAS_KERNEL = {dev: _ext.has_kernel("dual_cross_attention", dev) for dev in ("cpu", "cuda")} if _ext.HAS_EXT else {}

# The CUDA kernels' launch limits, mirrored from csrc/cuda/dual_attention.cu.
_CUDA_MAX_HEAD_DIM = 256
_CUDA_ROWS_PER_WARP = 4
_CUDA_MIN_WARPS = 2
# Opt-in shared memory per block by compute capability (CUDA programming guide, "Technical
# Specifications"); torch does not expose the opt-in limit, and an unknown device gets the
# always-available 48 KiB so the fallback is taken rather than a launch failing.
_SMEM_OPTIN_BYTES = {(7, 0): 98304, (7, 2): 98304, (7, 5): 65536, (8, 0): 166912, (8, 6): 101376, (8, 7): 166912,
                     (8, 9): 101376, (9, 0): 232448, (10, 0): 232448, (12, 0): 101376}
_DEFAULT_SMEM_BYTES = 49152


def _cuda_smem_bytes(lt: int, lu: int, d: int, text_grads: bool, backward: bool, itemsize: int = 4) -> int:
    """Shared memory of one CUDA block at the smallest warp count (the kernel picks more warps when
    they fit), mirroring fwd_smem_bytes / bwd_smem_bytes in csrc/cuda/dual_attention.cu: K and V
    tiles in the input dtype (`itemsize` bytes) with a bank-conflict-free row stride, then fp32 dk/dv
    accumulators (backward) and per-warp row buffers."""
    fp32_stride = d if d % 2 else d + 1
    kv_stride = fp32_stride if itemsize == 4 else d + (2 - d) % 4  # 16-bit: stride = 2 (mod 4)
    lk = lt + lu
    kv = (2 * lk * kv_stride * itemsize + 15) // 16 * 16
    per_warp = _CUDA_ROWS_PER_WARP * (2 * d + 2 * lk if backward else d + lk)
    lacc = (lk if text_grads else lu) if backward else 0
    return kv + 4 * (2 * lacc * fp32_stride + _CUDA_MIN_WARPS * per_warp)


def _cuda_smem_limit(device: torch.device) -> int:
    cap = torch.cuda.get_device_capability(device)
    return _SMEM_OPTIN_BYTES.get(cap, _DEFAULT_SMEM_BYTES)


def _kernel_handles(q: Tensor, k_text: Tensor, k_user: Tensor, text_grads: bool) -> bool:
    if q.dtype not in _KERNEL_DTYPES or not _HAS_KERNEL.get(q.device.type, False):
        return False
    if q.dim() != 4 or k_text.dim() != 4 or k_user.dim() != 4:
        return False
    if k_text.dtype != q.dtype or k_user.dtype != q.dtype:
        return False
    d, lt, lu = q.shape[-1], k_text.shape[-2], k_user.shape[-2]
    if lt < 1 or lu < 1:
        return False
    if q.device.type == "cuda":
        if d > _CUDA_MAX_HEAD_DIM:
            return False
        size = q.element_size()
        need = max(_cuda_smem_bytes(lt, lu, d, False, False, size), _cuda_smem_bytes(lt, lu, d, text_grads, True, size))
        return need <= _cuda_smem_limit(q.device)
    return True


def dual_attention_supported(q: Tensor, k_text: Tensor, k_user: Tensor) -> bool:
    """Whether a compiled kernel handles these inputs (device, dtype, head dim, key counts), forward
    and backward; k_text.requires_grad is taken to mean text gradients will be needed."""
    return _kernel_handles(q, k_text, k_user, k_text.requires_grad)


def _check(q: Tensor, k_text: Tensor, v_text: Tensor, k_user: Tensor, v_user: Tensor) -> None:
    names = ("q", "k_text", "v_text", "k_user", "v_user")
    tensors = (q, k_text, v_text, k_user, v_user)
    for name, t in zip(names, tensors):
        if t.dim() != 4:
            raise ValueError(f"dual_cross_attention: {name} must be (batch, heads, length, head_dim), "
                             f"got shape {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"dual_cross_attention: {name} is on {t.device}, q on {q.device}")
        if t.dtype != q.dtype:
            raise ValueError(f"dual_cross_attention: {name} dtype {t.dtype} != q dtype {q.dtype}")
    b, h, _, d = q.shape
    if v_text.shape != k_text.shape:
        raise ValueError(f"dual_cross_attention: v_text shape {tuple(v_text.shape)} != k_text shape "
                         f"{tuple(k_text.shape)}")
    if v_user.shape != k_user.shape:
        raise ValueError(f"dual_cross_attention: v_user shape {tuple(v_user.shape)} != k_user shape "
                         f"{tuple(k_user.shape)}")
    bt = k_text.shape[0]
    if bt < 1 or b % bt:
        raise ValueError(f"dual_cross_attention: k_text batch {bt} must divide q batch {b} "
                         f"(query batch b uses text batch b % Bt)")
    if k_user.shape[0] != b:
        raise ValueError(f"dual_cross_attention: k_user batch {k_user.shape[0]} != q batch {b}")
    for name, t in (("k_text", k_text), ("k_user", k_user)):
        if t.shape[1] != h or t.shape[3] != d:
            raise ValueError(f"dual_cross_attention: {name} heads/head_dim {tuple(t.shape[1::2])} != q's {(h, d)}")
        if t.shape[2] < 1:
            raise ValueError(f"dual_cross_attention: {name} has no keys, shape {tuple(t.shape)}")


def _user_scale_tensor(user_scale: Tensor | float, batch: int, device: torch.device) -> Tensor:
    if not isinstance(user_scale, Tensor):
        return torch.full((batch,), float(user_scale), dtype=torch.float32, device=device)
    if user_scale.device != device:
        raise ValueError(f"dual_cross_attention: user_scale is on {user_scale.device}, q on {device}")
    if not user_scale.is_floating_point():
        raise ValueError(f"dual_cross_attention: user_scale must be a float tensor, got {user_scale.dtype}")
    if user_scale.numel() == 1:
        return user_scale.reshape(1).expand(batch)
    if user_scale.numel() != batch:
        raise ValueError(f"dual_cross_attention: user_scale must be a float or have 1 or B={batch} elements, "
                         f"got shape {tuple(user_scale.shape)}")
    return user_scale.reshape(batch)


def dual_cross_attention(q: Tensor, k_text: Tensor, v_text: Tensor, k_user: Tensor, v_user: Tensor,
                         user_scale: Tensor | float, softmax_scale: float | None = None) -> Tensor:
    """Text attention + user_scale[b] × user attention for the same queries; (B, H, Lq, D) in q's dtype.

    q: (B, H, Lq, D); k_text, v_text: (Bt, H, Lt, D), Bt | B, batch b reads text batch b % Bt;
    k_user, v_user: (B, H, Lu, D); user_scale: float, or tensor with 1 or B elements;
    softmax_scale: defaults to 1/sqrt(D). Differentiable in every tensor input."""
    _check(q, k_text, v_text, k_user, v_user)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    us = _user_scale_tensor(user_scale, q.shape[0], q.device)
    if _kernel_handles(q, k_text, k_user, k_text.requires_grad or v_text.requires_grad):
        return torch.ops.ppd.dual_cross_attention(q, k_text, v_text, k_user, v_user, us, scale)[0]
    return reference.dual_cross_attention_reference(q, k_text, v_text, k_user, v_user, us, scale).to(q.dtype)


# ---- fake kernels and autograd, registered when the compiled op library is loaded ----------------

if _ext.HAS_EXT:

    @torch.library.register_fake("ppd::dual_cross_attention")
    def _dual_cross_attention_fake(q, k_text, v_text, k_user, v_user, user_scale, softmax_scale):
        b, h, lq, _ = q.shape
        # empty_like keeps q's layout, exactly like the kernels' at::empty_like(q).
        return (torch.empty_like(q), q.new_empty((b, h, lq), dtype=torch.float32),
                q.new_empty((b, h, lq), dtype=torch.float32))

    @torch.library.register_fake("ppd::dual_cross_attention_backward")
    def _dual_cross_attention_backward_fake(grad_out, q, k_text, v_text, k_user, v_user, user_scale, lse_text,
                                            lse_user, softmax_scale, text_grads):
        dk_text = torch.empty_like(k_text) if text_grads else k_text.new_empty((0,))
        dv_text = torch.empty_like(v_text) if text_grads else v_text.new_empty((0,))
        return (torch.empty_like(q), dk_text, dv_text, torch.empty_like(k_user), torch.empty_like(v_user),
                q.new_empty((q.shape[0],), dtype=torch.float32))

    def _setup(ctx, inputs, output):
        q, k_text, v_text, k_user, v_user, user_scale, softmax_scale = inputs
        _, lse_text, lse_user = output
        ctx.save_for_backward(q, k_text, v_text, k_user, v_user, user_scale, lse_text, lse_user)
        ctx.softmax_scale = softmax_scale
        ctx.mark_non_differentiable(lse_text, lse_user)

    def _backward(ctx, grad_out, _grad_lse_text, _grad_lse_user):
        q, k_text, v_text, k_user, v_user, user_scale, lse_text, lse_user = ctx.saved_tensors
        needs = ctx.needs_input_grad
        text_grads = needs[1] or needs[2]
        if grad_out is None:
            grad_out = torch.zeros_like(q)
        dq, dk_text, dv_text, dk_user, dv_user, d_scale = torch.ops.ppd.dual_cross_attention_backward(
            grad_out, q, k_text, v_text, k_user, v_user, user_scale, lse_text, lse_user, ctx.softmax_scale,
            text_grads)
        return (dq if needs[0] else None, dk_text if needs[1] else None, dv_text if needs[2] else None,
                dk_user if needs[3] else None, dv_user if needs[4] else None,
                d_scale.to(user_scale.dtype) if needs[5] else None, None)

    torch.library.register_autograd("ppd::dual_cross_attention", _backward, setup_context=_setup)
