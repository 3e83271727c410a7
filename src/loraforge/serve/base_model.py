"""The base model ``serve`` and ``chat`` run: a model source plus one ``--quantization`` word, turned into the
``model`` config section that training and export also load through (``models.prepare.load_base``).

``--quantization`` (``QUANTIZATIONS``):

- ``auto`` (the default): on a device with bf16 units, a GGUF source (``default``, the embedded SmolLM2-135M
  Q4_1 file, or a ``.gguf`` path) keeps the file's Q4_0/Q4_1/Q8_0 blocks as they are (``gguf``), which is
  what a 4-bit file is for; any other source, and any source on a device without bf16 units, is served
  dense (``none``), because there the low-bit path computes in fp32 and is slower than dense (below);
- ``none``: dense, in float32 (a GGUF's blocks dequantized);
- ``gguf``: keep a GGUF file's own blocks (an error for any other source);
- ``nf4`` / ``fp4``: QLoRA's 4-bit blocks (block size 64, double quantization), quantized on load;
- ``int4`` / ``int8``: group-wise asymmetric INTk (QA-LoRA's base format, group size 64), quantized on load.

Quantized linears compute in bf16 where the device has bf16 units (``quantize_model.bf16_supported``: a GPU
from Ampere on, an x86 CPU with AVX512-BF16 or AMX), else in fp32; a GGUF's dense tensors (embedding, norms)
are then held in that dtype too (``load_base``). torch's CPU int4 kernel is the reason: on an AVX512-BF16
CPU it multiplies a 1536x576 Q4_1 weight by one bf16 row in 0.05 ms, by one fp32 row in 1.5 ms (measured
with 1 thread), and a whole fp32 decode of the default model ran at 2.4 tok/s against 14.5 tok/s dense. A
QA-LoRA run exported with ``loraforge export --run R --format gguf`` keeps its Q4_1
blocks, so ``auto`` serves it as trained.
"""

from __future__ import annotations

from pathlib import Path

import torch

from loraforge.config.schema import ModelConfig, QuantizationConfig
from loraforge.models.sources import ModelSourceError

QUANTIZATIONS = ("auto", "none", "gguf", "nf4", "fp4", "int4", "int8")
"""The ``--quantization`` choices of ``serve`` and ``chat``; see the module docstring."""

_LOAD_TIME = {"nf4": {"type": "nf4"}, "fp4": {"type": "fp4"}, "int4": {"type": "int", "bits": 4},
              "int8": {"type": "int", "bits": 8}}
"""``--quantization`` word -> the ``QuantizationConfig`` fields it sets (the rest keep their defaults)."""


def is_gguf_source(source: str) -> bool:
    """Whether ``source`` names a GGUF file: ``default`` (the embedded one) or a ``.gguf`` path."""
    return source == "default" or Path(source).suffix == ".gguf"


def serving_model_config(source: str, quantization: str = "auto", device: torch.device | None = None) -> ModelConfig:
    """The ``ModelConfig`` for serving ``source`` with ``quantization`` (a word of ``QUANTIZATIONS``) on ``device``.

    Raises:
        ModelSourceError: an unknown ``quantization``, or ``gguf`` for a source that is not a GGUF file.
    """
    if quantization not in QUANTIZATIONS:
        raise ModelSourceError(f"--quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    if quantization == "auto":
        quantization = "gguf" if is_gguf_source(source) and _compute_dtype(device) == "bf16" else "none"
    if quantization == "none":
        return ModelConfig(source=source)
    if quantization == "gguf" and not is_gguf_source(source):
        raise ModelSourceError(f"--quantization gguf keeps a GGUF file's own blocks, but --model {source!r} is not a "
                               f".gguf file; use nf4, int4 or int8 to quantize it on load, or none")
    fields = _LOAD_TIME.get(quantization, {"type": "gguf"})
    return ModelConfig(source=source, quantization=QuantizationConfig(**fields, compute_dtype=_compute_dtype(device)))


def load_serving_base(source: str, quantization: str = "auto", device: torch.device | None = None):
    """``(model, tokenizer)`` for ``serve``/``chat``: ``source`` loaded (and quantized) as ``quantization`` says,
    on ``device`` (None: the CPU), through ``models.prepare.load_base``."""
    from loraforge.models.prepare import load_base

    device = device or torch.device("cpu")
    config = serving_model_config(source, quantization, device)
    if config.quantization is not None and config.quantization.type == "gguf":
        return _load_gguf_for_inference(config, device)
    return load_base(config, device)


def _load_gguf_for_inference(config: ModelConfig, device: torch.device):
    """``load_base``'s GGUF path (same file, compute dtype and checks), with the output head's blocks kept too
    (``load_gguf_native(quantized_head=True)``): the default model's tied Q8_0 head then reads half the
    bytes of a dense bf16 one per decoded token, through torch's int4 kernel (``quant.kernels``). Training
    and export keep the dense head (``load_base``), which they merge and write."""
    from loraforge.models.gguf_native import load_gguf_native
    from loraforge.models.kind import CAUSAL_LM, set_kind
    from loraforge.models.sources import default_gguf_path
    from loraforge.quant.quantize_model import COMPUTE_DTYPES, resolve_compute_dtype

    compute = resolve_compute_dtype(COMPUTE_DTYPES[config.quantization.compute_dtype], device)
    path = default_gguf_path() if config.source == "default" else Path(config.source).expanduser()
    model, tokenizer = load_gguf_native(path, compute, quantized_head=True)
    return set_kind(model, CAUSAL_LM).to(device), tokenizer


def _compute_dtype(device: torch.device | None) -> str:
    """bf16 where ``device`` has bf16 units, else fp32 (see the module docstring)."""
    from loraforge.quant.quantize_model import bf16_supported

    return "bf16" if bf16_supported(device or torch.device("cpu")) else "fp32"
