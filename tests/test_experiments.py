"""The method's experiments: beta in the paper's units, the sweep launcher, baselines as config keys."""
from __future__ import annotations

import json
import os

import pytest
import torch

from ppd_engine.testing.tiny_training import make_embeddings, make_items, tiny_model

FAST = ["train.pairs_per_step=2", "train.micro_batch=2", "train.mixed_precision=fp32", "optim.lr=1e-3",
        "optim.name=adamw", "log.tensorboard=false", "log.progress=false", "checkpoint.every=0"]


def test_official_beta_conversion_and_errors():
    from ppd_engine.losses import official_beta

    assert official_beta(5000.0, "official", 1000) == 5000.0
    assert official_beta(2.5, "paper", 1000) == 5000.0
    with pytest.raises(ValueError, match="beta_units"):
        official_beta(1.0, "nats", 1000)
    with pytest.raises(ValueError, match="training timesteps"):
        official_beta(1.0, "paper", 0)


def test_paper_logit_is_minus_beta_T_delta():
    """preference_loss at official_beta(paper) has the paper's logit -beta*T*w*delta, computed here by hand."""
    from ppd_engine.losses import official_beta, preference_loss

    g = torch.Generator().manual_seed(3)
    policy, ref, target = (torch.randn(6, 4, 5, 3, generator=g, dtype=torch.float64) for _ in range(3))
    w = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    beta_paper, T = 0.7, 1000
    e = lambda p: ((p - target) ** 2).mean(dim=(1, 2, 3))
    em, er = e(policy), e(ref)
    delta = (em[:3] - er[:3]) - (em[3:] - er[3:])
    logit = -beta_paper * T * w * delta
    out = preference_loss("sigmoid", policy.float(), ref.float(), target.float(),
                          beta=official_beta(beta_paper, "paper", T), weight=w.float())
    assert out.inside.double() == pytest.approx(logit.tolist(), rel=1e-4)
    assert out.loss.item() == pytest.approx(torch.nn.functional.softplus(-logit).mean().item(), rel=1e-4)


def _second_step(tmp_path, name, overrides):
    from ppd_engine.config import load_config
    from ppd_engine.training import Trainer

    model = tiny_model("sd15")
    cfg = load_config(None, [*FAST, "train.max_steps=2", *overrides])
    Trainer(cfg, model, make_items(model, 2), make_embeddings(), str(tmp_path / name)).fit()
    with open(tmp_path / name / "metrics.jsonl") as fh:
        # Step 1 starts at policy == reference (zero-initialised adapters): step 2 sees beta.
        return [json.loads(line) for line in fh][1]


def test_trainer_paper_units_equal_official_with_derived_beta(tmp_path):
    """The Trainer converts loss.beta_units=paper: the same run in both units logs the same step; a
    beta_paper read as official (no conversion) would not."""
    T = tiny_model("sd15").num_train_timesteps
    beta_paper = 0.02
    paper = _second_step(tmp_path, "paper", [f"loss.beta={beta_paper}", "loss.beta_units=paper"])
    official = _second_step(tmp_path, "official", [f"loss.beta={2 * T * beta_paper}"])
    unconverted = _second_step(tmp_path, "raw", [f"loss.beta={beta_paper}"])
    for key in ("loss", "reward_margin", "implicit_acc"):
        assert paper[key] == pytest.approx(official[key], rel=1e-6, abs=1e-9), key
    assert paper["reward_margin"] != pytest.approx(unconverted["reward_margin"], rel=1e-3)


def test_sweep_launch_writes_one_command_per_beta(tmp_path):
    import shlex

    from ppd_engine.sweep import main

    root = tmp_path / "sw"
    assert main(["launch", "--root", str(root), "--betas", "0.5,2", "--config", "sd15_pickapic", "--nproc", "8",
                 "data.folder=/d", "train.max_steps=10"]) == 0
    lines = (root / "commands.sh").read_text().splitlines()[2:]
    assert [shlex.split(x) for x in lines] == [
        ["torchrun", "--nproc_per_node=8", "-m", "ppd_engine.train", "--config", "sd15_pickapic", "data.folder=/d",
         "train.max_steps=10", f"loss.beta={b}", "loss.beta_units=paper", f"log.run_dir={root / ('beta-' + b)}"]
        for b in ("0.5", "2")]
    assert main(["launch", "--root", str(root), "--betas", "1,1"]) == 2
    assert main(["launch", "--root", str(root), "--betas", "1", "loss.beta=3"]) == 2


