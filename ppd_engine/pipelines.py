"""Stock diffusers pipelines from a run, with the user adapters loaded as an IP-Adapter.

    from ppd_engine.pipelines import from_run
    pipe, embeds = from_run("runs/sd15", user="alice")
    image = pipe("a photo of a cat", ip_adapter_image_embeds=embeds, guidance_scale=5.0).images[0]

The pipeline is the plain `StableDiffusionPipeline` / `StableDiffusionXLPipeline` of the run's base
(model.pretrained), its scheduler the engine's sampler (`ppd_engine.sampling.make_scheduler`), its
IP-Adapter the run's adapters converted in memory (`ppd_engine.adapters.ip_adapter_state_dict`, the
same tensors `ppd export` writes). `embeds` is the `ip_adapter_image_embeds` list for the chosen
user or mix, stacked for classifier-free guidance (the user in both halves, as the engine's sampler
does); with guidance_scale <= 1 build it with `cfg=False`. With the same seed (one generator per
image), scheduler, steps and guidance it gives the images of `ppd_engine.sampling.generate`
(tests/test_pipelines.py). SDXL: pass negative_prompt="" as the engine does (the stock SDXL
pipeline otherwise zeroes the negative text embedding).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

PIPELINE_CLASSES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


def from_run(run_dir: str | os.PathLike, user: str | None = None, *, mix: list[tuple[str, float]] | None = None,
             embedding: torch.Tensor | None = None, checkpoint: str = "latest", scheduler: str = "ddim",
             cfg: bool = True, device: str | torch.device = "cpu", torch_dtype: torch.dtype = torch.float32):
    """(pipeline, ip_adapter_image_embeds) for a run of an sd15 / sdxl base.

    Args:
        run_dir: the run folder (config.yaml, checkpoints/).
        user / mix / embedding: whom to generate for: a user of the run's store, a weighted mix
            [(name, weight), ...], or an embedding (T_in, Du); none of them: embeds is None (a
            pipeline with an IP-Adapter still needs embeds; `pipe.set_ip_adapter_scale(0)` with any
            user's embeds gives the base model).
        checkpoint: "latest", "step-N" inside the run, or a step-N folder.
        scheduler: "ddim" / "dpm" (the engine's settings) or a diffusers scheduler class name.
        cfg: embeds for classifier-free guidance (guidance_scale > 1) or not.
    """
    import diffusers

    from ppd_engine.adapters import ip_adapter_input, ip_adapter_state_dict, read_user_adapters
    from ppd_engine.config import load_config
    from ppd_engine.sampling import make_scheduler
    from ppd_engine.training.checkpoint import resolve_checkpoint
    from ppd_engine.training.run import run_user_embedding

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.yaml)")
    import ppd_engine.worlds  # noqa: F401  (the run's world section must be known to read its config)

    run_cfg = load_config(run_dir / "config.yaml", runnable=False)
    family = run_cfg.model.family
    if family not in PIPELINE_CLASSES:
        raise ValueError(f"model.family={family!r} has no stock diffusers pipeline; from_run serves "
                         f"{', '.join(f'{k} ({v})' for k, v in PIPELINE_CLASSES.items())}")
    config, tensors = read_user_adapters(resolve_checkpoint(run_dir, checkpoint) / "adapters.safetensors")
    pretrained = os.path.expanduser(run_cfg.model.pretrained)
    cls = getattr(diffusers, PIPELINE_CLASSES[family])
    extra = {"safety_checker": None, "requires_safety_checker": False} if family == "sd15" else {}
    pipe = cls.from_pretrained(pretrained, torch_dtype=torch_dtype, use_safetensors=True,
                               local_files_only=os.path.isdir(pretrained), **extra)
    pipe.scheduler = make_scheduler(pipe.scheduler.config, scheduler)
    pipe.load_ip_adapter(ip_adapter_state_dict(config, tensors, pipe.unet), subfolder="", weight_name="",
                         image_encoder_folder=None)
    pipe.to(device)

    if embedding is None and (user is not None or mix is not None):
        embedding = run_user_embedding(run_dir, run_cfg, user=user, mix=mix)
    embeds = None
    if embedding is not None:
        embeds = [ip_adapter_input(embedding, config, cfg=cfg).to(device=device, dtype=torch_dtype)]
    return pipe, embeds
