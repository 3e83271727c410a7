"""Write a merged model as one complete GGUF file (metadata, tokenizer, tensors) for llama.cpp / Ollama.

Linear weights are written as follows (``gguf_type``):

- ``auto``: a layer whose merged weight is still quantized keeps its blocks without loss (QA-LoRA over
  Q4_1, Q4_0 or INT2/3/4 → Q4_1 blocks byte for byte; untouched Q4_0/Q8_0 layers as they are); every
  other layer (LoRA/DoRA merged into a quantized or dense base) is written as F16.
- ``q4_1`` / ``q8_0``: lossless blocks of that type where the merged weight already is one (or, for
  Q4_1, maps onto one exactly); every other layer is re-quantized to that type by ggml's reference
  round-to-nearest, and its error is reported.
- ``f16``: every linear as F16.

The embedding (and an untied output head) is F16 for ``f16`` and Q8_0 otherwise; norms and biases are
F32. Rows of ``attn_q``/``attn_k`` get llama.cpp's RoPE permutation (Llama only; whole block rows move).
Metadata is rebuilt from the model's config; descriptive ``general.*`` keys and the whole tokenizer
are copied from the GGUF the model came from when there is one (``metadata_from``), else the
tokenizer is converted from the Hugging Face tokenizer (byte-level BPE only).

The file is written under a temporary name in the target directory and renamed into place.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from loraforge.export.merge import linear_layers, merged_dense_weight, merged_quantized_weight
from loraforge.models.gguf_native import (
    GGUF_SOURCE_ATTR,
    MODEL_TYPE_TO_ARCH,
    gguf_tensor_name,
    open_gguf,
    qk_row_order,
)
from loraforge.quant.base import QuantizedWeight
from loraforge.quant.gguf_blocks import BLOCK_SIZE, QUANTIZERS, GGUFBlockWeight, Q4_0Weight, Q4_1Weight, Q8_0Weight
from loraforge.quant.intk import IntKWeight
from loraforge.utils.atomic import atomic_file

GGUF_TYPES = ("auto", "f16", "q8_0", "q4_1")
_COPIED_PREFIXES = ("general.", "tokenizer.")
_NOT_COPIED = ("general.architecture", "general.file_type", "general.quantization_version")


class GGUFExportError(ValueError):
    """A model, option or tokenizer that can't be written as GGUF; the message says what would work."""


@dataclass
class TensorRecord:
    """How one tensor was written. Errors compare the written values with loraforge's merged weight."""

    name: str
    type: str
    shape: tuple[int, ...]
    lossless: bool
    max_abs_error: float = 0.0
    rel_rms_error: float = 0.0


@dataclass
class GGUFExportReport:
    path: Path
    gguf_type: str
    tensors: list[TensorRecord] = field(default_factory=list)

    @property
    def requantized(self) -> list[TensorRecord]:
        """2-D tensors that were rounded on the way out (re-quantized, or cast to F16)."""
        return [t for t in self.tensors if not t.lossless]

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.type] = counts.get(t.type, 0) + 1
        types = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        lines = [f"wrote {self.path} ({self.path.stat().st_size / 2**20:.1f} MiB): {len(self.tensors)} tensors ({types})"]
        lossy = self.requantized
        if lossy:
            worst = max(lossy, key=lambda t: t.rel_rms_error)
            lines.append(
                f"{len(lossy)} tensors re-quantized; worst relative RMS error {worst.rel_rms_error:.2e} "
                f"({worst.name}, {worst.type}, max |error| {worst.max_abs_error:.2e})"
            )
        else:
            lines.append("every tensor written without re-quantization")
        return "\n".join(lines)


