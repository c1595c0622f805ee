"""Config: YAML + key.sub=value overrides, typed conversion, errors that name the key, --help."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ppd_engine.config import Config, ConfigError, config_help, load_config, save_config

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_the_paper_recipe():
    c = load_config(None)
    assert (c.optim.lr, c.train.pairs_per_step, c.loss.beta, c.train.empty_caption_prob) == (1e-5, 768, 5000.0, 0.2)
    assert c.optim.name == "adamw8bit" and c.loss.name == "dpo"


def test_overrides_are_converted_by_field_type():
    c = load_config(None, ["train.max_steps=7", "optim.lr=3e-6", "train.gradient_checkpointing=yes",
                           "loss.options={label_smoothing: 0.25}", "optim.betas=[0.8, 0.95]",
                           "toy.seen_users=[warm_bright, muted]", "model.pretrained=1234", "loss.name=ipo"])
    assert c.train.max_steps == 7 and isinstance(c.train.max_steps, int)
    assert c.optim.lr == 3e-6 and c.train.gradient_checkpointing is True
    assert c.loss.options == {"label_smoothing": 0.25} and c.optim.betas == [0.8, 0.95]
    assert c.toy.seen_users == ["warm_bright", "muted"] and c.model.pretrained == "1234" and c.loss.name == "ipo"


@pytest.mark.parametrize("override, needle", [
    ("train.bogus=1", "unknown key train.bogus; allowed keys in train: seed,"),
    ("nosuch.key=1", "unknown key nosuch"),
    ("loss.name=dpoo", "loss.name: 'dpoo' is not allowed; choose one of: dpo, hinge, ipo, robust, kto, mapo, orpo, sft"),
    ("optim.name=sgd", "optim.name: 'sgd' is not allowed; choose one of: adamw8bit, adamw, adafactor"),
    ("train.paired_strategy=fused", "train.paired_strategy: 'fused' is not allowed; choose one of: sequential, stacked"),
    ("train.max_steps=1.5", "train.max_steps: '1.5' is not a valid int"),
    ("train.gradient_checkpointing=maybe", "train.gradient_checkpointing: 'maybe' is not a valid bool"),
    ("train.empty_caption_prob=1.5", "train.empty_caption_prob: 1.5 must be in [0, 1]"),
    ("optim.lr=-1", "optim.lr: -1.0 must be > 0"),
    ("train=3", "train is a section"),
    ("train.seed", "must look like key.sub=value"),
    ("train.seed.x=1", "train.seed is a value, not a section"),
    ("model.dtype=bf16", "model.dtype: bf16 base weights need train.mixed_precision=bf16"),
    ("dist.adapters=shard", "optim.name: adafactor factors its second moment"),
    ("toy.seed=abc", "toy.seed: 'abc' is not a valid int"),
])
def test_bad_overrides_name_the_key(override, needle):
    extra = {"model.dtype=bf16": ["train.mixed_precision=fp32"],
             "dist.adapters=shard": ["optim.name=adafactor"]}.get(override, [])
    with pytest.raises(ConfigError) as err:
        load_config(None, [*extra, override])
    assert needle in str(err.value)


def test_yaml_unknown_and_bad_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  micro_batch: 2\n  warmup: 3\n")
    with pytest.raises(ConfigError, match="unknown key train.warmup; allowed keys in train"):
        load_config(p)
    p.write_text("loss:\n  name: [dpo]\n")
    with pytest.raises(ConfigError, match="loss.name"):
        load_config(p)
    p.write_text("train: 5\n")
    with pytest.raises(ConfigError, match="train: is a section"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_save_and_reload_round_trip(tmp_path):
    c = load_config(None, ["optim.lr=2e-5", "loss.options={label_smoothing: 0.1}", "log.sample_prompts=[a, b]"])
    save_config(c, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == c
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["lr"] == 2e-5


def test_shipped_configs_load():
    need = ["data.folder=/data/pickapic", "data.embeddings=/data/users.safetensors"]
    for name in ("sd15_pickapic", "sdxl_pickapic"):
        c = load_config(ROOT / "configs" / f"{name}.yaml", need)
        assert c.world == "pickapic" and c.model.family == name[:4] and c.train.pairs_per_step == 768
    with pytest.raises(ConfigError, match="data.folder"):
        load_config(ROOT / "configs" / "sd15_pickapic.yaml")


def test_help_documents_every_key():
    text = config_help()
    import dataclasses
    import typing

    def keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                yield from keys(tp, prefix + f.name + ".")
            else:
                yield prefix + f.name

    all_keys = list(keys(Config))
    assert len(all_keys) > 60
    for k in all_keys:
        assert f"  {k} (" in text, k
    out = subprocess.run([sys.executable, "-m", "ppd_engine.train", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0 and "train.pairs_per_step" in out.stdout and "--resume" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "ppd_engine.train", "loss.name=nope"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "loss.name: 'nope' is not allowed" in bad.stderr
