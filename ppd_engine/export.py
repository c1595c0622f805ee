"""`python -m ppd_engine.export` / `ppd export --run RUN [--checkpoint step-N] --out DIR`.

Writes the run's user adapters in diffusers' IP-Adapter layout (DIR/ip_adapter.safetensors) so a
stock pipeline loads them with `pipe.load_ip_adapter(DIR, subfolder="", weight_name="ip_adapter.safetensors",
image_encoder_folder=None)`; configurations the layout cannot express are refused, naming why.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ppd_engine.cli.common import add_checkpoint, add_debug, cli_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ppd_engine.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, metavar="RUN", help="run folder (RUN/config.yaml, RUN/checkpoints/)")
    add_checkpoint(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (ip_adapter.safetensors)")
    add_debug(p)
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import ppd_engine.worlds  # noqa: F401  (a run of any world can be exported)
    from ppd_engine.adapters import export_ip_adapter
    from ppd_engine.training import load_run

    _, model = load_run(args.run, checkpoint=args.checkpoint)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    export_ip_adapter(model.unet, out / "ip_adapter.safetensors")
    print(f"exported {args.run} ({args.checkpoint}) -> {out / 'ip_adapter.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
