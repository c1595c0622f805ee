"""Adapter files: save -> load round trip, named errors, and the diffusers IP-Adapter export."""
import json
import os
import string

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ppd_engine.adapters import (AdapterFileError, add_user_adapters, call_model, export_ip_adapter,
                                 export_problem, ip_adapter_input, load_user_adapters, save_user_adapters, user_conditioning)
from ppd_engine.testing.tiny_unets import tiny_batch, tiny_unet

USER_DIM = 24


def _trained(family, seed=1, **kw):
    model = tiny_unet(family)
    handle = add_user_adapters(model, user_dim=USER_DIM, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model, handle


def _out(model, batch, u):
    with torch.no_grad(), user_conditioning(model, u, 1.0):
        return call_model(model, batch["noisy_latents"], batch["timesteps"], batch["encoder_hidden_states"],
                          **batch["kwargs"])


@pytest.mark.parametrize("family,projection,t_in", [("sd15", "linear", 1), ("sdxl", "resampler", 5),
                                                    ("cascade", "linear", 3)])
def test_save_load_roundtrip(tmp_path, family, projection, t_in):
    kw = {"in_tokens": t_in} if projection == "linear" else {}
    model, handle = _trained(family, projection=projection, num_tokens=3, scale=0.8, **kw)
    path = tmp_path / "user.safetensors"
    save_user_adapters(model, path)
    assert os.listdir(tmp_path) == ["user.safetensors"]  # the temporary file was renamed away
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["ppd_user_adapters"])
    assert meta["user_dim"] == USER_DIM and meta["num_tokens"] == 3 and meta["projection"] == projection
    assert meta["model_class"] == type(model).__name__ and meta["modules"] == list(handle.processors)

    batch = tiny_batch(model, 3, generator=torch.Generator().manual_seed(2))
    u = torch.randn(3, t_in, USER_DIM)
    expected = _out(model, batch, u)
    fresh = tiny_unet(family)
    loaded = load_user_adapters(fresh, path)  # adds the adapters from the file's config
    assert loaded.config == handle.config
    assert torch.equal(_out(fresh, batch, u), expected)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(dict(handle.named_parameters()))
    # into a model that already has (different) adapters of the same config
    other, _ = _trained(family, seed=9, projection=projection, num_tokens=3, scale=0.8, **kw)
    load_user_adapters(other, path)
    assert torch.equal(_out(other, batch, u), expected)


def _rewrite(src, dst, edit):
    with safe_open(src, "pt") as f:
        meta = f.metadata()
    tensors = load_file(src)
    edit(tensors)
    save_file(tensors, dst, metadata=meta)


def test_named_errors(tmp_path):
    model, handle = _trained("sd15")
    good = tmp_path / "good.safetensors"
    save_user_adapters(model, good)
    key = next(n for n, _ in handle.named_parameters() if n.endswith("to_v_ip.weight"))
    shape = tuple(dict(handle.named_parameters())[key].shape)

    bad = tmp_path / "missing.safetensors"
    _rewrite(good, bad, lambda t: t.pop(key))
    expects = rf"\(model expects shape \({shape[0]}, {shape[1]}\)\)"
    with pytest.raises(AdapterFileError, match=rf"missing key '{key}' {expects}"):
        load_user_adapters(tiny_unet("sd15"), bad)

    bad = tmp_path / "unexpected.safetensors"
    _rewrite(good, bad, lambda t: t.update({"extra.weight": torch.ones(2, 5)}))
    with pytest.raises(AdapterFileError, match=r"unexpected key 'extra.weight' with shape \(2, 5\)"):
        load_user_adapters(tiny_unet("sd15"), bad)

    bad = tmp_path / "shape.safetensors"
    _rewrite(good, bad, lambda t: t.update({key: torch.ones(shape[0], shape[1] + 1)}))
    target = tiny_unet("sd15")
    with pytest.raises(AdapterFileError, match=rf"shape mismatch for '{key}': file has \({shape[0]}, {shape[1] + 1}\), "
                                               rf"model expects \({shape[0]}, {shape[1]}\)"):
        load_user_adapters(target, bad)

    corrupt = tmp_path / "corrupt.safetensors"
    data = good.read_bytes()
    corrupt.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match="not a readable safetensors file"):
        load_user_adapters(tiny_unet("sd15"), corrupt)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(AdapterFileError, match="not a readable safetensors file"):
        load_user_adapters(tiny_unet("sd15"), garbage)

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2)}, plain)
    with pytest.raises(AdapterFileError, match="no 'ppd_user_adapters' metadata"):
        load_user_adapters(tiny_unet("sd15"), plain)
    with pytest.raises(AdapterFileError, match="for UNet2DConditionModel, not StableCascadeUNet"):
        load_user_adapters(tiny_unet("cascade"), good)
    with pytest.raises(AdapterFileError, match="config num_tokens=4 but the model's adapters have num_tokens=2"):
        load_user_adapters(_trained("sd15", num_tokens=2)[0], good)
    with pytest.raises(FileNotFoundError):
        load_user_adapters(tiny_unet("sd15"), tmp_path / "nope.safetensors")


