"""Integrity: every checkpoint file is hashed in state.json (adapter files also in their own
metadata), a flipped byte is refused naming the file, resume falls back to the previous intact
checkpoint, and truncated files give errors that name them."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch

from ppd_engine.config import load_config
from ppd_engine.testing.tiny_training import make_embeddings, make_items, tiny_model
from ppd_engine.training import Trainer, load_run
from ppd_engine.training import checkpoint as ckpt

BASE = ["train.pairs_per_step=4", "train.micro_batch=2", "train.mixed_precision=fp32", "optim.lr=1e-3",
        "optim.min_8bit_size=256", "log.tensorboard=false", "log.progress=false", "checkpoint.every=1",
        "checkpoint.keep_last=2", "train.max_steps=2"]
KINDS = ["adapters.safetensors", "optimizer-rank0.safetensors", "optimizer-rank0.json", "rng-rank0.safetensors",
         "state.json", "config.yaml"]


def _trainer(run_dir, extra=()):
    model = tiny_model("sd15")
    cfg = load_config(None, [*BASE, *extra])
    return Trainer(cfg, model, make_items(model, 8), make_embeddings(du=24), str(run_dir))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("integrity") / "run"
    _trainer(path).fit()
    assert [s for s, _ in ckpt.list_checkpoints(path)] == [1, 2]
    return path


def _flip(path, where=0.5):
    data = bytearray(path.read_bytes())
    i = min(len(data) - 1, int(len(data) * where))
    data[i] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", KINDS)
def test_a_flipped_byte_is_refused_and_resume_falls_back(run, tmp_path, name, caplog):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    # The end of a safetensors file is tensor data; the middle of a text file is content.
    _flip(copy / "checkpoints" / "step-2" / name, 0.97 if name.endswith(".safetensors") else 0.5)
    with pytest.raises(ValueError, match=rf"step-2[/\\]{name}"):
        _trainer(copy, [f"checkpoint.resume={copy / 'checkpoints' / 'step-2'}", "train.max_steps=3"])
    with caplog.at_level(logging.WARNING):
        trainer = _trainer(copy, ["checkpoint.resume=latest", "train.max_steps=3"])
    assert trainer.resume_from == copy / "checkpoints" / "step-1" and trainer.step == 1
    assert any(name in r.getMessage() and "step-1" in r.getMessage() for r in caplog.records)


def test_load_run_refuses_a_flipped_adapter_byte(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    _flip(copy / "checkpoints" / "step-2" / "adapters.safetensors", 0.97)
    with pytest.raises(ValueError, match=r"step-2[/\\]adapters.safetensors"):
        load_run(copy, model=tiny_model("sd15"))


def test_adapter_file_carries_its_tensor_hash(run, tmp_path):
    from ppd_engine.adapters import AdapterFileError, load_user_adapters

    f = tmp_path / "a.safetensors"
    shutil.copy(run / "checkpoints" / "step-2" / "adapters.safetensors", f)
    load_user_adapters(tiny_model("sd15").unet, f)
    _flip(f, 0.97)
    with pytest.raises(AdapterFileError, match=rf"{f}: tensor data does not match its sha256"):
        load_user_adapters(tiny_model("sd15").unet, f)


def test_exported_ip_adapter_carries_its_hash(tmp_path):
    from ppd_engine.adapters import add_user_adapters
    from ppd_engine.adapters.io import (
        AdapterFileError,
        check_tensor_hash,
        export_ip_adapter,
    )
    from ppd_engine.testing.tiny_unets import tiny_unet

    unet = tiny_unet("sd15")
    handle = add_user_adapters(unet, user_dim=24, num_tokens=4, in_tokens=1)
    with torch.no_grad():
        for p in handle.parameters():
            p.add_(torch.randn(p.shape) * 0.2)
    out = tmp_path / "ip_adapter.safetensors"
    export_ip_adapter(unet, out)
    check_tensor_hash(out)
    _flip(out, 0.97)
    with pytest.raises(AdapterFileError, match=rf"{out}: tensor data does not match its sha256"):
        check_tensor_hash(out)


@pytest.mark.parametrize("name", ["optimizer-rank0.json", "optimizer-rank0.safetensors", "rng-rank0.safetensors",
                                  "state.json"])
def test_truncated_files_name_themselves(run, tmp_path, name):
    """Read directly (no hash check in the way): one-line errors naming the file, not a
    SafetensorError or a bare JSONDecodeError."""
    import json

    from safetensors import SafetensorError

    from ppd_engine.training.optim import build_optimizer, load_optimizer_state

    copy = tmp_path / "step-2"
    shutil.copytree(run / "checkpoints" / "step-2", copy)
    path = copy / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=str(path)) as info:
        if name.startswith("optimizer"):
            p = torch.nn.Parameter(torch.zeros(2))
            load_optimizer_state(build_optimizer([p], load_config(None, BASE).optim), str(copy / "optimizer-rank0"))
        elif name.startswith("rng"):
            ckpt.restore_rng_state(path)
        else:
            ckpt.read_json(path)
    assert not isinstance(info.value, (SafetensorError, json.JSONDecodeError))
    assert "\n" not in str(info.value)


def test_a_missing_rng_file_is_an_error_on_resume(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "step-2" / "rng-rank0.safetensors").unlink()
    with pytest.raises(ValueError, match=r"rng-rank0.safetensors"):
        _trainer(copy, [f"checkpoint.resume={copy / 'checkpoints' / 'step-2'}", "train.max_steps=3"])
