"""The toy world's parts: rewards (vs float64 references), scenes, users, the oracle few-shot
encoder, text encoder, the model file, pretraining, the shipped asset, the training dataset, the
default config. The generic encoder has its own file, tests/test_toy_encoder.py."""

import json
import math

import pytest
import torch

from ppd_engine.worlds.toy import ToyConfig
from ppd_engine.worlds.toy.dataset import ToyPairDataset, build_world, few_shot_embeddings, labelled_pairs
from ppd_engine.worlds.toy.model import (
    DEFAULT_ASSET, build_components, load_toy_components, load_toy_model, save_toy_model)
from ppd_engine.worlds.toy.oracle import FEATURE_NAMES, OracleEncoder, image_features
from ppd_engine.worlds.toy.pretrain import main as pretrain_main
from ppd_engine.worlds.toy.pretrain import pretrain
from ppd_engine.worlds.toy.records import sha256_of
from ppd_engine.worlds.toy.rewards import REWARDS, weighted_reward
from ppd_engine.worlds.toy.scenes import CAPTIONS, SHAPES, hsv_to_rgb, make_scenes
from ppd_engine.worlds.toy.text import ToyTextEncoder
from ppd_engine.worlds.toy.users import USERS, bradley_terry_labels, get_user


pytestmark = pytest.mark.usefixtures("one_thread_module")


def _ref_rewards(x: torch.Tensor) -> dict:
    """Straight-from-the-issue float64 definitions, pixel loops avoided only by plain numpy-style ops."""
    x = x.double()
    n = x.shape[0]
    out = {k: [] for k in REWARDS}
    for i in range(n):
        r, g, b = x[i, 0], x[i, 1], x[i, 2]
        y = 0.299 * r + 0.587 * g + 0.114 * b
        mean_y = y.sum() / y.numel()
        warm = r.sum() / r.numel() - b.sum() / b.numel()
        sat = (torch.maximum(torch.maximum(r, g), b) - torch.minimum(torch.minimum(r, g), b)).sum() / r.numel()
        con = torch.sqrt(((y - mean_y) ** 2).sum() / y.numel())
        for k, v in (("warmth", warm), ("coolness", -warm), ("brightness", mean_y), ("darkness", -mean_y),
                     ("saturation", sat), ("contrast", con)):
            out[k].append(v)
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("shape", [(1, 3, 7, 5), (3, 3, 16, 16), (2, 3, 13, 9)])
def test_rewards_match_definitions(shape):
    assert sorted(REWARDS) == sorted(["warmth", "coolness", "brightness", "darkness", "saturation", "contrast"])
    x = torch.rand(shape)
    ref = _ref_rewards(x)
    for name, fn in REWARDS.items():
        got = fn(x)
        assert got.shape == (shape[0],)
        # float32 vs float64 over <= 256 pixels: a few float32 ulps.
        torch.testing.assert_close(got.double(), ref[name], rtol=0, atol=2e-6)
    w = {"warmth": 0.7, "contrast": -1.3, "saturation": 0.4}
    torch.testing.assert_close(weighted_reward(x, w).double(),
                               0.7 * ref["warmth"] - 1.3 * ref["contrast"] + 0.4 * ref["saturation"], rtol=0, atol=1e-5)
    with pytest.raises(KeyError, match="unknown reward"):
        weighted_reward(x, {"hue": 1.0})
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        REWARDS["warmth"](torch.rand(2, 4, 5, 5))


def test_hsv_to_rgb_against_colorsys():
    import colorsys
    h, s, v = torch.rand(17), torch.rand(17), torch.rand(17)
    got = hsv_to_rgb(h, s, v)
    ref = torch.tensor([colorsys.hsv_to_rgb(*t) for t in zip(h.tolist(), s.tolist(), v.tolist())])
    torch.testing.assert_close(got, ref.float(), rtol=0, atol=1e-6)


