"""Latent + text cache: built once, reused without the VAE, invalidated on changes, items per family."""

import copy
import glob
import os

import pytest
import torch

from ppd_engine.cache import CacheMismatchError, CacheReader, PairCacheDataset, build_cache
from ppd_engine.cache.store import caption_key
from ppd_engine.data.images import center_crop
from ppd_engine.data.pickapic import load_pairs
from ppd_engine.models import load_diffusion_model
from ppd_engine.testing.pickapic_fixture import write_pickapic_fixture
from ppd_engine.testing.tiny_pipelines import make_tiny_pipeline


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("pickapic"))
    write_pickapic_fixture(folder, seed=5)
    return folder


@pytest.fixture(scope="module")
def pairs(data_dir):
    return load_pairs(data_dir, progress=False)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {fam: make_tiny_pipeline(fam, str(root / fam), seed=2) for fam in ("sd15", "sdxl")}


class Counting:
    """Counts calls into the VAE encoder and the text encoder(s) of a model while in a `with` block."""

    def __init__(self, model):
        self.model, self.vae, self.text = model, 0, 0

    def __enter__(self):
        encode, encode_text = self.model.vae.encode, self.model.encode_text

        def vae_encode(*a, **k):
            self.vae += 1
            return encode(*a, **k)

        def text(*a, **k):
            self.text += 1
            return encode_text(*a, **k)

        self.model.vae.encode, self.model.encode_text = vae_encode, text
        self._saved = encode_text
        return self

    def __exit__(self, *exc):
        del self.model.vae.encode   # back to the class method
        self.model.encode_text = self._saved


@pytest.fixture(scope="module")
def sd15(pipes):
    return load_diffusion_model("sd15", pipes["sd15"])


def _uids(records):
    return {u for r in records for u in (r.uid_w, r.uid_l)}


def test_build_once_then_train_without_the_vae(tmp_path, sd15, pairs):
    with Counting(sd15) as calls:
        _build_twice_then_read(tmp_path, sd15, pairs, calls)


