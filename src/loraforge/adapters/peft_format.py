"""Adapters on disk in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are ``base_model.model.<module path>.<suffix>`` with suffixes ``lora_A.weight`` (r, in),
``lora_B.weight`` (out, r) and, for DoRA, ``lora_magnitude_vector`` (out,). QA-LoRA is PEFT's
``use_qalora`` with ``qalora_group_size``; its ``lora_A.weight`` is (r, in / group_size). The prefix is mandatory:
PEFT silently loads nothing without it. Only safetensors are read; ``adapter_model.bin`` is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from loraforge.adapters.inject import add_adapter
from loraforge.adapters.model import adapted_layers, adapter_names
from loraforge.adapters.qalora import group_size_of
from loraforge.adapters.spec import AdapterError, AdapterSpec
from loraforge.utils.atomic import atomic_dir

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


class AdapterFormatError(AdapterError):
    """An adapter directory that is incomplete, corrupt, or doesn't fit the model."""


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors of adapter ``name`` under PEFT's key names."""
    state = {}
    for path, layer in adapted_layers(model).items():
        if name in layer.adapters:
            for suffix, tensor in layer.adapters[name].peft_tensors().items():
                state[f"{PREFIX}{path}.{suffix}"] = tensor.detach().contiguous().cpu()
    if not state:
        raise AdapterError(f"no adapter named {name!r} on this model; it has {adapter_names(model)}")
    return state


def peft_config(spec: AdapterSpec, model: nn.Module, name: str, base_model_name_or_path: str | None) -> dict:
    """PEFT's ``LoraConfig`` fields for ``spec``; ``target_modules`` lists the leaf names actually adapted."""
    if spec.method not in ("lora", "dora", "qalora"):
        raise AdapterError(f"adapter method {spec.method!r} has no PEFT LoRA config")
    paths = [p for p, layer in adapted_layers(model).items() if name in layer.adapters]
    qalora = {"use_qalora": True, "qalora_group_size": _qalora_group_size(model, paths)} if spec.method == "qalora" else {}
    targets = spec.target_modules if isinstance(spec.target_modules, str) and spec.target_modules != "all-linear" else (
        sorted({p.rsplit(".", 1)[-1] for p in paths})
    )
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": targets,
        "layers_to_transform": spec.layers_to_transform,
        "rank_pattern": dict(spec.rank_pattern),
        "alpha_pattern": dict(spec.alpha_pattern),
        "use_rslora": spec.use_rslora,
        "use_dora": spec.method == "dora",
        "init_lora_weights": {"kaiming": True, "gaussian": "gaussian", "none": False}[spec.init],
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "inference_mode": True,
        **qalora,
    }


def _qalora_group_size(model: nn.Module, paths: list[str]) -> int:
    """PEFT stores one ``qalora_group_size`` per adapter, so every adapted layer must share it."""
    sizes = {path: group_size_of(model.get_submodule(path).base_layer) for path in paths}
    if len(set(sizes.values())) > 1:
        raise AdapterError(f"QA-LoRA layers have different quantization group sizes {sizes}; PEFT's format holds one")
    return next(iter(sizes.values()))


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    spec: AdapterSpec,
    name: str = "default",
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write adapter ``name`` to ``directory`` in PEFT's format, both files as one unit.

    The files are written into a staging folder that replaces ``directory`` in one rename
    (``loraforge.utils.atomic``), so a crash never leaves a new config beside old weights. Other
    files already in ``directory`` (a README, tokenizer files) are carried over.

    Raises:
        AdapterError: ``directory`` is a file, or the model has no adapter ``name``.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise AdapterError(f"can't save the adapter to {directory}: it is a file; give a folder path")
    with atomic_dir(directory) as staging:
        if directory.is_dir():
            shutil.copytree(directory, staging, symlinks=True, dirs_exist_ok=True, copy_function=_link_or_copy,
                            ignore=lambda folder, _: (CONFIG_NAME, WEIGHTS_NAME) if Path(folder) == directory else ())
        write_adapter_files(model, staging, spec, name, base_model_name_or_path)
    return directory


