"""Activation memory of the frozen UNet: gradient checkpointing (full, selective, feed-forward) and
frozen convolutions that keep no input.

    enable_checkpointing(unet, "feedforward")   # train.gradient_checkpointing + train.checkpoint_policy
    unsave_frozen_conv_inputs(unet)             # always, in the trainer

feedforward (the default): only the transformer blocks' FeedForward modules (GEGLU projection, GELU,
product, output linear) run under torch.utils.checkpoint. GEGLU's product keeps both of its large
operands for backward (13.9 of 41.5 MB saved per step on the CPU bench), and its recompute is two
linears and a GELU: the best memory per recompute time measured here.

full: diffusers' default, torch.utils.checkpoint over each block: nothing inside a block is kept,
backward re-runs the block's whole forward (one more forward of the frozen UNet per step).

selective: the same blocks under torch.utils.checkpoint with a selective policy
(create_selective_checkpoint_contexts): the outputs of convolutions and attention (SDPA and the
fused ppd::dual_cross_attention) are saved in the forward and replayed from that cache when the
block is re-run in backward; everything else — GroupNorm/LayerNorm, SiLU/GELU, residual adds,
scales, and the linear projections — is recomputed.

Why not keep the matmul outputs too (the textbook policy): measured on the CPU bench's small UNet at
4 pairs (a first interleaved probe, before frozen convolutions; bench/RESULTS.md), keeping conv + matmul + attention outputs keeps 0.87x the activation
memory of no checkpointing (37.6 of 43.2 MB: the linear outputs are as large as the tensors the
norms would have saved) for a 1.18x step; keeping conv + attention only keeps 0.55x (23.6 MB) for
1.26x; full checkpointing 0.40x (17.4 MB) for 1.28x. On this CPU the element-wise and normalisation
ops cost nearly what the convolutions do, so recomputing them is not cheap here; on a GPU (where
they are bandwidth-bound and the matmuls dominate) the gap between selective and full should be
wider — the GPU check measures it.
"""
from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

POLICIES = ("full", "selective", "feedforward")


@functools.cache
def _saved_ops() -> frozenset:
    aten = torch.ops.aten
    names = ["convolution", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math"]
    ops = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    if hasattr(torch.ops, "ppd") and hasattr(torch.ops.ppd, "dual_cross_attention"):
        ops.add(torch.ops.ppd.dual_cross_attention.default)
    return frozenset(ops)


def _policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _saved_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def _selective(module, *args):
    return checkpoint(module.__call__, *args, use_reentrant=False,
                      context_fn=functools.partial(create_selective_checkpoint_contexts, _policy))


def _checkpointed_forward(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def enable_checkpointing(unet, policy: str) -> None:
    """Turn on gradient checkpointing of `unet` with `policy` (full | selective | feedforward)."""
    if policy not in POLICIES:
        raise ValueError(f"train.checkpoint_policy={policy!r}; expected one of {POLICIES}")
    if policy == "feedforward":
        from diffusers.models.attention import FeedForward

        for m in unet.modules():
            if isinstance(m, FeedForward):
                m.forward = _checkpointed_forward(m.forward)
        return
    unet.enable_gradient_checkpointing(None if policy == "full" else _selective)


class _FrozenConv2d(torch.autograd.Function):
    """conv2d whose weight and bias need no gradient: saves only the weight (a parameter, no extra
    memory), not the input, which only the weight's gradient would read."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.conf = (x.shape, x.dtype, stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, dtype, stride, padding, dilation, groups = ctx.conf
        # ATen's own grad-input kernel; the input is only a shape there (torch.nn.grad.conv2d_input).
        gi = torch.ops.aten.convolution_backward(grad, grad.new_empty(1).expand(shape), weight.to(grad.dtype), None,
                                                 stride, padding, dilation, False, [0, 0], groups,
                                                 (True, False, False))[0]
        return gi.to(dtype), None, None, None, None, None, None


def _frozen_conv_forward(self, x):
    if self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad) \
            or not (torch.is_grad_enabled() and x.requires_grad):
        return self._conv_forward(x, self.weight, self.bias)
    return _FrozenConv2d.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def unsave_frozen_conv_inputs(model: nn.Module) -> int:
    """Make every plain, zero-padded nn.Conv2d of `model` keep no copy of its input for backward
    while its weight is frozen (autograd's convolution saves the input for the weight gradient
    even when no weight gradient is wanted). Gradients are unchanged: the same ATen kernel computes
    the input gradient. On the CPU bench's small UNet this is 6.3 of the 43 MB a step keeps
    (bench/RESULTS.md). Returns how many layers were patched."""
    n = 0
    for m in model.modules():
        if type(m) is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str):
            m.forward = types.MethodType(_frozen_conv_forward, m)
            n += 1
    return n
