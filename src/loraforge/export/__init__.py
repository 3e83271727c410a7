"""Export a fine-tuned model: merged Hugging Face safetensors, or one GGUF file for llama.cpp / Ollama."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from loraforge.export.gguf_writer import GGUF_TYPES, GGUFExportError, GGUFExportReport, write_gguf
from loraforge.export.merge import DTYPES, VLM_GGUF_REFUSAL, merged_state_dict, save_merged_hf
from loraforge.models.kind import is_vision_language

FORMATS = ("hf", "gguf")


@dataclass
class HFExportReport:
    path: Path
    dtype: str

    def summary(self) -> str:
        size = sum(p.stat().st_size for p in self.path.iterdir()) / 2**20
        return f"wrote {self.path} ({size:.1f} MiB): merged, dequantized Hugging Face model in {self.dtype}"


def export_model(
    model: nn.Module,
    tokenizer,
    out_path: str | os.PathLike,
    format: str = "hf",
    gguf_type: str = "auto",
    dtype: str = "float32",
    metadata_from: str | os.PathLike | None = None,
) -> HFExportReport | GGUFExportReport:
    """Merge every active adapter and write the result; the model itself is left unchanged.

    Args:
        model: a Llama-family causal LM, dense or quantized, with or without adapters.
        tokenizer: its tokenizer.
        out_path: the directory (``hf``) or ``.gguf`` file (``gguf``) to create or replace, atomically.
        format: ``"hf"`` (safetensors directory, dequantized) or ``"gguf"``.
        gguf_type: for ``gguf``: ``auto`` (lossless blocks where the merged weight is still quantized,
            F16 elsewhere), ``f16``, ``q8_0`` or ``q4_1`` (re-quantizing what isn't already that type).
        dtype: for ``hf``: ``float32``, ``float16`` or ``bfloat16``.
        metadata_from: for ``gguf``: a GGUF file whose ``general.*``/``tokenizer.*`` metadata to copy
            (default: the file a natively loaded model came from).

    Returns:
        A report whose ``summary()`` says what was written (for GGUF: each tensor's type and any
        re-quantization error).

    Raises:
        ValueError: an unknown ``format``, ``gguf_type`` or ``dtype`` (``GGUFExportError`` for GGUF problems).
    """
    if format == "hf":
        return HFExportReport(save_merged_hf(model, tokenizer, out_path, dtype), dtype)
    if format == "gguf":
        if is_vision_language(model):
            raise GGUFExportError(VLM_GGUF_REFUSAL)
        return write_gguf(model, tokenizer, out_path, gguf_type, metadata_from)
    raise ValueError(f"export format {format!r} is not supported; choose one of {list(FORMATS)}")


__all__ = [
    "DTYPES",
    "FORMATS",
    "GGUF_TYPES",
    "GGUFExportError",
    "GGUFExportReport",
    "HFExportReport",
    "export_model",
    "merged_state_dict",
    "save_merged_hf",
    "write_gguf",
]