def write_gguf(
    model: nn.Module,
    tokenizer,
    out_path: str | os.PathLike,
    gguf_type: str = "auto",
    metadata_from: str | os.PathLike | None = None,
) -> GGUFExportReport:
    """Write ``model`` (adapters merged on the way, the model itself unchanged) as a GGUF file.

    Args:
        model: a Llama/Mistral/Qwen2 causal LM, dense or with ``QuantLinear`` layers, with or without adapters.
        tokenizer: its Hugging Face tokenizer (used when there is no ``metadata_from``).
        out_path: the ``.gguf`` file to create or replace.
        gguf_type: ``auto``, ``f16``, ``q8_0`` or ``q4_1`` (see the module docstring).
        metadata_from: a GGUF file whose ``general.*`` and ``tokenizer.*`` metadata to copy; by default
            the file a natively loaded model came from, if any.

    Returns:
        A report: per tensor its type, whether it was written without loss, and the error if not.

    Raises:
        GGUFExportError: an unsupported ``gguf_type``, architecture, tensor or tokenizer.
    """
    if gguf_type not in GGUF_TYPES:
        raise GGUFExportError(f"gguf_type {gguf_type!r} is not supported; choose one of {list(GGUF_TYPES)}")
    config = model.config
    arch = gguf_architecture(config)
    out_path = Path(out_path)
    report = GGUFExportReport(out_path, gguf_type)
    tensors = _tensors(model, arch, gguf_type, report)
    metadata_from = metadata_from or getattr(model, GGUF_SOURCE_ATTR, None)
    source = open_gguf(metadata_from) if metadata_from else None
    write_gguf_file(out_path, arch, _metadata(arch, config, tokenizer, source, report), tensors)
    return report


def gguf_architecture(config) -> str:
    """The GGUF ``general.architecture`` of a transformers config, or a ``GGUFExportError``."""
    arch = MODEL_TYPE_TO_ARCH.get(config.model_type)
    if arch is None:
        raise GGUFExportError(
            f"model type {config.model_type!r} can't be exported to GGUF; supported: {sorted(MODEL_TYPE_TO_ARCH)}"
        )
    return arch


def write_gguf_file(out_path: Path, arch: str, metadata: list[tuple], tensors: list[tuple]) -> None:
    """Write a GGUF file atomically: under a temporary name beside ``out_path``, fsynced, then renamed.

    ``metadata``: ``(key, value, GGUFValueType, item type or None)``; ``tensors``: ``(name, numpy array,
    GGMLQuantizationType or None)``.
    """
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        writer = open_writer(tmp, arch)
        for key, value, vtype, sub_type in metadata:
            writer.add_key_value(key, value, vtype, sub_type)
        for name, array, raw_type in tensors:
            writer.add_tensor(name, array, raw_dtype=raw_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_file(out_path, write)


def open_writer(path: str | os.PathLike, arch: str):
    """A ``gguf.GGUFWriter`` for ``path`` that also writes empty arrays (give their item type).

    GGUF allows them and a BPE tokenizer without merges needs one: llama.cpp refuses a ``gpt2``
    vocabulary with no ``tokenizer.ggml.merges`` key, but gguf-py's writer refuses an empty array.
    """
    from gguf import GGUFValueType, GGUFWriter

    class Writer(GGUFWriter):
        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype != GGUFValueType.ARRAY or len(val) > 0:
                return super()._pack_val(val, vtype, add_vtype, sub_type)
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type) + self._pack("Q", 0)

    return Writer(str(path), arch)


def field_value(field) -> tuple:
    """``(value, GGUFValueType, item type or None)`` of a ``GGUFFile`` field, as ``add_key_value`` takes them."""
    return field.contents(), field.value_type, field.item_type


# --- tensors -------------------------------------------------------------------------------------


def _tensors(model: nn.Module, arch: str, gguf_type: str, report: GGUFExportReport) -> list[tuple]:
    """``(gguf name, numpy array, GGMLQuantizationType | None)`` for every tensor, in llama.cpp's order."""
    config = model.config
    head = model.get_output_embeddings()
    linears = linear_layers(model)
    out = []
    for path, layer in linears.items():
        if layer is head or getattr(layer, "base_layer", None) is head:
            if config.tie_word_embeddings:
                continue
            name = "output.weight"
            out.append(_embedding_like(name, merged_dense_weight(layer), gguf_type, report))
            continue
        name = _name(path, "weight")
        rows = qk_row_order(name, layer.out_features, config, arch, to_gguf=True)
        out.append(_linear(name, layer, gguf_type, rows, report))
        bias = (layer.base_layer if hasattr(layer, "base_layer") else layer).bias
        if bias is not None:
            bias_name = _name(path, "bias")
            out.append(_plain_f32(bias_name, bias if rows is None else bias[rows], report))
    for key, tensor in model.state_dict().items():
        module_path, _, kind = key.rpartition(".")
        if any(module_path == p or module_path.startswith(p + ".") for p in linears):
            continue
        name = _name(module_path, kind)
        if tensor.dim() == 1:
            out.append(_plain_f32(name, tensor, report))
        else:
            out.append(_embedding_like(name, tensor.detach().float(), gguf_type, report))
    return sorted(out, key=lambda item: _order(item[0]))


