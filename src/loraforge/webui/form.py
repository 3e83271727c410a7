"""The Train tab's form as plain data: which fields it has, the config they make, and the problems of that
config placed at the field that caused them. Every choice list and default comes from the config schema
and the registries; nothing here knows a method or a format by name."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args, get_type_hints

import yaml

from loraforge.adapters.registry import METHODS
from loraforge.config import (
    AdapterConfig,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    QuantizationConfig,
    TrainConfig,
)
from loraforge.models.tiny import TINY_FAMILIES

MODEL_KINDS = ("default", "folder", "GGUF file", *TINY_FAMILIES)
NO_QUANTIZATION = "none"
FIELDS_AT = {"model": "model", "adapter": "method", "data": "data", "train": "train", "output": "train",
             ("model", "quantization"): "method", "yaml": "yaml"}
"""Where a problem with a config key is shown: the first one or two parts of its key path -> form area."""
AREAS = ("model", "method", "data", "train", "yaml")


def choices(cls: type, name: str) -> list:
    """The values a ``Literal`` field of a schema dataclass takes (``choices(TrainConfig, "optim")``)."""
    hint = get_type_hints(cls)[name]
    for arg in (hint, *get_args(hint)):
        if get_args(arg) and all(not isinstance(a, type) for a in get_args(arg)):
            return list(get_args(arg))
    raise TypeError(f"{cls.__name__}.{name} is not a Literal field")


def default(cls: type, name: str) -> Any:
    return next(f for f in dataclasses.fields(cls) if f.name == name).default


@dataclass
class FormValues:
    """One value per form field, with the schema's defaults."""

    model_kind: str = "default"
    model_path: str = ""
    method: str = default(AdapterConfig, "method")
    quantization: str = NO_QUANTIZATION
    bits: int = default(QuantizationConfig, "bits")
    r: int = default(AdapterConfig, "r")
    alpha: float = default(AdapterConfig, "alpha")
    dropout: float = default(AdapterConfig, "dropout")
    data_path: str = ""
    data_format: str = default(DataConfig, "format")
    columns: str = ""
    cutoff_len: int = default(DataConfig, "cutoff_len")
    lr: float = default(TrainConfig, "lr")
    epochs: float = default(TrainConfig, "epochs")
    max_steps: int = 0
    batch_size: int = default(TrainConfig, "batch_size")
    grad_accum: int = default(TrainConfig, "grad_accum")
    gradient_checkpointing: bool = default(TrainConfig, "gradient_checkpointing")
    precision: str = default(TrainConfig, "precision")
    optim: str = default(TrainConfig, "optim")
    save_steps: int = 0
    run_name: str = "run1"

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


def source_of(values: FormValues) -> str:
    if values.model_kind in ("folder", "GGUF file"):
        return values.model_path.strip()
    return values.model_kind


def config_data(values: FormValues, base: dict | None = None) -> dict:
    """Plain config data: ``base`` (a loaded YAML's data) with the form's fields set on top."""
    data = yaml.safe_load(yaml.safe_dump(base or {})) or {}  # a deep copy

    def section(name: str) -> dict:
        if not isinstance(data.get(name), dict):
            data[name] = {}
        return data[name]

    model = section("model")
    model["source"] = source_of(values)
    if values.quantization == NO_QUANTIZATION:
        model["quantization"] = None
    else:
        quant = model.get("quantization") if isinstance(model.get("quantization"), dict) else {}
        model["quantization"] = {**quant, "type": values.quantization, "bits": int(values.bits)}
    adapter = section("adapter")
    adapter.update(method=values.method, r=int(values.r), alpha=float(values.alpha), dropout=float(values.dropout))
    data_section = section("data")
    data_section.update(format=values.data_format, cutoff_len=int(values.cutoff_len))
    if values.data_path.strip():
        data_section["train_files"] = [values.data_path.strip()]
    data_section["columns"] = parse_columns(values.columns)
    train = section("train")
    train.update(lr=float(values.lr), epochs=float(values.epochs), batch_size=int(values.batch_size),
                 grad_accum=int(values.grad_accum), gradient_checkpointing=bool(values.gradient_checkpointing),
                 precision=values.precision, optim=values.optim,
                 max_steps=int(values.max_steps) or None, save_steps=int(values.save_steps) or None)
    return data


def form_values(data: dict) -> FormValues:
    """The form's fields as a loaded config's data sets them (missing keys: the schema's defaults)."""
    config = Config.from_dict(data, check_files=False)
    source = config.model.source
    kind = (source if source in MODEL_KINDS else "GGUF file" if source.endswith(".gguf") else "folder")
    quant = config.model.quantization
    files = config.data.train_files
    return FormValues(
        model_kind=kind, model_path="" if kind == source else source, method=config.adapter.method,
        quantization=quant.type if quant else NO_QUANTIZATION, bits=quant.bits if quant else FormValues.bits,
        r=config.adapter.r, alpha=config.adapter.alpha, dropout=config.adapter.dropout,
        data_path=files[0] if files else "", data_format=config.data.format,
        columns=", ".join(f"{k}={v}" for k, v in config.data.columns.items()), cutoff_len=config.data.cutoff_len,
        lr=config.train.lr, epochs=config.train.epochs, max_steps=config.train.max_steps or 0,
        batch_size=config.train.batch_size, grad_accum=config.train.grad_accum,
        gradient_checkpointing=config.train.gradient_checkpointing, precision=config.train.precision,
        optim=config.train.optim, save_steps=config.train.save_steps or 0,
        run_name=Path(config.output.dir).name)


def parse_columns(text: str) -> dict[str, str]:
    """``"instruction=question, output=answer"`` -> a ``data.columns`` mapping (a bad item is kept as-is
    so that validation names it)."""
    out = {}
    for item in filter(None, (part.strip() for part in text.replace("\n", ",").split(","))):
        field, _, column = item.partition("=")
        out[field.strip()] = column.strip()
    return out


def validate(data: dict, check_files: bool = True) -> tuple[Config | None, dict[str, list[str]]]:
    """The config, or the problems by form area (see ``AREAS``), each with its key and did-you-mean."""
    try:
        return Config.from_dict(data, "form", base_dir=os.curdir, check_files=check_files), {}
    except ConfigError as err:
        return None, place(err)


def place(err: ConfigError) -> dict[str, list[str]]:
    """A ``ConfigError``'s problems by form area; problems located in a YAML file stay with the YAML."""
    by_area: dict[str, list[str]] = {}
    for problem in err.problems:
        where = problem.where or err.locations.get(problem.path, "")
        area = "yaml" if where and not where.startswith("form") else _area(problem.path)
        by_area.setdefault(area, []).append(f"{where}: {problem.text}" if area == "yaml" else problem.text)
    return by_area


def _area(path: tuple) -> str:
    return FIELDS_AT.get(tuple(path[:2]), FIELDS_AT.get(path[0] if path else "yaml", "yaml"))


def preview(data: dict, yaml_path: str) -> tuple[str, str]:
    """The YAML the form stands for, and the equivalent commands once it is saved at ``yaml_path``."""
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    return text, f"# after Save YAML:\nloraforge estimate {yaml_path}\nloraforge train {yaml_path}"


def method_names() -> list[str]:
    return list(METHODS)


def quantization_choices() -> list[str]:
    return [NO_QUANTIZATION, *choices(QuantizationConfig, "type")]


def model_source_help() -> str:
    return next(f for f in dataclasses.fields(ModelConfig) if f.name == "source").metadata["help"]
