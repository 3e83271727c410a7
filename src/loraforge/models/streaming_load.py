"""Load a Hugging Face safetensors folder straight into a quantized model, one tensor at a time.

The dense model never exists:

1. The architecture is built with its parameters on the meta device (accelerate's ``init_empty_weights``;
   buffers such as RoPE's ``inv_freq`` are computed for real, they are tiny) and quantized there by
   ``models.prepare._quantize``. That checks the settings and picks the layers exactly as the dense path
   does: every linear but the head; of a vision-language model, the language model's only.
2. Each shard is memory-mapped (``safe_open``) and read tensor by tensor. A weight of a quantized layer is
   cast to the dtype the dense path holds it in (``model.dtype``), quantized by the same function
   (``quant.quantize_model.QUANTIZERS``) and its ``QuantLinear`` is placed on the device as soon as its
   bias (if any) has arrived too. Every other tensor is copied out of the mapping in its ``model.dtype`` and
   placed. Tied parameters (``lm_head`` and the embedding) stay one tensor.

The result is bit-identical to ``quantize_model`` on the dense model (``tests/models/test_streaming_load.py``).
Host memory at any moment: the quantized layers so far (when the device is the CPU), the dense non-linear
weights so far, the pages of the current shard read so far (file-backed; dropped when the shard closes)
and one layer's quantization temporaries.

Checkpoint names map onto module names through transformers' own renamings
(``transformers.conversion_mapping``), which is how a Qwen2.5-VL checkpoint's ``model.layers.*`` lands in
``model.language_model.layers.*``. A checkpoint that needs one of transformers' tensor conversions
(fused or split tensors, e.g. MoE experts) can't be streamed: ``StreamingUnsupported`` says which tensor,
and ``models.quantized_base`` falls back to the dense load.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from loraforge.config import ModelConfig
from loraforge.models.kind import CAUSAL_LM, VISION_LANGUAGE, set_kind
from loraforge.models.sources import DTYPES, ModelSourceError, check_hf_dir, transformers_errors
from loraforge.models.vision import VLM_MODEL_TYPES, VisionProcessor, read_model_type
from loraforge.quant.base import QuantLinear
from loraforge.quant.quantize_model import COMPUTE_DTYPES, QUANTIZERS, resolve_compute_dtype
from loraforge.utils.memory import release_free_memory

INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "model.safetensors"


class StreamingUnsupported(Exception):
    """This checkpoint can't be streamed; the message says why (the caller loads it dense instead)."""


def model_skeleton(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The folder's architecture, as ``from_pretrained`` would build it in ``dtype``, with every parameter on
    the meta device and its (small) buffers computed on the CPU."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = read_model_type(folder)
    with transformers_errors(folder):
        config = AutoConfig.from_pretrained(folder)
        with init_empty_weights(include_buffers=False):
            if model_type in VLM_MODEL_TYPES:
                import transformers

                model = getattr(transformers, VLM_MODEL_TYPES[model_type])._from_config(
                    config, dtype=dtype, attn_implementation="sdpa")
            else:
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        model.tie_weights()  # init_empty_weights makes each module's parameter anew, untying them
        if (folder / "generation_config.json").is_file():
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(folder)
    return set_kind(model.eval(), VISION_LANGUAGE if model_type in VLM_MODEL_TYPES else CAUSAL_LM)


def load_processor(folder: Path):
    """The folder's tokenizer, or its ``VisionProcessor`` for a vision-language model."""
    with transformers_errors(folder):
        if read_model_type(folder) in VLM_MODEL_TYPES:
            return VisionProcessor.from_pretrained(folder)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)


