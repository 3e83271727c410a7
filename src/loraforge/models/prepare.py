"""The frozen base model exactly as a run's ``model`` config section says: loaded, quantized, placed."""

from __future__ import annotations

import torch
from torch import nn

from loraforge.config import ModelConfig
from loraforge.models.kind import is_vision_language
from loraforge.models.sources import DTYPES, load_model
from loraforge.models.vision import vision_layout


def load_base(config: ModelConfig, device: torch.device):
    """``(model, tokenizer)`` (a ``VisionProcessor`` for a vision-language model): the source loaded in ``config.dtype`` (or a GGUF's own blocks with
    ``quantization.type: gguf``), quantized as ``config.quantization`` says, and moved to ``device``.

    Training, export, chat, serve and ``loraforge info`` build their base through here, so an exported run
    merges into the very base it was trained on. An nf4/fp4/int base is streamed from the checkpoint into its
    quantized form and kept in the model cache (``models.quantized_base``)."""
    quant = config.quantization
    if quant is None:
        model, tokenizer = load_model(config.source, config.dtype)
    elif quant.type == "gguf":
        from loraforge.quant.quantize_model import COMPUTE_DTYPES, resolve_compute_dtype

        compute = resolve_compute_dtype(COMPUTE_DTYPES[quant.compute_dtype], device)
        model, tokenizer = load_model(config.source, {v: k for k, v in DTYPES.items()}[compute], native_gguf=True)
    else:  # streamed into its quantized form, and cached (models.quantized_base)
        from loraforge.models.quantized_base import load_quantized_base

        return load_quantized_base(config, device)
    return model.to(device), tokenizer


def _quantize(model: nn.Module, config: ModelConfig) -> nn.Module:
    quant = config.quantization
    if quant is None:
        return model
    from loraforge.quant.quantize_model import quantize_model

    size = quant.block_size if quant.block_size is not None else quant.group_size
    if is_vision_language(model):  # QLoRA quantizes the language model; the vision tower stays dense
        quantize_model(model.get_submodule(vision_layout(model).language), bits=quant.bits, type=quant.type,
                       double_quant=bool(quant.double_quant), block_size=size, compute_dtype=quant.compute_dtype)
        return model
    return quantize_model(model, bits=quant.bits, type=quant.type, double_quant=bool(quant.double_quant),
                          block_size=size, compute_dtype=quant.compute_dtype)
