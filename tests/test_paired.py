"""paired_forward: policy and reference from one model equal two independent calls (outputs, grads)."""
import pytest
import torch

from ppd_engine.adapters import add_user_adapters, call_model, user_conditioning
from ppd_engine.paired import paired_forward
from ppd_engine.testing.tiny_unets import tiny_pair_batch, tiny_unet

USER_DIM = 24


def _model(family, **kw):
    model = tiny_unet(family)
    handle = add_user_adapters(model, user_dim=USER_DIM, num_tokens=4, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in handle.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model, handle


def _pair_users(pairs, t_in=1, seed=3):
    u = torch.randn(pairs, t_in, USER_DIM, generator=torch.Generator().manual_seed(seed))
    return u.repeat(2, 1, 1)


def _stock(model, batch, users):
    """Two independent calls: the reference (no user branch) and the policy."""
    args = (batch["noisy_latents"], batch["timesteps"], batch["encoder_hidden_states"])
    with torch.no_grad():
        ref = call_model(model, *args, **batch["kwargs"])
    with user_conditioning(model, users, 1.0):
        policy = call_model(model, *args, **batch["kwargs"])
    return policy, ref


def _grads(handle, policy, weight):
    return torch.autograd.grad((policy * weight).sum(), list(handle.parameters()))


@pytest.mark.parametrize("family,pairs", [("sd15", 1), ("sd15", 3), ("sdxl", 2), ("cascade", 3)])
def test_strategies_equal_independent_calls(family, pairs):
    model, handle = _model(family)
    batch = tiny_pair_batch(model, pairs, generator=torch.Generator().manual_seed(2))
    users = _pair_users(pairs)
    policy0, ref0 = _stock(model, batch, users)
    weight = torch.randn_like(policy0)
    grads0 = _grads(handle, policy0, weight)
    for strategy in ("sequential", "stacked"):
        policy, ref = paired_forward(model, batch["noisy_latents"], batch["timesteps"], batch["encoder_hidden_states"],
                                     users, strategy=strategy, **batch["kwargs"])
        assert ref.grad_fn is None and not ref.requires_grad
        assert (policy - ref0).abs().max() > 1e-3  # the user branch is on for the policy rows
        assert (policy - policy0).abs().max() < 1e-5, strategy
        assert (ref - ref0).abs().max() < 1e-5, strategy
        for g, g0 in zip(_grads(handle, policy, weight), grads0):
            # fp32 sums over a different batch layout: compare relative to the tensor's scale
            err, scale = (g - g0).abs().max(), g0.abs().max()
            assert err <= 1e-5 * scale + 1e-7, (strategy, err, scale)


def test_text_kv_computed_once_per_step():
    model, handle = _model("sd15")
    pairs = 2
    batch = tiny_pair_batch(model, pairs, generator=torch.Generator().manual_seed(4))
    users = _pair_users(pairs)
    calls = []
    hooks = [model.get_submodule(name).to_k.register_forward_hook(
        lambda mod, inp, out: calls.append(inp[0].shape[0])) for name in handle.processors]
    try:
        for strategy in ("sequential", "stacked"):
            calls.clear()
            paired_forward(model, batch["noisy_latents"], batch["timesteps"], batch["encoder_hidden_states"], users,
                           strategy=strategy)
            # one projection per layer, of the B distinct captions only
            assert calls == [pairs] * len(handle.processors), (strategy, calls)
        calls.clear()
        paired_forward(model, batch["noisy_latents"], batch["timesteps"], batch["encoder_hidden_states"], users,
                       share_text_kv=False)
        assert calls == [2 * pairs] * (2 * len(handle.processors))
    finally:
        for h in hooks:
            h.remove()
    assert handle.state.text_cache is None  # the cache lives only inside paired_forward


def test_distinct_captions_and_none_user():
    """Winners and losers with different text (no caption dedup) and a None user still match."""
    model, handle = _model("sd15")
    pairs = 2
    batch = tiny_pair_batch(model, pairs, generator=torch.Generator().manual_seed(5))
    batch["encoder_hidden_states"] = batch["encoder_hidden_states"] + torch.randn_like(batch["encoder_hidden_states"])
    users = _pair_users(pairs)
    policy0, ref0 = _stock(model, batch, users)
    for strategy in ("sequential", "stacked"):
        policy, ref = paired_forward(model, batch["noisy_latents"], batch["timesteps"], batch["encoder_hidden_states"],
                                     users, strategy=strategy)
        assert (policy - policy0).abs().max() < 1e-5 and (ref - ref0).abs().max() < 1e-5
        policy, ref = paired_forward(model, batch["noisy_latents"], batch["timesteps"], batch["encoder_hidden_states"],
                                     None, strategy=strategy)
        assert (policy - ref0).abs().max() < 1e-5 and (ref - ref0).abs().max() < 1e-5


def test_phase_hook_and_pairwise_dropout():
    model, handle = _model("sd15", dropout=0.5)
    pairs = 3
    batch = tiny_pair_batch(model, pairs, generator=torch.Generator().manual_seed(6))
    users = _pair_users(pairs, seed=7)
    events = []
    args = (batch["noisy_latents"], batch["timesteps"], batch["encoder_hidden_states"])
    paired_forward(model, *args, users, phase_hook=lambda phase, ev: events.append((phase, ev)))
    assert events == [("reference", "start"), ("reference", "end"), ("policy", "start"), ("policy", "end")]
    events.clear()
    paired_forward(model, *args, users, strategy="stacked", phase_hook=lambda phase, ev: events.append((phase, ev)))
    assert events == [("stacked", "start"), ("stacked", "end")]

    with torch.no_grad():
        with user_conditioning(model, users, 1.0):
            kept = call_model(model, *args)
        with user_conditioning(model, torch.zeros_like(users), 1.0):
            dropped = call_model(model, *args)
    model.train()  # dropout applies in training mode only; the tiny UNets have no other randomness
    torch.manual_seed(11)
    with torch.no_grad():
        policy, _ = paired_forward(model, *args, users)
    model.eval()
    for i in range(pairs):
        rows = [i, i + pairs]  # the winner and loser of pair i get the same dropout decision
        is_kept = [bool((policy[r] - kept[r]).abs().max() < 1e-5) for r in rows]
        is_dropped = [bool((policy[r] - dropped[r]).abs().max() < 1e-5) for r in rows]
        assert is_kept in ([True, True], [False, False]) and [not k for k in is_kept] == is_dropped


def test_bad_batches():
    model, _ = _model("sd15")
    batch = tiny_pair_batch(model, 2)
    args = (batch["noisy_latents"], batch["timesteps"], batch["encoder_hidden_states"])
    with pytest.raises(ValueError, match="3 rows; a pair batch has 2B rows"):
        paired_forward(model, args[0][:3], args[1][:3], args[2][:3], None)
    with pytest.raises(ValueError, match="user_embeds has 2 rows, noisy_latents has 4"):
        paired_forward(model, *args, _pair_users(1))
    with pytest.raises(ValueError, match="strategy='fused'"):
        paired_forward(model, *args, None, strategy="fused")
    cascade, _ = _model("cascade")
    cb = tiny_pair_batch(cascade, 1)
    with pytest.raises(TypeError, match="clip_text_pooled"):
        paired_forward(cascade, cb["noisy_latents"], cb["timesteps"], cb["encoder_hidden_states"], None)


def test_bf16_within_twice_pytorch_error():
    """In bf16 both strategies stay within 2x the error of two independent bf16 calls (vs float64)."""
    import copy

    model64, _ = _model("sd15")
    model64 = model64.double()
    model_bf = copy.deepcopy(model64).to(torch.bfloat16)
    pairs = 3
    batch = tiny_pair_batch(model64, pairs, generator=torch.Generator().manual_seed(12))
    users = _pair_users(pairs).double()

    def cast(b, dtype):
        return {k: (v.to(dtype) if k != "kwargs" and v.is_floating_point() else v) for k, v in b.items()}

    pol64, ref64 = _stock(model64, cast(batch, torch.float64), users)
    with torch.no_grad():
        pol_bf, ref_bf = _stock(model_bf, cast(batch, torch.bfloat16), users.bfloat16())
    own = max((pol_bf.double() - pol64).abs().max(), (ref_bf.double() - ref64).abs().max()).item()
    assert own > 0
    b = cast(batch, torch.bfloat16)
    for strategy in ("sequential", "stacked"):
        with torch.no_grad():
            pol, ref = paired_forward(model_bf, b["noisy_latents"], b["timesteps"], b["encoder_hidden_states"],
                                      users.bfloat16(), strategy=strategy)
        err = max((pol.double() - pol64).abs().max(), (ref.double() - ref64).abs().max()).item()
        assert err <= 2 * own, (strategy, err, own)


@pytest.mark.parametrize("family", ["sd15", "cascade"])
def test_gradient_checkpointing(family):
    """Checkpointed blocks re-run the processors during backward, after the conditioning context
    has exited; they must replay the forward's user tokens and shared text K/V."""
    pairs = 2
    grads = {}
    for checkpointing in (False, True):
        model, handle = _model(family)
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        batch = tiny_pair_batch(model, pairs, generator=torch.Generator().manual_seed(13))
        args = (batch["noisy_latents"], batch["timesteps"], batch["encoder_hidden_states"], _pair_users(pairs))
        for strategy in ("sequential", "stacked"):
            policy, _ = paired_forward(model, *args, strategy=strategy, **batch["kwargs"])
            with torch.no_grad():  # an unconditioned call between forward and backward is the base
                base = call_model(model, *args[:3], **batch["kwargs"])
                assert (policy - base).abs().max() > 1e-3
            grads[checkpointing, strategy] = _grads(handle, policy, torch.ones_like(policy))
    for strategy in ("sequential", "stacked"):
        for g, g0 in zip(grads[True, strategy], grads[False, strategy]):
            assert (g - g0).abs().max() <= 1e-5 * g0.abs().max() + 1e-7
