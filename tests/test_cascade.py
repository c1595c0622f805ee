"""Stable Cascade Stage C ("cascade" family) on a tiny random model saved in the published layouts:
the EfficientNet encoder's key layout, the Stage C step's math, training through the CLI with a
bitwise resume, and sampling through prior + Stage B decoder."""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile

import pytest
import torch

from ppd_engine.testing.tiny_cascade import (
    TINY_CASCADE_RESOLUTION,
    TINY_CASCADE_SAMPLE_SIZE,
    save_tiny_effnet,
)

LN2 = math.log(2.0)


@functools.lru_cache(maxsize=None)
def tiny_cascade() -> dict:
    import atexit

    from ppd_engine.testing.tiny_cascade import make_tiny_cascade

    root = tempfile.mkdtemp(prefix="ppd-cascade-")
    atexit.register(shutil.rmtree, root, True)
    return make_tiny_cascade(root)


def _model(resolution: int = TINY_CASCADE_RESOLUTION, effnet: bool = False):
    """A fresh tiny cascade model through the real loader (fresh: tests add adapters to it)."""
    from ppd_engine.cascade import load_cascade_model

    p = tiny_cascade()
    return load_cascade_model(p["prior"], effnet=p["effnet"] if effnet else "", decoder=p["decoder"],
                              dtype=torch.float32, resolution=resolution)


