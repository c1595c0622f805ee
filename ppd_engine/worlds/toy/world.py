"""The toy world as a `World`: its config section, its model family and its end-to-end run."""

from __future__ import annotations

from ppd_engine.config.schema import ConfigError
from ppd_engine.models import register_family
from ppd_engine.world import World, WorldResult, register_world
from ppd_engine.worlds.toy.config import ToyConfig


class ToyWorld(World):
    name = "toy"
    description = "the embedded toy world: PPD vs base vs non-personalized DPO on a CPU, with a report"
    section = ("toy", ToyConfig)
    preset = "toy"

    def validate(self, cfg) -> None:
        if cfg.model.family != "toy":
            raise ConfigError(f"model.family: world=toy needs model.family=toy (got {cfg.model.family!r})")
        cfg.toy.validate()

    def run(self, cfg, env) -> WorldResult:
        from ppd_engine.worlds.toy.run import run_toy

        result = run_toy(cfg, env)
        if result is None:  # a replica rank: rank 0 reports
            return WorldResult(train=None)
        return WorldResult(train=result.ppd, report=result.report, lines=result.lines)


def _load_toy(cfg, dtype, device):
    from ppd_engine.worlds.toy.model import load_toy_model

    return load_toy_model(cfg.toy, dtype=dtype, device=device)


register_family("toy", _load_toy)
register_world(ToyWorld())
