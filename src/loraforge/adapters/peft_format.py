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
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from loraforge.adapters.inject import add_adapter
from loraforge.adapters.model import adapted_layers, adapter_names
from loraforge.adapters.qalora import group_size_of
from loraforge.adapters.spec import AdapterError, AdapterSpec

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
    """Write adapter ``name`` to ``directory`` in PEFT's format; each file is written atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(model, name)
    config = peft_config(spec, model, name, base_model_name_or_path)
    _atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    _atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    return directory


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterFormatError(f"{config_path}:{err.lineno}: invalid JSON ({err.msg})") from None
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFormatError(f"{weights_path}: not a readable safetensors file ({err}); is it truncated or corrupt?") from None
    return config, tensors


def load_adapter_weights(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Copy PEFT-keyed ``tensors`` into the existing adapter ``name`` (a checkpoint, or a run's final adapter)."""
    for module_path, layer in adapted_layers(model).items():
        if name not in layer.adapters:
            continue
        adapter = layer.adapters[name]
        wanted = {suffix: tensors.get(f"{PREFIX}{module_path}.{suffix}") for suffix in adapter.peft_tensors()}
        missing = [s for s, t in wanted.items() if t is None]
        if missing:
            raise AdapterFormatError(f"{source}: lacks {missing} for {module_path}; it was saved for another "
                                     "model or adapter configuration")
        adapter.load_peft_tensors(wanted)


def spec_from_peft_config(config: dict, source: str = "adapter_config.json") -> AdapterSpec:
    """Our ``AdapterSpec`` for a PEFT LoRA/DoRA config."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterFormatError(f"{source}: peft_type {peft_type!r} is not supported; loraforge loads LORA adapters (LoRA, DoRA, QA-LoRA)")
    if config.get("use_dora") and config.get("use_qalora"):
        raise AdapterFormatError(f"{source}: use_dora and use_qalora are both set; an adapter is one or the other")
    init = config.get("init_lora_weights", True)
    targets = config.get("target_modules") or "all-linear"
    return AdapterSpec(
        method="dora" if config.get("use_dora") else "qalora" if config.get("use_qalora") else "lora",
        r=int(config["r"]),
        alpha=float(config.get("lora_alpha", 8)),
        dropout=float(config.get("lora_dropout") or 0.0),
        use_rslora=bool(config.get("use_rslora", False)),
        init="none" if init is False else "gaussian" if init == "gaussian" else "kaiming",
        target_modules=targets if isinstance(targets, str) else list(targets),
        layers_to_transform=_as_list(config.get("layers_to_transform")),
        rank_pattern=dict(config.get("rank_pattern") or {}),
        alpha_pattern=dict(config.get("alpha_pattern") or {}),
    )


def _as_list(value):
    return [value] if isinstance(value, int) else value


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default") -> AdapterSpec:
    """Add the adapter saved in ``directory`` to ``model`` as ``name`` and load its weights.

    The modules come from the tensor keys, and every shape is checked before anything is changed:
    an adapter for another base model raises an error naming the first mismatching key.
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
    return spec


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