def test_scenes_are_seeded_in_range_and_vary_along_every_reward():
    a, ca = make_scenes(257, 16, torch.Generator().manual_seed(3))
    b, cb = make_scenes(257, 16, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and ca == cb
    assert a.shape == (257, 3, 16, 16) and a.min() >= 0 and a.max() <= 1
    assert set(ca) <= set(CAPTIONS) and len(set(ca)) == len(SHAPES)
    spread = {k: fn(a).std().item() for k, fn in REWARDS.items()}
    assert spread["warmth"] > 0.15 and spread["brightness"] > 0.12 and spread["saturation"] > 0.12
    assert spread["contrast"] > 0.04
    fixed = torch.full((5,), 2, dtype=torch.long)
    _, caps = make_scenes(5, 11, torch.Generator().manual_seed(0), fixed)
    assert caps == [f"a {SHAPES[2]}"] * 5


def test_users_cover_opposite_tastes_and_default_split():
    cfg = ToyConfig()
    assert len(cfg.seen_users) >= 6 and len(cfg.unseen_users) >= 2
    assert not set(cfg.seen_users) & set(cfg.unseen_users)
    x, _ = make_scenes(512, 16, torch.Generator().manual_seed(1))
    r = {n: USERS[n].reward(x) for n in cfg.seen_users}
    corr = lambda p, q: torch.corrcoef(torch.stack([r[p], r[q]]))[0, 1].item()
    assert corr("warm_bright", "cool_dark") < -0.95
    assert corr("vivid", "muted") < -0.95
    # Every seen user's opposite is seen too: the population has no net taste.
    for u in cfg.seen_users:
        assert min(corr(u, v) for v in cfg.seen_users if v != u) < -0.95, u
    with pytest.raises(KeyError, match="known users"):
        get_user("nobody")


def test_bradley_terry_labels_follow_the_reward_with_noise():
    u = USERS["warm_bright"]
    g = torch.Generator().manual_seed(0)
    a, _ = make_scenes(2000, 8, g)
    b, _ = make_scenes(2000, 8, g)
    truth = u.reward(a) > u.reward(b)
    sharp = bradley_terry_labels(u, a, b, 1e6, g)
    assert (sharp == truth).float().mean() > 0.995
    noisy = bradley_terry_labels(u, a, b, 20.0, g)
    agree = (noisy == truth).float().mean().item()
    assert 0.8 < agree < 0.99  # mostly right, some labels flipped like real ones
    coin = bradley_terry_labels(u, a, b, 0.0, g)
    assert abs(coin.float().mean().item() - 0.5) < 0.05


def test_image_features_reference():
    x = torch.rand(2, 3, 3, 5, 7)
    f = image_features(x)
    assert f.shape == (2, 3, len(FEATURE_NAMES))
    xd = x.double().reshape(6, 3, 35)
    y = 0.299 * xd[:, 0] + 0.587 * xd[:, 1] + 0.114 * xd[:, 2]
    ref = torch.stack([(xd[:, 0] - xd[:, 2]).mean(1), y.mean(1),
                       y.std(1, correction=0), (xd.amax(1) - xd.amin(1)).mean(1)], 1)
    torch.testing.assert_close(f.reshape(6, -1).double(), ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("kind", ["oracle", "generic"])
def test_few_shot_encoders_separate_opposite_users(kind):
    from ppd_engine.worlds.toy.fewshot import FewShotEncoder

    size = 12 if kind == "oracle" else 16  # the shipped feature extractor is trained at 16x16
    enc = OracleEncoder(size, dim=24, calibration_scenes=256) if kind == "oracle" else \
        FewShotEncoder(size, dim=24, calibration_scenes=256)
    # Over many 4-shot sets, opposite users point opposite ways, the same user agrees with itself.
    g = torch.Generator().manual_seed(5)

    def mean_token(name):
        p = labelled_pairs(USERS[name], 4 * 64, size, 20.0, g)
        return enc.embed(p.winners.reshape(64, 4, 3, size, size), p.losers.reshape(64, 4, 3, size, size))[:, -1]

    wb, cd, wb2 = mean_token("warm_bright"), mean_token("cool_dark"), mean_token("warm_bright")
    cos = torch.nn.functional.cosine_similarity
    assert cos(wb.mean(0), cd.mean(0), dim=0) < -0.8
    assert cos(wb.mean(0), wb2.mean(0), dim=0) > 0.8


def test_text_encoder_is_frozen_deterministic_and_handles_unknown_words():
    t1, t2 = ToyTextEncoder(seed=4), ToyTextEncoder(seed=4)
    assert not any(p.requires_grad for p in t1.parameters())
    caps = ["a circle", "A  RING!", "", "a zebra on the moon", "a very very long caption with many words"]
    s = t1(caps)
    assert s.shape == (5, t1.max_tokens, t1.dim)
    torch.testing.assert_close(s, t2(caps))
    ids = t1.tokenize(caps)
    assert ids[1].tolist()[:4] == [t1.index["<bos>"], t1.index["a"], t1.index["ring"], t1.index["<eos>"]]
    assert t1.index["<unk>"] in ids[3].tolist()
    assert ids[4, -1].item() == t1.index["<eos>"]  # cut, still terminated
    assert not torch.equal(s[0], s[1])


def test_model_file_round_trip_and_errors(tmp_path):
    unet, text, _ = build_components(image_size=8, text_dim=16, seed=2)
    path = tmp_path / "m.safetensors"
    save_toy_model(path, unet, text, {"note": "test"})
    unet2, text2, sched2, info = load_toy_components(path)
    assert info == {"note": "test"} and sched2.config.num_train_timesteps == 1000
    x, t, c = torch.randn(3, 3, 8, 8), torch.tensor([5, 500, 999]), text(["a circle", "", "a cross"])
    with torch.no_grad():
        torch.testing.assert_close(unet2(x, t, text2(["a circle", "", "a cross"])).sample, unet(x, t, c).sample,
                                   rtol=0, atol=0)
    model = load_toy_model(path)
    assert model.family == "toy" and model.vae is None and model.resolution == 8
    assert not any(p.requires_grad for p in model.unet.parameters())
    cond = model.encode_text(["a ring", "a square"])
    assert cond.states.shape == (2, text.max_tokens, 16) and cond.pooled is None
    px = torch.rand(2, 3, 8, 8) * 2 - 1
    torch.testing.assert_close(model.decode_latents(model.encode_images(px)), (px + 1) / 2)
    with pytest.raises(ValueError, match="image_size"):
        load_toy_model(ToyConfig(image_size=16, pretrained=str(path)))
    with pytest.raises(FileNotFoundError, match="pretrain"):
        load_toy_components(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a toy base model"):
        load_toy_components(tmp_path / "other.safetensors")


def test_pretrain_few_steps_writes_model_and_record_and_never_overwrites_unasked(tmp_path, capsys):
    out = tmp_path / "base.safetensors"
    info = pretrain(out, steps=4, batch=3, lr=1e-3, seed=1, image_size=8, progress=False)
    assert out.is_file() and info["steps"] == 4 and math.isfinite(info["final_loss_avg100"])
    rec = json.loads((tmp_path / "base.safetensors.json").read_text())
    assert rec == info and rec["sha256"] == sha256_of(out) and rec["seed"] == 1 and rec["wall_s"] >= 0
    model = load_toy_model(out)
    assert model.resolution == 8
    before = out.read_bytes()
    with pytest.raises(SystemExit) as e:  # the remake command, run over an existing file
        pretrain_main(["--out", str(out), "--steps", "1", "--image-size", "8"])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    pretrain(out, steps=1, batch=2, image_size=8, seed=2, progress=False, overwrite=True)
    assert out.read_bytes() != before


def test_shipped_asset_matches_its_record():
    assert DEFAULT_ASSET.is_file(), "run `python -m ppd_engine.worlds.toy.pretrain` to create the asset"
    rec = json.loads(DEFAULT_ASSET.with_name(DEFAULT_ASSET.name + ".json").read_text())
    assert rec["sha256"] == sha256_of(DEFAULT_ASSET)
    assert DEFAULT_ASSET.stat().st_size < 8 * 2**20
    _, _, _, info = load_toy_components()
    assert info["seed"] == rec["seed"] and info["steps"] == rec["steps"]


def test_world_dataset_and_embeddings():
    cfg = ToyConfig(seen_users=["warm_bright", "muted"], unseen_users=["night"], pairs_per_user=9,
                    embeddings_per_user=3, image_size=8)
    world = build_world(cfg)
    again = build_world(cfg)
    assert list(world) == ["warm_bright", "muted", "night"]
    assert world["night"].train is None and world["night"].split == "unseen"
    assert torch.equal(world["muted"].train.winners, again["muted"].train.winners)
    assert len(world["warm_bright"].shots) == cfg.n_shots
    enc = OracleEncoder(8, calibration_scenes=128)
    train, ev = few_shot_embeddings(world, enc, cfg)
    assert set(train) == {"warm_bright", "muted"} and set(ev) == set(world)
    assert train["muted"].shape == (3, cfg.n_shots + 1, enc.dim) and ev["night"].shape == (1, cfg.n_shots + 1, enc.dim)
    text = ToyTextEncoder(dim=16)

    class _Cond:
        def __init__(self, s):
            self.states = s

    ds = ToyPairDataset(world, lambda caps: _Cond(text(caps)))
    assert len(ds) == 18
    item = ds[10]
    assert item["user_id"] == "muted" and item["pair_id"] == "muted/1"
    assert item["latents_w"].shape == (3, 8, 8) and item["latents_w"].min() >= -1 and item["latents_w"].max() <= 1
    cap = world["muted"].train.captions[1]
    torch.testing.assert_close(item["text"], text([cap])[0])
    w = (ds[10]["latents_w"][None] + 1) / 2
    torch.testing.assert_close(w, world["muted"].train.winners[1:2])
    with pytest.raises(ValueError, match="overlap"):
        build_world(ToyConfig(seen_users=["muted"], unseen_users=["muted"]))


@pytest.mark.parametrize("name", ["toy.yaml", "toy_smoke.yaml"])
def test_toy_configs_load_and_name_known_users(name):
    from pathlib import Path

    from ppd_engine.config import load_config
    from ppd_engine.worlds.toy.run import parse_pairs

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / name)
    assert cfg.world == "toy" and cfg.model.family == "toy"
    users = [*cfg.toy.seen_users, *cfg.toy.unseen_users]
    assert all(u in USERS for u in users)
    assert parse_pairs(cfg.toy.interpolation_pairs, users)
    if name == "toy.yaml":  # the minimums for the default run
        assert len(cfg.toy.seen_users) >= 6 and len(cfg.toy.unseen_users) >= 2
        assert cfg.toy.eval_samples_per_user >= 32 and cfg.toy.n_shots == 4
        # The headline reads users with the encoder that does not know the rewards, with no
        # guidance crutch; the oracle and the guided sampling are extra columns.
        assert cfg.toy.encoder == "generic" and cfg.toy.user_guidance == 0
        assert cfg.toy.oracle_column and cfg.toy.guided_column > 0
    with pytest.raises(ValueError, match="userA:userB"):
        parse_pairs(["warm_bright"], users)
    with pytest.raises(ValueError, match="not one of the configured users"):
        parse_pairs(["warm_bright:nobody"], users)
