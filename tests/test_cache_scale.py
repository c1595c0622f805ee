"""The latent cache at scale: fingerprints that cover the weights, no orphans after a kill, SDXL-only
time ids, images read lazily by DataLoader workers, and a 2-rank build equal to a 1-rank one."""

import glob
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from ppd_engine.cache import CacheMismatchError, CacheReader, PairCacheDataset, build_cache
from ppd_engine.cache.build import cache_meta
from ppd_engine.data.pickapic import load_pairs
from ppd_engine.models import load_diffusion_model
from ppd_engine.testing.pickapic_fixture import write_pickapic_fixture
from ppd_engine.testing.tiny_pipelines import make_tiny_pipeline


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("pickapic"))
    write_pickapic_fixture(folder, seed=5, extra_users=2)
    return folder


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory):
    return make_tiny_pipeline("sd15", str(tmp_path_factory.mktemp("pipe") / "sd15"), seed=2)


def _contents(cache):
    reader = CacheReader(cache)
    out = {}
    for kind in ("latent_shards", "text_shards"):
        for name in reader.index[kind]:
            from safetensors.torch import load_file
            out.update(load_file(os.path.join(cache, name)))
    return out


def test_same_path_new_weights_is_a_new_fingerprint(tmp_path, data_dir):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    folder = make_tiny_pipeline("sd15", str(tmp_path / "pipe"), seed=2)
    records = load_pairs(data_dir, progress=False).records[:4]
    cache = str(tmp_path / "c")
    build_cache(load_diffusion_model("sd15", folder), records, cache, progress=False)
    _perturb(AutoencoderKL, folder, "vae", 0.01)
    with pytest.raises(CacheMismatchError, match="vae_weights"):
        build_cache(load_diffusion_model("sd15", folder), records, cache, on_mismatch="raise", progress=False)
    assert build_cache(load_diffusion_model("sd15", folder), records, cache, progress=False).rebuilt
    _perturb(CLIPTextModel, folder, "text_encoder", 0.5)
    with pytest.raises(CacheMismatchError, match="text_weights"):
        build_cache(load_diffusion_model("sd15", folder), records, cache, on_mismatch="raise", progress=False)


def _perturb(cls, folder, sub, delta):
    """Rewrite `folder/sub` with one weight changed: same path, same config, other weights."""
    m = cls.from_pretrained(folder, subfolder=sub)
    with torch.no_grad():
        next(m.parameters()).add_(delta)
    m.save_pretrained(os.path.join(folder, sub))


def test_orphan_temp_files_are_removed_and_sd15_has_no_time_ids(tmp_path, sd15_dir, data_dir):
    model = load_diffusion_model("sd15", sd15_dir)
    records = load_pairs(data_dir, progress=False).records[:3]
    cache = tmp_path / "c"
    cache.mkdir()
    orphan = cache / ".tmp-latents-r000-00000.safetensors.abc123.safetensors"
    orphan.write_bytes(b"half a shard")
    build_cache(model, records, str(cache), progress=False)
    assert not orphan.exists() and not glob.glob(str(cache / ".tmp-*"))
    assert not [k for k in _contents(str(cache)) if k.endswith("#time_ids")]
    assert not glob.glob(str(cache / "index-rank*.json"))   # parts merged into index.json


