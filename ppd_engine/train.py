"""`python -m ppd_engine.train` / `ppd train`: [--config PRESET|X.yaml] [--import MODULE] [key.sub=value ...]

The chosen world (`world=`, default toy) builds the model, data and embeddings and runs:

world=toy       the embedded toy world end to end (ppd_engine/worlds/toy)
world=pickapic  Pick-a-Pic pairs -> few-shot split -> user embeddings -> latent cache -> Trainer.fit

Multi-GPU: `torchrun --nproc_per_node=N -m ppd_engine.train --config sd15_pickapic ...`
(see docs/DISTRIBUTED.md). Every config key is listed by `--help`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from ppd_engine.cli.common import UsageError, add_debug, cli_errors, quiet_library_bars
from ppd_engine.config import ConfigError, config_help, config_to_yaml, flag_hint, load_config, presets, save_config
from ppd_engine.config.loader import import_modules
from ppd_engine.training.precision import accelerate_overrides

log = logging.getLogger("ppd_engine.train")

DEFAULT_WORLD = "toy"


def build_parser() -> argparse.ArgumentParser:
    import ppd_engine.worlds  # noqa: F401  (registers the built-in worlds, their sections and families)
    from ppd_engine.losses import describe_losses
    from ppd_engine.world import WORLDS

    worlds = "\n".join(f"  {name:<10} {w.description}" + (f" (defaults: preset {w.preset})" if w.preset else
                                                            " (defaults: the schema's, below)")
                       for name, w in sorted(WORLDS.items()))
    parser = argparse.ArgumentParser(
        prog="python -m ppd_engine.train",
        description="Personalized preference fine-tuning (PPD) of a diffusion model: Diffusion-DPO on "
                    f"user-conditioned adapters. With no arguments, runs the {DEFAULT_WORLD} world on the CPU.",
        epilog="WORLDS (world=NAME; each layers its own defaults under --config and the overrides)\n" + worlds +
               f"\n\nPRESETS (--config NAME): {', '.join(presets())}\n\n"
               "Overrides are key.sub=value (e.g. train.max_steps=100 optim.name=adamw loss.beta=2500);\n"
               "values are converted by the key's type; lists and mappings use YAML ([a, b], {k: v});\n"
               "one entry of a mapping: loss.options.NAME=value.\n\n"
               "LOSSES (loss.name, with their loss.options)\n" + describe_losses() +
               "\n\nCONFIG KEYS (default = the schema's; 'toy: X' = the toy world's value where it differs)\n"
               + config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="PRESET|X.yaml", default=None,
                        help=f"a preset name ({', '.join(presets())}) or a YAML file; default: none (the "
                             f"world's defaults, world={DEFAULT_WORLD} unless given)")
    parser.add_argument("--import", dest="imports", metavar="MODULE", action="append", default=[],
                        help="import MODULE before the config is validated, e.g. one that registers a loss "
                             "with @register_loss (repeatable; recorded as the config key `imports`)")
    parser.add_argument("--resume", metavar="RUN", default=None,
                        help="continue the run in folder RUN from its newest checkpoint, with its saved "
                             "config (plus any overrides, e.g. a larger train.max_steps)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit without running")
    add_debug(parser)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser


def _parse(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """argparse, with a hint for flag-style config keys (`--max_steps 10` -> `train.max_steps=10`).
    Overrides may stand on both sides of the options (`a=1 --config toy b=2`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, unknown = parser.parse_known_intermixed_args(argv)
    if unknown:
        flag = unknown[0]
        # argparse may have taken the flag's value as an override: read it back from argv.
        at = argv.index(flag) if flag in argv else -1
        nxt = argv[at + 1] if 0 <= at < len(argv) - 1 else None
        value = nxt if nxt is not None and not nxt.startswith("-") and "=" not in nxt and "=" not in flag else None
        hint = flag_hint(flag, value) if flag.startswith("-") else None
        if hint:
            raise UsageError(f"{flag} is not an option; config keys are set as key=value: use {hint}")
        raise UsageError(f"unrecognized argument {flag!r} (see --help)")
    return args


def resolve_config(args: argparse.Namespace, runnable: bool = True):
    """The run's config from --config / --resume / --import and the overrides (ConfigError on bad input)."""
    overrides = list(args.overrides)
    # `accelerate launch --mixed_precision fp16 -m ppd_engine.train` speaks through the environment.
    overrides = [*accelerate_overrides(os.environ, overrides), *overrides]
    if args.imports:
        import_modules(args.imports)
        overrides = [f"imports=[{', '.join(args.imports)}]", *overrides]
    if args.resume:
        if args.config:
            raise ConfigError("--resume uses the run's saved config.yaml; give overrides instead of --config")
        run = Path(args.resume)
        if not (run / "config.yaml").is_file():
            raise ConfigError(f"--resume {run}: not a run folder (no config.yaml)")
        return load_config(run / "config.yaml", [*overrides, f"log.run_dir={run}", "checkpoint.resume=latest"],
                           runnable=runnable)
    return load_config(args.config, overrides, default_world=DEFAULT_WORLD, runnable=runnable)


def default_run_dir(cfg) -> str:
    """runs/<world>-<UTC time>, with -2, -3, ... when taken: a new folder, created (and claimed) here."""
    from ppd_engine.training.run_folder import unique_run_dir

    return str(unique_run_dir(Path("runs") / f"{cfg.world}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"))


def claim_run_dir(cfg, env) -> None:
    """Rank 0 takes cfg.log.run_dir for this run (or names a new one); every rank learns the folder,
    or the one-line refusal, so no rank starts on a folder another run holds."""
    from ppd_engine.training.distributed import broadcast_str
    from ppd_engine.training.run_folder import RunFolderError, claim_run_folder, continues_run

    reply = ""
    if env.is_main:
        try:
            if not cfg.log.run_dir:
                reply = "dir:" + default_run_dir(cfg)
            else:
                resuming = continues_run(cfg.checkpoint.resume, cfg.log.run_dir)
                moved = claim_run_folder(cfg.log.run_dir, resuming=resuming, overwrite=cfg.log.overwrite)
                if moved is not None:
                    log.warning("log.overwrite=true: the run that was in %s is now in %s", cfg.log.run_dir, moved)
                reply = "dir:" + cfg.log.run_dir
        except RunFolderError as exc:
            reply = "err:" + str(exc)
    reply = broadcast_str(reply, env)
    if reply.startswith("err:"):
        raise RunFolderError(reply[4:])
    cfg.log.run_dir = reply[4:]


def _summary(result, seconds: float) -> str:
    m = result.final_metrics or {}

    def fmt(key, spec):
        v = m.get(key)
        return format(v, spec) if isinstance(v, (int, float)) else "n/a"

    def existing(path) -> str:  # the summary names only files that are there
        return str(path) if path and Path(path).exists() else "none"

    return (f"\nDone: {result.steps} steps in {seconds / 60:.1f} min -> {result.run_dir}\n"
            f"  last step: loss {fmt('loss', '.4f')}, implicit acc {fmt('implicit_acc', '.3f')}, "
            f"reward margin {fmt('reward_margin', '.4f')}, {fmt('pairs_per_s', '.1f')} pairs/s\n"
            f"  checkpoint: {existing(result.last_checkpoint)}\n"
            f"  metrics:    {existing(Path(result.run_dir) / 'metrics.jsonl')}")


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    if args.print_config:
        cfg = resolve_config(args, runnable=False)
        text = config_to_yaml(cfg)
        try:
            from ppd_engine.config import validate

            validate(cfg)
        except ConfigError as exc:
            text += f"# not runnable as it stands: {exc}\n"
        sys.stdout.write(text)
        return 0
    cfg = resolve_config(args)
    if not cfg.log.progress:
        quiet_library_bars()

    from ppd_engine.training import BadStepsError
    from ppd_engine.training.distributed import init_distributed, shutdown_distributed
    from ppd_engine.world import get_world

    world = get_world(cfg.world)
    env = init_distributed(cfg.train.device, cfg.dist.backend, cfg.dist.timeout_s, cfg.dist.heartbeat_s)
    claim_run_dir(cfg, env)
    if env.is_main:
        save_config(cfg, Path(cfg.log.run_dir) / "config.yaml")
        log.info("run folder: %s", cfg.log.run_dir)
    start = time.perf_counter()
    try:
        outcome = world.run(cfg, env)
    except BadStepsError as exc:
        print(f"training stopped: {exc}", file=sys.stderr)
        return 3
    finally:
        shutdown_distributed(env)
    if env.is_main:
        for line in outcome.lines:
            print(line)
        if outcome.train is not None and not outcome.lines:
            print(_summary(outcome.train, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
