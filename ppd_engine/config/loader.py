"""Reading configs: YAML files and presets, world defaults, `key.sub=value` overrides, validation,
and the `--help` / `--print-config` texts. The schema itself is in schema.py.

The layers, lowest first (a later layer wins):

    1. the schema's defaults (the real-model recipe, world-independent)
    2. the chosen world's defaults (its preset, e.g. the toy world's configs/toy.yaml)
    3. the YAML file given with --config (a path, or a preset name such as `toy` or `sd15_pickapic`)
    4. the `key.sub=value` overrides, in order

The world is read first (the last `world=` override, else the YAML's `world:`, else the caller's
default), so `world=pickapic` never inherits another world's values. Modules named in `imports:` or
by `--import` are imported before anything is validated, so a loss or world they register is known.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import logging
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from ppd_engine.config.schema import CANONICAL, Config, ConfigError, DTypeName, config_class
from ppd_engine.dtypes import canonical_dtype
from ppd_engine import world as _world

logger = logging.getLogger(__name__)

PRESETS = Path(__file__).resolve().parent.parent / "configs"


# ---------------------------------------------------------------------------------------------
# Type-driven conversion


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    if tp is DTypeName:
        return "dtype (" + " | ".join(CANONICAL) + ")"
    if tp is Any:
        return "value"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(c) for c in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) if a is not type(None) else "null" for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"mapping {_describe(k)} -> {_describe(v)}"
    return getattr(tp, "__name__", str(tp))


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` (from YAML or a command-line string) to type `tp`, or raise ConfigError."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: {value!r} is not a valid {_describe(tp)}")
    if tp is Any:
        return value
    if tp is DTypeName:
        try:
            return DTypeName(canonical_dtype(value))
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: is a section; expected a mapping of its keys "
                              f"({', '.join(f.name for f in dataclasses.fields(tp))}), got {value!r}")
        return _build(tp, value, key + ".")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of: {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
            raise bad
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except ConfigError:
                continue
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, str)) and str(value).lower() in _TRUE | _FALSE:
            return str(value).lower() in _TRUE
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    as_float = float(value)
                except ValueError:
                    raise bad from None
                if as_float.is_integer():
                    return int(as_float)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-5" as a string
                value = float(value.strip())
            except ValueError:
                raise bad from None
        if isinstance(value, (int, float)):
            if not math.isfinite(value):
                raise ConfigError(f"{key}: {value!r} is not a finite number")
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else []
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else {}
        if not isinstance(value, dict):
            raise bad
        return {_convert(k, kt, f"{key}.<key>"): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _unknown(key: str, where: str, names: list[str]) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown key {key}{hint} (allowed keys in {where}: {', '.join(names)})")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        if k not in names:
            raise _unknown(f"{prefix}{k!s}", prefix.rstrip(".") or "the root", names)
        kwargs[k] = _convert(v, hints[k], prefix + k)
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> dict:
    """The config tree as plain YAML-able data (DTypeName values as plain str: yaml.safe_dump refuses
    str subclasses)."""
    return dataclasses.asdict(cfg, dict_factory=lambda items: {k: str(v) if isinstance(v, DTypeName) else v
                                                               for k, v in items})


def config_from_dict(data: dict, cls: type | None = None) -> Any:
    """Build and validate a config tree from plain data (unknown keys/bad values raise ConfigError)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    root = cls is None or cls is Config
    cfg = _build(config_class() if root else cls, data)
    if root:
        validate(cfg)
    return cfg


