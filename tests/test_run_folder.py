"""Run folders are owned: a fresh run never writes into another run's folder, overwrite moves the
old run aside, default names are unique, and pruning never deletes the checkpoints it just wrote."""
from __future__ import annotations

import json
import os
import threading

import pytest

from ppd_engine.config import load_config
from ppd_engine.testing.tiny_training import make_embeddings, make_items, tiny_model
from ppd_engine.training import Trainer
from ppd_engine.training import checkpoint as ckpt

BASE = ["train.pairs_per_step=4", "train.micro_batch=2", "train.max_steps=2", "train.mixed_precision=fp32",
        "optim.name=adamw", "optim.lr=1e-3", "log.tensorboard=false", "log.progress=false", "checkpoint.every=0"]


def _fit(run_dir, extra=()):
    model = tiny_model("sd15")
    cfg = load_config(None, [*BASE, *extra])
    return Trainer(cfg, model, make_items(model, 8), make_embeddings(du=24), str(run_dir)).fit()


def test_fresh_run_into_a_run_folder_is_refused(tmp_path):
    _fit(tmp_path)
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"holds another run.*--resume.*log\.overwrite=true"):
        _fit(tmp_path, ["loss.beta=10"])
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert "beta: 5000.0" in (tmp_path / "config.yaml").read_text()


def test_overwrite_moves_the_old_run_aside(tmp_path):
    run = tmp_path / "run"
    _fit(run)
    old_metrics = (run / "metrics.jsonl").read_text()
    _fit(run, ["log.overwrite=true", "train.max_steps=1"])
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").read_text() == old_metrics
    assert [s for s, _ in ckpt.list_checkpoints(aside[0])] == [2]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [1]


def test_default_run_names_are_unique_within_one_second(tmp_path, monkeypatch):
    from ppd_engine.train import default_run_dir

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, [])
    names = []
    threads = [threading.Thread(target=lambda: names.append(default_run_dir(cfg))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == 4 and all(os.path.isdir(n) for n in names)


def test_pruning_keeps_the_checkpoint_just_written(tmp_path):
    """Resuming from an older step of a run that has newer checkpoints: keep_last never deletes the
    new checkpoint because an old one has a higher step number."""
    _fit(tmp_path, ["train.max_steps=4", "checkpoint.every=2", "checkpoint.keep_last=2"])
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 4]
    result = _fit(tmp_path, [f"checkpoint.resume={tmp_path / 'checkpoints' / 'step-2'}", "train.max_steps=3",
                             "checkpoint.keep_last=1"])
    assert result.last_checkpoint and os.path.isdir(result.last_checkpoint)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4]


def test_train_cli_refuses_a_run_folder_before_the_toy_world_writes(tmp_path):
    from ppd_engine.train import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("world: toy\n")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    rc = main(["--config", "toy_smoke", f"log.run_dir={run}"])
    assert rc == 2
    assert sorted(os.listdir(run)) == ["config.yaml", "metrics.jsonl"]
    assert json.loads((run / "metrics.jsonl").read_text()) == {"step": 1}
