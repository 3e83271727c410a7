"""The typed, validated config of a loraforge run: one YAML file, five sections (see ``schema``)."""

from .load import load_config, save_config
from .schema import (
    AdapterConfig,
    Config,
    DataConfig,
    ModelConfig,
    OutputConfig,
    QuantizationConfig,
    TrainConfig,
)
from .validate import ConfigError

__all__ = [
    "AdapterConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OutputConfig",
    "QuantizationConfig",
    "TrainConfig",
    "load_config",
    "save_config",
]
