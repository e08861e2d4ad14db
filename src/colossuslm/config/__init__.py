"""Run configuration: typed dataclasses, TOML loading, command-line overrides, validation."""

from colossuslm.config.load import config_from_dict, config_to_dict, load_config, parse_override, save_config
from colossuslm.config.schema import Config, DataConfig, ModelConfig, ParallelConfig, TrainConfig

__all__ = [
    "Config",
    "DataConfig",
    "ModelConfig",
    "ParallelConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_override",
    "save_config",
]
