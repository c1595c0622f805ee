"""Activation-memory savers (full / selective / feed-forward checkpointing, frozen convolutions that
keep no input) give the adapters the gradients of plain autograd."""
import pytest
import torch

from ppd_engine.adapters import add_user_adapters
from ppd_engine.paired import paired_forward, policy_forward
from ppd_engine.testing.tiny_unets import tiny_pair_batch, tiny_unet
from ppd_engine.training.activation_checkpointing import enable_checkpointing, unsave_frozen_conv_inputs


def _grads(family, policy_name, forward, frozen_convs=False):
    model = tiny_unet(family)
    handle = add_user_adapters(model, user_dim=24, num_tokens=4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in handle.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    if frozen_convs:
        assert unsave_frozen_conv_inputs(model) > 0
    if policy_name:
        enable_checkpointing(model, policy_name)
    model.train()
    batch = tiny_pair_batch(model, 2, generator=torch.Generator().manual_seed(13))
    users = torch.randn(2, 1, 24, generator=torch.Generator().manual_seed(3)).repeat(2, 1, 1)
    args = (batch["noisy_latents"], batch["timesteps"], batch["encoder_hidden_states"], users)
    if forward == "policy":  # the cached-reference step: no reference call fills the text K/V cache first
        policy = policy_forward(model, *args, **batch["kwargs"])
    else:
        policy, _ = paired_forward(model, *args, strategy="sequential", **batch["kwargs"])
    return torch.autograd.grad((policy * policy.detach()).sum(), list(handle.parameters()))


@pytest.mark.parametrize("family,forward", [("sd15", "policy"), ("sd15", "paired"), ("sdxl", "policy")])
def test_checkpoint_policies_match_no_checkpointing(family, forward):
    g0 = _grads(family, None, forward)
    for name in ("full", "selective", "feedforward"):
        for frozen in (False, True):
            for g, ref in zip(_grads(family, name, forward, frozen), g0):
                assert (g - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-7, (name, frozen)


def _saved_bytes(model, x):
    total = 0

    def pack(t):
        nonlocal total
        if not isinstance(t, torch.nn.Parameter):
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return model(x), total


def test_frozen_conv_keeps_no_input_and_the_same_input_gradient():
    torch.manual_seed(0)
    convs = [torch.nn.Conv2d(5, 7, 3, padding=1), torch.nn.Conv2d(7, 6, 3, stride=2, padding=1, bias=False),
             torch.nn.Conv2d(6, 6, 3, padding=1, groups=3)]
    model = torch.nn.Sequential(convs[0], torch.nn.SiLU(), convs[1], convs[2]).requires_grad_(False)
    x = torch.randn(3, 5, 11, 9, requires_grad=True)
    out, plain = _saved_bytes(model, x)
    (g_plain,) = torch.autograd.grad(out.square().sum(), x)
    assert unsave_frozen_conv_inputs(model) == 3
    out2, patched = _saved_bytes(model, x)
    (g_patched,) = torch.autograd.grad(out2.square().sum(), x)
    assert torch.equal(out, out2)
    torch.testing.assert_close(g_patched, g_plain, rtol=1e-6, atol=1e-7)
    # Left: the SiLU's input, the output of the last conv (kept by square) and x (conv 0's input is
    # x itself, which autograd holds anyway); the convs' inputs are gone.
    assert patched < plain and plain - patched >= 4 * (7 * 11 * 9 + 6 * 6 * 5) * 3
    # A trainable weight keeps the ordinary path (its gradient needs the input).
    convs[1].weight.requires_grad_(True)
    out3 = model(x)
    out3.sum().backward()
    assert convs[1].weight.grad is not None


def test_unknown_policy_is_named():
    with pytest.raises(ValueError, match="train.checkpoint_policy='some'"):
        enable_checkpointing(tiny_unet("sd15"), "some")
