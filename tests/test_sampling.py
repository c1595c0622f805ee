"""ppd_engine.sampling.generate: guidance arithmetic against a hand-written DDIM loop, per-seed
noise, the user branch (None / scale 0 = base), user guidance, errors."""

import pytest
import torch
from diffusers import DDIMScheduler

from ppd_engine.adapters import add_user_adapters, user_conditioning
from ppd_engine.sampling import generate, initial_noise
from ppd_engine.worlds.toy.model import build_components, make_diffusion_model

PROMPTS = ["a circle", "a ring", "a cross"]


def _model(seed=0, adapters=False, user_dim=6, in_tokens=3):
    unet, text, sched = build_components(image_size=8, text_dim=16, seed=seed)
    model = make_diffusion_model(unet, text, sched)
    if adapters:
        add_user_adapters(model.unet, user_dim=user_dim, num_tokens=2, in_tokens=in_tokens)
        # Fresh adapters may start near-silent; random weights make the user branch visible.
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for n, p in model.unet.named_parameters():
                if "ppd_user_proj" in n or "processor" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        model.unet.requires_grad_(False)
    return model


def _reference(model, prompts, seeds, steps, guidance, user=None, user_guidance=0.0):
    """Plain DDIM (trailing spacing) with one UNet call per branch, no batching tricks."""
    sched = DDIMScheduler.from_config(dict(model.noise_scheduler.config), timestep_spacing="trailing",
                                      set_alpha_to_one=False)
    sched.set_timesteps(steps)
    x = initial_noise(seeds, 3, model.resolution)
    cond = model.encode_text(prompts).states
    empty = model.encode_text([""] * len(prompts)).states

    def eps(states, u, xt, t):
        if u is None:
            return model.unet(xt, t, encoder_hidden_states=states).sample
        with user_conditioning(model.unet, u, drop=False):
            return model.unet(xt, t, encoder_hidden_states=states).sample

    with torch.no_grad():
        for t in sched.timesteps:
            e_c = eps(cond, user, x, t)
            e = eps(empty, user, x, t) + guidance * (e_c - eps(empty, user, x, t))
            if user_guidance:
                e = e + user_guidance * (e_c - eps(cond, torch.zeros_like(user), x, t))
            x = sched.step(e, t, x).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)


def test_text_guidance_matches_reference_loop_and_seeds_are_per_sample():
    model = _model()
    seeds = [11, 3, 7]
    out = generate(model, PROMPTS, None, seeds, steps=4, guidance=3.0)
    assert out.shape == (3, 3, 8, 8) and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    torch.testing.assert_close(out, _reference(model, PROMPTS, seeds, 4, 3.0), rtol=0, atol=1e-4)
    # An image depends on its own seed and prompt only, not on the batch around it.
    one = generate(model, PROMPTS, None, seeds, steps=4, guidance=3.0, batch_size=1)
    torch.testing.assert_close(one, out, rtol=0, atol=1e-5)
    torch.testing.assert_close(generate(model, PROMPTS[1:2], None, seeds[1:2], steps=4, guidance=3.0), out[1:2],
                               rtol=0, atol=1e-5)
    assert not torch.allclose(out[0], out[1])
    # guidance 1 skips the empty-caption branch: equal to pure conditional sampling.
    torch.testing.assert_close(generate(model, PROMPTS, None, seeds, steps=4, guidance=1.0),
                               _reference(model, PROMPTS, seeds, 4, 1.0), rtol=0, atol=1e-4)


def test_dpm_sampler_runs_deterministically():
    from diffusers import DPMSolverMultistepScheduler

    from ppd_engine.sampling import make_scheduler

    model = _model(seed=1)
    sched = make_scheduler(model.noise_scheduler.config, "dpm")
    assert isinstance(sched, DPMSolverMultistepScheduler) and sched.config.algorithm_type == "dpmsolver++"
    a = generate(model, PROMPTS[:2], None, [0, 1], steps=5, guidance=2.0, sampler="dpm")
    assert a.shape == (2, 3, 8, 8) and torch.isfinite(a).all()
    torch.testing.assert_close(generate(model, PROMPTS[:2], None, [0, 1], steps=5, guidance=2.0, sampler="dpm"), a,
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="scheduler 'euler'.*EulerDiscreteScheduler"):
        generate(model, PROMPTS[:1], None, [0], steps=2, sampler="euler")


