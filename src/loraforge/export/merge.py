"""Merged weights of an adapted model, and the merged model as a Hugging Face safetensors directory.

Nothing here changes the model. For each linear layer the merged weight is the base weight plus the
update of every active adapter that isn't merged yet, which is exactly what the forward pass adds:

- :func:`merged_dense_weight`: fp32 ``(out, in)``, for any adapter (LoRA, DoRA, QA-LoRA, ...) over a
  dense or quantized base;
- :func:`merged_quantized_weight`: the base's own quantized weight with QA-LoRA folded into its
  group offsets (no re-quantization), or None when the layer can't stay quantized without loss.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from loraforge.adapters.layer import AdaptedLinear
from loraforge.quant.base import QuantizedWeight, QuantLinear, dense_weight
from loraforge.utils.atomic import atomic_dir

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

VLM_GGUF_REFUSAL = (
    "GGUF export of a vision-language model is not supported: llama.cpp runs Qwen2-VL/Qwen2.5-VL as two files, "
    "the language model (architecture qwen2vl, with its M-RoPE sections) and a separate multimodal projector "
    "(mmproj) file holding the vision tower, and loraforge writes neither. Export with --format hf (the merged "
    "model), then convert that folder with llama.cpp's convert_hf_to_gguf.py, once as is and once with --mmproj"
)


def pending_adapters(layer: AdaptedLinear) -> list[nn.Module]:
    """The adapters whose update the forward pass adds on top of the base weight (active, not merged)."""
    if layer.disabled:
        return []
    return [layer.adapters[name] for name in layer.active if name not in layer.merged]


def merged_dense_weight(layer: nn.Module) -> torch.Tensor:
    """The weight ``(out, in)`` in fp32 that ``layer`` (a linear, quantized or adapted) computes with."""
    if not isinstance(layer, AdaptedLinear):
        return dense_weight(layer, torch.float32).detach()
    base = layer.base_layer
    weight = dense_weight(base, torch.float32).detach().clone()
    with torch.no_grad():
        for adapter in pending_adapters(layer):
            weight += adapter.delta_weight(base).to(torch.float32)
    return weight


def merged_quantized_weight(layer: nn.Module) -> QuantizedWeight | None:
    """The quantized weight of the merged layer when no rounding beyond QA-LoRA's fp16 offsets is needed.

    That is: a ``QuantLinear`` with no pending adapters (its weight as is), or one whose pending
    adapters all fold into the quantized weight itself (an adapter method's optional
    ``fold_into(weight) -> weight``; QA-LoRA folds into the group offsets). Any other adapter on a
    quantized base, or a dense base, gives None: merging it needs a dense weight.
    """
    base = layer.base_layer if isinstance(layer, AdaptedLinear) else layer
    if not isinstance(base, QuantLinear):
        return None
    weight = base.qweight
    adapters = pending_adapters(layer) if isinstance(layer, AdaptedLinear) else []
    if not all(hasattr(adapter, "fold_into") for adapter in adapters):
        return None
    with torch.no_grad():
        for adapter in adapters:
            weight = adapter.fold_into(weight)
    return weight


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear of the model by module path: adapted, quantized or plain (the output head included)."""
    found = {}
    for path, module in model.named_modules():
        if any(path.startswith(done + ".") for done in found):
            continue
        if isinstance(module, (AdaptedLinear, QuantLinear, nn.Linear)):
            found[path] = module
    return found


def merged_state_dict(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The dense state dict of the merged model under the plain model's key names (``q_proj.weight`` ...).

    Adapter tensors and quantization buffers are gone; every linear weight is its merged weight. A tied
    output head is left out (``tie_word_embeddings`` restores it on load).
    """
    linears = linear_layers(model)
    state = {}
    for key, tensor in model.state_dict().items():
        module_path = key.rpartition(".")[0]
        if any(module_path == path or module_path.startswith(path + ".") for path in linears):
            continue
        state[key] = tensor.detach().to(dtype) if tensor.is_floating_point() else tensor.detach()
    for path, layer in linears.items():
        state[f"{path}.weight"] = merged_dense_weight(layer).to(dtype)
        bias = _bias(layer)
        if bias is not None:
            state[f"{path}.bias"] = bias.detach().to(dtype)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        head = model.get_output_embeddings()
        for path, layer in linears.items():
            if layer is head or getattr(layer, "base_layer", None) is head:
                state.pop(f"{path}.weight", None)
    return {key: tensor.contiguous() for key, tensor in state.items()}


def _bias(layer: nn.Module) -> torch.Tensor | None:
    base = layer.base_layer if isinstance(layer, AdaptedLinear) else layer
    return base.bias


def save_merged_hf(model: nn.Module, tokenizer, out_dir: str | os.PathLike, dtype: str = "float32") -> Path:
    """Write the merged, dequantized model as a Hugging Face directory, atomically.

    The directory (``model.safetensors``, ``config.json``, tokenizer files) is built under a temporary
    name next to ``out_dir`` and renamed into place; an existing ``out_dir`` is replaced only then.

    Args:
        model: a Hugging Face causal LM or vision-language model, with or without adapters and quantized
            layers (a vision-language model's vision tower and projector are merged the same way).
        tokenizer: saved with ``save_pretrained`` (a vision-language model's ``VisionProcessor`` saves its
            tokenizer, image processor and chat template); None to skip.
        out_dir: the directory to create or replace.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``.

    Raises:
        ValueError: an unknown ``dtype``.
    """
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"export dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}")
    out_dir = Path(out_dir)
    state = merged_state_dict(model, DTYPES[dtype])
    with atomic_dir(out_dir) as staging:
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["dtype"] = dtype
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return out_dir
