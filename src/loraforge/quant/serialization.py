"""Save and load a quantized model through safetensors (never pickle).

A saved directory holds:

- ``model.safetensors``: every parameter and buffer of the model (non-persistent buffers such as
  RoPE's ``inv_freq`` included, so a model rebuilt on the meta device needs nothing else). A quantized
  layer ``L`` contributes ``L.qweight.<name>`` for each tensor of its ``tensors()`` and ``L.bias`` if it
  has one. The header metadata carries ``loraforge.quantized`` (json: layer name -> the weight's
  ``meta`` plus ``compute_dtype``) and ``loraforge.tied`` (json: alias name -> stored name, for tied
  weights such as ``lm_head.weight`` -> ``model.embed_tokens.weight``, which are stored once).
- ``config.json``: the Hugging Face config, when the model has one, so that ``load_quantized`` can
  rebuild the architecture without a model.

Files are written to a temporary name in the same directory, flushed to disk, then moved into place
with ``os.replace``, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from loraforge.quant.base import QuantLinear
from loraforge.quant.quantize_model import COMPUTE_DTYPES, WEIGHT_CLASSES, resolve_compute_dtype
from loraforge.utils.atomic import atomic_file

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
QUANTIZED_KEY = "loraforge.quantized"
TIED_KEY = "loraforge.tied"


def quantized_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A model's tensors as a flat safetensors dict, and the header metadata that describes them.

    Returns ``(tensors, metadata)``: each tensor stored once (contiguous), metadata as described in the
    module docstring.
    """
    quantized = {name: module for name, module in model.named_modules() if isinstance(module, QuantLinear)}
    layers = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in quantized.items():
        layers[name] = {**layer.qweight.meta, "compute_dtype": str(layer.compute_dtype).removeprefix("torch.")}
        for key, tensor in layer.qweight.tensors().items():
            tensors[f"{name}.qweight.{key}"] = tensor
    stored_by_identity: dict[int, str] = {}
    tied = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if name in tensors or tensor is None:
            continue
        if id(tensor) in stored_by_identity:
            tied[name] = stored_by_identity[id(tensor)]
            continue
        stored_by_identity[id(tensor)] = name
        tensors[name] = tensor
    tensors = {name: tensor.detach().contiguous() for name, tensor in tensors.items()}
    metadata = {"format": "pt", QUANTIZED_KEY: json.dumps(layers), TIED_KEY: json.dumps(tied)}
    return tensors, metadata


def save_quantized(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` (and ``config.json`` for a Hugging Face model) into ``directory``.

    Returns the weights file's path. Existing files of the same names are replaced atomically.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, metadata = quantized_state(model)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        atomic_file(directory / CONFIG_NAME, lambda path: Path(path).write_text(config.to_json_string()))
    target = directory / WEIGHTS_NAME
    atomic_file(target, lambda path: save_file(tensors, path, metadata=metadata))
    return target


def load_quantized(directory: str | os.PathLike, model: nn.Module | None = None,
                   device: torch.device | None = None) -> nn.Module:
    """Load a directory written by ``save_quantized``.

    Args:
        directory: holds ``model.safetensors`` (and ``config.json`` when ``model`` is None).
        model: the architecture to fill: a dense or meta-device instance of the saved model's class.
            When None, a Hugging Face causal LM is built on the meta device from ``config.json``, so
            no dense weight is ever materialised.
        device: where the model will compute (None: the CPU); a bf16 compute dtype falls back to fp32
            with a warning when it lacks bf16, as in ``quantize_model``.

    Returns:
        The model on CPU in eval mode, with its quantized layers rebuilt as ``QuantLinear`` and every
        other tensor taken from the file (memory-mapped, copy-on-write: pages are read on first use).

    Raises:
        ValueError: the file lacks tensors the model needs, holds tensors or layers the model has no
            place for, or a tensor's shape differs from the model's (all listed by name).
    """
    directory = Path(directory)
    if model is None:
        model = _skeleton_from_config(directory)
    with safe_open(directory / WEIGHTS_NAME, framework="pt", device="cpu") as file:
        metadata = file.metadata() or {}
        layers = json.loads(metadata.get(QUANTIZED_KEY, "{}"))
        tied = json.loads(metadata.get(TIED_KEY, "{}"))
        tensors = {name: file.get_tensor(name) for name in file.keys()}
    module_names = {name for name, _ in model.named_modules()}
    strangers = sorted(set(layers) - module_names)
    if strangers:
        raise ValueError(
            f"the checkpoint does not fit {model.__class__.__name__}: it has no layers {', '.join(strangers)}"
        )
    unknown = sorted({meta["format"] for meta in layers.values()} - set(WEIGHT_CLASSES))
    if unknown:
        raise ValueError(f"unknown quantized formats {unknown}; this version reads {sorted(WEIGHT_CLASSES)}")
    compute_dtypes = {
        name: resolve_compute_dtype(dtype, device or torch.device("cpu"))
        for name, dtype in COMPUTE_DTYPES.items()
        if name in {meta["compute_dtype"] for meta in layers.values()}
    }
    for name, meta in layers.items():
        prefix = f"{name}.qweight."
        parts = {key[len(prefix) :]: tensors.pop(key) for key in list(tensors) if key.startswith(prefix)}
        weight = WEIGHT_CLASSES[meta["format"]].from_tensors(parts, meta)
        bias = tensors.pop(f"{name}.bias", None)
        model.set_submodule(name, QuantLinear(weight, bias, compute_dtypes[meta["compute_dtype"]]))
    _assign_tensors(model, tensors, tied)
    return model.eval()


def _skeleton_from_config(directory: Path) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (directory / CONFIG_NAME).is_file():
        raise ValueError(
            f"{directory} has no {CONFIG_NAME}; pass the model to fill as load_quantized(directory, model)"
        )
    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _assign_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], tied: dict[str, str]) -> None:
    """Put each stored tensor in place of the model's parameter or buffer of the same name.

    ``QuantLinear`` layers are already built from the file and are left alone.
    """
    quantized = tuple(f"{name}." for name, module in model.named_modules() if isinstance(module, QuantLinear))
    slots = {}
    for name, module in model.named_modules():
        if f"{name}.".startswith(quantized):
            continue
        prefix = f"{name}." if name else ""
        for key, tensor in (*module._parameters.items(), *module._buffers.items()):
            if tensor is not None:
                slots[prefix + key] = (module, key)
    missing = sorted(set(slots) - set(tensors) - set(tied))
    unexpected = sorted(set(tensors) - set(slots))
    misshapen = [
        f"{name} {tuple(tensor.shape)} (model: {tuple(getattr(*slots[name]).shape)})"
        for name, tensor in tensors.items()
        if name in slots and getattr(*slots[name]).shape != tensor.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected)}")
    if misshapen:
        problems.append(f"other shapes: {', '.join(misshapen)}")
    if problems:
        raise ValueError(f"the checkpoint does not fit {model.__class__.__name__}: " + "; ".join(problems))
    placed = {}
    for name, tensor in tensors.items():
        module, key = slots[name]
        if key in module._parameters:
            old = module._parameters[key]
            tensor = nn.Parameter(tensor, requires_grad=old is None or old.requires_grad)
            module._parameters[key] = tensor
        else:
            module._buffers[key] = tensor
        placed[name] = tensor
    for alias, source in tied.items():
        module, key = slots[alias]
        (module._parameters if key in module._parameters else module._buffers)[key] = placed[source]
