"""The Pick-a-Pic world on a hub-layout folder: it trains on the train split only, records the files
it read, and its sample grids on a real latent model are RGB images of the image size."""

import json

import pytest
import torch
from PIL import Image

from ppd_engine.data.pickapic import load_pairs
from ppd_engine.embed.store import EmbeddingStore
from ppd_engine.testing.pickapic_fixture import write_hub_layout
from ppd_engine.testing.tiny_pipelines import make_tiny_pipeline

FAST = ["train.pairs_per_step=4", "train.micro_batch=2", "train.mixed_precision=fp32", "optim.lr=1e-3",
        "optim.min_8bit_size=256", "log.tensorboard=false", "log.progress=false", "checkpoint.every=0"]


@pytest.mark.slow  # ~30 s: cache build, one step and a sample grid on a tiny SD1.5
def test_hub_layout_run_trains_on_train_and_samples_decode_through_the_vae(tmp_path, capsys):
    from ppd_engine.train import main

    data = tmp_path / "pickapic"
    write_hub_layout(str(data), seed=3)
    users = sorted(load_pairs(str(data), split="train", progress=False).by_user())
    store = str(tmp_path / "users")
    g = torch.Generator().manual_seed(0)
    EmbeddingStore(store).append_many([(u, torch.randn(1, 1, 24, generator=g), None) for u in users])
    run = tmp_path / "run"
    rc = main(["world=pickapic", f"data.folder={data}", f"data.embeddings={store}", "model.family=sd15",
               f"model.pretrained={make_tiny_pipeline('sd15', str(tmp_path / 'sd15'), seed=1)}",
               "model.resolution=32", f"cache.dir={tmp_path / 'cache'}", f"log.run_dir={run}",
               "data.unseen_fraction=0", "data.n_shots=1", "data.min_pairs_per_user=4", "log.sample_every=1",
               "log.sample_steps=2", "log.sample_users=2", *FAST, "train.max_steps=1"])
    assert rc == 0
    record = json.loads((run / "data.json").read_text())
    assert record["split"] == "train" and len(record["files"]) == 2
    assert all("/train-0000" in f for f in record["files"])
    assert record["stats"]["files_not_parquet"] == 1 and record["stats"]["files_other_splits"] == 3
    grid = Image.open(run / "samples" / "step-1.png")
    n_prompts, n_rows = 2, 1 + 2 + 1       # base, 2 users, zero embedding
    assert grid.mode == "RGB" and grid.size == (n_prompts * 34 + 2, n_rows * 34 + 2)
    # A shard corrupted on disk after the build: the next run refuses the cache naming the shard
    # (the world hashes the shards once, split across ranks, before training).
    import glob

    shard = sorted(glob.glob(str(tmp_path / "cache" / "latents-*.safetensors")))[0]
    data_bytes = bytearray(open(shard, "rb").read())
    data_bytes[-10] ^= 0xFF
    open(shard, "wb").write(bytes(data_bytes))
    again = main(["world=pickapic", f"data.folder={data}", f"data.embeddings={store}", "model.family=sd15",
                  f"model.pretrained={tmp_path / 'sd15'}", "model.resolution=32", f"cache.dir={tmp_path / 'cache'}",
                  f"log.run_dir={tmp_path / 'run2'}", "data.unseen_fraction=0", "data.n_shots=1",
                  "data.min_pairs_per_user=4", *FAST, "train.max_steps=1"])
    assert again == 2 and f"{shard}: content does not match the sha256" in capsys.readouterr().err
