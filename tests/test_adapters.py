"""User cross-attention adapters on the three tiny denoiser families: identity, gating, training."""
import logging
import math

import pytest
import torch

from ppd_engine.adapters import add_user_adapters, call_model, get_user_adapters, user_conditioning
from ppd_engine.testing.tiny_unets import FAMILIES, tiny_batch, tiny_unet

USER_DIM = 24


def _run(model, batch):
    return call_model(model, batch["noisy_latents"], batch["timesteps"], batch["encoder_hidden_states"],
                      **batch["kwargs"])


def _perturb(handle, std=0.2, seed=1):
    """Random adapter weights (to_v_ip included) so the user branch has an effect."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def _embeds(rows, t_in, seed=0):
    return torch.randn(rows, t_in, USER_DIM, generator=torch.Generator().manual_seed(seed))


# Every family with the linear projection; the resampler on one SD and the Stage C layout.
CASES = [(f, "linear") for f in FAMILIES] + [("sd15", "resampler"), ("cascade", "resampler")]


@pytest.mark.parametrize("family,projection", CASES)
def test_identity_at_init_and_gate_zero(family, projection):
    model = tiny_unet(family)
    batch = tiny_batch(model, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = _run(model, batch)
    t_in = 5 if projection == "resampler" else 3
    handle = add_user_adapters(model, user_dim=USER_DIM, num_tokens=4, projection=projection, in_tokens=1
                               if projection == "resampler" else t_in)
    u = _embeds(3, t_in)
    with torch.no_grad():
        assert torch.equal(_run(model, batch), base)  # no conditioning active
        with user_conditioning(model, u, 1.0):  # init: to_v_ip = 0 -> policy == reference exactly
            assert torch.equal(_run(model, batch), base)
        _perturb(handle)
        with user_conditioning(model, u, 1.0):
            policy = _run(model, batch)
        with user_conditioning(model, u, 0.0):
            assert torch.equal(_run(model, batch), base)
        with user_conditioning(model, None, 1.0):
            assert torch.equal(_run(model, batch), base)
        with user_conditioning(model, u, torch.tensor([1.0, 0.0, 1.0])):
            mixed = _run(model, batch)
    per_row = (policy - base).flatten(1).abs().amax(1)
    assert (per_row > 1e-3).all(), per_row  # the branch does something for every row
    assert torch.equal(mixed[1], base[1])  # gate-0 row: bit-identical to the base in the same batch
    torch.testing.assert_close(mixed[[0, 2]], policy[[0, 2]], rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_only_adapter_params_train_and_counts_logged(family, caplog):
    model = tiny_unet(family)
    with caplog.at_level(logging.INFO, logger="ppd_engine.adapters.handle"):
        handle = add_user_adapters(model, user_dim=USER_DIM, num_tokens=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in handle.named_parameters()}
    assert {id(p) for p in handle.parameters()} == {id(p) for p in model.parameters() if p.requires_grad}
    counts = handle.parameter_counts()
    assert sum(counts.values()) == sum(p.numel() for p in handle.parameters()) > 1000
    assert "trainable params" in caplog.text and f"{sum(counts.values()):,}" in caplog.text
    cfg = handle.config
    assert cfg["user_dim"] == USER_DIM and cfg["num_tokens"] == 4 and cfg["model_class"] == type(model).__name__
    assert len(cfg["modules"]) == len(handle.processors) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_one_step_changes_policy_not_gate_zero(family):
    model = tiny_unet(family)
    handle = add_user_adapters(model, user_dim=USER_DIM, num_tokens=4, projection="linear")
    batch = tiny_batch(model, 2, generator=torch.Generator().manual_seed(3))
    u = _embeds(2, 1, seed=4)
    with torch.no_grad():
        base = _run(model, batch)
    opt = torch.optim.AdamW(handle.parameters(), lr=1e-2)
    target = torch.randn_like(base)
    # Two steps: at init to_v_ip = 0 blocks the gradient of to_k_ip and the projection.
    for _ in range(2):
        with user_conditioning(model, u, 1.0):
            loss = (_run(model, batch) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is not None for p in handle.parameters())
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    with torch.no_grad():
        with user_conditioning(model, u, 1.0):
            policy = _run(model, batch)
        with user_conditioning(model, u, 0.0):
            gate0 = _run(model, batch)
        with user_conditioning(model, torch.zeros_like(u), 1.0):
            agnostic = _run(model, batch)
    assert (policy - base).abs().max() > 1e-4
    assert torch.equal(gate0, base)
    # A zeroed embedding is the learned user-agnostic condition, not the base.
    assert (agnostic - base).abs().max() > 1e-5


def test_processor_matches_float64_reference():
    """One patched attention layer against the formula, computed in float64."""
    model = tiny_unet("sd15").double()
    handle = add_user_adapters(model, user_dim=USER_DIM, num_tokens=4)
    _perturb(handle)
    name = handle.config["modules"][1]
    attn = model.get_submodule(name)
    proc = handle.processors[name]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 13, attn.to_q.in_features, generator=g, dtype=torch.float64)
    text = torch.randn(3, 9, attn.to_k.in_features, generator=g, dtype=torch.float64)
    u = torch.randn(3, 1, USER_DIM, generator=g, dtype=torch.float64)
    gate = torch.tensor([0.7, 0.0, 1.3], dtype=torch.float64)
    with torch.no_grad(), user_conditioning(model, u, gate):
        out = attn(x, encoder_hidden_states=text)
        tokens = handle.project(u)

    def heads(t):
        return t.view(t.shape[0], t.shape[1], attn.heads, -1).transpose(1, 2)

    def softmax_attn(q, k, v):
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
        return (w @ v).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    with torch.no_grad():
        q = heads(attn.to_q(x))
        text_out = softmax_attn(q, heads(attn.to_k(text)), heads(attn.to_v(text)))
        user_out = softmax_attn(q, heads(proc.to_k_ip(tokens)), heads(proc.to_v_ip(tokens)))
        ref = attn.to_out[0](text_out + gate.view(-1, 1, 1) * user_out)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_gate_forms_scale_and_broadcast():
    model = tiny_unet("sd15")
    handle = add_user_adapters(model, user_dim=USER_DIM, num_tokens=3)
    _perturb(handle)
    batch = tiny_batch(model, 3, generator=torch.Generator().manual_seed(6))
    u = _embeds(3, 1, seed=7)
    with torch.no_grad():
        with user_conditioning(model, u, 0.5):
            half_float = _run(model, batch)
        with user_conditioning(model, u[:, 0], torch.full((3,), 0.5)):  # (B, Du) and tensor gate
            half_tensor = _run(model, batch)
        handle.scale = 0.5
        with user_conditioning(model, u, 1.0):
            half_scale = _run(model, batch)
        handle.scale = 1.0
        with user_conditioning(model, u[:1], 1.0):  # one user for the whole batch
            one = _run(model, batch)
        with user_conditioning(model, u[:1].expand(3, -1, -1), 1.0):
            expanded = _run(model, batch)
    assert torch.equal(half_float, half_tensor)
    assert torch.equal(half_float, half_scale)
    torch.testing.assert_close(one, expanded, rtol=0, atol=1e-5)


def test_fp32_adapters_on_bf16_base():
    model = tiny_unet("sdxl").to(torch.bfloat16)
    batch = tiny_batch(model, 3, generator=torch.Generator().manual_seed(12))
    batch["noisy_latents"] = batch["noisy_latents"].bfloat16()
    batch["encoder_hidden_states"] = batch["encoder_hidden_states"].bfloat16()
    with torch.no_grad():
        base = _run(model, batch)
    handle = add_user_adapters(model, user_dim=USER_DIM, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in handle.parameters()) and handle.config["dtype"] == "float32"
    _perturb(handle)
    u = _embeds(3, 1)
    with torch.no_grad():
        with user_conditioning(model, u, torch.tensor([0.0, 1.0, 1.0])):
            out = _run(model, batch)
    assert out.dtype == torch.bfloat16 and torch.equal(out[0], base[0]) and not torch.equal(out[1], base[1])


def test_embedding_dropout():
    model = tiny_unet("sdxl")
    handle = add_user_adapters(model, user_dim=USER_DIM, num_tokens=4, dropout=0.5)
    _perturb(handle)
    batch = tiny_batch(model, 3, generator=torch.Generator().manual_seed(8))
    u = _embeds(3, 1, seed=9)
    mask = torch.tensor([True, False, True])
    with torch.no_grad():
        with user_conditioning(model, u, 1.0, drop=mask):
            dropped = _run(model, batch)
        with user_conditioning(model, u * (~mask).float().view(-1, 1, 1), 1.0):
            manual = _run(model, batch)
        with user_conditioning(model, u, 1.0):  # eval mode: no dropout by default
            kept = _run(model, batch)
    assert torch.equal(dropped, manual)
    assert not torch.equal(dropped[0], kept[0]) and torch.equal(dropped[1], kept[1])
    model.train()
    torch.manual_seed(0)
    drops = torch.stack([handle.drop_mask(4000)]).float().mean()
    assert abs(drops.item() - 0.5) < 0.05


def test_errors():
    model = tiny_unet("sd15")
    add_user_adapters(model, user_dim=USER_DIM, num_tokens=4)
    batch = tiny_batch(model, 2)
    with pytest.raises(ValueError, match=r"\(B, T_in, 24\).*\(2, 1, 23\)"):
        with user_conditioning(model, torch.randn(2, 1, 23)):
            pass
    with pytest.raises(ValueError, match="3 rows but the model was called with a batch of 2"):
        with torch.no_grad(), user_conditioning(model, _embeds(3, 1)):
            _run(model, batch)
    with pytest.raises(ValueError, match=r"gate must be .* \(2,\) tensor"):
        with user_conditioning(model, _embeds(2, 1), torch.ones(3)):
            pass
    with pytest.raises(ValueError, match="T_in=1"):
        with user_conditioning(model, _embeds(2, 4)):
            pass
    with pytest.raises(ValueError, match="already has user adapters"):
        add_user_adapters(model, user_dim=USER_DIM)
    with pytest.raises(ValueError, match="projection='mlp'"):
        add_user_adapters(tiny_unet("sd15"), user_dim=USER_DIM, projection="mlp")
    with pytest.raises(TypeError, match="user adapters support"):
        add_user_adapters(torch.nn.Linear(3, 3), user_dim=USER_DIM)
    with pytest.raises(ValueError, match="no user adapters"):
        get_user_adapters(tiny_unet("cascade"))


def test_fused_attention_option(monkeypatch):
    """attention='auto' uses ppd::dual_cross_attention where supported; results match SDPA within fp32
    rounding (not bit-exact), also through paired_forward's shared text K/V and for gradients."""
    dual_mod = pytest.importorskip("ppd_engine.ops.dual_attention")
    from ppd_engine.paired import paired_forward
    from ppd_engine.testing.tiny_unets import tiny_pair_batch

    calls = []
    real = dual_mod.dual_cross_attention
    monkeypatch.setattr(dual_mod, "dual_cross_attention", lambda *a, **k: calls.append(a[1].shape[0]) or real(*a, **k))
    sdpa, fused = tiny_unet("sd15"), tiny_unet("sd15")
    h1 = add_user_adapters(sdpa, user_dim=USER_DIM, attention="sdpa")
    h2 = add_user_adapters(fused, user_dim=USER_DIM, attention="auto")
    _perturb(h1)
    fused.load_state_dict(sdpa.state_dict())
    batch = tiny_batch(sdpa, 3, generator=torch.Generator().manual_seed(10))
    u = _embeds(3, 1)
    gate = torch.tensor([1.0, 0.0, 0.6])
    with torch.no_grad():
        with user_conditioning(sdpa, u, gate):
            a = _run(sdpa, batch)
        with user_conditioning(fused, u, gate):
            b = _run(fused, batch)
    assert len(calls) == len(h2.processors)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)

    pairs = tiny_pair_batch(sdpa, 2, generator=torch.Generator().manual_seed(11))
    users = _embeds(2, 1).repeat(2, 1, 1)
    args = (pairs["noisy_latents"], pairs["timesteps"], pairs["encoder_hidden_states"], users)
    calls.clear()
    (pa, ra), (pb, rb) = paired_forward(sdpa, *args), paired_forward(fused, *args)
    assert calls == [2] * len(h2.processors)  # text K/V of the 2 distinct captions, no copies
    torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rb, ra, rtol=0, atol=0)  # reference rows take the stock SDPA path
    w = torch.randn_like(pa)
    ga = torch.autograd.grad((pa * w).sum(), list(h1.parameters()))
    gb = torch.autograd.grad((pb * w).sum(), list(h2.parameters()))
    for x, y in zip(ga, gb):
        assert (x - y).abs().max() <= 1e-4 * y.abs().max() + 1e-6
    calls.clear()
    pc, rc = paired_forward(fused, *args, strategy="stacked")  # user rows padded with gate 0
    assert calls == [2] * len(h2.processors)
    torch.testing.assert_close(pc, pa, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rc, ra, rtol=1e-5, atol=1e-5)
