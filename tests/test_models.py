"""Model families loaded from tiny pipelines saved with save_pretrained (the real loading path, offline)."""

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ppd_engine.models import DiffusionModel, TextConditioning, load_diffusion_model, make_time_ids
from ppd_engine.testing.tiny_pipelines import make_tiny_pipeline

CAPTIONS = ["the cat and a dog", "", "a photo of 3 red balloons over the sea"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {fam: make_tiny_pipeline(fam, str(root / fam), seed=1) for fam in ("sd15", "sdxl")}


def _ids(folder, sub, captions):
    tok = CLIPTokenizer.from_pretrained(folder, subfolder=sub)
    return tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def _frozen(module):
    return not module.training and not any(p.requires_grad for p in module.parameters())


def test_sd15_from_folder(folders):
    m = load_diffusion_model("sd15", folders["sd15"])
    assert isinstance(m, DiffusionModel) and m.family == "sd15" and m.source == folders["sd15"]
    assert m.resolution == 32 and m.latent_scale == pytest.approx(0.18215)
    assert isinstance(m.noise_scheduler, DDPMScheduler) and m.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert _frozen(m.unet) and _frozen(m.vae)
    cond = m.encode_text(CAPTIONS)
    assert isinstance(cond, TextConditioning) and cond.pooled is None
    assert cond.states.shape == (3, 77, 32) and not cond.states.requires_grad
    te = CLIPTextModel.from_pretrained(folders["sd15"], subfolder="text_encoder")
    with torch.no_grad():
        want = te(_ids(folders["sd15"], "tokenizer", CAPTIONS)).last_hidden_state
    torch.testing.assert_close(cond.states, want)
    assert m.added_cond(None, None) is None
    with pytest.raises(TypeError, match="list of captions"):
        m.encode_text("a single string")


def test_sdxl_from_folder_both_encoders_and_micro_conditioning(folders):
    f = folders["sdxl"]
    m = load_diffusion_model("sdxl", f)
    assert m.family == "sdxl" and m.resolution == 32 and m.latent_scale == pytest.approx(0.13025)
    cond = m.encode_text(CAPTIONS)
    assert cond.states.shape == (3, 77, 64) and cond.pooled.shape == (3, 16)
    te1 = CLIPTextModel.from_pretrained(f, subfolder="text_encoder")
    te2 = CLIPTextModelWithProjection.from_pretrained(f, subfolder="text_encoder_2")
    with torch.no_grad():
        o1 = te1(_ids(f, "tokenizer", CAPTIONS), output_hidden_states=True)
        o2 = te2(_ids(f, "tokenizer_2", CAPTIONS), output_hidden_states=True)
    # Penultimate layers concatenated, pooled projection of the second encoder (SDXL's convention).
    torch.testing.assert_close(cond.states, torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1))
    torch.testing.assert_close(cond.pooled, o2.text_embeds)
    assert not torch.allclose(cond.states[..., :32], o1.last_hidden_state)

    time_ids = torch.stack([make_time_ids((40, 32), (0, 4), (32, 32))] * 3)
    assert time_ids[0].tolist() == [40, 32, 0, 4, 32, 32]
    added = m.added_cond(cond.pooled, time_ids)
    assert set(added) == {"text_embeds", "time_ids"}
    z = torch.randn(3, 4, 16, 16)
    out = m.unet(z, torch.tensor([1, 500, 999]), cond.states, added_cond_kwargs=added).sample
    assert out.shape == z.shape and torch.isfinite(out).all()
    # The time ids really condition the UNet.
    other = m.unet(z, torch.tensor([1, 500, 999]), cond.states,
                   added_cond_kwargs=m.added_cond(cond.pooled, time_ids * 3)).sample
    assert not torch.allclose(out, other)
    with pytest.raises(ValueError, match="time_ids"):
        m.added_cond(cond.pooled, None)


def test_encode_decode_images_match_the_vae(folders):
    m = load_diffusion_model("sd15", folders["sd15"])
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    z = m.encode_images(x)
    vae = AutoencoderKL.from_pretrained(folders["sd15"], subfolder="vae")
    with torch.no_grad():
        want = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        want_img = (vae.decode(want / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert z.shape == (3, 4, 16, 16) and z.dtype == torch.float32
    torch.testing.assert_close(z, want)
    img = m.decode_latents(z)
    torch.testing.assert_close(img, want_img)
    assert img.min() >= 0 and img.max() <= 1
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        m.encode_images(torch.rand(3, 32, 32))


def test_half_precision_keeps_upcast_vae_in_float32(folders):
    m = load_diffusion_model("sdxl", folders["sdxl"], dtype=torch.float16)
    assert next(m.unet.parameters()).dtype == torch.float16
    assert next(m.vae.parameters()).dtype == torch.float32   # force_upcast in the VAE config
    assert m.encode_text(["a cat"]).states.dtype == torch.float16


def test_bad_family_and_missing_folder(folders, tmp_path):
    with pytest.raises(ValueError, match="'sd15', 'sdxl'"):
        load_diffusion_model("sd3", folders["sd15"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_diffusion_model("sd15", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="text_time"):
        load_diffusion_model("sdxl", _sd15_with_second_encoder(folders, tmp_path))


def _sd15_with_second_encoder(folders, tmp_path):
    """An SD1.5-style folder that also has text_encoder_2/tokenizer_2: loads as SDXL only up to the UNet check."""
    import shutil

    dst = tmp_path / "mixed"
    shutil.copytree(folders["sd15"], dst)
    shutil.copytree(f"{folders['sdxl']}/text_encoder_2", dst / "text_encoder_2")
    shutil.copytree(f"{folders['sdxl']}/tokenizer_2", dst / "tokenizer_2")
    return str(dst)