def _build_twice_then_read(tmp_path, model, pairs, calls):
    cache = str(tmp_path / "cache")
    n_img, n_txt = len(_uids(pairs.records)), len({r.caption for r in pairs.records})
    first = build_cache(model, pairs.records, cache, batch_size=4, shard_bytes=20_000, progress=False)
    assert first.images_encoded == n_img and first.texts_encoded == n_txt and not first.images_failed
    assert calls.vae == -(-n_img // 4) and calls.text == -(-n_txt // 4)
    assert len(glob.glob(os.path.join(cache, "latents-*.safetensors"))) > 1   # shard_bytes forces several shards
    assert not glob.glob(os.path.join(cache, ".tmp-*"))

    calls.vae = calls.text = 0
    second = build_cache(model, pairs.records, cache, batch_size=4, shard_bytes=20_000, progress=False)
    assert (second.images_encoded, second.texts_encoded) == (0, 0)
    assert (second.images_reused, second.texts_reused) == (n_img, n_txt)
    ds = PairCacheDataset(cache, pairs.records)
    items = [ds[i] for i in range(len(ds))]
    assert calls.vae == 0 and calls.text == 0 and len(ds) == len(pairs.records) and ds.missing == 0

    # Cached latents are the VAE latents of the center crop (and of its mirror image), stored in fp16.
    r = pairs.records[0]
    px, _, _ = center_crop(r.image_w, 32)
    with torch.no_grad():
        want = model.encode_images(torch.stack([px, px.flip(-1)]))
    reader = CacheReader(cache)
    torch.testing.assert_close(reader.latents(r.uid_w).float(), want[0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(reader.latents(r.uid_w, flipped=True).float(), want[1], atol=2e-3, rtol=2e-3)
    assert not torch.allclose(want[0], want[1].flip(-1), atol=1e-3)   # why flips are cached, not flipped
    text = model.encode_text([r.caption]).states[0]
    torch.testing.assert_close(items[0]["text"], text, atol=5e-3, rtol=2e-3)
    assert items[0]["latents_w"] is not None and reader.latents(r.uid_l).shape == (4, 16, 16)


def test_items_sd15(tmp_path, sd15, pairs):
    model = sd15
    cache = str(tmp_path / "c")
    build_cache(model, pairs.records[:5], cache, flip=False, dtype="float32", progress=False)
    ds = PairCacheDataset(cache, pairs.records[:5])
    item = ds[3]
    assert set(item) == {"latents_w", "latents_l", "text", "user_id", "pair_id"}
    assert item["latents_w"].shape == (4, 16, 16) and item["latents_w"].dtype == torch.float32
    assert item["text"].shape == (77, 32)
    assert item["user_id"] == pairs.records[3].user_id and item["pair_id"] == pairs.records[3].pair_id
    assert not torch.equal(item["latents_w"], item["latents_l"])
    loader = torch.utils.data.DataLoader(ds, batch_size=3)
    batch = next(iter(loader))
    assert batch["latents_w"].shape == (3, 4, 16, 16) and len(batch["user_id"]) == 3
    # Open shard handles are dropped on copy (DataLoader workers get a fresh reader).
    clone = copy.deepcopy(ds)
    assert torch.equal(clone[3]["latents_w"], item["latents_w"])
    # The fingerprint the cached reference pass keys on: same pairs and cache -> same; fewer pairs,
    # another flip seed -> different.
    assert clone.fingerprint() == ds.fingerprint()
    assert PairCacheDataset(cache, pairs.records[:4]).fingerprint() != ds.fingerprint()
    assert PairCacheDataset(cache, pairs.records[:5], seed=1).fingerprint() != ds.fingerprint()


def test_items_sdxl_have_pooled_and_time_ids(tmp_path, pipes, pairs):
    model = load_diffusion_model("sdxl", pipes["sdxl"])
    cache = str(tmp_path / "c")
    recs = pairs.records[:3]
    build_cache(model, recs, cache, progress=False)
    ds = PairCacheDataset(cache, recs)
    for i, r in enumerate(recs):
        item = ds[i]
        assert item["text"].shape == (77, 64) and item["pooled"].shape == (16,)
        assert item["time_ids_w"].shape == (6,) and item["time_ids_l"].shape == (6,)
        w, h = r.image_w.size
        short = min(w, h)
        new_w, new_h = int(32 * w / short), int(32 * h / short)
        want = [h, w, round((new_h - 32) / 2), round((new_w - 32) / 2), 32, 32]
        assert item["time_ids_w"].tolist() == want
        torch.testing.assert_close(item["pooled"], model.encode_text([r.caption]).pooled[0], atol=5e-3, rtol=2e-3)
    # The fixture's sizes (40x32, 32x48, ...) give a non-zero crop offset somewhere.
    assert any(ds[i]["time_ids_w"][2:4].abs().sum() > 0 or ds[i]["time_ids_l"][2:4].abs().sum() > 0 for i in range(3))


def test_invalidation_on_resolution_change(tmp_path, sd15, pairs):
    model = sd15
    cache = str(tmp_path / "c")
    recs = pairs.records[:4]
    build_cache(model, recs, cache, progress=False)
    with pytest.raises(CacheMismatchError, match="resolution"):
        build_cache(model, recs, cache, resolution=24, on_mismatch="raise", progress=False)
    with Counting(model) as calls:
        rebuilt = build_cache(model, recs, cache, resolution=24, progress=False)
    assert rebuilt.rebuilt and rebuilt.images_encoded == len(_uids(recs)) and calls.vae > 0
    assert PairCacheDataset(cache, recs)[0]["latents_w"].shape == (4, 12, 12)
    # Preprocessing change (flip flag) invalidates too.
    with pytest.raises(CacheMismatchError, match="flip"):
        build_cache(model, recs, cache, resolution=24, flip=False, on_mismatch="raise", progress=False)


def test_resume_encodes_only_what_is_missing(tmp_path, sd15, pairs):
    model = sd15
    cache = str(tmp_path / "c")
    part, full = pairs.records[:3], pairs.records[:7]
    build_cache(model, part, cache, progress=False)
    # A shard left behind by a killed build (written, not yet in the index) is overwritten, not read.
    open(os.path.join(cache, "latents-r000-00001.safetensors"), "wb").write(b"partial")
    report = build_cache(model, full, cache, progress=False)
    assert report.images_reused == len(_uids(part))
    assert report.images_encoded == len(_uids(full) - _uids(part))
    ds = PairCacheDataset(cache, full)
    assert len(ds) == 7 and all(ds[i]["latents_w"].shape == (4, 16, 16) for i in range(7))


def test_corrupt_bytes_at_build_are_skipped_and_counted(tmp_path, sd15, data_dir, caplog):
    raw = load_pairs(data_dir, decode_images=False, verify_images=False, progress=False)
    model = sd15
    cache = str(tmp_path / "c")
    with caplog.at_level("WARNING"):
        report = build_cache(model, raw.records, cache, flip=False, progress=False)
    assert len(report.images_failed) == 4 and "does not decode" in caplog.text
    ds = PairCacheDataset(cache, raw.records)
    assert ds.missing == 3 and len(ds) == len(raw.records) - 3
    again = build_cache(model, raw.records, cache, flip=False, progress=False)
    assert again.images_encoded == 0 and len(again.images_failed) == 4


def test_flip_is_joint_deterministic_and_epoch_dependent(tmp_path, sd15, pairs):
    model = sd15
    cache = str(tmp_path / "c")
    recs = pairs.records
    build_cache(model, recs, cache, progress=False)
    reader = CacheReader(cache)
    a, b = PairCacheDataset(cache, recs, seed=1), PairCacheDataset(cache, recs, seed=1)
    states = []
    for epoch in range(3):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        flips = []
        for i, r in enumerate(recs):
            x, y = a[i], b[i]
            assert torch.equal(x["latents_w"], y["latents_w"])
            fw = torch.equal(x["latents_w"], reader.latents(r.uid_w, True).float())
            fl = torch.equal(x["latents_l"], reader.latents(r.uid_l, True).float())
            assert fw == fl   # winner and loser flipped together
            assert fw or torch.equal(x["latents_w"], reader.latents(r.uid_w).float())
            flips.append(fw)
        states.append(tuple(flips))
        assert 0 < sum(flips) < len(flips)
    assert len(set(states)) > 1
    no_flip = PairCacheDataset(cache, recs, flip=False)
    assert torch.equal(no_flip[0]["latents_w"], reader.latents(recs[0].uid_w).float())


def test_cli_builds_the_cache(tmp_path, pipes, data_dir, capsys):
    from ppd_engine.cache.build import main

    cache = str(tmp_path / "cli")
    assert main(["--family", "sd15", "--pretrained", pipes["sd15"], "--data", data_dir, "--cache-dir", cache,
                 "--no-flip", "--batch-size", "7"]) == 0
    out = capsys.readouterr().out
    # The CLI reads the index only; the 4 corrupt images are found (and skipped) as the build decodes them.
    assert "20 pairs from 4 users" in out and "36 images encoded" in out and "4 failed to decode" in out
    assert len(PairCacheDataset(cache, load_pairs(data_dir, decode_images=False, progress=False).records)) == 15
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--no-rebuild" in capsys.readouterr().out


def test_center_crop_keeps_the_middle():
    import numpy as np
    from PIL import Image

    arr = np.zeros((30, 90, 3), dtype=np.uint8)
    arr[:, 40:50] = 255                       # white central strip -> columns ~7..13 of the 20x20 crop
    px, orig, crop = center_crop(Image.fromarray(arr), 20)
    assert px.shape == (3, 20, 20) and orig == (30, 90) and crop == (0, 20)
    assert px.min() >= -1 and px.max() <= 1
    assert px[:, :, 8:12].mean() > 0.9 and px[:, :, :5].mean() < -0.9 and px[:, :, -5:].mean() < -0.9
    tall, orig, crop = center_crop(Image.fromarray(arr.transpose(1, 0, 2).copy()), 20)
    assert tall.shape == (3, 20, 20) and orig == (90, 30) and crop == (20, 0)


def test_missing_cache_is_a_clear_error(tmp_path, pairs):
    with pytest.raises(FileNotFoundError, match="build it first"):
        PairCacheDataset(str(tmp_path), pairs.records)
    assert caption_key("a") != caption_key("b")


@pytest.mark.parametrize("kind", ["latents", "texts"])
def test_a_flipped_shard_byte_is_refused_naming_the_file(tmp_path, sd15, pairs, kind):
    from ppd_engine.integrity import CorruptFileError
    from ppd_engine.testing.corrupt import flip_tensor_byte

    cache = str(tmp_path / "cache")
    build_cache(sd15, pairs.records, cache, batch_size=4, shard_bytes=20_000, progress=False)
    index = CacheReader(cache).index
    assert set(index["sha256"]) == set(index["latent_shards"]) | set(index["text_shards"])
    clean = PairCacheDataset(cache, pairs.records)   # an intact cache verifies and loads
    assert len(clean) == len(pairs.records)
    shard = sorted(glob.glob(os.path.join(cache, f"{kind}-*.safetensors")))[-1]
    flip_tensor_byte(shard)
    with pytest.raises(CorruptFileError) as err:
        PairCacheDataset(cache, pairs.records)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(shard + ":") and "sha256" in msg
    # cache.verify=false trusts the disk: the same cache opens (and serves the flipped value).
    assert len(PairCacheDataset(cache, pairs.records, verify=False)) == len(pairs.records)


def test_a_cache_built_before_hashes_loads_with_a_warning(tmp_path, sd15, pairs, caplog):
    from ppd_engine.cache.store import read_index, write_index

    cache = str(tmp_path / "cache")
    build_cache(sd15, pairs.records, cache, batch_size=4, progress=False)
    index = read_index(cache)
    del index["sha256"]
    write_index(cache, index)
    with caplog.at_level("WARNING"):
        ds = PairCacheDataset(cache, pairs.records)
    assert len(ds) == len(pairs.records) and "have no sha256" in caplog.text
