"""`python -m ppd_engine.sweep`: a β sweep as the method ran it — one training run per β, then the
best β by a named reward on validation prompts.

  launch  one run per β of --betas under ROOT/beta-<β>/ (loss.beta=<β>, loss.beta_units as given).
          Always writes ROOT/commands.sh (one `python -m ppd_engine.train ...` line per β, or a
          `torchrun --nproc_per_node=N -m ppd_engine.train ...` line with --nproc N) to launch by
          hand or on a scheduler; with --run, runs them one after the other here (a run folder
          that already has a checkpoint resumes from it, so a rerun continues an interrupted sweep).
  pick    every ROOT/beta-*/ run -> `python -m ppd_engine.eval sweep` (same generation and reward
          flags, which pick forwards): sweep.json / sweep.md name the best β.

The paper tunes β in its own units (β_paper ∈ [0.1, 2]); `--beta-units paper` sweeps those and
the trainer converts (β_official = 2·T·β_paper, ppd_engine.losses.official_beta).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from ppd_engine.cli.common import DefaultsFormatter, UsageError, cli_errors

RUN_PREFIX = "beta-"


def parse_betas(text: str) -> list[float]:
    try:
        betas = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--betas {text!r}: expected comma-separated numbers, e.g. 0.1,0.5,1,2") from None
    if not betas or any(b <= 0 for b in betas):
        raise UsageError(f"--betas {text!r}: give one or more positive values")
    if len(set(betas)) != len(betas):
        raise UsageError(f"--betas {text!r}: a value is repeated")
    return betas


def run_dir(root: str, beta: float) -> Path:
    return Path(root) / f"{RUN_PREFIX}{beta:g}"


def train_command(beta: float, units: str, root: str, config: str | None, overrides: list[str],
                  nproc: int = 1, python: str = sys.executable) -> list[str]:
    """The command line that trains the run of one β."""
    d = run_dir(root, beta)
    head = ([python, "-m", "ppd_engine.train"] if nproc <= 1 else
            ["torchrun", f"--nproc_per_node={nproc}", "-m", "ppd_engine.train"])
    cmd = head + (["--config", config] if config else []) + list(overrides)
    cmd += [f"loss.beta={beta:g}", f"loss.beta_units={units}", f"log.run_dir={d}"]
    if (d / "checkpoints").is_dir() and any((d / "checkpoints").glob("step-*")):
        cmd.append("checkpoint.resume=latest")
    return cmd


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ppd_engine.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    la = sub.add_parser("launch", formatter_class=DefaultsFormatter, help="one training run per β")
    la.add_argument("--root", required=True, help="sweep folder: ROOT/beta-<β>/ per run, ROOT/commands.sh")
    la.add_argument("--betas", required=True, help="comma-separated β grid, e.g. 0.1,0.5,1,2 (paper units)")
    la.add_argument("--beta-units", choices=("official", "paper"), default="paper", help="units of --betas")
    la.add_argument("--config", default=None, help="preset or YAML every run starts from (e.g. sd15_pickapic)")
    la.add_argument("--nproc", type=int, default=1, help="GPUs per run: >1 writes torchrun lines")
    la.add_argument("--run", action="store_true", help="also run the commands here, one after the other")
    la.add_argument("overrides", nargs="*", help="key.sub=value overrides applied to every run")
    pk = sub.add_parser("pick", formatter_class=DefaultsFormatter, add_help=True,
                        help="evaluate ROOT's runs and pick the best β (flags after --root go to `eval sweep`)")
    pk.add_argument("--root", required=True, help="the sweep folder `launch` wrote")
    return p


def _launch(args) -> int:
    from ppd_engine.files import write_text_atomic

    betas = parse_betas(args.betas)
    bad = [o for o in args.overrides if "=" not in o or o.split("=", 1)[0] in ("loss.beta", "loss.beta_units",
                                                                             "log.run_dir")]
    if bad:
        raise UsageError(f"overrides {bad}: must be key=value and must not set loss.beta, loss.beta_units or "
                         "log.run_dir (the sweep sets them per run)")
    cmds = [train_command(b, args.beta_units, args.root, args.config, args.overrides, args.nproc) for b in betas]
    Path(args.root).mkdir(parents=True, exist_ok=True)
    script = "#!/bin/sh\nset -e\n" + "".join(shlex.join(c) + "\n" for c in cmds)
    write_text_atomic(Path(args.root) / "commands.sh", script)
    print(f"{len(cmds)} runs (β {', '.join(f'{b:g}' for b in betas)}, {args.beta_units} units) -> "
          f"{Path(args.root) / 'commands.sh'}")
    if not args.run:
        return 0
    for b, c in zip(betas, cmds):
        print(f"β = {b:g}: {shlex.join(c)}", flush=True)
        rc = subprocess.run(c).returncode
        if rc != 0:
            print(f"the run of β = {b:g} failed (exit {rc}); later runs not started", file=sys.stderr)
            return rc
    return 0


def _pick(args, rest: list[str]) -> int:
    from ppd_engine.eval.__main__ import main as eval_main

    runs = sorted(str(d) for d in Path(args.root).glob(f"{RUN_PREFIX}*") if (d / "config.yaml").is_file())
    if not runs:
        raise UsageError(f"{args.root}: no {RUN_PREFIX}*/ run folders with a config.yaml (run `launch` first)")
    return eval_main(["sweep", "--runs", *runs, *rest])


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "launch":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return _launch(args)
    return _pick(args, rest)


if __name__ == "__main__":
    sys.exit(main())
