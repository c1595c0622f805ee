"""Inputs a user types: non-finite or degenerate sampling inputs, devices, seeds and the order of
overrides around --config are refused or handled at start-up, in one line."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ppd_engine.config import ConfigError, load_config


@pytest.mark.parametrize("spec,why", [("a:nan", "not a finite number"), ("a:inf", "not a finite number"),
                                      ("a:0.5,b:-inf", "not a finite number"), ("a:1,b:-1", "sum to 0"),
                                      ("a:0", "sum to 0")])
def test_mix_weights_must_be_finite_and_not_sum_to_zero(spec, why):
    from ppd_engine.sample import parse_mix

    with pytest.raises(ValueError, match=why):
        parse_mix(spec)


def test_a_non_finite_embedding_file_is_refused(tmp_path):
    from ppd_engine.sample import load_embedding_file

    e = torch.randn(2, 8)
    e[1, 3] = float("nan")
    path = tmp_path / "me.safetensors"
    save_file({"embedding": e}, str(path))
    with pytest.raises(ValueError, match=rf"--embedding {path}: .*NaN/Inf"):
        load_embedding_file(path)


@pytest.mark.parametrize("flag", ["--guidance", "--user-scale", "--user-guidance"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_sample_refuses_non_finite_numbers_before_loading_anything(tmp_path, capsys, flag, value):
    from ppd_engine.sample import main

    rc = main(["--run", str(tmp_path / "nope"), "--base", "--prompt", "x", "--out", str(tmp_path / "o"),
               flag, value])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: {flag} {value}") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_device_typos_are_refused_at_start_up(tmp_path, capsys):
    from ppd_engine.train import main

    with pytest.raises(ConfigError, match="train.device: 'cudafoo'"):
        load_config(None, ["train.device=cudafoo"])
    run = tmp_path / "run"
    assert main(["--config", "toy_smoke", "train.device=cudafoo", f"log.run_dir={run}"]) == 2
    assert "train.device" in capsys.readouterr().err and not run.exists()


def test_seeds_are_not_reduced_mod_2_32():
    from ppd_engine.training.data_order import DataOrder, mix_seed

    assert mix_seed(2**32, 1) != mix_seed(0, 1)
    assert not torch.equal(DataOrder(64, 4, 2**32).permutation(0), DataOrder(64, 4, 0).permutation(0))
    for bad in ("-1", str(2**63)):
        with pytest.raises(ConfigError, match=r"train.seed: .* must be in \[0, 2\^63\)"):
            load_config(None, [f"train.seed={bad}"])


def test_overrides_on_both_sides_of_config():
    from ppd_engine.train import _parse, build_parser

    args = _parse(build_parser(), ["train.max_steps=7", "--config", "toy_smoke", "loss.beta=3"])
    assert args.config == "toy_smoke" and args.overrides == ["train.max_steps=7", "loss.beta=3"]


def test_a_truncated_embedding_file_is_one_named_error(tmp_path):
    from ppd_engine.sample import load_embedding_file

    path = tmp_path / "me.safetensors"
    save_file({"embedding": torch.randn(2, 8)}, str(path))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=rf"--embedding {path}: not a readable safetensors file"):
        load_embedding_file(path)