@pytest.mark.slow
def test_sweep_launch_run_then_pick_best_beta(tmp_path):
    """Two tiny pickapic runs (β_paper 0.5 and 4, trained here one after the other in subprocesses), then
    `pick` evaluates both and names the one with the higher mean reward."""
    from test_eval_experiments import _store_from_shots
    from test_rewards import make_tiny_clip
    from test_train import tiny_pipeline_dir

    from ppd_engine.sweep import main
    from ppd_engine.testing.pickapic_fixture import write_pickapic_fixture

    data = tmp_path / "pap"
    write_pickapic_fixture(str(data), extra_users=2)
    store, _ = _store_from_shots(data, tmp_path / "users.safetensors")
    root = tmp_path / "sw"
    env_py = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(__import__("pathlib").Path(__file__).parents[1]), env_py])
    try:
        assert main(["launch", "--root", str(root), "--betas", "0.5,4", "--run", "world=pickapic",
                     f"data.folder={data}", f"data.embeddings={store.path}", "model.family=sd15",
                     f"model.pretrained={tiny_pipeline_dir('sd15')}", "model.resolution=32", f"cache.dir={tmp_path / 'c'}",
                     *FAST, "train.max_steps=2", "optim.lr=3e-2", "train.device=cpu"]) == 0
    finally:
        os.environ["PYTHONPATH"] = env_py
    clip = str(make_tiny_clip(tmp_path / "clip"))
    out = tmp_path / "pick"
    assert main(["pick", "--root", str(root), "--out", str(out), "--store", store.path, "--prompts", "parti",
                 "--limit", "2", "--steps", "2", "--num-users", "2", "--device", "cpu", "--no-progress",
                 "--pickscore-model", clip, "--reward", "pickscore"]) == 0
    sw = json.loads((out / "sweep.json").read_text())
    means = {r["name"]: r["mean_reward"] for r in sw["runs"]}
    assert {r["beta"] for r in sw["runs"]} == {0.5, 4.0} and sw["beta_units"] == "paper"
    assert sw["best"] == max(means, key=means.get)


def _readme_commands():
    """(module, argv) of every command in README's "Reproducing the paper" block, continuation lines
    joined, the shell loop's $users bound, heredocs and plain shell lines skipped."""
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("## Reproducing the paper", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    block = re.sub(r"<<'YAML'.*?\nYAML\n", "\n", block, flags=re.S).replace("\\\n", " ")
    out = []
    for line in block.splitlines():
        line = line.split("  #")[0].split(" # ")[0].strip().replace("$users", "seen")
        words = shlex.split(line) if line and not line.startswith("#") else []
        if "-m" in words and words[0] in ("python", "torchrun"):
            i = words.index("-m")
            out.append((words[i + 1], words[i + 2:]))
    return out


def test_readme_reproduction_commands_parse(capsys):
    """Every command the README gives for reproducing the paper is accepted by its real parser (train:
    every override is a config key with a valid value), so the doc cannot drift from the flags."""
    import importlib

    cmds = _readme_commands()
    modules = {m for m, _ in cmds}
    assert {"ppd_engine.embed", "ppd_engine.train", "ppd_engine.sweep", "ppd_engine.eval",
            "ppd_engine.rewards_users"} <= modules
    for module, argv in cmds:
        if module == "ppd_engine.train":
            from ppd_engine.train import main

            assert main([*argv, "--print-config"]) == 0, argv
            assert "not a key" not in capsys.readouterr().err
            continue
        mod = importlib.import_module(module + (".__main__" if module in ("ppd_engine.eval", "ppd_engine.embed") else ""))
        parser = mod.build_parser()
        if module == "ppd_engine.sweep":
            args, rest = parser.parse_known_args(argv)
            if args.command == "pick":
                from ppd_engine.eval.__main__ import build_parser as eval_parser

                eval_parser().parse_args(["sweep", "--runs", "r", *rest])
            else:
                assert not rest, rest
        else:
            parser.parse_args(argv)
