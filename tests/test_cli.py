"""The command line as a user meets it: `ppd` subcommands, a user's own loss chosen with --import,
torchrun over the toy world, and a non-editable `pip install .` that runs from any folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Subprocesses import the tree under test, whatever an editable install elsewhere points to.
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

MARGIN_LOSS = '''
import torch.nn.functional as F
from ppd_engine.losses import register_loss


@register_loss("margin_dpo")
def margin_dpo(model_mse, ref_mse, inside, beta, weight, margin: float = 0.0):
    return -F.logsigmoid(inside - margin)
'''


def _run(args, cwd, timeout=300, env=ENV):
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def test_ppd_lists_every_subcommand_and_dispatches():
    from ppd_engine.cli import COMMANDS

    out = _run([sys.executable, "-m", "ppd_engine"], ROOT)
    assert out.returncode == 0
    for name in COMMANDS:
        assert f"  {name} " in out.stdout, name
    sub = _run([sys.executable, "-m", "ppd_engine", "sample", "--help"], ROOT)
    assert sub.returncode == 0 and "--checkpoint latest|step-N|DIR" in sub.stdout
    bad = _run([sys.executable, "-m", "ppd_engine", "trian"], ROOT)
    assert bad.returncode == 2 and "'trian' is not a ppd command" in bad.stderr


@pytest.mark.parametrize("module", ["ppd_engine.sample", "ppd_engine.export", "ppd_engine.probe_users"])
def test_input_errors_are_one_line_with_exit_2(tmp_path, module):
    args = {"ppd_engine.sample": ["--run", str(tmp_path / "nope"), "--base", "--prompt", "x", "--out", str(tmp_path)],
            "ppd_engine.export": ["--run", str(tmp_path / "nope"), "--out", str(tmp_path)],
            "ppd_engine.probe_users": ["--store", str(tmp_path / "nope.safetensors")]}[module]
    out = _run([sys.executable, "-m", module, *args], ROOT)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and "Traceback" not in out.stderr
    assert str(tmp_path / "nope") in out.stderr
    debug = _run([sys.executable, "-m", module, *args, "--debug"], ROOT)
    assert "Traceback" in debug.stderr


def test_a_users_loss_trains_through_the_cli(tmp_path):
    (tmp_path / "mymodule.py").write_text(MARGIN_LOSS)
    run = tmp_path / "run"
    out = _run([sys.executable, "-m", "ppd_engine.train", "--import", "mymodule", "--config", "toy_smoke",
                "loss.name=margin_dpo", "loss.options.margin=0.5", f"log.run_dir={run}"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    # Training rows only: toy_smoke's held-out evaluation also writes a step-0 row of eval/* keys.
    first = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r][0]
    # At initialisation policy == reference, so inside = 0 and the loss is -log sigmoid(-margin).
    import math

    assert first["loss"] == pytest.approx(-math.log(1 / (1 + math.exp(0.5))), abs=1e-4)
    saved = (run / "config.yaml").read_text()
    assert "margin_dpo" in saved and "mymodule" in saved  # a resume re-imports the module
    bad = _run([sys.executable, "-m", "ppd_engine.train", "--import", "mymodule", "--config", "toy_smoke",
                "loss.name=margin_dpo", "loss.options.marign=0.5", f"log.run_dir={tmp_path / 'bad'}"], tmp_path)
    assert bad.returncode == 2 and "loss.options.marign: not an option of margin_dpo; allowed: margin" in bad.stderr
    assert not (tmp_path / "bad").exists()  # refused at start-up, before a run folder exists


def test_torchrun_toy_world_two_ranks_one_report(tmp_path):
    run = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    out = _run([str(torchrun), "--nproc_per_node=2", "--master_port=29547", "-m", "ppd_engine.train",
                "--config", "toy_smoke", f"log.run_dir={run}"], tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("run folder: ") == 1  # rank 0 alone reports
    report = json.loads((run / "report.json").read_text())
    assert report["summary"]["budget"]["steps"] == 3
    assert not [p for p in run.rglob("*") if p.name.startswith(".tmp-")]  # no temp file left behind


@pytest.mark.slow
def test_non_editable_install_runs_from_anywhere(tmp_path):
    """A fresh venv, `pip install .` (not editable), then the CLI from an unrelated folder: the presets
    are package data and the toy world is the default. The compiled extension is skipped here
    (PPD_NO_EXT=1; the ops fall back to their PyTorch references) to keep the test short; the
    dependencies come from this environment through a .pth file instead of a download."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PPD_NO_EXT"] = "1"
    # From a copy: pip builds a local folder in place, and the egg-info setuptools leaves in the
    # source tree would shadow the installed package's metadata (its entry points) there.
    import shutil

    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "build-cmake", "*.so",
                                                             "runs", "cache", "__pycache__", "*.egg-info"))
    inst = _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", str(src)],
                tmp_path, timeout=600, env=env)
    assert inst.returncode == 0, inst.stderr[-3000:]
    where = _run([str(py), "-c", "import ppd_engine; print(ppd_engine.__file__)"], tmp_path, env=env)
    assert where.stdout.strip().startswith(str(site)), where.stdout
    assert _run([str(venv / "bin" / "ppd"), "--help"], tmp_path, env=env).stdout.count("toy-pretrain") == 1
    run = tmp_path / "run"
    out = _run([str(py), "-m", "ppd_engine.train", "--config", "toy_smoke", f"log.run_dir={run}"], tmp_path,
               timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run / "report.json").is_file()
    shown = _run([str(py), "-m", "ppd_engine.train", "--print-config"], tmp_path, env=env)
    assert shown.returncode == 0 and "world: toy" in shown.stdout


def test_command_log_lines_never_land_inside_a_progress_bar_line():
    """Every command logs through tqdm.write (cli_errors sets it up): a record emitted while a bar
    shows gets its own line; a plain stream handler writes it after the bar's text on the bar's line."""
    import io
    import logging

    from tqdm import tqdm

    from ppd_engine.cli.common import TqdmLoggingHandler

    def emitted_with(handler_cls):
        stream = io.StringIO()
        handler = handler_cls(stream)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        logger = logging.getLogger("ppd_engine.test_bar")
        logger.addHandler(handler)
        logger.propagate = False
        try:
            with tqdm(total=3, file=stream, desc="work", mininterval=0, ascii=True) as bar:
                bar.update(1)
                logger.warning("a corrupt image")
                bar.update(1)
        finally:
            logger.removeHandler(handler)
            logger.propagate = True
        # What a terminal shows on the line holding the message: the text after its last \r.
        (line,) = [seg for seg in stream.getvalue().split("\n") if "a corrupt image" in seg]
        return line.rsplit("\r", 1)[-1]

    assert emitted_with(TqdmLoggingHandler) == "WARNING a corrupt image"
    assert emitted_with(logging.StreamHandler).startswith("work:")     # the collision it fixes


def test_every_command_sets_up_tqdm_logging(tmp_path):
    code = ("import logging; from ppd_engine.cli.common import cli_errors, TqdmLoggingHandler\n"
            "main = cli_errors(lambda argv: logging.getLogger('ppd_engine.x').info('hello')\n"
            "                  or logging.getLogger('httpx').info('HTTP Request: GET') or 0)\n"
            "assert main([]) == 0\n"
            "assert [type(h) for h in logging.getLogger().handlers] == [TqdmLoggingHandler]\n")
    out = _run([sys.executable, "-c", code], ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stderr.rstrip().endswith("INFO ppd_engine.x: hello")   # and no line per HTTP request
    assert "HTTP Request" not in out.stderr
