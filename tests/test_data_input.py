"""The training input pipeline: DataLoader workers change nothing (bitwise, CPU), a resumed run with
workers equals an uninterrupted one, and the loader restarts wherever it is asked to."""

import json
import os

import torch
from safetensors.torch import load_file

from ppd_engine.config import load_config
from ppd_engine.training import Trainer
from ppd_engine.training.data_order import DataOrder, rank_slots
from ppd_engine.training.input import StepLoader
from ppd_engine.testing.tiny_training import make_embeddings, make_items, tiny_model

BASE = ["train.pairs_per_step=4", "train.micro_batch=2", "train.max_steps=4", "train.mixed_precision=fp32",
        "optim.lr=1e-3", "optim.min_8bit_size=256", "log.tensorboard=false", "log.progress=false",
        "checkpoint.every=2", "train.user_dropout=0.3", "train.empty_caption_prob=0.3"]


class Flipping(list):
    """Items that depend on the epoch, as the latent cache's random flips do."""

    epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, i):
        item = dict(super().__getitem__(i))
        item["latents_w"] = item["latents_w"] * (1 + self.epoch)
        return item


def _fit(run_dir, extra=()):
    model = tiny_model("sd15")
    Trainer(load_config(None, [*BASE, *extra]), model, Flipping(make_items(model, 6)), make_embeddings(du=24),
            str(run_dir)).fit()
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        rows = [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, fh)]
    last = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))[-1]
    return rows, load_file(os.path.join(run_dir, "checkpoints", last, "adapters.safetensors"))


def test_workers_and_resume_are_bitwise_the_in_process_run(tmp_path):
    rows0, w0 = _fit(tmp_path / "w0")
    rows2, w2 = _fit(tmp_path / "w2", ["data.workers=2", "data.prefetch=1"])
    assert rows0 == rows2 and len(rows0) == 4
    assert all(torch.equal(w0[k], w2[k]) for k in w0)
    # Stop after step 2, resume with workers: the same run (steps 3 and 4 are in epoch 2: flips change).
    _fit(tmp_path / "r", ["train.max_steps=2"])
    rows_r, w_r = _fit(tmp_path / "r", ["data.workers=2", "checkpoint.resume=latest"])
    assert rows_r == rows0
    assert all(torch.equal(w0[k], w_r[k]) for k in w0)


def test_loader_restarts_at_any_step():
    items = [{"latents_w": torch.full((1, 2, 2), float(i)), "latents_l": torch.zeros(1, 2, 2),
              "text": torch.zeros(3, 4), "user_id": str(i)} for i in range(8)]
    order = DataOrder(8, 4, seed=5)
    slots = rank_slots(4, 2, rank=1, world=2)
    loader = StepLoader(items, order, slots, total_steps=6, device=torch.device("cpu"), workers=1)
    first = [loader.batches(s) for s in range(3)]
    again = loader.batches(1)            # out of order: restarts there
    assert again[0]["user_id"] == first[1][0]["user_id"]
    for step, batches in enumerate(first):
        want = [order.step_indices(step)[s] for s in slots[0]]
        assert batches[0]["user_id"] == [str(i) for i in want]
    loader.close()
