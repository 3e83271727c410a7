"""Write an adapter as a GGUF LoRA file that llama.cpp (and Ollama's ``ADAPTER``) applies at run time.

The file holds ``general.type=adapter``, ``general.architecture`` (the base's), ``adapter.type=lora`` and
``adapter.lora.alpha``, and per adapted linear ``<base tensor>.lora_a`` ``(r, in)`` and ``.lora_b``
``(out, r)`` (numpy shapes; ggml lists them reversed). llama.cpp adds ``scale · alpha / r · B A x`` with
``r`` read from each ``lora_b``, so:

- every method that folds to a plain low-rank pair exports (``adapters.fold``: LoRA, PiSSA, AdaLoRA,
  VeRA, QA-LoRA); a fold that also needs a per-row scale (DoRA's magnitude) is refused: llama.cpp's
  LoRA has no magnitude vector;
- the file has one alpha. It is the ``scale · r`` that most modules share (rsLoRA's ``alpha·√r``, for
  example); a module whose own ``scale · r`` differs (``alpha_pattern``, rsLoRA with ``rank_pattern``)
  has the ratio folded into its ``lora_b``, and the report counts them;
- ``lora_b`` of ``attn_q``/``attn_k`` gets llama's RoPE row permutation (the base's rows are permuted
  alike), ``lora_a`` none;
- adapters on ``embed_tokens`` / ``lm_head`` can't reach this writer: loraforge adapts the decoder's
  linear projections only, and refuses such a PEFT file by name (llama.cpp would take ``token_embd``
  with ``lora_a`` transposed, and ``output`` only where the base has an untied head).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from loraforge.adapters.fold import fold_adapter
from loraforge.adapters.peft_format import PREFIX
from loraforge.export.gguf_writer import (
    GGUFExportError,
    TensorRecord,
    encode_dense,
    gguf_architecture,
    write_gguf_file,
)
from loraforge.models.gguf_native import gguf_tensor_name, hf_module_path, qk_row_order

LORA_TYPES = ("f32", "f16", "q8_0")
"""Tensor types of a GGUF LoRA; Q8_0 falls back to F16 for a tensor whose rows aren't whole 32-blocks
(``lora_b`` unless r is a multiple of 32)."""

_UNADAPTABLE = ("token_embd", "output")
"""GGUF stems of the embedding and output head, which loraforge's adapters never target."""


@dataclass
class GGUFLoraReport:
    path: Path
    gguf_type: str
    alpha: float
    tensors: list[TensorRecord] = field(default_factory=list)
    rescaled: list[str] = field(default_factory=list)
    """Modules whose own scale differs from ``alpha / r``: the ratio is folded into their ``lora_b``."""

    def summary(self) -> str:
        types = Counter(t.type for t in self.tensors)
        lines = [(f"wrote {self.path} ({self.path.stat().st_size / 2**20:.2f} MiB): GGUF LoRA, "
                 f"{len(self.tensors) // 2} modules, alpha {self.alpha:g} "
                 f"({', '.join(f'{n} {k}' for k, n in sorted(types.items()))} tensors)")]
        if self.rescaled:
            lines.append(f"{len(self.rescaled)} modules have their own scale, folded into lora_b "
                         f"(e.g. {self.rescaled[0]})")
        lossy = [t for t in self.tensors if not t.lossless]
        if lossy:
            worst = max(lossy, key=lambda t: t.rel_rms_error)
            lines.append(f"worst relative RMS rounding error {worst.rel_rms_error:.2e} ({worst.name}, {worst.type})")
        return "\n".join(lines)


