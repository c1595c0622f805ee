"""The protocol every application ("world") follows, and the registry the CLI picks one from.

A world turns a config into a run: it builds the frozen model, the training pairs and the user
embeddings (`build`), trains (`run`, by default one `Trainer.fit`) and evaluates as it sees fit
(`evaluate`). Worlds live in `ppd_engine.worlds` (toy, pickapic) or in a user's package; they
register themselves with `register_world`, add their config section (`section`) and model family
(`ppd_engine.models.register_family`). The core never imports a world: it only reads this registry.

    class MyWorld(World):
        name = "mine"
        def build(self, cfg, env): return WorldParts(model, dataset, embeddings)
    register_world(MyWorld())
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ppd_engine.config.schema import ConfigError, register_section


@dataclass
class WorldParts:
    """What a world hands the trainer: a frozen DiffusionModel, the training items and user embeddings,
    and optionally held-out sets (name -> training.heldout.HeldOutSet, evaluated every log.eval_every)."""

    model: Any
    dataset: Any
    embeddings: Mapping[str, Any] | None
    personalized: bool = True
    eval_sets: Mapping[str, Any] | None = None


@dataclass
class WorldResult:
    """A finished world run: the training result and whatever the world evaluated (printed by the CLI)."""

    train: Any
    report: dict | None = None
    lines: list[str] = field(default_factory=list)


class World:
    """Base class of a world. Subclasses set `name` and implement `build` (and may override `run`).

    section:  (name, dataclass) of the world's own config section, registered with the world.
    preset:   name of a preset (ppd_engine/configs/NAME.yaml) whose values are this world's defaults;
              they layer under the user's YAML and overrides whenever this world is chosen.
    """

    name: str = ""
    description: str = ""
    section: tuple[str, type] | None = None
    preset: str | None = None

    def validate(self, cfg) -> None:
        """Checks that a run of this world needs beyond the schema (raise ConfigError naming the key)."""

    def build(self, cfg, env) -> WorldParts:
        raise NotImplementedError(f"world {self.name!r} does not implement build()")

    def run(self, cfg, env) -> WorldResult:
        """Build, train, evaluate. The default trains one Trainer on the built parts."""
        from ppd_engine.training import Trainer

        parts = self.build(cfg, env)
        result = Trainer(cfg, parts.model, parts.dataset, parts.embeddings, cfg.log.run_dir,
                         personalized=parts.personalized, env=env, eval_sets=parts.eval_sets).fit()
        return WorldResult(train=result, report=self.evaluate(cfg, parts, result))

    def evaluate(self, cfg, parts: WorldParts, train_result) -> dict | None:
        """After training: the world's own evaluation (None = none; `python -m ppd_engine.eval` exists)."""
        return None


WORLDS: dict[str, World] = {}


def register_world(world: World) -> World:
    """Make `world` selectable as `world=<name>`; registers its config section too."""
    if not world.name:
        raise ValueError(f"{type(world).__name__} has no name")
    if world.section is not None:
        register_section(*world.section)
    WORLDS[world.name] = world
    return world


ENTRY_POINT_GROUP = "ppd_engine.worlds"


def load_installed_worlds() -> None:
    """Import every world an installed package declares in the entry-point group
    `ppd_engine.worlds` (this package declares toy and pickapic in pyproject.toml); importing a world
    registers it, its config section and its model family. This is how the core finds worlds
    without importing them: a command that only reads a run (eval, load_run) gets the run's world."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in WORLDS:
            ep.load()


def get_world(name: str) -> World:
    if name not in WORLDS:
        load_installed_worlds()
    if name not in WORLDS:
        known = ", ".join(sorted(WORLDS)) or "none registered (import ppd_engine.worlds)"
        raise ConfigError(f"world: {name!r} is not a registered world; choose one of: {known}")
    return WORLDS[name]
