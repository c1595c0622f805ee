"""`ppd <command> …`: one console script over every command of the engine.

Each subcommand is the same program as its `python -m` entry (the argv after the subcommand is
handed to that module's `main`), so `ppd train --config toy` == `python -m ppd_engine.train
--config toy`. `python -m ppd_engine` and `ppd --help` list the subcommands.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module with main(argv), one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("ppd_engine.train", "train PPD (or a baseline) in a world: toy (default) or pickapic"),
    "sample": ("ppd_engine.sample", "images from a trained run for a user, an embedding file, a mix or the base"),
    "embed": ("ppd_engine.embed.__main__", "user embeddings from few-shot pairs with a VLM (LLaVA-OneVision)"),
    "judge": ("ppd_engine.judge.__main__", "VLM judge: agreement with held-out choices, or win rates"),
    "eval": ("ppd_engine.eval.__main__", "sample checkpoints, score with rewards and the judge, report"),
    "sweep": ("ppd_engine.sweep", "a beta sweep: one training run per beta, then the best by a reward"),
    "rewards-users": ("ppd_engine.rewards_users", "multi-reward synthetic users: score pairs, relabel by weights"),
    "probe-users": ("ppd_engine.probe_users", "how well embeddings identify their users (MLP probe)"),
    "cache-build": ("ppd_engine.cache.build", "encode Pick-a-Pic pairs into the latent/text cache once"),
    "export": ("ppd_engine.export", "export a run's adapters as diffusers IP-Adapter weights"),
    "toy-pretrain": ("ppd_engine.worlds.toy.pretrain", "re-make the toy world's shipped base model"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items())
    return ("usage: ppd <command> [options]   (or python -m <module> for each)\n\n"
            f"commands:\n{rows}\n\n`ppd <command> --help` documents every option of a command.")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: {name!r} is not a ppd command\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    code = module.main(rest)
    # Some commands return their results (a dict) for library callers; the process exits 0 then.
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
