"""Only finite states are saved: a non-finite update is rolled back and never checkpointed, and a
run that made no good step does not end as a success."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ppd_engine.config import load_config
from ppd_engine.testing.tiny_training import make_embeddings, make_items, tiny_model
from ppd_engine.training import BadStepsError, Trainer
from ppd_engine.training import checkpoint as ckpt

BASE = ["train.pairs_per_step=4", "train.micro_batch=2", "train.mixed_precision=fp32", "optim.name=adamw",
        "log.tensorboard=false", "log.progress=false", "checkpoint.every=1", "checkpoint.keep_last=10"]


def _all_finite(run_dir) -> None:
    found = ckpt.list_checkpoints(run_dir)
    assert found
    for _, folder in found:
        for f in folder.glob("*.safetensors"):
            for key, t in load_file(str(f)).items():
                assert not t.is_floating_point() or torch.isfinite(t).all(), f"{f.name}:{key}"


def test_huge_lr_update_is_rolled_back_and_never_saved(tmp_path):
    """lr=1e30 with weight_decay=1e10 pass the config (finite), but AdamW's decay factor
    1 - lr * weight_decay overflows float32: the first update makes the adapters inf/NaN."""
    model = tiny_model("sd15")
    cfg = load_config(None, [*BASE, "optim.lr=1e30", "optim.weight_decay=1e10", "train.max_steps=6",
                             "train.max_bad_steps=2"])
    trainer = Trainer(cfg, model, make_items(model, 8), make_embeddings(du=24), str(tmp_path))
    with pytest.raises(BadStepsError, match="last finite state"):
        trainer.fit()
    assert trainer.updates == 0 and trainer.bad_total == 3
    assert all(torch.isfinite(p).all() for p in trainer.params)
    _all_finite(tmp_path)


def test_cli_huge_lr_exits_non_zero_with_finite_checkpoints(tmp_path, capsys):
    from ppd_engine.train import main

    run = tmp_path / "run"
    rc = main(["--config", "toy_smoke", f"log.run_dir={run}", "optim.lr=1e30", "optim.weight_decay=1e10",
               "train.max_bad_steps=1",
               "checkpoint.every=1", "checkpoint.keep_last=5"])
    assert rc == 3
    assert "training stopped" in capsys.readouterr().err
    _all_finite(run)


def test_a_run_whose_every_step_was_skipped_is_not_a_success(tmp_path):
    model = tiny_model("sd15")
    embeds = {u: torch.full_like(e, float("nan")) for u, e in make_embeddings(du=24).items()}
    cfg = load_config(None, [*BASE, "optim.lr=1e-3", "train.max_steps=2", "train.max_bad_steps=10",
                             "train.user_dropout=0", "checkpoint.every=0"])
    with pytest.raises(BadStepsError, match="no step"):
        Trainer(cfg, model, make_items(model, 8), embeds, str(tmp_path)).fit()
    assert ckpt.list_checkpoints(tmp_path) == []