def stream_quantized(folder: Path, config: ModelConfig, device: torch.device):
    """``(model, tokenizer)`` (a ``VisionProcessor`` for a vision-language model) of the HF folder ``folder``,
    quantized as ``config.quantization`` says, on ``device``, without ever holding the dense model.

    Raises:
        StreamingUnsupported: a tensor needs one of transformers' conversions (nothing has been read yet).
        ModelSourceError: the folder is not a loadable model, or its checkpoint lacks tensors the model needs.
        ValueError: bad quantization settings (as ``quantize_model`` raises them).
    """
    from loraforge.models.prepare import _quantize

    check_hf_dir(folder)
    dtype = DTYPES[config.dtype]
    model = model_skeleton(folder, dtype)
    shards = _shards(folder)
    names = _checkpoint_names(model, folder, shards)
    dense_dtypes = {name: tensor.dtype for name, tensor in model.state_dict(keep_vars=True).items()}
    aliases = _aliases(model)
    model = _quantize(model, config)  # meta QuantLinears: checks the settings, marks the layers
    quant = config.quantization
    size = quant.block_size if quant.block_size is not None else quant.group_size
    quantize = QUANTIZERS[quant.type]
    compute = resolve_compute_dtype(COMPUTE_DTYPES[quant.compute_dtype], device)
    layers = {name: module for name, module in model.named_modules() if isinstance(module, QuantLinear)}
    waiting: dict[str, dict[str, torch.Tensor]] = {name: {} for name in layers}
    slots = _dense_slots(model, layers)
    loaded_names = set(names.values())
    unexpected = []
    with torch.no_grad():
        for shard in shards:
            with _safe_open(shard) as file:
                for key in file.keys():
                    name = names[key]
                    layer, _, part = name.rpartition(".")
                    if layer in layers and part in ("weight", "bias"):
                        tensor = file.get_tensor(key).to(dense_dtypes[name])
                        if part == "weight":
                            tensor = quantize(tensor, quant.bits, size, bool(quant.double_quant))
                        waiting[layer][part] = tensor
                        if "weight" in waiting[layer] and ("bias" in waiting[layer]) == (layers[layer].bias is not None):
                            parts = waiting.pop(layer)
                            model.set_submodule(layer, QuantLinear(parts["weight"], parts.get("bias"), compute).to(device))
                    elif name in slots:
                        canonical = aliases.get(name, name)
                        if canonical != name and canonical in loaded_names:
                            continue  # a tied copy: the tensor it is tied to is in the checkpoint (transformers ties to it)
                        tensor = file.get_tensor(key).to(device=device, dtype=dense_dtypes[name], copy=True)
                        _place(slots, [alias for alias, target in aliases.items() if target == canonical] or [name],
                               tensor)
                    else:
                        unexpected.append(key)
            release_free_memory()
    missing = sorted([*waiting, *(name for name, (module, key) in slots.items() if _tensor(module, key).is_meta)])
    if missing:
        raise ModelSourceError(f"{folder}: the checkpoint has no weights for {', '.join(missing[:8])}"
                               f"{f' and {len(missing) - 8} more' if len(missing) > 8 else ''}; is it complete?")
    if unexpected:
        warnings.warn(f"{folder}: {len(unexpected)} checkpoint tensors have no place in {type(model).__name__} and "
                      f"were ignored: {', '.join(unexpected[:5])}", stacklevel=2)
    return model.to(device), load_processor(folder)


def _shards(folder: Path) -> list[Path]:
    """The weight files, as ``from_pretrained`` picks them: the index's files, else ``model.safetensors``."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as err:
            raise ModelSourceError(f"{index}: not a safetensors index (weight_map missing or unreadable: {err})") from None
        absent = [name for name in files if not (folder / name).is_file()]
        if absent:
            raise ModelSourceError(f"{index} names shards that are missing: {', '.join(absent)}")
        return [folder / name for name in files]
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    raise StreamingUnsupported(f"{folder} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")


def _safe_open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as err:  # SafetensorError and OSError: a truncated or foreign file
        raise ModelSourceError(f"{path}: not a readable safetensors file ({err}); is it truncated or corrupt?") from None


def _checkpoint_names(model: nn.Module, folder: Path, shards: list[Path]) -> dict[str, str]:
    """Checkpoint key -> the model's state name, by transformers' renamings; every shard's header is read,
    no tensor data.

    Raises:
        StreamingUnsupported: a key needs a tensor conversion, not just a new name.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError as err:  # transformers moved its loading internals
        raise StreamingUnsupported(f"this transformers has no checkpoint renaming API ({err})") from None
    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    state = dict.fromkeys(model.state_dict(keep_vars=True), True)
    names = {}
    for shard in shards:
        with _safe_open(shard) as file:
            for key in file.keys():
                name, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, state)
                if converted is not None:
                    raise StreamingUnsupported(f"{shard.name}: tensor {key} needs transformers' conversion "
                                               f"{converted!r}, which only its dense loader applies")
                names[key] = name
    return names


def _aliases(model: nn.Module) -> dict[str, str]:
    """Every name of a parameter that has several (tied weights) -> its first name."""
    first: dict[int, str] = {}
    aliases = {}
    for name, tensor in model.named_parameters(remove_duplicate=False):
        canonical = first.setdefault(id(tensor), name)
        aliases[name] = canonical
    counts: dict[str, int] = {}
    for canonical in aliases.values():
        counts[canonical] = counts.get(canonical, 0) + 1
    return {name: canonical for name, canonical in aliases.items() if counts[canonical] > 1}


def _dense_slots(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, tuple[nn.Module, str]]:
    """State name -> ``(module, attribute)`` of every parameter and persistent buffer outside the quantized
    layers (tied names included)."""
    slots = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        if module_name in layers or any(module_name.startswith(f"{layer}.") for layer in layers if module_name):
            continue
        prefix = f"{module_name}." if module_name else ""
        for key in module._parameters:
            slots[prefix + key] = (module, key)
        for key in module._buffers:
            if key not in module._non_persistent_buffers_set:
                slots[prefix + key] = (module, key)
    return {name: slot for name, slot in slots.items() if _tensor(*slot) is not None}


def _tensor(module: nn.Module, key: str) -> torch.Tensor | None:
    return module._parameters[key] if key in module._parameters else module._buffers[key]


def _place(slots: dict[str, tuple[nn.Module, str]], names: list[str], tensor: torch.Tensor) -> None:
    """Put ``tensor`` in every slot of ``names`` (one shared ``Parameter`` for tied parameters)."""
    module, key = slots[names[0]]
    if key in module._parameters:
        tensor = nn.Parameter(tensor, requires_grad=module._parameters[key].requires_grad)
    for name in names:
        module, key = slots[name]
        (module._parameters if key in module._parameters else module._buffers)[key] = tensor