def write_gguf_lora(model: nn.Module, peft_config: dict, tensors: dict[str, torch.Tensor], source: str | os.PathLike,
                    out_path: str | os.PathLike, gguf_type: str = "f16", name: str | None = None) -> GGUFLoraReport:
    """Write the PEFT adapter ``(peft_config, tensors)`` read from ``source`` as a GGUF LoRA for ``model``'s base.

    Args:
        model: the base model (dense or quantized) the adapter was trained on; only read.
        peft_config, tensors: the adapter as ``peft_format.read_adapter_dir`` returns it.
        source: the adapter folder, named in errors.
        out_path: the ``.gguf`` file to create or replace, atomically.
        gguf_type: ``f32``, ``f16`` or ``q8_0``.
        name: ``general.name`` (default: the adapter folder's name).

    Raises:
        GGUFExportError: an unknown ``gguf_type``, an architecture llama.cpp's LoRA loader doesn't share
            with us, an embedding/head target, or a method whose fold isn't a plain low-rank pair (DoRA).
        AdapterFormatError: the adapter doesn't fit ``model`` (as ``load_adapter`` checks).
    """
    from gguf import GGUFValueType as V

    if gguf_type not in LORA_TYPES:
        raise GGUFExportError(f"GGUF LoRA type {gguf_type!r} is not supported; choose one of {list(LORA_TYPES)}")
    config = model.config
    arch = gguf_architecture(config)
    _refuse_embedding_targets(tensors, source)
    pairs = _plain_pairs(model, peft_config, tensors, source)
    alpha = _shared_alpha(pairs)
    out_path = Path(out_path)
    report = GGUFLoraReport(out_path, gguf_type, alpha)
    written = []
    for path, (a, b, scale) in pairs.items():
        base_name = gguf_tensor_name(path, "weight")
        if base_name is None:
            raise GGUFExportError(f"{source}: module {path} has no GGUF tensor name; is this a Llama-family model?")
        factor = scale * a.shape[0] / alpha
        if abs(factor - 1) > 1e-6:
            b = b * factor
            report.rescaled.append(path)
        rows = qk_row_order(base_name, b.shape[0], config, arch, to_gguf=True)
        if rows is not None:
            b = b[rows]
        written.append(encode_dense(f"{base_name}.lora_a", a, gguf_type, report))
        written.append(encode_dense(f"{base_name}.lora_b", b, gguf_type, report))
    metadata = [
        ("general.type", "adapter", V.STRING, None),
        ("general.name", name or Path(source).name, V.STRING, None),
        ("adapter.type", "lora", V.STRING, None),
        ("adapter.lora.alpha", alpha, V.FLOAT32, None),
    ]
    write_gguf_file(out_path, arch, metadata, written)
    return report


def _refuse_embedding_targets(tensors: dict[str, torch.Tensor], source) -> None:
    for key in tensors:
        for stem in _UNADAPTABLE:
            module = hf_module_path(f"{stem}.weight")[0]
            if key.startswith(f"{PREFIX}{module}."):
                raise GGUFExportError(
                    f"{source}: {key} adapts {module}; loraforge adapts only the decoder's linear projections "
                    "(q/k/v/o, gate/up/down), so it can't read or export this adapter. Retrain without "
                    f"{module.rsplit('.', 1)[-1]} in target_modules, or convert it with llama.cpp's "
                    "convert_lora_to_gguf.py (which refuses embedding and head targets too)")


def _plain_pairs(model: nn.Module, peft_config: dict, tensors: dict[str, torch.Tensor], source
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Module path -> ``(A (r, in), B (out, r), scale)`` for every module of nonzero rank."""
    pairs = {}
    for path, pair in fold_adapter(model, peft_config, tensors, str(source)).items():
        if pair.row_scale is not None:
            raise GGUFExportError(
                f"{source}: the {peft_config.get('peft_type')} adapter on {path} scales each output row of the "
                "merged weight (a magnitude vector, as DoRA has), and llama.cpp's LoRA has no magnitude "
                "vector: it can't run this adapter. Merge it into the model instead: loraforge export "
                "--format gguf")
        if pair.a.shape[0]:  # an AdaLoRA layer pruned to rank 0 adds nothing
            pairs[path] = (pair.a, pair.b, pair.scale)
    if not pairs:
        raise GGUFExportError(f"{source}: every module of this adapter has rank 0; there is nothing to export")
    return pairs


def _shared_alpha(pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> float:
    """The alpha that gives most modules their own scale under llama.cpp's ``alpha / r``.

    Never 0: llama.cpp reads alpha 0 as "no alpha/r scaling at all".
    """
    natural = Counter(round(scale * a.shape[0], 6) for a, _, scale in pairs.values() if scale != 0)
    return float(natural.most_common(1)[0][0]) if natural else 1.0
