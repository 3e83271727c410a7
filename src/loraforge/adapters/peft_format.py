"""Adapters on disk in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are ``base_model.model.<module path>.<suffix>``, each method's layer naming its suffixes
(``lora_A.weight`` (r, in) and ``lora_B.weight`` (out, r) for LoRA); a method's model-level tensors (VeRA's
``base_model.vera_A``) sit outside that prefix. The prefix is mandatory: PEFT silently loads nothing
without it. Which config fields a method writes and reads comes from ``adapters.registry``. Only
safetensors are read; ``adapter_model.bin`` is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from loraforge.adapters.inject import add_adapter, linear_modules
from loraforge.adapters.model import adapted_layers, adapter_names, delete_adapter
from loraforge.adapters.registry import METHODS, method, method_for_peft_config
from loraforge.adapters.spec import AdapterError, AdapterSpec, check_spec
from loraforge.models.kind import is_vision_language
from loraforge.utils.atomic import atomic_dir

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


class AdapterFormatError(AdapterError):
    """An adapter directory that is incomplete, corrupt, or doesn't fit the model."""


def adapter_state_dict(model: nn.Module, name: str = "default", for_original_base: bool = False
                       ) -> dict[str, torch.Tensor]:
    """The tensors of adapter ``name`` under PEFT's key names, model-level ones (VeRA's) included.

    ``for_original_base``: as they apply to the model before any init changed its weights (PiSSA leaves
    the base its residual; PEFT's ``pissa_convert``), which is what a saved adapter is for.
    """
    layers = {path: layer.adapters[name] for path, layer in adapted_layers(model).items() if name in layer.adapters}
    if not layers:
        raise AdapterError(f"no adapter named {name!r} on this model; it has {adapter_names(model)}")
    state = {}
    for path, adapter in layers.items():
        tensors = adapter.original_base_tensors() if for_original_base and hasattr(adapter, "original_base_tensors") \
            else adapter.peft_tensors()
        for suffix, tensor in tensors.items():
            state[f"{PREFIX}{path}.{suffix}"] = tensor
    shared = method(next(iter(layers.values())).method_name).shared
    if shared is not None:
        state.update(shared.tensors(shared.of_layer(next(iter(layers.values())))))
    return {key: tensor.detach().contiguous().cpu() for key, tensor in state.items()}


def paths_regex(paths: list[str]) -> str:
    """A regex that PEFT's ``target_modules`` fullmatches against exactly these module paths (PEFT ignores
    ``layers_to_transform`` for a regex, so the paths are listed, not generalised over layer indices)."""
    return "|".join(re.escape(path) for path in paths)


def peft_config(spec: AdapterSpec, model: nn.Module, name: str, base_model_name_or_path: str | None) -> dict:
    """PEFT's ``adapter_config.json`` for ``spec``: the fields every config has, the LoRA ones where the
    method's config is a LoRA one, and the method's own; ``target_modules`` lists the leaf names adapted."""
    entry = method(spec.method)
    paths = [p for p, layer in adapted_layers(model).items() if name in layer.adapters]
    targets = spec.target_modules if isinstance(spec.target_modules, str) and spec.target_modules != "all-linear" else (
        sorted({p.rsplit(".", 1)[-1] for p in paths})
    )
    if is_vision_language(model):  # leaf names would also reach vision linears of the same name (gate_proj ...)
        targets = paths_regex(paths)
    config = {
        "peft_type": entry.peft_type,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": spec.r,
        "target_modules": targets,
        "layers_to_transform": spec.layers_to_transform,
        "inference_mode": True,
    }
    if entry.lora_config:
        config.update({
            "lora_alpha": spec.alpha,
            "lora_dropout": spec.dropout,
            "rank_pattern": dict(spec.rank_pattern),
            "alpha_pattern": dict(spec.alpha_pattern),
            "use_rslora": spec.use_rslora,
            "init_lora_weights": _INIT_TO_PEFT.get(spec.init, spec.init),
            "bias": "none",
            "fan_in_fan_out": False,
            "modules_to_save": None,
        })
        config.update({m.peft_flag: m is entry for m in METHODS.values()
                       if m.peft_flag and m.peft_type == entry.peft_type})
    config.update(entry.peft_fields(spec, model, name, paths))
    return config


_INIT_TO_PEFT = {"kaiming": True, "gaussian": "gaussian", "none": False}
"""``adapter.init`` -> PEFT's ``init_lora_weights`` (PiSSA's values are spelled alike)."""


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
        write_adapter_files(model, staging, spec, name, base_model_name_or_path, for_original_base=True)
    return directory