def write_adapter_files(model: nn.Module, directory: Path, spec: AdapterSpec, name: str,
                        base_model_name_or_path: str | None) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into the folder ``directory``, in place.

    Callers that need the pair to appear as one unit write into an ``atomic_dir`` (``save_adapter``, checkpoints).
    """
    state = adapter_state_dict(model, name)
    config = peft_config(spec, model, name, base_model_name_or_path)
    save_file(state, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:  # a file system without hard links
        shutil.copy2(source, destination)


def read_adapter_dir(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Parse ``adapter_config.json`` and load ``adapter_model.safetensors`` (never a pickle)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFormatError(f"{directory}: no such adapter directory")
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_path.is_file():
        raise AdapterFormatError(f"{directory}: {CONFIG_NAME} is missing; a PEFT adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    if not weights_path.is_file():
        pickled = (directory / "adapter_model.bin").is_file()
        hint = " (adapter_model.bin is there, but loraforge never unpickles weights: re-save it with safetensors)" if pickled else ""
        raise AdapterFormatError(f"{directory}: {WEIGHTS_NAME} is missing{hint}")
    try:
        config = json.loads(config_path.read_bytes())
    except json.JSONDecodeError as err:
        raise AdapterFormatError(f"{config_path}:{err.lineno}: invalid JSON ({err.msg})") from None
    except UnicodeDecodeError as err:
        raise AdapterFormatError(f"{config_path}: not UTF-8 text ({err.reason}); is it truncated or corrupt?") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{config_path}: expected a JSON object of LoraConfig fields, "
                                 f"got {type(config).__name__}")
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFormatError(f"{weights_path}: not a readable safetensors file ({err}); is it truncated or corrupt?") from None
    return config, tensors


def load_adapter_weights(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Copy PEFT-keyed ``tensors`` from the adapter folder ``source`` into the existing adapter ``name``.

    For a checkpoint, or a run's final adapter. Every key and shape is checked before anything is copied.

    Raises:
        AdapterFormatError: ``tensors`` lacks a tensor of the adapter, has one it doesn't, or has a
            shape it can't take; the message names the file and the key.
    """
    weights = Path(source) / WEIGHTS_NAME
    planned, used = [], set()
    for module_path, layer in adapted_layers(model).items():
        if name not in layer.adapters:
            continue
        adapter = layer.adapters[name]
        keys = {suffix: f"{PREFIX}{module_path}.{suffix}" for suffix in adapter.peft_tensors()}
        missing = [key for key in keys.values() if key not in tensors]
        if missing:
            raise AdapterFormatError(f"{weights}: lacks {missing}; it was saved for another model or adapter "
                                     "configuration")
        for suffix, current in adapter.peft_tensors().items():
            found = tensors[keys[suffix]]
            if found.shape != current.shape:
                raise AdapterFormatError(
                    f"{weights}: {keys[suffix]} has shape {tuple(found.shape)}, but this model's adapter needs "
                    f"{tuple(current.shape)}; it was saved with another rank, method or base model")
        used.update(keys.values())
        planned.append((adapter, {suffix: tensors[key] for suffix, key in keys.items()}))
    extra = sorted(set(tensors) - used)
    if extra:
        raise AdapterFormatError(f"{weights}: holds {len(extra)} tensors that adapter {name!r} of this model lacks, "
                                 f"e.g. {extra[0]}; it was saved with other target modules or for another model")
    for adapter, adapter_tensors in planned:
        adapter.load_peft_tensors(adapter_tensors)