def test_effnet_loads_the_published_layout_and_preprocesses_as_stage_c(tmp_path):
    from safetensors.torch import load_file
    from torchvision.transforms.functional import normalize

    from ppd_engine.cascade import load_effnet

    path = save_tiny_effnet(str(tmp_path / "effnet.safetensors"), seed=3)
    saved = load_file(path)
    assert "mapper.0.weight" in saved and "mapper.1.running_var" in saved and "mapper.1.weight" not in saved
    enc = load_effnet(path)
    state = enc.state_dict()
    for k, v in saved.items():
        assert torch.equal(state[k], v.float()), k
    px = torch.rand(2, 3, 64, 96) * 2 - 1
    lat = enc.encode(px)
    assert lat.shape == (2, 16, 2, 3) and lat.dtype == torch.float32
    # [-1, 1] -> [0, 1] -> ImageNet mean/std -> EfficientNet features -> 1x1 conv -> BatchNorm (running stats).
    x = normalize((px + 1) / 2, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    feats = torch.nn.functional.conv2d(enc.backbone(x), saved["mapper.0.weight"].float())
    want = (feats - saved["mapper.1.running_mean"].float().view(1, -1, 1, 1)) / \
        (saved["mapper.1.running_var"].float().view(1, -1, 1, 1) + 1e-5).sqrt()
    torch.testing.assert_close(lat, want, rtol=1e-5, atol=1e-5)
    # The fingerprint material changes with the weights.
    other = load_effnet(save_tiny_effnet(str(tmp_path / "other.safetensors"), seed=4))
    assert other.config["weights_sha256"] != enc.config["weights_sha256"]


def test_effnet_refuses_a_renamed_key_naming_it(tmp_path):
    from ppd_engine.cascade import EffnetFileError, load_effnet

    bad = save_tiny_effnet(str(tmp_path / "bad.safetensors"), rename=("mapper.1.running_mean", "mapper.1.mean"))
    with pytest.raises(EffnetFileError, match=r"missing keys mapper\.1\.running_mean; unexpected keys mapper\.1\.mean"):
        load_effnet(bad)
    with pytest.raises(FileNotFoundError, match="model.effnet"):
        load_effnet(str(tmp_path / "nope.safetensors"))


def test_loader_reads_the_prior_pipeline_and_counts_published_priors():
    from ppd_engine.cascade import PRIOR_CONFIGS, adapter_param_counts

    m = _model(effnet=True)
    assert type(m.unet).__name__ == "StableCascadeUNet" and m.unet.config.in_channels == 16
    assert not any(p.requires_grad for p in m.unet.parameters())
    cond = m.encode_text(["a cat", "a dog on the sofa"])
    assert cond.states.shape == (2, 77, 32) and cond.pooled.shape == (2, 16)
    assert m.clip_img_dim == 24
    # Decoupled K/V on every attention block: 32 blocks x 2 x 1536^2 (prior_lite, "~150M"), 64 x 2 x 2048^2.
    lite = adapter_param_counts(PRIOR_CONFIGS["prior_lite"], user_dim=1, num_tokens=4)
    full = adapter_param_counts(PRIOR_CONFIGS["prior"], user_dim=1, num_tokens=4)
    assert lite["kv"] == 32 * 2 * 1536 ** 2 == 150_994_944
    assert full["kv"] == 64 * 2 * 2048 ** 2 == 536_870_912


def test_train_help_documents_the_cascade_family():
    from ppd_engine.config.loader import config_help

    text = config_help()
    for key in ("model.family", "model.prior", "model.effnet", "model.decoder"):
        assert key in text
    assert "sd15 | sdxl | cascade" in text and "cascade_pickapic" in text


def _cosine_abar(t: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """Stable Cascade's cosine schedule written out (DDPMWuerstchenScheduler with scaler 1)."""
    f = lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return (f(t) / f(torch.zeros(()))).clamp(1e-4, 0.9999)


def test_stage_c_step_noises_with_continuous_t_and_conditions_like_train_c(monkeypatch):
    import ppd_engine.paired as paired
    from ppd_engine.adapters import add_user_adapters
    from ppd_engine.training.data_order import draw_pairs
    from ppd_engine.training.step import collate, micro_step_loss

    m = _model()
    add_user_adapters(m.unet, user_dim=24, in_tokens=2)
    cond = m.encode_text(["a cat", "a dog", "a tree"])
    g = torch.Generator().manual_seed(0)
    items = [{"latents_w": torch.randn(16, 4, 4, generator=g), "latents_l": torch.randn(16, 4, 4, generator=g),
              "text": cond.states[i % 3], "pooled": cond.pooled[i % 3], "user_id": "u", "pair_id": str(i)}
             for i in range(4)]
    batch = collate(items, torch.device("cpu"))
    draws = draw_pairs(0, 0, list(range(4)), (16, 4, 4), m.num_train_timesteps, 0.0, 0.0, torch.device("cpu"))
    draws.drop_caption = torch.tensor([True, False, False, True])
    embeds = torch.randn(4, 2, 24)
    seen = {}
    real = paired.paired_forward

    def spy(unet, noisy, t, text, user, **kw):
        seen.update(noisy=noisy, t=t, text=text, kw=kw)
        return real(unet, noisy, t, text, user, **kw)

    monkeypatch.setattr(paired, "paired_forward", spy)
    empty = m.encode_text([""])
    for weighting in ("uniform", "min_snr"):
        loss, stats = micro_step_loss(m, batch, draws, embeds, empty.states, empty.pooled, loss_name="dpo",
                                      beta=5000.0, weighting=weighting, snr_gamma=5.0, loss_options={},
                                      strategy="sequential", autocast_dtype=None)
        assert loss.item() == pytest.approx(LN2, abs=1e-6) and stats.model_mse == stats.ref_mse
    t = seen["t"]
    assert t.dtype == torch.float32 and torch.equal(t[:4], t[4:]) and ((t >= 0) & (t < 1)).all()
    assert len(set(t[:4].tolist())) == 4 and torch.equal(t[:4], draws.timesteps.float() / 2 ** 24)
    abar = _cosine_abar(t.double()).view(-1, 1, 1, 1)
    x0 = torch.cat([batch["latents_w"], batch["latents_l"]]).double()
    want = abar.sqrt() * x0 + (1 - abar).sqrt() * torch.cat([draws.noise, draws.noise]).double()
    torch.testing.assert_close(seen["noisy"].double(), want, rtol=1e-5, atol=1e-5)
    # Min-SNR-gamma on the cosine schedule, eps target: min(SNR, 5) / SNR with SNR = abar / (1 - abar).
    snr = abar[:4].flatten() / (1 - abar[:4].flatten())
    torch.testing.assert_close(m.snr_weight(draws.timesteps, 5.0).double(), snr.clamp(max=5.0) / snr,
                               rtol=1e-5, atol=1e-6)
    kw = seen["kw"]
    assert not {"added_cond_kwargs", "timestep_ratio"} & set(kw) and kw["clip_text_pooled"].shape == (8, 1, 16)
    assert torch.equal(kw["clip_img"], torch.zeros(8, 1, 24))
    for i, dropped in enumerate(draws.drop_caption.tolist()):
        want_text = empty.states[0] if dropped else batch["text"][i]
        want_pooled = empty.pooled[0] if dropped else batch["pooled"][i]
        for row in (i, i + 4):
            assert torch.equal(seen["text"][row], want_text)
            assert torch.equal(kw["clip_text_pooled"][row, 0], want_pooled)


def _rows(run):
    with open(os.path.join(run, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


@pytest.mark.slow
def test_cascade_pickapic_cli_trains_resumes_bitwise_and_samples(tmp_path):
    """cascade_pickapic preset through main(): cache build -> 3 steps -> checkpoint -> resume bitwise;
    then the run samples through prior + decoder, and its gate-0 outputs are the base's."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ppd_engine.adapters import user_conditioning
    from ppd_engine.cache.store import read_index
    from ppd_engine.embed.store import EmbeddingStore
    from ppd_engine.sampling import generate
    from ppd_engine.testing.pickapic_fixture import write_fixture_with_embeddings
    from ppd_engine.train import main
    from ppd_engine.training import load_run

    p = tiny_cascade()
    data, store_path, users = write_fixture_with_embeddings(str(tmp_path))
    store = EmbeddingStore(store_path)
    g = torch.Generator().manual_seed(0)
    common = [f"data.folder={data}", f"data.embeddings={store_path}",
              f"model.pretrained={p['prior']}", "model.prior=prior", f"model.effnet={p['effnet']}", f"model.decoder={p['decoder']}",
              "model.dtype=fp32", "model.resolution=64", f"cache.dir={tmp_path / 'cache'}", "data.unseen_fraction=0.2",
              "train.pairs_per_step=4", "train.micro_batch=2", "train.mixed_precision=fp32",
              "train.gradient_checkpointing=false", "train.empty_caption_prob=0.3", "train.user_dropout=0.3",
              "optim.lr=1e-3", "optim.warmup_steps=1", "optim.min_8bit_size=256", "log.tensorboard=false",
              "log.progress=false", "log.sample_every=0", "checkpoint.every=1", "checkpoint.keep_last=5"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["--config", "cascade_pickapic", *common, f"log.run_dir={full}", "train.max_steps=3",
                 "log.sample_every=3", "log.sample_steps=2", "log.sample_users=1", "log.sample_prompts=[a cat]"]) == 0
    from PIL import Image

    # The training sample grid through prior + Stage B: the base model, 1 user and the zero embedding,
    # 16 px images, 2 px gaps.
    with Image.open(full / "samples" / "step-3.png") as im:
        assert im.size == (18 + 2, 3 * 18 + 2) and im.mode == "RGB"
    meta = read_index(str(tmp_path / "cache"))["meta"]
    assert meta["family"] == "cascade" and meta["vae_config"]["class"] == "EfficientNetEncoder"
    rows = _rows(full)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss"] == pytest.approx(LN2, abs=1e-7) and rows[0]["model_mse"] == rows[0]["ref_mse"]
    assert rows[-1]["model_mse"] != rows[-1]["ref_mse"]
    # Interrupted after step 1, resumed to 3: bitwise the same adapters and losses.
    assert main(["--config", "cascade_pickapic", *common, f"log.run_dir={cut}", "train.max_steps=1"]) == 0
    assert main(["--config", "cascade_pickapic", *common, f"log.run_dir={cut}", "train.max_steps=3",
                 "checkpoint.resume=latest"]) == 0
    a = load_file(str(full / "checkpoints" / "step-3" / "adapters.safetensors"))
    b = load_file(str(cut / "checkpoints" / "step-3" / "adapters.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [(r["loss"], r["grad_norm"]) for r in _rows(cut)] == [(r["loss"], r["grad_norm"]) for r in rows]
    assert max(v.abs().max().item() for k, v in a.items() if "to_v_ip" in k) > 0

    with safe_open(str(full / "checkpoints" / "step-3" / "adapters.safetensors"), "pt") as f:
        saved = json.loads(f.metadata()["ppd_user_adapters"])
    assert saved["model_class"] == "StableCascadeUNet" and saved["user_dim"] == 24
    _, trained = load_run(str(full))
    base = _model(64)
    x = torch.randn(2, 16, 2, 2, generator=g)
    ratio = torch.tensor([0.3, 0.8])
    kw = base.denoiser_kwargs(base.encode_text(["a", "b"]).pooled, None)
    text = base.encode_text(["a", "b"]).states
    with user_conditioning(trained.unet, torch.randn(2, 1, 24, generator=g), gate=0.0):
        gated = trained.unet(x, ratio, clip_text=text, **kw).sample
    assert torch.equal(gated, base.unet(x, ratio, clip_text=text, **kw).sample)

    u0, u1 = store.get(users[0]), store.get(users[1])
    side = 64 // 32 * 2 * 4  # Stage C 2x2 -> latent_dim_scale 2 -> Paella VQ x4
    user = generate(trained, ["a cat", "a dog"], torch.stack([u0[0], u1[0]]), [1, 2], steps=2, guidance=3.0)
    mix = generate(trained, ["a cat"], (0.5 * u0[0] + 0.5 * u1[0])[None], [1], steps=2, guidance=3.0,
                   user_guidance=1.0)
    plain = generate(trained, ["a cat", "a dog"], None, [1, 2], steps=2, guidance=3.0)
    for imgs, n in ((user, 2), (mix, 1), (plain, 2)):
        assert imgs.shape == (n, 3, side, side) and imgs.min() >= 0 and imgs.max() <= 1
    # The base is the same prior with the branch off: a model without adapters samples the same images.
    torch.testing.assert_close(plain, generate(base, ["a cat", "a dog"], None, [1, 2], steps=2, guidance=3.0),
                               rtol=0, atol=0)
    assert not torch.equal(user, plain)


def test_sampling_prior_and_decoder_returns_rgb_of_the_requested_size():
    from ppd_engine.adapters import add_user_adapters
    from ppd_engine.sampling import generate

    m = _model()
    base = generate(m, ["a cat", "a red dog"], None, [5, 6], steps=3, guidance=4.0)
    assert base.shape == (2, 3, TINY_CASCADE_SAMPLE_SIZE, TINY_CASCADE_SAMPLE_SIZE)
    # Each image from its own seed: alone in a batch it comes out the same.
    torch.testing.assert_close(generate(m, ["a red dog"], None, [6], steps=3, guidance=4.0), base[1:],
                               rtol=1e-4, atol=1e-4)
    add_user_adapters(m.unet, user_dim=8)
    with torch.no_grad():
        for name, p in m.unet.named_parameters():
            if "to_v_ip" in name:
                p.normal_(0, 0.5)
    u = torch.randn(2, 1, 8, generator=torch.Generator().manual_seed(0))
    user = generate(m, ["a cat", "a red dog"], u, [5, 6], steps=3, guidance=4.0, user_guidance=2.0)
    mix = generate(m, ["a cat"], 0.5 * (u[:1] + u[1:]), [5], steps=3, guidance=4.0)
    assert user.shape == base.shape and mix.shape == (1, 3, TINY_CASCADE_SAMPLE_SIZE, TINY_CASCADE_SAMPLE_SIZE)
    assert not torch.allclose(user, base)
    assert torch.equal(generate(m, ["a cat", "a red dog"], None, [5, 6], steps=3, guidance=4.0), base)
    with pytest.raises(ValueError, match="'ddim' only"):
        generate(m, ["a cat"], None, [5], steps=2, sampler="dpm")


def test_cache_build_cli_builds_the_cascade_cache_training_reuses(tmp_path, capsys, monkeypatch):
    """`python -m ppd_engine.cache.build --family cascade` (it offered sd15/sdxl only): the cache it
    writes is the one the cascade family's training build finds complete (same fingerprint); with
    --no-progress the libraries' loading bars stay off too."""
    import importlib

    import diffusers.utils.logging
    import transformers.utils.logging

    # --no-progress turns these process-wide switches off; put them back after the test.
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    monkeypatch.setattr(diffusers.utils.logging, "_tqdm_active", True)
    monkeypatch.setattr(transformers.utils.logging, "_tqdm_active", True)
    monkeypatch.setattr(importlib.import_module("huggingface_hub.utils.tqdm"), "progress_bar_states", {})
    from ppd_engine.cache import build_cache
    from ppd_engine.cache.build import main
    from ppd_engine.cache.store import read_index
    from ppd_engine.data.pickapic import load_pairs
    from ppd_engine.testing.pickapic_fixture import write_pickapic_fixture

    p = tiny_cascade()
    data = str(tmp_path / "data")
    write_pickapic_fixture(data)
    cache = str(tmp_path / "cache")
    common = ["--family", "cascade", "--pretrained", p["prior"], "--data", data, "--cache-dir", cache,
              "--resolution", "64", "--workers", "0", "--no-progress", "--device", "cpu"]
    assert main(common) == 2 and "--family cascade needs --effnet" in capsys.readouterr().err
    assert main([*common, "--effnet", p["effnet"]]) == 0
    out = capsys.readouterr()
    assert "images encoded" in out.out
    assert "Loading pipeline components" not in out.err and "it/s]" not in out.err, out.err[-500:]
    assert read_index(cache)["meta"]["family"] == "cascade"
    pairs = load_pairs(data, load_images=False, progress=False)
    again = build_cache(_model(64, effnet=True), pairs.records, cache, resolution=64, progress=False,
                        images=pairs.image_reader(), on_mismatch="raise")
    assert again.images_encoded == 0 and again.images_reused > 0 and again.texts_encoded == 0
    # A cache built with other settings, under --no-rebuild: one line naming what differs, exit 2
    # (CacheMismatchError was a RuntimeError, so the command died with a traceback).
    capsys.readouterr()
    assert main([*common, "--effnet", p["effnet"], "--no-flip", "--no-rebuild"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "(changed: flip)" in last and "Traceback" not in err


def test_cascade_samples_the_height_and_width_asked():
    """--height/--width reach Stage C: latents of ceil(pixels / (latent_dim_scale x VQ upscale)) each
    way (the tiny decoder: 2 x 4 = 8 px per latent), non-square too (it refused any size but
    model.resolution's)."""
    from ppd_engine.sampling import generate

    m = _model()
    assert m.stage_c_size(None, None) == (m.latent_side, m.latent_side)
    assert m.stage_c_size(16, 24) == (2, 3) and m.stage_c_size(17, 24) == (3, 3)
    wide = generate(m, ["a cat", "a dog"], None, [5, 6], steps=2, guidance=4.0, height=16, width=24)
    assert wide.shape == (2, 3, 16, 24) and torch.isfinite(wide).all()
    tall = generate(m, ["a cat"], None, [5], steps=2, guidance=4.0, height=32)
    assert tall.shape == (1, 3, 32, TINY_CASCADE_SAMPLE_SIZE)
    with pytest.raises(ValueError, match="width=0"):
        m.stage_c_size(16, 0)
