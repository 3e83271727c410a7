"""Load a Llama-family GGUF file with its quantized blocks kept as they are in the file.

Every decoder linear becomes a ``QuantLinear`` holding the file's own bytes:

- Q4_0, Q4_1, Q8_0: the block fields (fp16 scales, nibbles, int8 codes) exactly as stored;
- F16, F32, BF16: a dense ``nn.Linear``;
- any other type (Q6_K, IQ4_XS, ...): dequantized by gguf-py into a dense ``nn.Linear``, with a warning
  that names the type; a type gguf-py can't dequantize (Q8_K, I8, ...) is a ``GGUFError``.

llama.cpp stores the rows of ``attn_q`` and ``attn_k`` in its RoPE order; since a block lies inside
one row, undoing that permutation moves whole rows of blocks and changes no byte of any block
(:func:`rope_row_order`). The embedding and norms are dense (a quantized embedding is dequantized
with our codecs), except that inference may keep a quantized output head as it is (``quantized_head``).
The config is built from the file's metadata here (transformers' own GGUF config path parses the
whole file again, ~10 s for the default model); the tokenizer comes from transformers' GGUF tokenizer converter (``PreTrainedTokenizerFast.from_pretrained(..., gguf_file=...)``).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from loraforge.models.gguf_file import GGUFFile
from loraforge.quant.base import QuantEmbedding, QuantLinear
from loraforge.quant.gguf_blocks import BLOCK_FORMATS

ARCHITECTURES = ("llama", "qwen2")
"""``general.architecture`` values this loader (and the GGUF writer) handle; Mistral GGUFs say ``llama``."""

PERMUTED_ARCHITECTURES = ("llama",)
"""Architectures whose q/k rows llama.cpp's converter permutes (Qwen2's it leaves alone)."""

MODEL_TYPE_TO_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
"""transformers ``model_type`` -> the GGUF ``general.architecture`` llama.cpp knows it by."""

DENSE_TYPES = ("F32", "F16", "BF16")

NATIVE_TYPES = (*(name.upper() for name in BLOCK_FORMATS), *DENSE_TYPES)
"""GGUF tensor types loaded without dequantization: block formats kept as is, dense ones as weights."""

GGUF_SOURCE_ATTR = "loraforge_gguf_path"
"""Attribute set on a natively loaded model: the GGUF it came from, whose metadata an export can copy."""

_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_NAME = re.compile(r"^(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)$")


class GGUFError(ValueError):
    """A GGUF file that is missing, truncated, corrupt, or of an architecture we don't load."""


def hf_module_path(gguf_name: str) -> tuple[str, str] | None:
    """``blk.3.attn_q.weight`` -> ``("model.layers.3.self_attn.q_proj", "weight")``; None for unknown names."""
    match = _GGUF_NAME.match(gguf_name)
    if match is None:
        return None
    layer, stem, kind = match.groups()
    if layer is None:
        module = _GLOBAL_TENSORS.get(stem)
    else:
        module = f"model.layers.{layer}.{_LAYER_TENSORS[stem]}" if stem in _LAYER_TENSORS else None
    return (module, kind) if module else None


def gguf_tensor_name(module_path: str, kind: str = "weight") -> str | None:
    """The inverse of :func:`hf_module_path`: ``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q.weight``."""
    for stem, module in _GLOBAL_TENSORS.items():
        if module_path == module:
            return f"{stem}.{kind}"
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module_path)
    if match:
        for stem, module in _LAYER_TENSORS.items():
            if match.group(2) == module:
                return f"blk.{match.group(1)}.{stem}.{kind}"
    return None


def rope_row_order(n_rows: int, n_head: int, to_gguf: bool) -> torch.Tensor:
    """Row indices that apply llama.cpp's q/k permutation (``to_gguf``) or undo it: ``rows[index]``.

    llama.cpp's converter (``LlamaModel.permute``) views the rows as ``(n_head, 2, n_rows/n_head/2)``
    and swaps the last two axes; ``n_head`` is the KV head count for ``attn_k``.
    """
    half = n_rows // n_head // 2
    rows = torch.arange(n_rows)
    if to_gguf:
        return rows.reshape(n_head, 2, half).transpose(1, 2).reshape(-1)
    return rows.reshape(n_head, half, 2).transpose(1, 2).reshape(-1)