def spec_from_peft_config(config: dict, source: str = "adapter_config.json") -> AdapterSpec:
    """Our ``AdapterSpec`` for a PEFT LoRA/DoRA config."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterFormatError(f"{source}: peft_type {peft_type!r} is not supported; loraforge loads LORA adapters (LoRA, DoRA, QA-LoRA)")
    if config.get("use_dora") and config.get("use_qalora"):
        raise AdapterFormatError(f"{source}: use_dora and use_qalora are both set; an adapter is one or the other")
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterFormatError(f"{source}: r must be a positive integer, got {r!r}")
    init = config.get("init_lora_weights", True)
    targets = config.get("target_modules") or "all-linear"
    try:
        return AdapterSpec(
            method="dora" if config.get("use_dora") else "qalora" if config.get("use_qalora") else "lora",
            r=r,
            alpha=float(config.get("lora_alpha", 8)),
            dropout=float(config.get("lora_dropout") or 0.0),
            use_rslora=bool(config.get("use_rslora", False)),
            init="none" if init is False else "gaussian" if init == "gaussian" else "kaiming",
            target_modules=targets if isinstance(targets, str) else list(targets),
            layers_to_transform=_as_list(config.get("layers_to_transform")),
            rank_pattern=dict(config.get("rank_pattern") or {}),
            alpha_pattern=dict(config.get("alpha_pattern") or {}),
        )
    except (TypeError, ValueError) as err:
        raise AdapterFormatError(f"{source}: a LoraConfig field has a wrong type or value: {err}") from None


def _as_list(value):
    return [value] if isinstance(value, int) else value


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default",
                 base_model_name_or_path: str | None = None) -> AdapterSpec:
    """Add the adapter saved in ``directory`` to ``model`` as ``name`` and load its weights.

    The modules come from the tensor keys, and every shape is checked before anything is changed:
    an adapter for another base model raises an error naming the first mismatching key.

    ``base_model_name_or_path``, when given, is the model's source. An adapter whose config names
    another base only gets a warning: names are not identities (a hub id, a local copy, a renamed
    folder or a GGUF file can hold the same weights), PEFT ignores the field when loading, and an
    adapter that truly belongs to another architecture fails the shape check.

    Raises:
        AdapterFormatError: a missing, corrupt or truncated file, or a tensor that doesn't fit the model.
    """
    directory = Path(directory)
    config, tensors = read_adapter_dir(directory)
    spec = spec_from_peft_config(config, str(directory / CONFIG_NAME))
    per_module = group_by_module(tensors, directory / WEIGHTS_NAME, spec.method)
    modules = dict(model.named_modules())
    for path, module_tensors in per_module.items():
        _check_shapes(path, module_tensors, modules.get(path), directory / WEIGHTS_NAME, _qalora_file_group(config, spec))
    for path, module_tensors in per_module.items():
        r = module_tensors["lora_A.weight"].shape[0]
        _, alpha = spec.rank_and_alpha(path)
        module_spec = dataclasses.replace(spec, r=r, alpha=alpha, rank_pattern={}, alpha_pattern={})
        add_adapter(model, module_spec, name, paths=[path])
        layer = model.get_submodule(path)
        layer.adapters[name].load_peft_tensors(module_tensors)
    if base_model_name_or_path:
        _warn_if_other_base(config.get("base_model_name_or_path"), base_model_name_or_path, directory / CONFIG_NAME)
    return spec


def _warn_if_other_base(trained_on, loaded_into: str, config_path: Path) -> None:
    if not isinstance(trained_on, str) or not trained_on or trained_on == loaded_into:
        return
    if os.path.exists(trained_on) and os.path.exists(loaded_into) and os.path.samefile(trained_on, loaded_into):
        return
    warnings.warn(f"{config_path}: the adapter was trained on {trained_on!r} and is loaded into {loaded_into!r}; "
                  "its shapes fit, but if that is another model its outputs will be wrong", stacklevel=3)


def group_by_module(tensors: dict[str, torch.Tensor], source: Path, method: str) -> dict[str, dict[str, torch.Tensor]]:
    expected = set(_suffixes(method))
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterFormatError(f"{source}: key {key!r} lacks PEFT's mandatory {PREFIX!r} prefix")
        body = key[len(PREFIX):]
        suffix = next((s for s in expected if body.endswith("." + s)), None)
        if suffix is None:
            raise AdapterFormatError(
                f"{source}: key {key!r} is not a {method} tensor; expected keys ending in {sorted(expected)}"
            )
        grouped.setdefault(body[: -len(suffix) - 1], {})[suffix] = tensor
    for path, group in grouped.items():
        missing = expected - set(group)
        if missing:
            raise AdapterFormatError(f"{source}: module {path} lacks {sorted(missing)}")
    if not grouped:
        raise AdapterFormatError(f"{source}: holds no adapter tensors")
    return grouped


def _suffixes(method: str) -> tuple[str, ...]:
    base = ("lora_A.weight", "lora_B.weight")
    return base + ("lora_magnitude_vector",) if method == "dora" else base


def _qalora_file_group(config: dict, spec: AdapterSpec) -> int | None:
    return int(config.get("qalora_group_size", 16)) if spec.method == "qalora" else None


def _check_shapes(
    path: str, tensors: dict[str, torch.Tensor], module: nn.Module | None, source: Path, qalora_group: int | None
) -> None:
    key = f"{PREFIX}{path}"
    if module is None:
        raise AdapterFormatError(
            f"{source}: {key} names module {path!r}, which this model lacks; was the adapter trained for another base model?"
        )
    base = getattr(module, "base_layer", module)
    if not hasattr(base, "in_features"):
        raise AdapterFormatError(f"{source}: {key}: module {path!r} is a {type(base).__name__}, not a linear layer")
    r = tensors["lora_A.weight"].shape[0]
    a_in = base.in_features
    if qalora_group is not None:
        if group_size_of(base) != qalora_group:
            raise AdapterFormatError(
                f"{source}: {key}: the adapter was trained with qalora_group_size {qalora_group}, but this base is "
                f"quantized in groups of {group_size_of(base)}; QA-LoRA needs the same groups it was trained on"
            )
        a_in = base.in_features // qalora_group
    expected = {"lora_A.weight": (r, a_in), "lora_B.weight": (base.out_features, r)}
    if "lora_magnitude_vector" in tensors:
        expected["lora_magnitude_vector"] = (base.out_features,)
    for suffix, shape in expected.items():
        if tuple(tensors[suffix].shape) != shape:
            raise AdapterFormatError(
                f"{source}: {key}.{suffix} has shape {tuple(tensors[suffix].shape)} but this model needs {shape}; "
                "the adapter was trained for another base model"
            )
