"""ppd_engine.pipelines.from_run: a stock diffusers pipeline with the run's adapters gives the
images of the engine's own sampler for the same seeds, scheduler, steps and guidance."""
import pytest
import torch

from ppd_engine.pipelines import from_run
from ppd_engine.testing.tiny_runs import make_tiny_run


def _engine(run, embedding, prompt, seeds, steps, guidance, sampler, negative="", user_scale=1.0):
    import ppd_engine.worlds  # noqa: F401
    from ppd_engine.sampling import generate
    from ppd_engine.training import load_run

    _, model = load_run(run)
    embeds = embedding[None].expand(len(seeds), -1, -1).contiguous()
    return generate(model, [prompt] * len(seeds), embeds, seeds, steps=steps, guidance=guidance, sampler=sampler,
                    negative_prompt=negative, user_scale=user_scale)


@pytest.mark.parametrize("family,projection,scale,sampler", [("sd15", "linear", 0.8, "ddim"),
                                                            ("sdxl", "resampler", 1.0, "dpm")])
def test_from_run_matches_engine_sampler(tmp_path, family, projection, scale, sampler):
    from ppd_engine.config import load_config
    from ppd_engine.training.run import run_user_embedding

    run = make_tiny_run(tmp_path / "run", family, projection=projection, scale=scale)
    cfg = load_config(run / "config.yaml", runnable=False)
    seeds, steps, guidance, prompt = [3, 4], 4, 3.0, "a red cat"
    for who in ({"user": "alice"}, {"mix": [("alice", 0.7), ("bob", 0.3)]}):
        pipe, embeds = from_run(run, **who, scheduler=sampler)
        assert type(pipe).__name__ == ("StableDiffusionPipeline" if family == "sd15" else "StableDiffusionXLPipeline")
        pipe.set_progress_bar_config(disable=True)
        got = pipe(prompt, negative_prompt="", ip_adapter_image_embeds=embeds, num_inference_steps=steps,
                   guidance_scale=guidance, num_images_per_prompt=len(seeds), output_type="pt",
                   generator=[torch.Generator().manual_seed(s) for s in seeds]).images
        want = _engine(run, run_user_embedding(run, cfg, **who), prompt, seeds, steps, guidance, sampler)
        torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-4)
    # IP-Adapter scale x on the export (training scale folded in) = the engine's user_scale x.
    pipe.set_ip_adapter_scale(0.5)
    half = pipe(prompt, negative_prompt="", ip_adapter_image_embeds=embeds, num_inference_steps=steps,
                guidance_scale=guidance, num_images_per_prompt=len(seeds), output_type="pt",
                generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    want = _engine(run, run_user_embedding(run, cfg, **who), prompt, seeds, steps, guidance, sampler, user_scale=0.5)
    torch.testing.assert_close(half.float(), want, rtol=1e-4, atol=1e-4)
    # The user branch acts: without it (IP-Adapter scale 0) the same call gives other images.
    pipe.set_ip_adapter_scale(0.0)
    base = pipe(prompt, negative_prompt="", ip_adapter_image_embeds=embeds, num_inference_steps=steps,
                guidance_scale=guidance, num_images_per_prompt=len(seeds), output_type="pt",
                generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    assert (base - got).abs().max() > 1e-3


def test_from_run_errors(tmp_path):
    run = make_tiny_run(tmp_path / "run", "sd15")
    with pytest.raises(KeyError, match="'carol' is not in"):
        from_run(run, user="carol")
    with pytest.raises(FileNotFoundError, match="step-9"):
        from_run(run, user="alice", checkpoint="step-9")
    with pytest.raises(ValueError, match="scheduler 'Nope'"):
        from_run(run, user="alice", scheduler="Nope")
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        from_run(tmp_path, user="alice")