def apply_override(cfg: Any, override: str) -> None:
    """Apply one `a.b.c=value` string in place; the value is converted by the field's type.

    A mapping field takes `a.b.KEY=value` for one of its entries (e.g. loss.options.margin=0.5)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.sub=value")
    path, raw = override.split("=", 1)
    path = path.strip()
    if path == "log.tensorboard":
        path, raw = "log.report_to", _legacy_tensorboard(raw, "override log.tensorboard")
    parts = path.split(".")
    node = cfg
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(node)]
        here = ".".join(parts[:i]) or "the root"
        if part not in names:
            raise _unknown(".".join(parts[:i + 1]), here, names)
        tp = _hints(type(node))[part]
        origin = typing.get_origin(tp)
        if origin is dict and i == len(parts) - 2:
            # One entry of a mapping: the value is YAML ("0.5" -> 0.5, "true" -> True).
            _, vt = typing.get_args(tp)
            entry = yaml.safe_load(raw) if raw.strip() else ""
            getattr(node, part)[parts[-1]] = _convert(entry, vt, path)
            return
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"{path} is a section; set one of its keys, e.g. {path}."
                                  f"{dataclasses.fields(tp)[0].name}=...")
            value: Any = raw
            if tp not in (str, bool, int, float, DTypeName) and origin not in (Literal, list, dict):
                value = yaml.safe_load(raw)
            setattr(node, part, _convert(value, tp, path))
        else:
            if not dataclasses.is_dataclass(tp):
                raise ConfigError(f"{'.'.join(parts[:i + 1])} is a value, not a section (in {path})")
            node = getattr(node, part)


def validate(cfg: Config, runnable: bool = True) -> None:
    """Cross-field checks of the core sections, the loss against its registry entry, and (when
    `runnable`) the chosen world's own checks; raise ConfigError naming the key."""
    t, o = cfg.train, cfg.optim

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {msg}")

    for key, v in (("train.empty_caption_prob", t.empty_caption_prob), ("train.user_dropout", t.user_dropout),
                   ("data.unseen_fraction", cfg.data.unseen_fraction)):
        need(0.0 <= v <= 1.0, key, f"{v} must be in [0, 1]")
    need(t.pairs_per_step >= 1, "train.pairs_per_step", f"{t.pairs_per_step} must be >= 1")
    need(t.micro_batch >= 1, "train.micro_batch", f"{t.micro_batch} must be >= 1")
    need(t.epochs >= 1, "train.epochs", f"{t.epochs} must be >= 1")
    need(t.max_steps >= 0, "train.max_steps", f"{t.max_steps} must be >= 0 (0 = from epochs)")
    need(t.loss_scale_init > 0, "train.loss_scale_init", f"{t.loss_scale_init} must be > 0")
    need(t.grad_clip >= 0, "train.grad_clip", f"{t.grad_clip} must be >= 0 (0 = off)")
    need(t.max_bad_steps >= 0, "train.max_bad_steps", f"{t.max_bad_steps} must be >= 0")
    need(t.reference_batch >= 0, "train.reference_batch", f"{t.reference_batch} must be >= 0 (0 = micro_batch)")
    need(re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device) is not None, "train.device",
         f"{t.device!r} is not allowed; choose auto | cpu | cuda | cuda:N")
    # Seeds feed SeedSequence and torch generators whole (never reduced mod 2^32); torch takes < 2^63.
    for key, seed in (("train.seed", t.seed), ("data.split_seed", cfg.data.split_seed),
                      ("log.sample_seed", cfg.log.sample_seed)):
        need(0 <= seed < 2**63, key, f"{seed} must be in [0, 2^63)")
    _validate_columns(cfg.data)
    need(o.lr > 0, "optim.lr", f"{o.lr} must be > 0")
    need(o.warmup_steps >= 0, "optim.warmup_steps", f"{o.warmup_steps} must be >= 0")
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas",
         f"{o.betas} must be two numbers in [0, 1)")
    need(o.eps > 0, "optim.eps", f"{o.eps} must be > 0")
    need(o.min_8bit_size >= 1, "optim.min_8bit_size", f"{o.min_8bit_size} must be >= 1")
    need(not (o.name == "adafactor" and cfg.dist.adapters == "shard"), "optim.name",
         "adafactor factors its second moment over whole rows/columns, which dim-0 shards do not hold; "
         "use dist.adapters=replicate with adafactor, or adamw8bit/adamw with shard")
    need(cfg.loss.beta > 0, "loss.beta", f"{cfg.loss.beta} must be > 0")
    need(cfg.loss.snr_gamma > 0, "loss.snr_gamma", f"{cfg.loss.snr_gamma} must be > 0")
    _validate_loss(cfg)
    need(cfg.model.dtype == "fp32" or t.mixed_precision in ("bf16", "fp16"), "model.dtype",
         f"{cfg.model.dtype} base weights need train.mixed_precision=bf16 or fp16 (got {t.mixed_precision})")
    need(cfg.model.resolution >= 0 and cfg.model.resolution % 8 == 0, "model.resolution",
         f"{cfg.model.resolution} must be 0 or a positive multiple of 8")
    need(cfg.adapters.num_tokens >= 1, "adapters.num_tokens", f"{cfg.adapters.num_tokens} must be >= 1")
    need(cfg.adapters.user_dim >= 0, "adapters.user_dim", f"{cfg.adapters.user_dim} must be >= 0")
    need(cfg.adapters.projection in ("linear", "resampler"), "adapters.projection",
         f"{cfg.adapters.projection!r} is not allowed; choose one of: linear, resampler")
    need(cfg.dist.timeout_s >= 1, "dist.timeout_s", f"{cfg.dist.timeout_s} must be >= 1")
    need(cfg.dist.heartbeat_s >= 0, "dist.heartbeat_s", f"{cfg.dist.heartbeat_s} must be >= 0 (0 = no watchdog)")
    need(cfg.checkpoint.every >= 0, "checkpoint.every", f"{cfg.checkpoint.every} must be >= 0")
    need(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", f"{cfg.checkpoint.keep_last} must be >= 1")
    need(cfg.log.sample_every >= 0, "log.sample_every", f"{cfg.log.sample_every} must be >= 0")
    need(cfg.log.eval_every >= 0, "log.eval_every", f"{cfg.log.eval_every} must be >= 0")
    need(o.num_cycles >= 1, "optim.num_cycles", f"{o.num_cycles} must be >= 1")
    need(o.power > 0, "optim.power", f"{o.power} must be > 0")
    need(not (o.scheduler == "constant" and o.warmup_steps), "optim.warmup_steps",
         f"{o.warmup_steps} with optim.scheduler=constant, which has no warmup (use constant_with_warmup)")
    from ppd_engine.trackers import resolve_trackers

    try:  # the names always; whether they are installed only for a run that will start
        resolve_trackers(cfg.log.report_to, check_installed=runnable)
    except ValueError as exc:
        raise ConfigError(f"log.report_to: {exc}") from None
    from ppd_engine.models import FAMILIES

    if cfg.model.family not in FAMILIES:
        _world.load_installed_worlds()  # the family of an installed world (e.g. toy) registers on import
    need(cfg.model.family in FAMILIES, "model.family",
         f"{cfg.model.family!r} is not a registered model family; choose one of: {', '.join(sorted(FAMILIES))}")
    if cfg.world:
        world = _world.get_world(cfg.world)
        if runnable:
            world.validate(cfg)


def _validate_columns(d) -> None:
    """data.columns against data.format: the mapping is parsed here so a bad key fails before any load."""
    if d.format != "columns":
        if d.columns:
            raise ConfigError(f"data.columns: only read with data.format=columns (data.format={d.format})")
        return
    from ppd_engine.data.columns import ColumnMap

    try:
        ColumnMap.parse(d.columns)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _validate_loss(cfg: Config) -> None:
    """loss.name against the registry (after --import), its options against the ones it declares."""
    from ppd_engine.losses import LOSSES, validate_loss_options

    lc = cfg.loss
    names = [lc.name] if isinstance(lc.name, str) else list(lc.name)
    if not names:
        raise ConfigError("loss.name: give a loss name or a non-empty list of names")
    for n in names:
        if n not in LOSSES:
            close = difflib.get_close_matches(n, list(LOSSES), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"loss.name: {n!r} is not a registered loss{hint} (registered: "
                              f"{', '.join(sorted(LOSSES))}; a loss of your own needs --import MODULE)")
    if lc.weights and len(lc.weights) != len(names):
        raise ConfigError(f"loss.weights: {len(lc.weights)} weight(s) for {len(names)} loss(es) {names}")
    if lc.weights and isinstance(lc.name, str):
        raise ConfigError("loss.weights: weights go with a list of losses (loss.name=[a, b])")
    try:
        lc.options = validate_loss_options(lc.name, lc.options)
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc) if str(exc).startswith("loss.options") else f"loss.options: {exc}") from None
    if lc.weighting != "uniform":
        unweighted = [n for n in names if not LOSSES[n].uses_weight]
        weighted = sorted(n for n, spec in LOSSES.items() if spec.uses_weight)
        if unweighted:
            raise ConfigError(f"loss.weighting: {', '.join(unweighted)} take(s) no per-pair weight; use "
                              f"weighting=uniform, or one of: {', '.join(weighted)}")