def test_lazy_records_with_workers_equal_eager_records(tmp_path, sd15_dir, data_dir):
    model = load_diffusion_model("sd15", sd15_dir)
    eager = load_pairs(data_dir, decode_images=False, verify_images=False, progress=False)
    lazy = load_pairs(data_dir, load_images=False, progress=False)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ra = build_cache(model, eager.records, a, batch_size=4, progress=False)
    rb = build_cache(model, lazy.records, b, batch_size=4, progress=False, images=lazy.image_reader(), num_workers=2)
    assert sorted(ra.images_failed) == sorted(rb.images_failed) and len(rb.images_failed) == 4
    ca, cb = _contents(a), _contents(b)
    assert sorted(ca) == sorted(cb)
    for k in ca:
        torch.testing.assert_close(ca[k], cb[k], atol=2e-3, rtol=0)
    assert len(PairCacheDataset(b, lazy.records)) == len(PairCacheDataset(a, eager.records))
    with pytest.raises(ValueError, match="image_reader"):
        build_cache(model, lazy.records, str(tmp_path / "x"), progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, sd15_dir, data_dir, cache):
    import torch.distributed as dist

    from ppd_engine.training.distributed import DistEnv, key_barrier

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        lazy = load_pairs(data_dir, load_images=False, progress=False)
        env = DistEnv(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
        build_cache(load_diffusion_model("sd15", sd15_dir), lazy.records, cache, batch_size=4, shard_bytes=20_000,
                    progress=False, images=lazy.image_reader(), rank=rank, world_size=world,
                    barrier=key_barrier(env, "cache"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~45 s: two spawned processes import torch + diffusers
def test_two_rank_build_equals_one_rank_key_for_key(tmp_path, sd15_dir, data_dir):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    lazy = load_pairs(data_dir, load_images=False, progress=False)
    build_cache(load_diffusion_model("sd15", sd15_dir), lazy.records, one, batch_size=4, shard_bytes=20_000,
                progress=False, images=lazy.image_reader())
    mp.spawn(_worker, args=(2, _free_port(), sd15_dir, data_dir, two), nprocs=2, join=True)
    shards = CacheReader(two).index["latent_shards"]
    assert {n.split("-")[1] for n in shards} == {"r000", "r001"}   # both ranks encoded
    index = CacheReader(two).index   # each rank's part brings the hashes of its shards into the merged index
    assert set(index["sha256"]) == set(index["latent_shards"]) | set(index["text_shards"])
    c1, c2 = _contents(one), _contents(two)
    assert sorted(c1) == sorted(c2)
    assert sorted(CacheReader(one).index["failed_images"]) == sorted(CacheReader(two).index["failed_images"])
    for k in c1:
        torch.testing.assert_close(c1[k], c2[k], atol=2e-3, rtol=0)
    # The merged 2-rank cache is complete: a rerun on one process has nothing left to encode.
    again = build_cache(load_diffusion_model("sd15", sd15_dir), lazy.records, two, progress=False,
                        images=lazy.image_reader())
    assert (again.images_encoded, again.texts_encoded) == (0, 0)


def test_meta_changes_with_the_weights_only(sd15_dir):
    a, b = load_diffusion_model("sd15", sd15_dir), load_diffusion_model("sd15", sd15_dir)
    assert cache_meta(a, 32, True, "fp16") == cache_meta(b, 32, True, "fp16")


def _verify_worker(rank, world, port, cache, log_dir):
    import json

    import torch.distributed as dist

    import ppd_engine.cache.store as store
    from ppd_engine.integrity import CorruptFileError
    from ppd_engine.training.distributed import DistEnv, all_gather_str

    hashed = []
    real = store.sha256_file
    store.sha256_file = lambda path: hashed.append(os.path.basename(path)) or real(path)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        env = DistEnv(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
        try:
            store.verify_cache(cache, rank, world, exchange=lambda t: all_gather_str(t, env, "verify"))
            error = None
        except CorruptFileError as e:
            error = str(e)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(log_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"hashed": hashed, "error": error}, f)


def test_ranks_split_the_cache_hashing_and_all_refuse_a_corrupt_shard(tmp_path):
    """Each of 2 ranks hashes half the shards (each used to hash all of them); a shard only rank 1
    hashes is corrupt, and both ranks refuse the cache naming it."""
    import hashlib
    import json

    from ppd_engine.cache.store import FORMAT, write_index

    cache = tmp_path / "cache"
    cache.mkdir()
    names = [f"latents-{i}.safetensors" for i in range(5)] + [f"text-{i}.safetensors" for i in range(3)]
    for i, n in enumerate(names):
        (cache / n).write_bytes(os.urandom(1000 + i))
    write_index(str(cache), {"format": FORMAT, "latent_shards": names[:5], "text_shards": names[5:],
                             "sha256": {n: hashlib.sha256((cache / n).read_bytes()).hexdigest() for n in names}})
    flipped = bytearray((cache / names[7]).read_bytes())
    flipped[500] ^= 1
    (cache / names[7]).write_bytes(bytes(flipped))        # the last shard rank 1 hashes (every 2nd from 1)
    mp.spawn(_verify_worker, args=(2, _free_port(), str(cache), str(tmp_path)), nprocs=2, join=True)
    logs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert sorted(logs[0]["hashed"] + logs[1]["hashed"]) == sorted(names)
    assert not set(logs[0]["hashed"]) & set(logs[1]["hashed"])
    assert all(lg["error"] and names[7] in lg["error"] for lg in logs)
