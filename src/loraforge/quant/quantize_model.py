"""Quantize a causal LM's linear layers in place: the ``quantization:`` block of the YAML config.

``quantization: {bits: 4, type: nf4, double_quant: true, block_size: 64, compute_dtype: bf16}`` becomes
``quantize_model(model, bits=4, type="nf4", double_quant=True, block_size=64, compute_dtype="bf16")``.
Every ``nn.Linear`` except the output head is replaced by a ``QuantLinear``; in a Llama-family model
these are exactly the attention and MLP projections of the decoder layers. The embedding is not a
linear layer and the output head (``lm_head``) is skipped, so both stay dense.
"""

from __future__ import annotations

import platform
import warnings
from collections.abc import Callable

import torch
from torch import nn

from loraforge.quant.base import QuantizedWeight, QuantLinear
from loraforge.quant.blockwise4bit import BLOCK_SIZES, Blockwise4bitWeight
from loraforge.quant.gguf_blocks import BLOCK_FORMATS
from loraforge.quant.intk import IntKWeight, quantize_intk
from loraforge.utils.memory import copy_to_anonymous_memory, release_free_memory


def _blockwise_4bit(format: str) -> Callable[[torch.Tensor, int, int, bool], QuantizedWeight]:
    def quantize(weight: torch.Tensor, bits: int, block_size: int, double_quant: bool) -> QuantizedWeight:
        return Blockwise4bitWeight.from_dense(weight, format, block_size, double_quant)

    return quantize


def _intk(weight: torch.Tensor, bits: int, group_size: int, double_quant: bool) -> QuantizedWeight:
    return quantize_intk(weight, bits, group_size)


QUANTIZERS: dict[str, Callable[[torch.Tensor, int, int, bool], QuantizedWeight]] = {
    "nf4": _blockwise_4bit("nf4"),
    "fp4": _blockwise_4bit("fp4"),
    "int": _intk,
}
"""``type`` -> ``quantize(dense_weight, bits, block_size, double_quant)``. A new format registers here, and
its class in ``WEIGHT_CLASSES``. For ``int`` the block size is the group size along ``in_features``."""

WEIGHT_CLASSES: dict[str, type] = {
    "nf4": Blockwise4bitWeight,
    "fp4": Blockwise4bitWeight,
    **{f"int{bits}": IntKWeight for bits in (2, 3, 4, 8)},
    **{cls.format: cls for cls in BLOCK_FORMATS.values()},
}
"""Stored ``meta["format"]`` -> the class whose ``from_tensors`` rebuilds it."""

FOUR_BIT_ONLY = ("nf4", "fp4")
GROUPED_ALONG_INPUT = ("int",)
"""Formats whose blocks (groups) run along each row's ``in_features`` rather than the flattened weight."""
GROUP_SIZES = (32, 64, 128)

COMPUTE_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def quantize_model(
    model: nn.Module,
    bits: int = 4,
    type: str = "nf4",
    double_quant: bool = True,
    block_size: int = 64,
    compute_dtype: torch.dtype | str = torch.bfloat16,
) -> nn.Module:
    """Replace every ``nn.Linear`` but the output head by a frozen ``QuantLinear``, one layer at a time.

    Each dense weight is quantized on its own device and dropped as soon as its layer is replaced, so the
    model never holds more than one extra layer. The dense weights left (embeddings, norms, head) are then
    copied out of any memory-mapped checkpoint, so that the file's pages read while quantizing leave RSS
    (``utils.memory``). Returns ``model`` (changed in place).

    Args:
        model: a module; the output head is ``model.get_output_embeddings()`` when the model has one,
            else any module named ``lm_head``.
        bits: 4 (NF4 and FP4 are 4-bit formats).
        type: ``"nf4"`` or ``"fp4"`` (keys of ``QUANTIZERS``).
        double_quant: also quantize the per-block absmax to 8 bits (QLoRA's double quantization).
        block_size: elements per absmax block (``BLOCK_SIZES``); it must divide every layer's element count.
        compute_dtype: matmul dtype, a ``torch.dtype`` or ``"bf16"``/``"fp16"``/``"fp32"``. bf16 on hardware
            without bf16 support falls back to fp32 with a warning (see ``bf16_supported``).

    Raises:
        ValueError: listing every problem at once: an unknown ``type``, ``bits`` other than 4 for NF4/FP4,
            an unsupported ``block_size`` or ``compute_dtype``, and each layer (by name) whose element
            count ``block_size`` does not divide. Nothing is changed when it raises.
    """
    dtype = _check_options(bits, type, block_size, compute_dtype)
    targets = _linear_layers(model)
    if not targets:
        raise ValueError(f"{model.__class__.__name__} has no nn.Linear layers to quantize besides the output head")
    along_input = type in GROUPED_ALONG_INPUT
    blocked = (lambda layer: layer.in_features) if along_input else (lambda layer: layer.weight.numel())
    misfits = [
        f"{name} (weight {tuple(layer.weight.shape)}, {blocked(layer)} {'in_features' if along_input else 'elements'})"
        for name, layer in targets
        if blocked(layer) % block_size
    ]
    if misfits:
        sizes = GROUP_SIZES if along_input else BLOCK_SIZES
        divisor = max((b for b in sizes if all(blocked(layer) % b == 0 for _, layer in targets)), default=None)
        what = "group_size" if along_input else "block_size"
        hint = f"{what} {divisor} divides every layer" if divisor else f"no supported {what} divides every layer"
        raise ValueError(f"{what} {block_size} does not divide the {'in_features' if along_input else 'element count'}"
                         f" of: {', '.join(misfits)}; {hint}")
    dtype = resolve_compute_dtype(dtype, targets[0][1].weight.device)
    names = [name for name, _ in targets]
    del targets  # hold no reference to a dense layer once it is replaced
    quantize = QUANTIZERS[type]
    for name in names:
        layer = model.get_submodule(name)
        weight = quantize(layer.weight.detach(), bits, block_size, double_quant)
        model.set_submodule(name, QuantLinear(weight, layer.bias, dtype))
    copy_to_anonymous_memory(model, skip=(QuantLinear,))
    release_free_memory()
    return model


