"""Every registered loss, and a mixture, trains a few steps through the Trainer on a tiny SD1.5 UNet
(built with ppd_engine.testing.tiny_training as in tests/test_train.py), and through
`python -m ppd_engine.train loss.name=...` in the smoke config."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from ppd_engine.testing.tiny_training import make_embeddings, make_items, tiny_model

FAST = ["train.pairs_per_step=4", "train.micro_batch=2", "train.mixed_precision=fp32", "optim.lr=1e-3",
        "optim.name=adamw", "log.tensorboard=false", "log.progress=false", "checkpoint.every=0"]
LOSSES_TRAINED = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", "dpo", "cdpo", "kto",
                  "mapo", "orpo", "dspo", "npo"]


@pytest.mark.parametrize("name", LOSSES_TRAINED)
def test_each_loss_trains(name, tmp_path):
    from ppd_engine.config import load_config
    from ppd_engine.training import Trainer

    model = tiny_model("sd15")
    cfg = load_config(None, [*FAST, "train.max_steps=2", "loss.beta=50", f"loss.name={name}"])
    trainer = Trainer(cfg, model, make_items(model, 4), make_embeddings(), str(tmp_path))
    before = [p.detach().clone() for p in trainer.params]
    result = trainer.fit()
    assert result.steps == 2 and result.final_metrics["skipped"] == 0
    with open(os.path.join(tmp_path, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, trainer.params)), f"{name} moved no parameter"


def test_micro_step_mixture_and_trl_stats():
    """micro_step_loss with a list of names and loss_weights equals the weighted sum of the terms."""
    from ppd_engine.testing.tiny_training import make_items as items_of
    from ppd_engine.training.data_order import draw_pairs
    from ppd_engine.training.step import StepStats, collate, micro_step_loss

    from ppd_engine.adapters import add_user_adapters

    model = tiny_model("sd15")
    add_user_adapters(model.unet, user_dim=24, in_tokens=2)
    batch = collate(items_of(model, 2), torch.device("cpu"))
    draws = draw_pairs(0, 0, [0, 1], tuple(batch["latents_w"].shape[1:]), model.noise_scheduler.config.num_train_timesteps,
                       0.0, 0.0, torch.device("cpu"))
    embeds = torch.randn(2, 2, 24)
    empty = model.encode_text([""])

    def run(name, weights=None):
        torch.manual_seed(0)
        return micro_step_loss(model, batch, draws, embeds, empty.states, empty.pooled, loss_name=name, beta=50.0,
                               weighting="uniform", snr_gamma=5.0, loss_options={}, strategy="stacked",
                               autocast_dtype=None, loss_weights=weights)

    loss, stats = run(["sigmoid", "bco_pair"], [0.7, 0.3])
    a, _ = run("sigmoid")
    b, _ = run("bco_pair")
    torch.testing.assert_close(loss, 0.7 * a + 0.3 * b)
    fields = StepStats.__dataclass_fields__
    assert {"rewards_chosen", "rewards_rejected", "rewards_accuracies", "rewards_margins"} <= set(fields)
    assert all(getattr(stats, f).shape == () for f in fields)


@pytest.mark.parametrize("overrides", [
    ["loss.name=[sigmoid, bco_pair, sft]", "loss.weights=[0.8, 0.2, 1.0]"],
    ["loss.name=sigmoid", "loss.options.f_divergence=js_divergence"],
    ["loss.name=dspo"], ["loss.name=npo"], ["loss.name=bco_pair"], ["loss.name=kto"]])
def test_losses_train_through_the_cli(overrides, tmp_path):
    from ppd_engine.train import main

    run = tmp_path / "run"
    assert main(["--config", "toy_smoke", *overrides, f"log.run_dir={run}", "toy.eval_samples_per_user=1",
                 "toy.interpolation_samples=1"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]  # toy_smoke's held-out evaluation adds a step-0 eval row
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    assert "rewards_margins" in rows[0]  # TRL's metric names are logged beside diffusers'
