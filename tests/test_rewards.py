"""Reward models on tiny random CLIPs saved to and loaded from tmp folders (no downloads)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ppd_engine.eval.rewards import (AestheticMLP, CLIPScore, HPSv2, LaionAesthetic, PickScore,
                                     load_reward)

PROMPTS = ["a red cat on a mat", "Blue sky!", "three small dogs playing in the snow, photo"]


def make_tiny_clip(folder, seed=0, projection_dim=12):
    """Save a tiny random transformers CLIPModel + CLIPProcessor (char-level BPE vocab) to `folder`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for i in range(33, 127):
        vocab[chr(i)] = len(vocab)
        vocab[chr(i) + "</w>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    ip = CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=20, intermediate_size=36,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=48,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=20, intermediate_size=36, num_hidden_layers=2,
                           num_attention_heads=4, image_size=30, patch_size=6),
        projection_dim=projection_dim, logit_scale_init_value=2.3)
    torch.manual_seed(seed)
    model = CLIPModel(cfg)
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(folder)
    return folder


def make_images(n, seed=0, size=(37, 29)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return str(make_tiny_clip(tmp_path_factory.mktemp("clip")))


def _reference_logits(folder, images, prompts):
    """Per-pair CLIP logits via CLIPModel.forward in float64 (an independent code path)."""
    from transformers import CLIPModel, CLIPProcessor

    proc = CLIPProcessor.from_pretrained(folder)
    model = CLIPModel.from_pretrained(folder).double().eval()
    inp = proc(text=prompts, images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"],
                    pixel_values=inp["pixel_values"].double())
    return out.logits_per_image.diagonal(), model.logit_scale.exp(), out.image_embeds


def test_pickscore_matches_clip_logits(tiny_clip):
    images = make_images(3, seed=1)
    ps = PickScore(tiny_clip, batch_size=2)
    got = ps.score(images, PROMPTS)
    ref, _, _ = _reference_logits(tiny_clip, images, PROMPTS)
    assert got.shape == (3,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_clipscore_is_100_clamped_cosine(tiny_clip):
    images = make_images(3, seed=2)
    cs = CLIPScore(tiny_clip, batch_size=3)
    got = cs.score(images, PROMPTS)
    logits, scale, _ = _reference_logits(tiny_clip, images, PROMPTS)
    ref = (100 * logits / scale).clamp(min=0)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)
    assert (got >= 0).all() and (got <= 100).all()


def test_scores_batch_invariant_and_deterministic(tiny_clip):
    images = make_images(5, seed=3)
    prompts = PROMPTS + ["x", "a much longer prompt with many many words in it to pad the others"]
    a = PickScore(tiny_clip, batch_size=1).score(images, prompts)
    b = PickScore(tiny_clip, batch_size=3).score(images, prompts)
    c = PickScore(tiny_clip, batch_size=3).score(images, prompts)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(b, c)
    # Scores depend on the pairing: swapping prompts changes them.
    d = PickScore(tiny_clip, batch_size=3).score(images, prompts[::-1])
    assert not torch.allclose(b, d)


def test_reward_input_errors(tiny_clip):
    ps = PickScore(tiny_clip)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        ps.score(make_images(2), ["one"])
    with pytest.raises(ValueError, match="needs one prompt"):
        ps.score(make_images(1))
    assert ps.score([], []).shape == (0,)
    with pytest.raises(ValueError, match="unknown reward"):
        load_reward("nope")


def _aesthetic_weights(path, input_size, fmt, seed=5):
    torch.manual_seed(seed)
    mlp = AestheticMLP(input_size)
    if fmt == "pth":
        torch.save(mlp.state_dict(), path)
    else:
        from safetensors.torch import save_file
        save_file(mlp.state_dict(), path)
    return mlp


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_aesthetic_matches_reference(tiny_clip, tmp_path, fmt):
    w = tmp_path / f"aes.{fmt}"
    mlp = _aesthetic_weights(w, 12, fmt)
    images = make_images(3, seed=4)
    aes = load_reward("aesthetic", aesthetic_clip=tiny_clip, aesthetic_weights=str(w), batch_size=2)
    got = aes.score(images)  # prompt-free
    _, _, image_embeds = _reference_logits(tiny_clip, images, PROMPTS)
    ref = mlp.double().eval()(F.normalize(image_embeds, dim=-1)).squeeze(-1)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    # The public head's keys (layers.0/2/4/6/7) and shapes.
    assert [k for k in mlp.state_dict() if k.endswith("weight")] == [
        "layers.0.weight", "layers.2.weight", "layers.4.weight", "layers.6.weight", "layers.7.weight"]


def test_aesthetic_rejects_wrong_input_size(tiny_clip, tmp_path):
    w = tmp_path / "aes.pth"
    _aesthetic_weights(w, 7, "pth")
    with pytest.raises(ValueError, match="MLP input size 7 != CLIP projection_dim 12"):
        LaionAesthetic(str(w), tiny_clip)
    with pytest.raises(FileNotFoundError, match="aesthetic predictor weights"):
        LaionAesthetic(str(tmp_path / "missing.pth"), tiny_clip)


# --- HPSv2 (open_clip) --------------------------------------------------------------------------

TINY_OPENCLIP = {
    "embed_dim": 12,
    "vision_cfg": {"image_size": 30, "layers": 2, "width": 20, "head_width": 5, "patch_size": 6},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 20, "heads": 4, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_openclip(tmp_path_factory):
    open_clip = pytest.importorskip("open_clip")
    d = tmp_path_factory.mktemp("openclip")
    torch.manual_seed(7)
    model = open_clip.model.CLIP(**TINY_OPENCLIP)
    from safetensors.torch import save_file
    save_file(model.state_dict(), str(d / "open_clip_model.safetensors"))
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPENCLIP, "preprocess_cfg": {}}))
    # The authors' HPS_v2*.pt layout: {"state_dict": ...} keyed as a DDP-wrapped module.
    ckpt = d / "HPS_v2_tiny.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    # A named architecture for the checkpoint-file route (open_clip's public registry API).
    cfg_file = d / "ppd-tiny-hps.json"
    cfg_file.write_text(json.dumps(TINY_OPENCLIP))
    open_clip.add_model_config(cfg_file)
    return d, ckpt, model.eval()