# ---------------------------------------------------------------------------------------------
# Files, presets, layering


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would keep the last silently)."""


def _mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def presets() -> list[str]:
    """Names of the configs shipped in the package (ppd_engine/configs/*.yaml)."""
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def resolve_config_path(spec: str | os.PathLike) -> Path:
    """A config file path, or a preset name (`toy`, `toy.yaml`, `sd15_pickapic`) -> its file."""
    p = Path(spec)
    if p.is_file():
        return p
    name = p.name[:-5] if p.name.endswith(".yaml") else p.name
    if p.parent in (Path("."), Path("configs")) and (PRESETS / f"{name}.yaml").is_file():
        return PRESETS / f"{name}.yaml"
    raise ConfigError(f"config {str(spec)!r}: no such file and no such preset (presets: {', '.join(presets())})")


def read_yaml(path: str | os.PathLike) -> dict:
    """A YAML config file as a mapping; every problem is a ConfigError naming the file."""
    p = Path(path)
    try:
        with open(p, encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=_UniqueKeyLoader)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
        raise ConfigError(f"{p}: not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read ({exc.strerror})") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a config must be a mapping of sections, got {type(data).__name__}")
    log = data.get("log")
    if isinstance(log, dict) and "tensorboard" in log:
        if "report_to" in log:
            raise ConfigError(f"{p}: log.tensorboard and log.report_to are both given; keep log.report_to")
        log = {("report_to" if k == "tensorboard" else k): (_legacy_tensorboard(v, f"{p}: log.tensorboard")
                                                           if k == "tensorboard" else v) for k, v in log.items()}
        data = dict(data, log=log)
    return data


def _legacy_tensorboard(value: Any, where: str) -> str:
    """The log.report_to value of an old `log.tensorboard` boolean (run folders written before it)."""
    on = _convert(yaml.safe_load(value) if isinstance(value, str) else value, bool, "log.tensorboard")
    logger.warning("%s is replaced by log.report_to; read as log.report_to=%s", where, "tensorboard" if on else "none")
    return "tensorboard" if on else "none"


def _merge(low: dict, high: dict) -> dict:
    """Deep merge of two config mappings: sections merge key by key, values of `high` win."""
    out = dict(low)
    for k, v in high.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _override_value(overrides, key: str):
    found = None
    for ov in overrides:
        k, sep, v = ov.partition("=")
        if sep and k.strip() == key:
            found = v.strip()
    return found


def import_modules(names) -> None:
    """Import the user's modules (each may register losses, worlds, families); errors name the module."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"imports: cannot import {name!r} ({exc})") from None


def world_defaults(world: str) -> dict:
    """The values a world layers over the schema's defaults (its preset, without `world:` itself)."""
    w = _world.get_world(world)
    if not w.preset:
        return {}
    data = read_yaml(resolve_config_path(w.preset))
    data.pop("world", None)
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                default_world: str = "", runnable: bool = True) -> Config:
    """Load a YAML config or preset (None = no file), layer it over the world's defaults, apply
    `key.sub=value` overrides, validate (see the module doc for the layers).

    `default_world`: the world when neither the overrides nor the file name one (the CLI passes
    "toy"; library use leaves it empty: the schema's defaults, no world). `runnable=False` skips the
    world's run-readiness checks (used by --print-config). Raises ConfigError naming the key.
    """
    overrides = list(overrides)
    data = read_yaml(resolve_config_path(path)) if path is not None else {}
    imports = list(data.get("imports") or [])
    extra = _override_value(overrides, "imports")
    if extra:
        imports += list(yaml.safe_load(extra) or [])
    import_modules(imports)
    world = _override_value(overrides, "world")
    if world is None:
        world = data.get("world") or default_world
    if world:
        data = _merge(world_defaults(world), dict(data, world=world))
    cfg = _build(config_class(), data)
    for ov in overrides:
        apply_override(cfg, ov)
    if imports:
        cfg.imports = list(dict.fromkeys(imports))
    validate(cfg, runnable=runnable)
    return cfg


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically: a reader never sees half a file)."""
    from ppd_engine.files import write_text_atomic

    write_text_atomic(path, config_to_yaml(cfg))


def config_to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------------------------------------
# Help texts


def _flat_defaults(cls: type, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    inst = cls()
    for f in dataclasses.fields(cls):
        v = getattr(inst, f.name)
        if dataclasses.is_dataclass(v):
            out.update({k: w for k, w in _flat_defaults(type(v), prefix + f.name + ".").items()})
        else:
            out[prefix + f.name] = v
    return out


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and k not in ("options",):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_help(cls: type | None = None, prefix: str = "", worlds: dict[str, dict] | None = None) -> str:
    """One entry per key: `section.key  (type; default X; toy: Y)  help` — the CLI's --help epilog.

    `worlds`: world name -> its defaults mapping; a key a world sets differently shows that value."""
    cls = cls or config_class()
    if worlds is None:
        WORLDS = _world.WORLDS

        worlds = {}
        for name in sorted(WORLDS):
            try:
                worlds[name] = _flatten(world_defaults(name))
            except ConfigError:
                worlds[name] = {}
    lines: list[str] = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = prefix + f.name
        doc = f.metadata.get("help", "")
        if dataclasses.is_dataclass(tp):
            lines.append("")
            lines.append(f"[{key}]  {(tp.__doc__ or doc).strip().splitlines()[0]}")
            lines.append(config_help(tp, key + ".", worlds))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        per_world = "".join(f"; {w}: {vals[key]!r}" for w, vals in worlds.items()
                            if key in vals and vals[key] != default)
        lines.append(f"  {key} ({_describe(tp)}; default {default!r}{per_world})\n      {doc}")
    return "\n".join(lines).lstrip("\n")


def flag_hint(flag: str, value: str | None = None) -> str | None:
    """'--max_steps' -> 'use train.max_steps=VALUE' when a config key ends in that name."""
    name = flag.lstrip("-").split("=", 1)[0].replace("-", "_")
    if "=" in flag and value is None:
        value = flag.split("=", 1)[1]
    keys = [k for k in _flat_defaults(config_class()) if k == name or k.endswith("." + name)]
    if not keys:
        close = difflib.get_close_matches(name, [k.rsplit(".", 1)[-1] for k in _flat_defaults(config_class())], n=1)
        keys = [k for k in _flat_defaults(config_class()) if close and k.endswith("." + close[0])]
    if not keys:
        return None
    return " or ".join(f"{k}={value if value is not None else 'VALUE'}" for k in keys)