def _name(module_path: str, kind: str) -> str:
    name = gguf_tensor_name(module_path, kind)
    if name is None:
        raise GGUFExportError(f"{module_path}.{kind} has no GGUF tensor name; is this a Llama-family model?")
    return name


def _order(name: str) -> tuple:
    if name.startswith("token_embd"):
        return (-1, name)
    if name.startswith("blk."):
        return (int(name.split(".")[1]), name)
    return (1 << 30, name)


def lossless_blocks(weight: QuantizedWeight | None, gguf_type: str) -> GGUFBlockWeight | None:
    """``weight`` as GGUF blocks of a type ``gguf_type`` allows, when that needs no rounding; else None."""
    if weight is None or gguf_type == "f16":
        return None
    if isinstance(weight, IntKWeight) and weight.bits <= 4:
        weight = weight.to_q4_1()
    if isinstance(weight, Q4_0Weight) and gguf_type == "q4_1":
        weight = weight.to_q4_1()
    allowed = {"auto": (Q4_0Weight, Q4_1Weight, Q8_0Weight), "q4_1": (Q4_1Weight,), "q8_0": (Q8_0Weight,)}[gguf_type]
    return weight if isinstance(weight, allowed) else None


def _linear(name: str, layer: nn.Module, gguf_type: str, rows, report: GGUFExportReport) -> tuple:
    quantized = merged_quantized_weight(layer)
    blocks = lossless_blocks(quantized, gguf_type)
    if blocks is not None:
        if rows is not None:
            blocks = blocks.select_rows(rows)
        report.tensors.append(TensorRecord(name, blocks.format.upper(), blocks.shape, lossless=True))
        return _block_tensor(name, blocks)
    dense = quantized.dequantize(torch.float32) if quantized is not None else merged_dense_weight(layer)
    if rows is not None:
        dense = dense[rows]
    target = "f16" if gguf_type == "auto" else gguf_type
    return encode_dense(name, dense, target, report)


def _embedding_like(name: str, weight: torch.Tensor, gguf_type: str, report: GGUFExportReport) -> tuple:
    return encode_dense(name, weight, "f16" if gguf_type == "f16" else "q8_0", report)


def encode_dense(name: str, weight: torch.Tensor, target: str, report: GGUFExportReport) -> tuple:
    """Write a dense fp32 tensor as F32, F16 or GGUF blocks (F16 when its rows aren't whole blocks),
    recording the type and the rounding error in ``report``. Returns ``(name, numpy array, raw type)``."""
    if target not in ("f32", "f16") and weight.shape[-1] % BLOCK_SIZE:
        target = "f16"
    if target in ("f32", "f16"):
        written = weight.float() if target == "f32" else weight.half()
        array, raw_type, values = _numpy(written), None, written.float()
    else:
        blocks = QUANTIZERS[target](weight)
        (_, array, raw_type), values = _block_tensor(name, blocks), blocks.dequantize()
    diff = values - weight
    norm = weight.norm().item()
    report.tensors.append(
        TensorRecord(
            name,
            target.upper(),
            tuple(weight.shape),
            lossless=bool((diff == 0).all()),
            max_abs_error=diff.abs().max().item(),
            rel_rms_error=diff.norm().item() / norm if norm > 0 else 0.0,
        )
    )
    return name, array, raw_type


def _block_tensor(name: str, blocks: GGUFBlockWeight) -> tuple:
    from gguf import GGMLQuantizationType

    return name, _numpy(blocks.to_gguf_bytes()), GGMLQuantizationType[blocks.format.upper()]


def _plain_f32(name: str, tensor: torch.Tensor, report: GGUFExportReport) -> tuple:
    report.tensors.append(TensorRecord(name, "F32", tuple(tensor.shape), lossless=True))
    return name, _numpy(tensor.float()), None


def _numpy(tensor: torch.Tensor):
    """A tensor's values as a numpy array, from whichever device the model is on."""
    return tensor.detach().cpu().numpy()


# --- metadata ------------------------------------------------------------------------------------


