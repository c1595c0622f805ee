"""train.reference=cached: one reference pass shared by the runs of a sweep, equal to the online reference."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from ppd_engine.testing.tiny_training import make_embeddings, make_items, tiny_model

ROOT = str(Path(__file__).resolve().parent.parent)

FAST = ["train.pairs_per_step=4", "train.micro_batch=2", "train.mixed_precision=fp32", "optim.lr=1e-3",
        "optim.min_8bit_size=256", "log.tensorboard=false", "log.progress=false", "checkpoint.every=0",
        "train.empty_caption_prob=0.3", "train.epochs=2"]


def _rows(run_dir):
    with open(run_dir / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh]


class _Counted:
    """Counts UNet forward calls (a forward pre-hook) and the pairs each call carries."""

    def __init__(self, unet):
        self.calls: list[int] = []
        unet.register_forward_pre_hook(lambda m, args: self.calls.append(args[0].shape[0] // 2))


def _train(tmp_path, name, overrides, items_seed=0, personalized=True, family="sd15"):
    from ppd_engine.config import load_config
    from ppd_engine.training import Trainer

    model = tiny_model(family)
    counted = _Counted(model.unet)
    cfg = load_config(None, [*FAST, f"train.reference_dir={tmp_path / 'refs'}", *overrides])
    items = make_items(model, 6, seed=items_seed)
    run = tmp_path / name
    Trainer(cfg, model, items, make_embeddings() if personalized else None, str(run),
            personalized=personalized).fit()
    return _rows(run), counted.calls


def test_sweep_runs_share_one_reference_pass(tmp_path):
    """A β sweep, another loss and the non-personalized baseline reuse the first run's reference
    pass: they run one UNet forward per micro-batch (the policy), none for the reference."""
    steps, accum = 2 * (6 // 4), 4 // 2
    first, calls = _train(tmp_path, "beta-5000", [])
    pre = calls[: len(calls) - steps * accum]
    assert sum(pre) == steps * 4 and calls[len(pre):] == [2] * (steps * accum)  # pre-pass, then policy only
    assert len(list((tmp_path / "refs").iterdir())) == 1
    for name, extra, personalized in (("beta-500", ["loss.beta=500"], True), ("hinge", ["loss.name=hinge"], True),
                                      ("baseline", ["adapters.user_dim=24"], False)):
        rows, calls = _train(tmp_path, name, extra, personalized=personalized)
        assert calls == [2] * (steps * accum), name  # no reference forward at all
        assert [r["ref_mse"] for r in rows] == [r["ref_mse"] for r in first], name
    assert len(list((tmp_path / "refs").iterdir())) == 1
    # A different seed draws other t / noise: a new pass and a second file.
    _, calls = _train(tmp_path, "seed-1", ["train.seed=1"])
    assert len(calls) > steps * accum and len(list((tmp_path / "refs").iterdir())) == 2
    # Other data: recomputed too.
    _, calls = _train(tmp_path, "other-data", [], items_seed=5)
    assert len(calls) > steps * accum and len(list((tmp_path / "refs").iterdir())) == 3


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_cached_reference_losses_equal_online(tmp_path, family):
    """Same run with the reference online and cached, over two epochs with caption dropout: with the
    default pass batch (the micro-batch) every logged number is identical; with a larger batch the
    reference MSEs agree to float32 rounding and the loss to beta/2 times that."""
    online, on_calls = _train(tmp_path, "online", ["train.reference=online"], family=family)
    cached, _ = _train(tmp_path / "a", "cached", [], family=family)
    big, _ = _train(tmp_path / "b", "big", ["train.reference_batch=16"], family=family)
    assert len(online) == len(cached) == len(big) == 2
    assert len(on_calls) == 2 * 2 * 2  # two forwards (reference + policy) per micro-batch
    keys = ("loss", "ref_mse", "model_mse", "reward_margin", "grad_norm")
    for a, b, c in zip(online, cached, big):
        assert [b[k] for k in keys] == [a[k] for k in keys]
        eps = torch.finfo(torch.float32).eps
        assert c["ref_mse"] == pytest.approx(a["ref_mse"], rel=8 * eps)
        assert c["loss"] == pytest.approx(a["loss"], abs=0.5 * 5000 * 8 * eps * a["ref_mse"])
    assert online[-1]["model_mse"] != online[-1]["ref_mse"]  # the policy moved: a real comparison


@pytest.mark.parametrize("extra,why", [(["train.paired_strategy=stacked"], "stacked"),
                                       (["loss.name=dspo"], "reads the reference prediction")])
def test_invalid_runs_fall_back_to_online(tmp_path, caplog, extra, why):
    with caplog.at_level(logging.INFO, logger="ppd_engine.training.trainer"):
        _, calls = _train(tmp_path, "run", extra + ["train.epochs=1"])
    assert why in caplog.text and "running the reference online" in caplog.text
    assert not (tmp_path / "refs").exists()
    if "stacked" not in why:
        assert len(calls) == 2 * 1 * 2  # reference + policy per micro-batch


def test_fingerprint_covers_what_the_reference_depends_on():
    from ppd_engine.adapters import add_user_adapters
    from ppd_engine.training.data_order import DataOrder
    from ppd_engine.training.reference import fingerprint, reference_meta

    model = tiny_model("sd15")
    adapters = add_user_adapters(model.unet, user_dim=24, in_tokens=2)
    items = make_items(model, 6)
    base = dict(model=model, adapters=adapters, dataset=items, order=DataOrder(6, 4, 0), total_steps=3, seed=0,
                empty_caption_prob=0.2, empty_text=torch.zeros(1, 8, 32), empty_pooled=None, mixed_precision="fp32",
                device=torch.device("cpu"))
    fp = fingerprint(reference_meta(**base))
    # Training the adapters does not change it; touching a base weight does.
    with torch.no_grad():
        next(adapters.parameters()).add_(1.0)
    assert fingerprint(reference_meta(**base)) == fp
    for change in (dict(seed=1), dict(total_steps=4), dict(empty_caption_prob=0.3), dict(mixed_precision="bf16"),
                   dict(order=DataOrder(6, 2, 0)), dict(empty_text=torch.ones(1, 8, 32)),
                   dict(dataset=items[:5])):
        assert fingerprint(reference_meta(**{**base, **change})) != fp, change
    with torch.no_grad():
        model.unet.conv_in.weight[0, 0, 0, 0] += 1e-3
    assert fingerprint(reference_meta(**base)) != fp


def test_a_corrupt_reference_file_is_recomputed(tmp_path):
    _train(tmp_path, "a", ["train.epochs=1"])
    (path,) = (tmp_path / "refs").iterdir()
    path.write_bytes(b"not a safetensors file")
    _, calls = _train(tmp_path, "b", ["train.epochs=1"])
    assert len(calls) > 2 and path.stat().st_size > 100


def test_a_flipped_byte_in_the_reference_table_is_recomputed_naming_the_file(tmp_path, caplog):
    from ppd_engine.testing.corrupt import flip_tensor_byte

    _train(tmp_path, "a", ["train.epochs=1"])
    (path,) = (tmp_path / "refs").iterdir()
    _, calls = _train(tmp_path, "clean", ["train.epochs=1"])
    clean_calls = len(calls)   # an intact table is reused: no reference forwards
    flip_tensor_byte(path)     # still a valid safetensors file with the right shape and dtype
    with caplog.at_level(logging.WARNING, logger="ppd_engine.training.reference"):
        _, calls = _train(tmp_path, "b", ["train.epochs=1"])
    assert f"{path}: tensor data does not match its sha256" in caplog.text
    assert len(calls) > clean_calls


def test_schedule_identity_is_the_same_in_every_process():
    """diffusers records `_use_default_values` as a list built from a set: its order follows the
    process's string hashing. The fingerprint must not, or a sweep's separate processes never share
    a reference pass."""
    import subprocess
    import sys

    code = ("import json; from diffusers import DDPMScheduler; "
            "from ppd_engine.training.reference import schedule_identity; "
            "s = DDPMScheduler(num_train_timesteps=1000, beta_schedule='scaled_linear'); "
            "print(json.dumps(schedule_identity(s), sort_keys=True)); "
            "print(json.dumps(s.config['_use_default_values']))")
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed), "PYTHONPATH": ROOT}).stdout.splitlines()
            for seed in (1, 2, 3)]
    assert len({o[1] for o in outs}) > 1  # the raw config does differ between these processes
    assert len({o[0] for o in outs}) == 1