# ---- export to diffusers' IP-Adapter layout ------------------------------------------------------

def _tiny_pipeline_parts(tmp_path, unet):
    """VAE, CLIP text encoder and a CLIP tokenizer written offline (vocab.json + merges.txt), loaded
    through from_pretrained like real weights."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok_dir = tmp_path / "tokenizer"
    tok_dir.mkdir()
    letters = list(string.ascii_lowercase)
    vocab = ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters] + ["re", "red</w>"]
    (tok_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tok_dir / "merges.txt").write_text("#version: 0.2\nr e\nre d</w>\n")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=12)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=unet.config.cross_attention_dim, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=12, bos_token_id=0, eos_token_id=1,
        pad_token_id=1)).eval()
    vae = AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=4, sample_size=16).eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False)
    return dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def _pipe(parts, unet):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(unet=unet, safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("projection,t_in,scale", [("linear", 1, 1.0), ("linear", 5, 0.6), ("resampler", 3, 1.0)])
def test_export_loads_in_stock_diffusers(tmp_path, projection, t_in, scale):
    """A T_in-token linear projection (its learned layer mix folded into ImageProjection over the
    flattened input) and a training scale != 1 (folded into to_v_ip) act identically in stock diffusers."""
    kw = {"in_tokens": t_in} if projection == "linear" else {}
    ours, handle = _trained("sd15", projection=projection, num_tokens=4, scale=scale, **kw)
    assert export_problem(ours) is None
    export_ip_adapter(ours, tmp_path / "ip_adapter.safetensors")
    keys = load_file(tmp_path / "ip_adapter.safetensors").keys()
    assert {k.split(".")[0] for k in keys} == {"image_proj", "ip_adapter"}

    stock_unet = tiny_unet("sd15")  # the same base weights, untouched
    parts = _tiny_pipeline_parts(tmp_path, stock_unet)
    stock = _pipe(parts, stock_unet)
    stock.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip_adapter.safetensors",
                          image_encoder_folder=None)
    for name in handle.processors:
        assert type(stock_unet.get_submodule(name).processor).__name__ == "IPAdapterAttnProcessor2_0"
    mine = _pipe(parts, ours)

    prompt = ["a red cat", "red"]
    # Stock pipelines take one IP-Adapter input per call (repeated over the prompts), negative first
    # under classifier-free guidance.
    u = torch.randn(1, t_in, USER_DIM, generator=torch.Generator().manual_seed(3))
    u_neg = torch.randn(1, t_in, USER_DIM, generator=torch.Generator().manual_seed(4))
    for guidance in (1.0, 3.0):
        kw = dict(prompt=prompt, height=16, width=16, num_inference_steps=3, guidance_scale=guidance,
                  output_type="latent")
        stock_in = torch.cat([u_neg, u]) if guidance > 1 else u
        stock_in = stock_in.flatten(1)[:, None] if projection == "linear" else stock_in[:, None]
        if guidance > 1:  # the helper's same-user-twice form is the rows' equal halves
            assert torch.equal(ip_adapter_input(u[0], handle.config, cfg=True)[1], stock_in[1])
        ref = stock(**kw, ip_adapter_image_embeds=[stock_in],
                    generator=torch.Generator().manual_seed(5)).images
        ours_in = torch.cat([u_neg.expand(2, -1, -1), u.expand(2, -1, -1)]) if guidance > 1 else u.expand(2, -1, -1)
        with user_conditioning(ours, ours_in, 1.0):
            got = mine(**kw, generator=torch.Generator().manual_seed(5)).images
        base = _pipe(parts, tiny_unet("sd15"))(**kw, generator=torch.Generator().manual_seed(5)).images
        assert (ref - base).abs().max() > 1e-3  # the exported user branch acts in stock diffusers
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_export_restrictions(tmp_path):
    with pytest.raises(ValueError, match="UNet2DConditionModel only"):
        export_ip_adapter(_trained("cascade")[0], tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="num_tokens=4.*num_tokens=8"):
        export_ip_adapter(_trained("sd15", num_tokens=8)[0], tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="depth=4, dim_head=64 and ffn_ratio=4.*got depth=2"):
        export_ip_adapter(_trained("sd15", projection="resampler", resampler={"depth": 2})[0],
                          tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="got ffn_ratio=2"):
        export_ip_adapter(_trained("sd15", projection="resampler", resampler={"ffn_ratio": 2})[0],
                          tmp_path / "x.safetensors")
    assert "num_tokens=4" in export_problem(_trained("sd15", num_tokens=2)[0])
    assert not os.listdir(tmp_path)
