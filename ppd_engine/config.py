"""Run configuration: a typed dataclass tree loaded from YAML with `key.sub=value` overrides.

Every field carries a `help` string in its metadata; `config_help()` turns them into the
`python -m ppd_engine.train --help` text, so the documentation cannot drift from the code.
Values are converted by the field's type (`Literal[...]` fields are enums with fixed choices) and
checked once, at start-up: an unknown key or a bad value raises `ConfigError` naming the dotted key
and what is allowed.

Defaults are the paper's recipe (PPD supplementary B.1 + Diffusion-DPO) for SD1.5 on Pick-a-Pic;
`configs/toy.yaml` is the embedded default run of the CLI.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ppd_engine.toyworld.config import ToyConfig

LOSS_NAMES = ("dpo", "hinge", "ipo", "robust", "kto", "mapo", "orpo", "sft")


class ConfigError(ValueError):
    """A config key is unknown or its value is not allowed; the message names the key."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help string (lists/dicts get a fresh copy per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    """The frozen base denoiser (its text encoder(s) and VAE come with it)."""

    family: Literal["sd15", "sdxl", "toy"] = _f("sd15", "model family: sd15 | sdxl | toy")
    pretrained: str = _f("stable-diffusion-v1-5/stable-diffusion-v1-5",
                         "hub id or local diffusers folder of the base pipeline")
    dtype: Literal["fp32", "bf16", "fp16"] = _f(
        "fp32", "storage dtype of the FROZEN base weights (adapters are always fp32 masters); "
        "bf16/fp16 need train.mixed_precision=bf16")
    resolution: int = _f(0, "image side in pixels; 0 = the model's default (512 sd15, 1024 sdxl)")


@dataclass
class DataConfig:
    """Pick-a-Pic pairs (world=pickapic) and the user-embedding store."""

    folder: str = _f("", "local folder with the Pick-a-Pic v2 parquet files (world=pickapic)")
    min_pairs_per_user: int = _f(4, "users with fewer labelled pairs are dropped (paper: N = 4)")
    max_users: int = _f(0, "keep the users with the most pairs; 0 = all")
    n_shots: int = _f(4, "few-shot pairs per user that build its embedding; held out of its training pairs")
    unseen_fraction: float = _f(0.1, "fraction of users held out entirely (never trained on)")
    split_seed: int = _f(0, "seed of the few-shot and seen/unseen splits")
    embeddings: str = _f("", "EmbeddingStore .safetensors with user_id -> (K, T_in, Du) few-shot embeddings")


@dataclass
class CacheConfig:
    """On-disk latent + text cache (the VAE and text encoders run once, never in the step)."""

    dir: str = _f("cache", "folder of the latent/text cache (shared between runs; hash-checked)")
    batch_size: int = _f(8, "images encoded per VAE call while building the cache")
    flip: bool = _f(True, "also cache horizontally flipped latents; a pair is flipped (both images) with p = 1/2")
    dtype: Literal["float16", "bfloat16", "float32"] = _f("float16", "storage dtype of cached latents/text states")


@dataclass
class AdaptersConfig:
    """The added user cross-attention layers (the only trained weights)."""

    user_dim: int = _f(0, "width Du of the user embedding; 0 = read it from the embeddings")
    num_tokens: int = _f(4, "user tokens the projection makes from one embedding")
    projection: str = _f("linear", "embedding -> tokens projection: linear | resampler")
    scale: float = _f(1.0, "scale s of the user attention branch during training")
    attention: Literal["sdpa", "fused", "auto"] = _f(
        "sdpa", "user cross-attention kernel: sdpa (two SDPA calls, bit-exact base path) | fused (the "
        "ppd::dual_cross_attention op) | auto (fused where the op supports the shapes); see bench/RESULTS.md")


@dataclass
class LossConfig:
    """The preference loss (ppd_engine.losses registry)."""

    name: Literal["dpo", "hinge", "ipo", "robust", "kto", "mapo", "orpo", "sft"] = _f(
        "dpo", "preference loss: " + " | ".join(LOSS_NAMES))
    beta: float = _f(5000.0, "beta in the official Diffusion-DPO code's units (beta_dpo; 5000 for SD1.5)")
    weighting: Literal["uniform", "min_snr"] = _f(
        "uniform", "per-pair weight w(lambda_t) of the loss: uniform (w = 1, as Diffusion-DPO trains) | "
        "min_snr (w = min(SNR(t), snr_gamma) / SNR(t), Min-SNR weighting for eps-prediction)")
    snr_gamma: float = _f(5.0, "gamma of the min_snr weighting")
    options: dict[str, float] = _f({}, "extra keyword arguments of the loss, e.g. {label_smoothing: 0.1} for robust")


@dataclass
class TrainConfig:
    """The optimisation loop."""

    seed: int = _f(0, "seed of the data order, timesteps, noise and dropouts")
    epochs: int = _f(1, "passes over the training pairs (paper: 1); used when max_steps = 0")
    max_steps: int = _f(0, "optimizer steps to run; 0 = epochs x (pairs // pairs_per_step)")
    pairs_per_step: int = _f(768, "effective batch in preference pairs over all ranks (paper: 768)")
    micro_batch: int = _f(8, "pairs per forward/backward on one rank (gradient accumulation fills the rest)")
    empty_caption_prob: float = _f(0.2, "probability a pair's caption is replaced by the empty caption")
    user_dropout: float = _f(0.1, "probability a pair's user embedding is zeroed (trains the user-agnostic branch)")
    grad_clip: float = _f(1.0, "max global gradient L2 norm; 0 = no clipping")
    mixed_precision: Literal["bf16", "fp32"] = _f(
        "bf16", "bf16 = bf16 autocast compute with fp32 adapters, loss and reductions; fp32 = no autocast")
    gradient_checkpointing: bool = _f(False, "recompute UNet activations in backward (less memory, ~30% slower)")
    paired_strategy: Literal["sequential", "stacked"] = _f(
        "sequential", "paired forward: sequential (reference then policy) | stacked (one 4B batch)")
    max_bad_steps: int = _f(10, "consecutive NaN/Inf steps tolerated before the run stops")
    device: str = _f("auto", "auto (cuda:LOCAL_RANK if available, else cpu) | cpu | cuda | cuda:N")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: Literal["adamw8bit", "adamw", "adafactor"] = _f(
        "adamw8bit", "adamw8bit (bitsandbytes AdamW8bit) | adamw (torch) | adafactor")
    lr: float = _f(1e-5, "peak learning rate (paper: 1e-5; 3e-6 for the real-user run)")
    warmup_steps: int = _f(0, "linear warmup length of the constant-with-warmup schedule (optimizer updates)")
    weight_decay: float = _f(1e-2, "decoupled weight decay")
    betas: list[float] = _f([0.9, 0.999], "Adam betas (beta1, beta2)")
    eps: float = _f(1e-8, "Adam epsilon")
    min_8bit_size: int = _f(4096, "adamw8bit: tensors with fewer elements keep 32-bit state (bitsandbytes default)")


@dataclass
class DistConfig:
    """Multi-process training (torchrun)."""

    adapters: Literal["shard", "replicate"] = _f(
        "replicate", "trainable adapters: shard (FSDP2 fully_shard: params, grads and optimizer state "
        "sharded) | replicate (full copy per rank, gradients all-reduced); see docs/DISTRIBUTED.md")
    backend: Literal["auto", "gloo", "nccl"] = _f("auto", "process-group backend; auto = nccl on GPU, gloo on CPU")
    timeout_s: int = _f(1800, "collective timeout in seconds")


@dataclass
class LogConfig:
    """Run folder, metrics, TensorBoard, sample grids."""

    run_dir: str = _f("", "run folder; empty = runs/<world>-<UTC time>")
    tensorboard: bool = _f(True, "also write TensorBoard events to RUN/tb when tensorboard is installed")
    progress: bool = _f(True, "show the tqdm progress bar")
    sample_every: int = _f(0, "write RUN/samples/step-N.png every this many steps; 0 = never")
    sample_prompts: list[str] = _f(["a photo of a cat", "a mountain lake at sunrise"],
                                   "prompts (grid columns) of the sample grid")
    sample_users: int = _f(3, "users (grid rows, first in sorted order) of the sample grid, plus a zero-embedding row")
    sample_steps: int = _f(20, "sampler steps of the sample grid")
    sample_guidance: float = _f(5.0, "text classifier-free guidance of the sample grid")
    sample_seed: int = _f(0, "seed of the sample grid (same noise every time)")


@dataclass
class CheckpointConfig:
    """RUN/checkpoints/step-N/ (adapters, optimizer, rng, data cursor, config)."""

    every: int = _f(500, "save every this many steps (and at the end); 0 = only at the end")
    keep_last: int = _f(3, "checkpoints kept; older ones are deleted")
    resume: str = _f("", "empty = fresh run; 'latest' = newest checkpoint of log.run_dir; "
                         "or a path to a run folder or a step-N checkpoint folder")


@dataclass
class Config:
    """Root of the run configuration."""

    world: Literal["toy", "pickapic"] = _f("toy", "toy = the embedded toy world | pickapic = real data")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "base model"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "data"})
    cache: CacheConfig = field(default_factory=CacheConfig, metadata={"help": "latent cache"})
    adapters: AdaptersConfig = field(default_factory=AdaptersConfig, metadata={"help": "user adapters"})
    loss: LossConfig = field(default_factory=LossConfig, metadata={"help": "loss"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "training loop"})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "optimizer"})
    dist: DistConfig = field(default_factory=DistConfig, metadata={"help": "distributed"})
    log: LogConfig = field(default_factory=LogConfig, metadata={"help": "logging"})
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata={"help": "checkpoints"})
    toy: ToyConfig = field(default_factory=ToyConfig, metadata={"help": "toy world"})


# ---------------------------------------------------------------------------------------------
# Type-driven conversion


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
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
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-5" as a string
                return float(value.strip())
            except ValueError:
                raise bad from None
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


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        if k not in names:
            raise ConfigError(f"unknown key {prefix}{k!s}; allowed keys in "
                              f"{prefix.rstrip('.') or 'the root'}: {', '.join(names)}")
        kwargs[k] = _convert(v, hints[k], prefix + k)
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> dict:
    """The config tree as plain YAML-able data."""
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict, cls: type = Config) -> Any:
    """Build and validate a config tree from plain data (unknown keys/bad values raise ConfigError)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    cfg = _build(cls, data)
    if cls is Config:
        validate(cfg)
    return cfg