def _hps_reference(model, images, prompts):
    import open_clip

    _, _, preprocess = open_clip.create_model_and_transforms("ppd-tiny-hps", pretrained=None)
    tok = open_clip.get_tokenizer("ppd-tiny-hps")
    m = model.double()
    with torch.no_grad():
        out = m(torch.stack([preprocess(im) for im in images]).double(), tok(prompts))
    model.float()
    img, txt = out[0], out[1]  # open_clip returns normalised features
    return (img @ txt.T).diagonal()


def test_hpsv2_folder_and_checkpoint_routes(tiny_openclip):
    folder, ckpt, model = tiny_openclip
    images = make_images(3, seed=6)
    a = HPSv2(str(folder), batch_size=2).score(images, PROMPTS)
    b = HPSv2(str(ckpt), arch="ppd-tiny-hps", batch_size=3).score(images, PROMPTS)
    ref = _hps_reference(model, images, PROMPTS)
    assert a.shape == (3,)
    torch.testing.assert_close(a.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert (a.abs() <= 1).all()


def test_bfloat16_scores_close_to_float32(tiny_clip):
    images = make_images(3, seed=8)
    ref = PickScore(tiny_clip).score(images, PROMPTS, progress=False)
    low = PickScore(tiny_clip, dtype=torch.bfloat16)
    assert low.model.text_projection.weight.dtype == torch.bfloat16
    got = low.score(images, PROMPTS, progress=False)
    assert got.dtype == torch.float32 and not torch.equal(got, ref)
    # bf16 keeps ~3 significant digits through two tiny towers; the cosine is scaled by e^2.3 ~ 10.
    torch.testing.assert_close(got, ref, rtol=0, atol=0.1)