def _metadata(arch: str, config, tokenizer, source, report: GGUFExportReport) -> list[tuple]:
    """``(key, value, GGUFValueType, sub_type)`` for every metadata key."""
    from gguf import GGUFValueType as V

    items = []
    if source is not None:
        for key, fld in source.fields.items():
            if key.startswith(_COPIED_PREFIXES) and key not in _NOT_COPIED:
                items.append((key, *field_value(fld)))
    else:
        items.append(("general.type", "model", V.STRING, None))
        items.append(("general.name", str(getattr(config, "_name_or_path", "") or "loraforge-export"), V.STRING, None))
        items += _tokenizer_metadata(tokenizer, config.vocab_size)
    rope = getattr(config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": getattr(config, "rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default":
        raise GGUFExportError(f"RoPE type {rope['rope_type']!r} is not supported by the GGUF writer yet (only default RoPE)")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    a = f"{arch}."
    items += [
        (a + "vocab_size", config.vocab_size, V.UINT32, None),
        (a + "context_length", config.max_position_embeddings, V.UINT32, None),
        (a + "embedding_length", config.hidden_size, V.UINT32, None),
        (a + "block_count", config.num_hidden_layers, V.UINT32, None),
        (a + "feed_forward_length", config.intermediate_size, V.UINT32, None),
        (a + "attention.head_count", config.num_attention_heads, V.UINT32, None),
        (a + "attention.head_count_kv", config.num_key_value_heads, V.UINT32, None),
        (a + "attention.key_length", head_dim, V.UINT32, None),
        (a + "attention.value_length", head_dim, V.UINT32, None),
        (a + "rope.dimension_count", head_dim, V.UINT32, None),
        (a + "rope.freq_base", float(rope["rope_theta"]), V.FLOAT32, None),
        (a + "attention.layer_norm_rms_epsilon", float(config.rms_norm_eps), V.FLOAT32, None),
        ("general.file_type", _file_type(report), V.UINT32, None),
        ("general.quantization_version", 2, V.UINT32, None),
    ]
    return items


def _file_type(report: GGUFExportReport) -> int:
    """llama.cpp's ``general.file_type``: the type most 2-D tensors have."""
    from gguf import LlamaFileType

    counts: dict[str, int] = {}
    for t in report.tensors:
        if len(t.shape) == 2:
            counts[t.type] = counts.get(t.type, 0) + 1
    main = max(counts, key=counts.get) if counts else "F32"
    return {
        "F32": LlamaFileType.ALL_F32,
        "F16": LlamaFileType.MOSTLY_F16,
        "Q4_0": LlamaFileType.MOSTLY_Q4_0,
        "Q4_1": LlamaFileType.MOSTLY_Q4_1,
        "Q8_0": LlamaFileType.MOSTLY_Q8_0,
    }[main].value


def _tokenizer_metadata(tokenizer, vocab_size: int) -> list[tuple]:
    """GGUF ``tokenizer.*`` keys for a byte-level BPE Hugging Face tokenizer (GPT-2 style, as llama.cpp's
    ``gpt2`` model); ids the tokenizer lacks up to ``vocab_size`` become unused ``[PAD<i>]`` tokens."""
    from gguf import GGUFValueType as V
    from gguf import TokenType

    if tokenizer is None:
        raise GGUFExportError("a GGUF file needs a tokenizer: pass the model's tokenizer or metadata_from=<a .gguf>")
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend["model"]["type"] != "BPE":
        raise GGUFExportError(
            f"the tokenizer is {backend['model']['type']}, but the GGUF writer converts byte-level BPE tokenizers only; "
            "pass metadata_from=<the model's original .gguf> to copy its tokenizer"
        )
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise GGUFExportError(f"the tokenizer has token id {max(by_id)} but the model's vocab_size is {vocab_size}")
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(
                (TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED) if i in added else TokenType.NORMAL
            )
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    items = [
        ("tokenizer.ggml.model", "gpt2", V.STRING, None),
        ("tokenizer.ggml.pre", "default", V.STRING, None),
        ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
        ("tokenizer.ggml.token_type", [int(t) for t in types], V.ARRAY, V.INT32),
        ("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING),
    ]
    for key, token_id in (
        ("bos_token_id", tokenizer.bos_token_id),
        ("eos_token_id", tokenizer.eos_token_id),
        ("unknown_token_id", tokenizer.unk_token_id),
        ("padding_token_id", tokenizer.pad_token_id),
    ):
        if token_id is not None:
            items.append((f"tokenizer.ggml.{key}", int(token_id), V.UINT32, None))
    items.append(("tokenizer.ggml.add_bos_token", bool(getattr(tokenizer, "add_bos_token", False)), V.BOOL, None))
    if isinstance(tokenizer.chat_template, str):
        items.append(("tokenizer.chat_template", tokenizer.chat_template, V.STRING, None))
    return items