def write_adapter_files(model: nn.Module, directory: Path, spec: AdapterSpec, name: str,
                        base_model_name_or_path: str | None, for_original_base: bool = False) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into the folder ``directory``, in place.

    ``for_original_base``: as the adapter applies to the model's original weights (see
    ``adapter_state_dict``); checkpoints keep it as trained, beside the base it was trained on.

    Callers that need the pair to appear as one unit write into an ``atomic_dir`` (``save_adapter``, checkpoints).
    """
    state = adapter_state_dict(model, name, for_original_base)
    config = peft_config(method(spec.method).spec_for_original_base(spec) if for_original_base else spec, model,
                         name, base_model_name_or_path)
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
    adapters = {path: layer.adapters[name] for path, layer in adapted_layers(model).items() if name in layer.adapters}
    weights = Path(source) / WEIGHTS_NAME
    for adapter, adapter_tensors in check_adapter_tensors(adapters, tensors, tensors, weights, name):
        adapter.load_peft_tensors(adapter_tensors)


def check_adapter_tensors(adapters: dict[str, nn.Module], tensors: dict[str, torch.Tensor],
                          everything: dict[str, torch.Tensor], weights: Path, name: str
                          ) -> list[tuple[nn.Module, dict[str, torch.Tensor]]]:
    """Match a file's PEFT-keyed ``tensors`` to ``adapters`` (module path -> one layer's adapter), every key
    and shape checked, and the file's model-level tensors (in ``everything``) against the shared ones.

    Returns ``(adapter, {suffix: tensor})`` pairs to load. Raises ``AdapterFormatError`` naming the file and key.
    """
    planned, used = [], set()
    for module_path, adapter in adapters.items():
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
    if planned:
        used.update(_check_shared(planned[0][0], everything, weights))
    extra = sorted(set(everything) - used)
    if extra:
        raise AdapterFormatError(f"{weights}: holds {len(extra)} tensors that adapter {name!r} of this model lacks, "
                                 f"e.g. {extra[0]}; it was saved with other target modules or for another model")
    return planned


def _check_shared(adapter: nn.Module, tensors: dict[str, torch.Tensor], weights: Path) -> list[str]:
    """The model-level keys of ``tensors`` (VeRA's projections), checked against those ``adapter`` shares:
    they are rebuilt with the adapter, so a file must hold the same ones."""
    shared = method(adapter.method_name).shared
    if shared is None:
        return []
    current = shared.tensors(shared.of_layer(adapter))
    for key, tensor in current.items():
        if key in tensors and not torch.equal(tensors[key].to(tensor), tensor):
            raise AdapterFormatError(f"{weights}: {key} differs from this adapter's; it was saved with other "
                                     "shared settings (projection_prng_key, r or target modules)")
    return [key for key in shared.keys if key in tensors]


def spec_from_peft_config(config: dict, source: str = "adapter_config.json") -> AdapterSpec:
    """Our ``AdapterSpec`` for a PEFT ``adapter_config.json`` of any method in the registry."""
    try:
        entry = method_for_peft_config(config, source)
    except AdapterError as err:
        raise AdapterFormatError(str(err)) from None
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterFormatError(f"{source}: r must be a positive integer, got {r!r}")
    targets = config.get("target_modules") or "all-linear"
    fields = {"method": entry.name, "r": r, "target_modules": targets if isinstance(targets, str) else list(targets),
              "layers_to_transform": _as_list(config.get("layers_to_transform"))}
    try:
        if entry.lora_config:
            init = config.get("init_lora_weights", True)
            fields.update(
                alpha=float(config.get("lora_alpha", 8)),
                dropout=float(config.get("lora_dropout") or 0.0),
                use_rslora=bool(config.get("use_rslora", False)),
                # the file's tensors replace the init; a PiSSA file applies to the base it was converted for
                init="none" if init is False else "gaussian" if init == "gaussian" else "kaiming",
                rank_pattern=dict(config.get("rank_pattern") or {}),
                alpha_pattern=dict(config.get("alpha_pattern") or {}),
            )
        fields.update(entry.from_peft(config))
        spec = AdapterSpec(**fields)
        check_spec(spec)
    except (TypeError, ValueError) as err:
        raise AdapterFormatError(f"{source}: a {entry.peft_type} config field has a wrong type or value: {err}") from None
    return spec


def _as_list(value):
    return [value] if isinstance(value, int) else value


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default",
                 base_model_name_or_path: str | None = None) -> AdapterSpec:
    """Add the adapter saved in ``directory`` to ``model`` as ``name`` and load its weights.

    The modules come from the tensor keys. Each layer is built as its method builds it (the rank from the
    file), and every key and shape is checked against it before a tensor is copied; on any mismatch the
    adapter is removed again and the model is as it was.

    ``base_model_name_or_path``, when given, is the model's source. An adapter whose config names
    another base only gets a warning: names are not identities (a hub id, a local copy, a renamed
    folder or a GGUF file can hold the same weights), PEFT ignores the field when loading, and an
    adapter that truly belongs to another architecture fails the shape check.

    Raises:
        AdapterFormatError: a missing, corrupt or truncated file, an unsupported method, or a tensor that
            doesn't fit the model.
    """
    directory = Path(directory)
    config, tensors = read_adapter_dir(directory)
    weights = directory / WEIGHTS_NAME
    plan = plan_adapter(model, config, tensors, directory)
    try:
        add_adapter(model, plan.spec, name, paths=list(plan.ranks), ranks=plan.ranks, saved_shared=plan.saved_shared,
                    peft_config=config)
        load_adapter_weights(model, name, plan.layer_tensors, directory)
    except AdapterError as err:
        if name in adapter_names(model):
            delete_adapter(model, name)
        if isinstance(err, AdapterFormatError):
            raise
        raise AdapterFormatError(f"{weights}: {err}") from None
    if base_model_name_or_path:
        _warn_if_other_base(config.get("base_model_name_or_path"), base_model_name_or_path, directory / CONFIG_NAME)
    return plan.spec


class AdapterPlan(NamedTuple):
    """What an adapter file asks of a model: its spec, its per-layer tensors, each module's ``(r, alpha)``
    and its model-level (shared) tensors."""

    spec: AdapterSpec
    layer_tensors: dict[str, torch.Tensor]
    ranks: dict[str, tuple[int, float]]
    saved_shared: dict[str, torch.Tensor]


def plan_adapter(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor], directory: Path) -> AdapterPlan:
    """Read a PEFT adapter ``(config, tensors)`` from ``directory`` against ``model``, before building anything.

    Raises ``AdapterFormatError``: an unsupported method or config, keys naming no linear module of ``model``.
    """
    spec = spec_from_peft_config(config, str(Path(directory) / CONFIG_NAME))
    entry = method(spec.method)
    shared_keys = entry.shared.keys if entry.shared else ()
    layer_tensors = {k: v for k, v in tensors.items() if k not in shared_keys}
    per_module = group_by_module(layer_tensors, Path(directory) / WEIGHTS_NAME, model)
    ranks = {path: (entry.rank_from_peft(config, module_tensors), spec.rank_and_alpha(path)[1])
             for path, module_tensors in per_module.items()}
    return AdapterPlan(spec, layer_tensors, ranks, {k: tensors[k] for k in shared_keys if k in tensors})


def _warn_if_other_base(trained_on, loaded_into: str, config_path: Path) -> None:
    if not isinstance(trained_on, str) or not trained_on or trained_on == loaded_into:
        return
    if os.path.exists(trained_on) and os.path.exists(loaded_into) and os.path.samefile(trained_on, loaded_into):
        return
    warnings.warn(f"{config_path}: the adapter was trained on {trained_on!r} and is loaded into {loaded_into!r}; "
                  "its shapes fit, but if that is another model its outputs will be wrong", stacklevel=3)


def group_by_module(tensors: dict[str, torch.Tensor], source: Path, model: nn.Module
                    ) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT-keyed ``tensors`` grouped by the linear module of ``model`` each belongs to, keyed by suffix.

    Raises:
        AdapterFormatError: a key without PEFT's prefix, or one that names no linear module of ``model``.
    """
    modules = linear_modules(model)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterFormatError(f"{source}: key {key!r} lacks PEFT's mandatory {PREFIX!r} prefix")
        body = key[len(PREFIX):]
        path = next((p for p in _prefixes(body) if p in modules), None)
        if path is None:
            raise AdapterFormatError(f"{source}: {key} names no linear module of this model; was the adapter trained "
                                     "for another base model?")
        grouped.setdefault(path, {})[body[len(path) + 1:]] = tensor
    if not grouped:
        raise AdapterFormatError(f"{source}: holds no adapter tensors")
    return grouped


def _prefixes(body: str) -> list[str]:
    """``a.b.c.d`` -> ``["a.b.c", "a.b", "a"]``: the module paths a tensor key could belong to, longest first."""
    parts = body.split(".")
    return [".".join(parts[:end]) for end in range(len(parts) - 1, 0, -1)]
