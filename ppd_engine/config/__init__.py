"""Run configuration: the schema (schema.py) and its reading, layering and help (loader.py).

    from ppd_engine.config import load_config
    cfg = load_config("toy", ["train.max_steps=10"])      # a preset or a YAML path, then overrides
"""

from ppd_engine.config.loader import (
    apply_override, config_from_dict, config_help, config_to_dict, config_to_yaml, flag_hint, load_config,
    presets, read_yaml, resolve_config_path, save_config, validate, world_defaults)
from ppd_engine.config.schema import (
    AdaptersConfig, CacheConfig, CheckpointConfig, Config, ConfigError, DataConfig, DistConfig, LogConfig,
    LossConfig, ModelConfig, OptimConfig, TrainConfig, config_class, register_section)

__all__ = [
    "AdaptersConfig", "CacheConfig", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DistConfig",
    "LogConfig", "LossConfig", "ModelConfig", "OptimConfig", "TrainConfig", "apply_override", "config_class",
    "config_from_dict", "config_help", "config_to_dict", "config_to_yaml", "flag_hint", "load_config", "presets",
    "read_yaml", "register_section", "resolve_config_path", "save_config", "validate", "world_defaults"]
