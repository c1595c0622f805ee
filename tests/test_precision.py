"""Mixed precision: fp16 autocast with dynamic loss scaling (checkpointed, bitwise resume), overflow
steps that skip without counting as bad, TF32, and accelerate launch's environment honoured or refused."""
from __future__ import annotations

import json
import os

import pytest
import torch

from ppd_engine.config import ConfigError, load_config
from ppd_engine.testing.tiny_training import make_embeddings, make_items, tiny_model
from ppd_engine.training import Trainer
from ppd_engine.training.precision import LossScaler, accelerate_overrides

BASE = ["train.pairs_per_step=4", "train.micro_batch=2", "train.max_steps=6", "train.mixed_precision=fp16",
        "optim.name=adamw", "optim.lr=1e-3", "log.report_to=none", "log.progress=false", "checkpoint.every=3"]


def _rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def _trainer(run_dir, extra=()):
    model = tiny_model("sd15")
    return Trainer(load_config(None, [*BASE, *extra]), model, make_items(model, 8), make_embeddings(), str(run_dir))


def test_scaler_rules_follow_gradscaler():
    s = LossScaler(True, init_scale=8.0, growth_interval=2)
    s.update(True)
    assert s.scale == 4.0 and s.overflows == 1
    s.update(False)
    s.update(False)
    assert s.scale == 8.0 and s.good_steps == 0
    off = LossScaler(False)
    off.update(True)
    assert off.scale == 1.0 and off.overflows == 0


def test_fp16_trains_and_resumes_bitwise(tmp_path):
    # The default 2^16 x the tiny model's gradients (norm ~35) overflows fp16 activation gradients:
    # the scale halves on each overflowing step until steps go through, as GradScaler's would
    # (measured: steps 1-2 overflow, 3-8 go through at 2^14).
    scale = ["train.loss_scale_init=65536"]
    full = _trainer(tmp_path / "full", scale)
    full.fit()
    rows = _rows(tmp_path / "full")
    assert rows[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)  # policy == reference at init
    overflowed = [r for r in rows if r["overflow"]]
    applied = [r for r in rows if not r["skipped"]]
    assert overflowed and applied and full.updates == len(applied)
    assert all(r["bad_steps_total"] == 0 for r in rows)  # overflows are not bad steps
    assert rows[-1]["loss_scale"] == 2.0 ** 16 * 0.5 ** len(overflowed)
    state = json.loads((tmp_path / "full" / "checkpoints" / "step-3" / "state.json").read_text())
    assert state["loss_scaler"]["scale"] == rows[2]["loss_scale"]
    half = _trainer(tmp_path / "half", [*scale, "train.max_steps=3"])
    half.fit()
    resumed = _trainer(tmp_path / "half", [*scale, "checkpoint.resume=latest"])
    resumed.fit()
    assert [(r["loss"], r["grad_norm"], r["loss_scale"]) for r in _rows(tmp_path / "half")] == \
        [(r["loss"], r["grad_norm"], r["loss_scale"]) for r in rows]


def test_an_all_overflow_run_is_not_done(tmp_path):
    from ppd_engine.training import BadStepsError

    # 2^140 is past fp32's range: every step overflows, and a run that never updated must not end "Done".
    with pytest.raises(BadStepsError, match="no step of this run made a finite update"):
        _trainer(tmp_path, ["train.loss_scale_init=1.4e42", "train.max_steps=2"]).fit()


def test_tf32_switch(tmp_path):
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        # Both off first (cuDNN's TF32 is on by default): the trainer must turn each on.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        _trainer(tmp_path, ["train.allow_tf32=true", "train.mixed_precision=no"])
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True  # torch's defaults
        _trainer(tmp_path / "off", ["train.allow_tf32=false", "train.mixed_precision=no"])
        assert not torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # left as they were
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_accelerate_launch_environment_is_honoured_or_refused():
    assert accelerate_overrides({"ACCELERATE_MIXED_PRECISION": "fp16"}, []) == ["train.mixed_precision=fp16"]
    assert accelerate_overrides({"ACCELERATE_MIXED_PRECISION": "no"}, ["train.mixed_precision=fp32"]) == []
    with pytest.raises(ValueError, match="train.mixed_precision=bf16 on the command line"):
        accelerate_overrides({"ACCELERATE_MIXED_PRECISION": "fp16"}, ["train.mixed_precision=bf16"])
    with pytest.raises(ValueError, match="ACCELERATE_USE_FSDP=true .* use dist.adapters=shard"):
        accelerate_overrides({"ACCELERATE_USE_FSDP": "true"}, [])
    assert accelerate_overrides({"ACCELERATE_USE_FSDP": "false", "ACCELERATE_DYNAMO_BACKEND": "no"}, []) == []


def test_accelerate_mixed_precision_reaches_the_run(tmp_path, monkeypatch):
    from ppd_engine.train import build_parser, resolve_config

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    cfg = resolve_config(build_parser().parse_args(["--config", "toy_smoke", f"log.run_dir={tmp_path}"]))
    assert cfg.train.mixed_precision == "fp16"
    with pytest.raises(ConfigError):
        load_config(None, ["train.mixed_precision=fp8"])