def open_gguf(path: str | os.PathLike):
    """The parsed header of ``path`` (``models.gguf_file.GGUFFile``), after checking that every tensor's bytes
    lie inside the file.

    Raises:
        GGUFError: the file is missing, is not GGUF, or is truncated or corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    size = path.stat().st_size
    try:
        reader = GGUFFile(path)
        for tensor in reader.tensors:
            end = int(tensor.data_offset) + int(tensor.n_bytes)
            if end > size or tensor.data.nbytes != tensor.n_bytes:
                raise ValueError(f"tensor {tensor.name} ends at byte {end}, past the end of the file ({size} bytes)")
    except GGUFError:
        raise
    except (ValueError, KeyError, IndexError, OSError, TypeError, OverflowError, UnicodeDecodeError, MemoryError) as err:
        raise GGUFError(f"{path}: not a readable GGUF file ({err}); is it truncated or corrupt?") from None
    return reader


def read_field(reader, key: str, default=None):
    """A scalar or string metadata value (``general.architecture`` -> ``"llama"``), or ``default``."""
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def load_gguf_native(path: str | os.PathLike, compute_dtype: torch.dtype = torch.float32, quantized_head: bool = False):
    """Load a Llama-family GGUF into ``(model, tokenizer)`` with the file's quantized blocks kept bit-exact.

    Args:
        path: a ``.gguf`` file whose ``general.architecture`` is in :data:`ARCHITECTURES`.
        compute_dtype: matmul dtype of the quantized linears, and the dtype of every dense tensor.
        quantized_head: keep the output head's blocks too (``output``, or a tied ``token_embd``) where the
            file stores them in a block format (the default model's tied head is Q8_0): the head becomes a
            ``QuantLinear`` and a tied embedding a ``QuantEmbedding`` of the same weight, stored once. For
            inference only (``serve``/``chat``): training, export and merging expect a dense embedding.

    Returns:
        The model in eval mode (its ``loraforge_gguf_path`` attribute names the file) and the tokenizer
        built from the file's metadata.

    Raises:
        GGUFError: a missing, truncated or corrupt file, an unsupported architecture, or tensors that
            don't fit the architecture the metadata describes.
    """
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    reader = open_gguf(path)
    config = config_from_metadata(reader, path)
    try:
        # AutoTokenizer would first rebuild the config through transformers' slow GGUF path (~10 s)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError) as err:
        raise GGUFError(f"{path}: can't build the tokenizer from its metadata ({err})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype)
    _fill(model, reader, read_field(reader, "general.architecture"), compute_dtype, path, quantized_head)
    if config.tie_word_embeddings and not isinstance(model.lm_head, QuantLinear):
        model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise GGUFError(f"{path}: the file lacks tensors for {left[:5]}{' ...' if len(left) > 5 else ''}")
    setattr(model, GGUF_SOURCE_ATTR, str(path))
    return model.eval(), tokenizer


def config_from_metadata(reader, path: Path):
    """The transformers config (``LlamaConfig`` or ``Qwen2Config``) that the GGUF metadata describes.

    Raises:
        GGUFError: an unsupported architecture, a missing required key, or RoPE scaling (not handled yet).
    """
    from transformers import LlamaConfig, Qwen2Config

    arch = read_field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{path}: GGUF architecture {arch!r} is not supported; loraforge loads {list(ARCHITECTURES)}")

    def key(name, default=...):
        value = read_field(reader, f"{arch}.{name}", default)
        if value is ...:
            raise GGUFError(f"{path}: metadata key {arch}.{name} is missing; is the file complete?")
        return value

    scaling = key("rope.scaling.type", "none")
    if scaling != "none":
        raise GGUFError(f"{path}: RoPE scaling {scaling!r} is not supported by the native GGUF loader yet")
    tensor_names = {t.name for t in reader.tensors}
    heads = key("attention.head_count")
    hidden = key("embedding_length")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    fields = dict(
        vocab_size=key("vocab_size", len(tokens.contents()) if tokens is not None else None),
        hidden_size=hidden,
        intermediate_size=key("feed_forward_length"),
        num_hidden_layers=key("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=key("attention.head_count_kv", heads),
        head_dim=key("attention.key_length", hidden // heads),
        max_position_embeddings=key("context_length"),
        rms_norm_eps=key("attention.layer_norm_rms_epsilon"),
        rope_parameters={"rope_type": "default", "rope_theta": key("rope.freq_base", 10000.0)},
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=read_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=read_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=read_field(reader, "tokenizer.ggml.padding_token_id"),
    )
    if fields["vocab_size"] is None:
        raise GGUFError(f"{path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens is present")
    if arch == "qwen2":
        return Qwen2Config(**fields)
    return LlamaConfig(**fields, attention_bias="blk.0.attn_q.bias" in tensor_names)


def _fill(model: nn.Module, reader, arch: str, dtype: torch.dtype, path: Path, quantized_head: bool = False) -> None:
    """Put each GGUF tensor in its module: block formats as QuantLinear, the rest dense (see
    :func:`load_gguf_native` for ``quantized_head``)."""
    config = model.config
    dequantized: dict[str, list[str]] = {}
    biases = {}
    for tensor in reader.tensors:
        target = hf_module_path(tensor.name)
        if target is None:
            warnings.warn(f"{path}: tensor {tensor.name} has no place in a {arch} model; ignored", stacklevel=3)
            continue
        module_path, kind = target
        type_name = tensor.tensor_type.name
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        rows = qk_row_order(tensor.name, shape[0], config, arch, to_gguf=False)
        raw = torch.from_numpy(np.array(tensor.data))
        module = model.get_submodule(module_path)
        if kind == "bias":
            biases[module_path] = dense_values(raw, tensor.name, type_name, shape, dtype, rows, path)
        elif (isinstance(module, nn.Linear) and (module_path != "lm_head" or quantized_head)
              and type_name.lower() in BLOCK_FORMATS):
            weight = BLOCK_FORMATS[type_name.lower()].from_gguf_bytes(raw, shape)
            if rows is not None:
                weight = weight.select_rows(rows)
            model.set_submodule(module_path, QuantLinear(weight, None, dtype))
        elif (quantized_head and module_path == "model.embed_tokens" and config.tie_word_embeddings
              and type_name.lower() in BLOCK_FORMATS):
            weight = BLOCK_FORMATS[type_name.lower()].from_gguf_bytes(raw, shape)
            model.set_submodule(module_path, QuantEmbedding(weight, dtype))
            model.set_submodule("lm_head", QuantLinear(weight, None, dtype))
        else:
            if type_name not in DENSE_TYPES and type_name.lower() not in BLOCK_FORMATS:
                dequantized.setdefault(type_name, []).append(tensor.name)
            _set_dense(module, kind, dense_values(raw, tensor.name, type_name, shape, dtype, rows, path), tensor.name, path)
    for module_path, bias in biases.items():
        module = model.get_submodule(module_path)
        if isinstance(module, QuantLinear):
            module.bias = bias
        else:
            _set_dense(module, "bias", bias, module_path + ".bias", path)
    for type_name, names in dequantized.items():
        warnings.warn(
            f"{path}: {len(names)} tensor(s) of type {type_name} (e.g. {names[0]}) are not a native loraforge format; "
            f"they were dequantized to dense weights (native: {', '.join(NATIVE_TYPES)})",
            stacklevel=3,
        )


def qk_row_order(name: str, n_rows: int, config, arch: str, to_gguf: bool) -> torch.Tensor | None:
    """Row indices (``rows[index]``) that apply (``to_gguf``) or undo llama.cpp's RoPE permutation on the
    output rows of GGUF tensor ``name`` (``blk.N.attn_q.*`` / ``attn_k.*`` of a permuted architecture;
    a LoRA's ``lora_b`` included), or None for every other tensor."""
    if arch not in PERMUTED_ARCHITECTURES:
        return None
    if ".attn_q." in name:
        return rope_row_order(n_rows, config.num_attention_heads, to_gguf)
    if ".attn_k." in name:
        return rope_row_order(n_rows, config.num_key_value_heads, to_gguf)
    return None


def dense_values(raw: torch.Tensor, name: str, type_name: str, shape: tuple[int, ...], dtype: torch.dtype, rows,
           path: Path) -> torch.Tensor:
    """Tensor ``name``'s values as a dense ``dtype`` tensor of ``shape`` (rows already in HF order).

    Raises:
        GGUFError: a type that neither loraforge nor gguf-py can turn into values.
    """
    from gguf import GGMLQuantizationType, quants

    if type_name in ("F32", "F16"):
        values = raw.reshape(shape).float()
    elif type_name.lower() in BLOCK_FORMATS:
        values = BLOCK_FORMATS[type_name.lower()].from_gguf_bytes(raw, shape).dequantize()
    else:
        try:
            values = torch.from_numpy(quants.dequantize(raw.numpy(), GGMLQuantizationType[type_name])).reshape(shape)
        except NotImplementedError:
            raise GGUFError(
                f"{path}: tensor {name} has type {type_name}, which loraforge can't load: it loads "
                f"{', '.join(NATIVE_TYPES)} natively and dequantizes the other llama.cpp weight types (K-quants, "
                f"IQ types, Q5_0, ...) with gguf-py, which can't dequantize {type_name}. Neither can transformers' "
                "GGUF loader (used when model.quantization.type is not gguf). Convert the model to GGUF again "
                "with a weight type such as Q8_0 or F16."
            ) from None
    if rows is not None:
        values = values[rows]
    return values.to(dtype)


def _set_dense(module: nn.Module, kind: str, value: torch.Tensor, name: str, path: Path) -> None:
    current = getattr(module, kind, None)
    if current is None or tuple(current.shape) != tuple(value.shape):
        expected = None if current is None else tuple(current.shape)
        raise GGUFError(
            f"{path}: tensor {name} has shape {tuple(value.shape)}, but the model built from the file's metadata "
            f"expects {expected}; the metadata and tensors disagree (corrupt file?)"
        )
    setattr(module, kind, nn.Parameter(value, requires_grad=False))