def _check_options(bits: int, type: str, block_size: int, compute_dtype: torch.dtype | str) -> torch.dtype:
    problems = []
    if type not in QUANTIZERS:
        problems.append(f"unknown quantization type {type!r}; supported: {', '.join(sorted(QUANTIZERS))}")
    elif type in FOUR_BIT_ONLY and bits != 4:
        problems.append(f"type {type!r} is 4-bit only, got bits={bits}; for 2-, 3- or 8-bit weights use type: int")
    sizes, what = (GROUP_SIZES, "group_size") if type in GROUPED_ALONG_INPUT else (BLOCK_SIZES, "block_size")
    if block_size not in sizes:
        problems.append(f"{what} must be one of {', '.join(map(str, sizes))}, got {block_size}")
    dtype = COMPUTE_DTYPES.get(compute_dtype) if isinstance(compute_dtype, str) else compute_dtype
    if dtype not in COMPUTE_DTYPES.values():
        problems.append(f"compute_dtype must be one of bf16, fp16, fp32, got {compute_dtype!r}")
    if problems:
        raise ValueError("bad quantization settings: " + "; ".join(problems))
    return dtype


def _linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """``(qualified name, layer)`` of every ``nn.Linear`` except the output head."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head and name.rsplit(".", 1)[-1] != "lm_head"
    ]


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` has bf16 arithmetic in hardware.

    - CUDA: ``torch.cuda.is_bf16_supported(including_emulation=False)`` (compute capability 8.0+).
    - x86 CPU: AVX512-BF16 or AMX, from ``torch.cpu._is_avx512_bf16_supported()`` and
      ``torch.cpu._is_amx_tile_supported()``. ``torch.backends.cpu.get_cpu_capability()`` is not enough:
      it says "AVX512" on CPUs without the bf16 instructions. Those probes read the CPU itself, so torch must
      also be allowed to use the units: its kernels at AVX512 (``ATEN_CPU_CAPABILITY`` can cap them at AVX2)
      and oneDNN's bf16 probe true (``ONEDNN_MAX_CPU_ISA=AVX2`` makes it false): how a CPU without bf16
      units is emulated on one with them, where bf16 matmuls run 100x slower than fp32.
    - Other CPUs (ARM): oneDNN's bf16 probe, ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``.
    - Other devices: assumed yes.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return True
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return (any(probe() for probe in probes if probe is not None)
                and torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2")
                and torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """``dtype``, or fp32 with a warning when it is bf16 and ``device`` lacks bf16 hardware."""
    if dtype == torch.bfloat16 and not bf16_supported(device):
        warnings.warn(
            f"compute_dtype bf16 is not supported in hardware on {device} (see loraforge.quant.quantize_model"
            ".bf16_supported); computing in fp32 instead. Set compute_dtype: fp32 to silence this warning.",
            stacklevel=3,
        )
        return torch.float32
    return dtype
