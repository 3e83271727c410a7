"""Read a GGUF LoRA file (llama.cpp's adapter format) as the PEFT LoRA adapter it stands for.

A GGUF LoRA holds, per adapted base tensor, ``<name>.lora_a`` ``(r, in)`` and ``.lora_b`` ``(out, r)``,
and one ``adapter.lora.alpha``; llama.cpp scales each module by ``alpha / r`` with that module's r. The
PEFT equivalent is a plain LoRA with ``lora_alpha = alpha`` and each module's rank taken from its
tensors, so the result goes through ``plan_adapter`` / ``fold_adapter`` like any adapter folder. The
``lora_b`` rows of ``attn_q``/``attn_k`` are in llama.cpp's RoPE order for a Llama base and are put
back in Hugging Face order here. Tensors llama.cpp skips (``*_norm.weight``) are skipped here too.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from loraforge.adapters.peft_format import PREFIX, AdapterFormatError, read_adapter_dir
from loraforge.models.gguf_native import (
    MODEL_TYPE_TO_ARCH,
    GGUFError,
    dense_values,
    hf_module_path,
    open_gguf,
    qk_row_order,
    read_field,
)

_SUFFIXES = {".lora_a": "lora_A.weight", ".lora_b": "lora_B.weight"}


def read_adapter(path: str | os.PathLike, model_config) -> tuple[dict, dict[str, torch.Tensor]]:
    """A PEFT ``(config, tensors)`` pair from an adapter folder or a GGUF LoRA file for a model of ``model_config``."""
    path = Path(path)
    if path.is_file():
        return read_gguf_lora(path, model_config)
    return read_adapter_dir(path)


def read_gguf_lora(path: str | os.PathLike, model_config) -> tuple[dict, dict[str, torch.Tensor]]:
    """The PEFT LoRA ``(adapter_config dict, tensors under PEFT keys)`` that the GGUF LoRA ``path`` applies.

    ``model_config``: the transformers config of the base it is meant for (its architecture is checked,
    and its head counts undo the Q/K row permutation).

    Raises:
        AdapterFormatError: not a readable GGUF, not a LoRA adapter, another architecture, a tensor that
            names no decoder projection (embedding and head adapters included), or an incomplete pair.
    """
    path = Path(path)
    try:
        reader = open_gguf(path)
    except GGUFError as err:
        raise AdapterFormatError(str(err)) from None
    kinds = (read_field(reader, "general.type"), read_field(reader, "adapter.type"))
    if kinds != ("adapter", "lora"):
        raise AdapterFormatError(f"{path}: not a GGUF LoRA adapter (general.type={kinds[0]!r}, adapter.type="
                                 f"{kinds[1]!r}; expected 'adapter' and 'lora')")
    arch = read_field(reader, "general.architecture")
    expected = MODEL_TYPE_TO_ARCH.get(model_config.model_type)
    if arch != expected:
        raise AdapterFormatError(f"{path}: the adapter is for architecture {arch!r}, but the base model is "
                                 f"{model_config.model_type!r} (GGUF architecture {expected!r})")
    alpha = read_field(reader, "adapter.lora.alpha")
    if not isinstance(alpha, (int, float)) or alpha == 0:
        raise AdapterFormatError(f"{path}: adapter.lora.alpha is {alpha!r}; loraforge needs a nonzero alpha "
                                 "(llama.cpp reads 0 as 'no alpha/r scaling')")
    tensors: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        if tensor.name.endswith("_norm.weight"):
            continue
        suffix = next((s for s in _SUFFIXES if tensor.name.endswith(s)), None)
        base_name = tensor.name[: -len(suffix)] if suffix else tensor.name
        target = hf_module_path(base_name)
        if suffix is None or target is None or target[0] in ("model.embed_tokens", "lm_head"):
            raise AdapterFormatError(f"{path}: tensor {tensor.name} is not the lora_a/lora_b of a decoder "
                                     "projection (attn_q/k/v/output, ffn_gate/up/down); loraforge serves only those")
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        values = dense_values(torch.from_numpy(np.array(tensor.data)), tensor.name, tensor.tensor_type.name, shape,
                              torch.float32, None, path)
        if suffix == ".lora_b":
            rows = qk_row_order(base_name, shape[0], model_config, arch, to_gguf=False)
            if rows is not None:
                values = values[rows]
        tensors[f"{PREFIX}{target[0]}.{_SUFFIXES[suffix]}"] = values.contiguous()
    return _peft_config(tensors, float(alpha), path), tensors


def _peft_config(tensors: dict[str, torch.Tensor], alpha: float, path: Path) -> dict:
    modules = {suffix: {key[len(PREFIX):-len(suffix) - 1] for key in tensors if key.endswith(suffix)}
               for suffix in _SUFFIXES.values()}
    unpaired = sorted(modules["lora_A.weight"] ^ modules["lora_B.weight"])
    if unpaired:
        raise AdapterFormatError(f"{path}: {unpaired[0]} has only one of lora_a and lora_b; the file is incomplete")
    ranks = {module: tensors[f"{PREFIX}{module}.lora_A.weight"].shape[0] for module in modules["lora_A.weight"]}
    if not ranks:
        raise AdapterFormatError(f"{path}: holds no LoRA tensors")
    r = Counter(ranks.values()).most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted({module.rsplit(".", 1)[-1] for module in ranks}),
        "rank_pattern": {re.escape(module): rank for module, rank in ranks.items() if rank != r},
        "use_rslora": False,
        "init_lora_weights": False,
        "bias": "none",
        "fan_in_fan_out": False,
    }
