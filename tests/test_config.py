"""Config: schema + loader, world defaults that layer under YAML and overrides, typed conversion,
errors that name the key, presets as package data, --help / --print-config telling the truth."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

import ppd_engine.worlds  # noqa: F401  (registers toy + pickapic)
from ppd_engine.config import ConfigError, config_class, config_help, load_config, save_config

ROOT = Path(__file__).resolve().parent.parent
PICKAPIC = ["world=pickapic", "data.folder=/data/pickapic", "data.embeddings=/data/users.safetensors"]


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "ppd_engine.train", *args], capture_output=True, text=True,
                          cwd=kw.get("cwd", ROOT), timeout=180)


def test_schema_defaults_are_the_paper_recipe():
    c = load_config(None)
    assert c.world == ""
    assert (c.optim.lr, c.train.pairs_per_step, c.loss.beta, c.train.empty_caption_prob) == (1e-5, 768, 5000.0, 0.2)
    assert c.optim.name == "adamw8bit" and c.loss.name == "dpo" and c.optim.warmup_steps == 0


def test_world_defaults_layer_under_yaml_and_overrides(tmp_path):
    toy = load_config(None, [], default_world="toy")
    assert (toy.world, toy.loss.beta, toy.optim.lr, toy.model.family) == ("toy", 100.0, 3e-3, "toy")
    # world=pickapic named by an override wins over the CLI's default world and inherits nothing of the toy's
    real = load_config(None, PICKAPIC, default_world="toy")
    assert (real.loss.beta, real.optim.lr, real.optim.warmup_steps, real.model.family) == (5000.0, 1e-5, 0, "sd15")
    # a YAML that names only a few keys of the toy world still gets the rest from the toy preset
    p = tmp_path / "mine.yaml"
    p.write_text("world: toy\ntrain:\n  max_steps: 7\n")
    c = load_config(p, ["loss.beta=50"])
    assert (c.train.max_steps, c.loss.beta, c.optim.lr, c.toy.pairs_per_user) == (7, 50.0, 3e-3, 512)


def test_overrides_are_converted_by_field_type():
    c = load_config(None, ["train.max_steps=7", "optim.lr=3e-6", "train.gradient_checkpointing=yes",
                           "loss.name=robust", "loss.options={label_smoothing: 0.25}", "optim.betas=[0.8, 0.95]",
                           "toy.seen_users=[warm_bright, muted]", "model.pretrained=1234", "cache.dtype=bfloat16"])
    assert c.train.max_steps == 7 and isinstance(c.train.max_steps, int)
    assert c.optim.lr == 3e-6 and c.train.gradient_checkpointing is True
    assert c.loss.options == {"label_smoothing": 0.25} and c.optim.betas == [0.8, 0.95]
    assert c.toy.seen_users == ["warm_bright", "muted"] and c.model.pretrained == "1234" and c.loss.name == "robust"
    assert c.cache.dtype == "bf16"  # the one dtype table: aliases are stored canonical


def test_one_mapping_entry_override():
    c = load_config(None, ["loss.name=robust", "loss.options.label_smoothing=0.3"])
    assert c.loss.options == {"label_smoothing": 0.3}


@pytest.mark.parametrize("override, needle", [
    ("train.bogus=1", "unknown key train.bogus (allowed keys in train: seed,"),
    ("train.max_step=1", "unknown key train.max_step; did you mean 'max_steps'?"),
    ("nosuch.key=1", "unknown key nosuch"),
    ("loss.name=dpoo", "loss.name: 'dpoo' is not a registered loss; did you mean 'dpo'?"),
    ("optim.name=sgd", "optim.name: 'sgd' is not allowed; choose one of: adamw8bit, adamw, adafactor"),
    ("train.paired_strategy=fused", "train.paired_strategy: 'fused' is not allowed; choose one of: sequential, stacked"),
    ("train.max_steps=1.5", "train.max_steps: '1.5' is not a valid int"),
    ("train.gradient_checkpointing=maybe", "train.gradient_checkpointing: 'maybe' is not a valid bool"),
    ("train.empty_caption_prob=1.5", "train.empty_caption_prob: 1.5 must be in [0, 1]"),
    ("optim.lr=-1", "optim.lr: -1.0 must be > 0"),
    ("optim.lr=inf", "optim.lr: inf is not a finite number"),
    ("loss.beta=nan", "loss.beta: nan is not a finite number"),
    ("train=3", "train is a section"),
    ("train.seed", "must look like key.sub=value"),
    ("train.seed.x=1", "train.seed is a value, not a section"),
    ("model.dtype=bf16", "model.dtype: bf16 base weights need train.mixed_precision=bf16"),
    ("model.dtype=int8", "model.dtype: 'int8' is not a dtype"),
    ("model.family=sd3", "model.family: 'sd3' is not a registered model family"),
    ("dist.adapters=shard", "optim.name: adafactor factors its second moment"),
    ("toy.seed=abc", "toy.seed: 'abc' is not a valid int"),
    ("world=moon", "world: 'moon' is not a registered world; choose one of: pickapic, toy"),
    ("loss.options.label_smoothng=0.1", "loss.options.label_smoothng: not an option of robust; allowed: f_alpha, f_divergence, label_smoothing"),
])
def test_bad_overrides_name_the_key(override, needle):
    extra = {"model.dtype=bf16": ["train.mixed_precision=fp32"],
             "dist.adapters=shard": ["optim.name=adafactor"],
             "loss.options.label_smoothng=0.1": ["loss.name=robust"]}.get(override, [])
    with pytest.raises(ConfigError) as err:
        load_config(None, [*extra, override])
    assert needle in str(err.value)


def test_toy_section_is_validated():
    with pytest.raises(ConfigError, match="toy.seen_users: 'nobody' is not a toy user"):
        load_config(None, ["toy.seen_users=[nobody]"], default_world="toy")
    with pytest.raises(ConfigError, match="toy.unseen_users: .*also seen"):
        load_config(None, ["toy.unseen_users=[vivid]"], default_world="toy")


def test_yaml_errors_name_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  micro_batch: 2\n  warmup: 3\n")
    with pytest.raises(ConfigError, match="unknown key train.warmup"):
        load_config(p)
    p.write_text("loss:\n  name: {a: 1}\n")
    with pytest.raises(ConfigError, match="loss.name"):
        load_config(p)
    p.write_text("train: 5\n")
    with pytest.raises(ConfigError, match="train: is a section"):
        load_config(p)
    p.write_text("train:\n  seed: 1\n  seed: 2\n")
    with pytest.raises(ConfigError, match=r"c.yaml: line 3: key 'seed' is given twice"):
        load_config(p)
    p.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match=r"c.yaml: not valid YAML \(line"):
        load_config(p)
    p.write_bytes(b"train:\n  seed: \xff\xfe\n")
    with pytest.raises(ConfigError, match="c.yaml: not UTF-8"):
        load_config(p)
    with pytest.raises(ConfigError, match="no such file and no such preset"):
        load_config(tmp_path / "missing.yaml")


def test_save_and_reload_round_trip(tmp_path):
    c = load_config(None, ["optim.lr=2e-5", "loss.name=robust", "loss.options={label_smoothing: 0.1}",
                           "log.sample_prompts=[a, b]"], default_world="toy")
    save_config(c, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == c
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["lr"] == 2e-5


def test_presets_load_by_name_and_path():
    for name in ("sd15_pickapic", "sdxl_pickapic"):
        c = load_config(name, PICKAPIC[1:])
        assert c.world == "pickapic" and c.model.family == name[:4] and c.train.pairs_per_step == 768
        assert load_config(ROOT / "configs" / f"{name}.yaml", PICKAPIC[1:]) == c
    with pytest.raises(ConfigError, match="data.folder"):
        load_config("sd15_pickapic")
    assert load_config("toy_smoke").train.max_steps == 3


def test_help_documents_every_key_with_the_world_values():
    text = config_help()

    def keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                yield from keys(tp, prefix + f.name + ".")
            else:
                yield prefix + f.name

    all_keys = list(keys(config_class()))
    assert len(all_keys) > 60 and "toy.user_guidance" in all_keys
    for k in all_keys:
        assert f"  {k} (" in text, k
    # the schema's default and the toy world's own value, both shown
    assert "loss.beta (float; default 5000.0; toy: 100.0)" in text


def test_cli_help_print_config_and_one_line_errors():
    out = _cli("--help")
    assert out.returncode == 0 and "train.pairs_per_step" in out.stdout and "--print-config" in out.stdout
    assert "margin" not in out.stdout or "LOSSES" in out.stdout
    shown = _cli("world=pickapic", "--print-config")
    assert shown.returncode == 0, shown.stderr
    printed = yaml.safe_load(shown.stdout)
    assert (printed["loss"]["beta"], printed["optim"]["lr"], printed["optim"]["warmup_steps"]) == (5000.0, 1e-05, 0)
    assert "toy" not in printed.get("world", "") and "# not runnable as it stands: data.folder" in shown.stdout
    toy = yaml.safe_load(_cli("--print-config").stdout)
    assert (toy["world"], toy["loss"]["beta"]) == ("toy", 100.0)
    bad = _cli("loss.name=nope")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        bad.stderr.strip().splitlines()[0]] and "loss.name: 'nope' is not a registered loss" in bad.stderr
    flag = _cli("--max_steps", "10")
    assert flag.returncode == 2 and "use train.max_steps=10" in flag.stderr and "Traceback" not in flag.stderr