def test_user_branch_guidance_and_scale():
    plain = _model(seed=2)
    model = _model(seed=2, adapters=True)
    seeds = [5, 6, 7]
    u = torch.randn(3, 3, 6)
    base = generate(plain, PROMPTS, None, seeds, steps=3, guidance=2.0)
    # No user (None) and a zero-strength branch are exactly the base model.
    torch.testing.assert_close(generate(model, PROMPTS, None, seeds, steps=3, guidance=2.0), base, rtol=0, atol=1e-6)
    torch.testing.assert_close(generate(model, PROMPTS, u, seeds, steps=3, guidance=2.0, user_scale=0.0), base,
                               rtol=0, atol=1e-6)
    with_user = generate(model, PROMPTS, u, seeds, steps=3, guidance=2.0)
    assert (with_user - base).abs().max() > 1e-3
    torch.testing.assert_close(with_user, _reference(model, PROMPTS, seeds, 3, 2.0, user=u), rtol=0, atol=1e-4)
    ug = generate(model, PROMPTS, u, seeds, steps=3, guidance=2.0, user_guidance=1.5)
    torch.testing.assert_close(ug, _reference(model, PROMPTS, seeds, 3, 2.0, user=u, user_guidance=1.5),
                               rtol=0, atol=1e-4)
    assert (ug - with_user).abs().max() > 1e-4
    # The scale is restored after the call.
    from ppd_engine.adapters import get_user_adapters
    generate(model, PROMPTS, u, seeds, steps=1, user_scale=0.3)
    assert get_user_adapters(model.unet).scale == 1.0


def test_generate_errors():
    model = _model()
    with pytest.raises(ValueError, match="seeds"):
        generate(model, PROMPTS, None, [1, 2], steps=2)
    with pytest.raises(ValueError, match="no user adapters"):
        generate(model, PROMPTS, torch.randn(3, 3, 6), [1, 2, 3], steps=2)
    with pytest.raises(ValueError, match="user_guidance"):
        generate(model, PROMPTS, None, [1, 2, 3], steps=2, user_guidance=1.0)
    with pytest.raises(ValueError, match=r"\(N=3"):
        generate(_model(adapters=True), PROMPTS, torch.randn(2, 3, 6), [1, 2, 3], steps=2)
    with pytest.raises(ValueError, match="steps"):
        generate(model, PROMPTS, None, [1, 2, 3], steps=0)


def test_user_scale_multiplies_the_trained_scale_as_an_export_does():
    """A run trained with adapters.scale = s: user_scale x samples at strength x * s, continuous in
    x (it used to REPLACE s for every x but 1, so 1.0 gave s and 1.001 gave 1.001), and the same
    as stock diffusers' set_ip_adapter_scale(x) on the export, where s is folded in."""
    from ppd_engine.adapters import get_user_adapters

    model = _model(seed=3, adapters=True)
    handle = get_user_adapters(model.unet)
    seeds, u = [1, 2], torch.randn(2, 3, 6)
    handle.scale = 0.5                                       # the trained strength s
    half = generate(model, PROMPTS[:2], u, seeds, steps=2, guidance=2.0)
    doubled = generate(model, PROMPTS[:2], u, seeds, steps=2, guidance=2.0, user_scale=2.0)
    near = generate(model, PROMPTS[:2], u, seeds, steps=2, guidance=2.0, user_scale=1.0 + 1e-6)
    assert handle.scale == 0.5                               # restored
    handle.scale = 1.0
    full = generate(model, PROMPTS[:2], u, seeds, steps=2, guidance=2.0)
    torch.testing.assert_close(doubled, full, rtol=0, atol=1e-6)             # 2 x 0.5 = 1
    torch.testing.assert_close(near, half, rtol=0, atol=1e-4)                # no jump next to 1
    assert (full - half).abs().max() > 1e-3