def apply_override(cfg: Any, override: str) -> None:
    """Apply one `a.b.c=value` string in place; the value is converted by the field's type."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.sub=value")
    path, raw = override.split("=", 1)
    path = path.strip()
    parts = path.split(".")
    node = cfg
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(node)]
        here = ".".join(parts[:i]) or "the root"
        if part not in names:
            raise ConfigError(f"unknown key {'.'.join(parts[:i + 1])}; allowed keys in {here}: {', '.join(names)}")
        tp = _hints(type(node))[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"{path} is a section; set one of its keys, e.g. {path}."
                                  f"{dataclasses.fields(tp)[0].name}=...")
            value: Any = raw
            origin = typing.get_origin(tp)
            if tp not in (str, bool, int, float) and origin not in (Literal, list, dict):
                value = yaml.safe_load(raw)
            setattr(node, part, _convert(value, tp, path))
        else:
            if not dataclasses.is_dataclass(tp):
                raise ConfigError(f"{'.'.join(parts[:i + 1])} is a value, not a section (in {path})")
            node = getattr(node, part)


def validate(cfg: Config) -> None:
    """Cross-field checks; raise ConfigError naming the key."""
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
    need(t.grad_clip >= 0, "train.grad_clip", f"{t.grad_clip} must be >= 0 (0 = off)")
    need(t.max_bad_steps >= 0, "train.max_bad_steps", f"{t.max_bad_steps} must be >= 0")
    need(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"), "train.device",
         f"{t.device!r} is not allowed; choose auto | cpu | cuda | cuda:N")
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
    if cfg.loss.weighting != "uniform":
        from ppd_engine.losses import LOSSES

        weighted = sorted(n for n, spec in LOSSES.items() if spec.uses_weight)
        need(LOSSES[cfg.loss.name].uses_weight, "loss.weighting",
             f"{cfg.loss.name} takes no per-pair weight; use weighting=uniform, or one of: {', '.join(weighted)}")
    need(cfg.model.dtype == "fp32" or t.mixed_precision == "bf16", "model.dtype",
         f"{cfg.model.dtype} base weights need train.mixed_precision=bf16 (got {t.mixed_precision})")
    need(cfg.model.resolution >= 0 and cfg.model.resolution % 8 == 0, "model.resolution",
         f"{cfg.model.resolution} must be 0 or a positive multiple of 8")
    need(cfg.adapters.num_tokens >= 1, "adapters.num_tokens", f"{cfg.adapters.num_tokens} must be >= 1")
    need(cfg.adapters.user_dim >= 0, "adapters.user_dim", f"{cfg.adapters.user_dim} must be >= 0")
    need(cfg.adapters.projection in ("linear", "resampler"), "adapters.projection",
         f"{cfg.adapters.projection!r} is not allowed; choose one of: linear, resampler")
    need(cfg.checkpoint.every >= 0, "checkpoint.every", f"{cfg.checkpoint.every} must be >= 0")
    need(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", f"{cfg.checkpoint.keep_last} must be >= 1")
    need(cfg.log.sample_every >= 0, "log.sample_every", f"{cfg.log.sample_every} must be >= 0")
    if cfg.world == "pickapic":
        need(bool(cfg.data.folder), "data.folder", "world=pickapic needs the Pick-a-Pic parquet folder")
        need(bool(cfg.data.embeddings), "data.embeddings", "world=pickapic needs the user-embedding store path")
        need(cfg.model.family != "toy", "model.family",
             "toy is the toy world's model; world=pickapic needs sd15 or sdxl (e.g. --config configs/sd15_pickapic.yaml)")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (None = all defaults), apply `key.sub=value` overrides, validate.

    Raises ConfigError naming the key for unknown keys, bad values or missing files.
    """
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        with open(p, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: a config must be a mapping of sections, got {type(data).__name__}")
    cfg = _build(Config, data)
    for ov in overrides:
        apply_override(cfg, ov)
    validate(cfg)
    return cfg


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (temp name + rename, so a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        yaml.safe_dump(config_to_dict(cfg), fh, sort_keys=False, allow_unicode=True)
    os.replace(tmp, path)


def config_help(cls: type = Config, prefix: str = "") -> str:
    """One line per key: `section.key  (type, default)  help` — the CLI's --help epilog."""
    lines: list[str] = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = prefix + f.name
        doc = f.metadata.get("help", "")
        if dataclasses.is_dataclass(tp):
            lines.append("")
            lines.append(f"[{key}]  {(tp.__doc__ or doc).strip().splitlines()[0]}")
            lines.append(config_help(tp, key + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        lines.append(f"  {key} ({_describe(tp)}; default {default!r})\n      {doc}")
    return "\n".join(lines).lstrip("\n")
