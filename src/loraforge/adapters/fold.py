"""Any adapter of the registry as plain low-rank pairs, for the serving engine's batched LoRA op.

The engine never builds adapter layers into its model and never parses a method's tensors: it asks
for :func:`fold_adapter`, which builds each layer's adapter beside (not into) the base module, loads
the file's tensors with every check ``load_adapter`` makes, and asks the method for its exact fold
``low_rank(base)`` (plus DoRA's ``row_scale(base)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from loraforge.adapters.layer import AdaptedLinear
from loraforge.adapters.peft_format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterFormatError,
    check_adapter_tensors,
    group_by_module,
    spec_from_peft_config,
)
from loraforge.adapters.registry import method
from loraforge.adapters.spec import AdapterError


@dataclass(frozen=True)
class LowRank:
    """One module's update: ``delta(x) = (row_scale − 1) ⊙ W x + row_scale ⊙ scale · x Aᵀ Bᵀ``.

    ``a`` ``(r, in)``, ``b`` ``(out, r)``; ``row_scale`` ``(out,)`` or None (then the first term is 0 and
    the second is the plain LoRA update). ``r`` may be 0 (an AdaLoRA layer pruned to nothing).
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    row_scale: torch.Tensor | None = None


def fold_adapter(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor], source: str) -> dict[str, LowRank]:
    """Module path -> the exact low-rank form of the PEFT adapter ``(config, tensors)`` on ``model``.

    ``model`` is only read. Raises ``AdapterFormatError`` as ``load_adapter`` does: an unsupported method,
    keys naming no linear module, shapes that don't fit.
    """
    weights = Path(source) / WEIGHTS_NAME
    spec = spec_from_peft_config(config, str(Path(source) / CONFIG_NAME))
    entry = method(spec.method)
    shared_keys = entry.shared.keys if entry.shared else ()
    layer_tensors = {k: v for k, v in tensors.items() if k not in shared_keys}
    per_module = group_by_module(layer_tensors, weights, model)
    bases = {path: _base(model.get_submodule(path)) for path in per_module}
    try:
        shared = entry.shared.build(model, "served", list(per_module), spec,
                                    {k: tensors[k] for k in shared_keys if k in tensors}) if entry.shared else None
        adapters = {}
        for path, module_tensors in per_module.items():
            r = entry.rank_from_peft(config, module_tensors)
            _, alpha = spec.rank_and_alpha(path)
            adapter = entry.layer(bases[path], r, entry.scaling(spec, r, alpha), 0.0, "kaiming", spec.options, shared)
            adapter.method_name = entry.name
            if entry.after_load is not None:
                entry.after_load(adapter, path, config)
            adapters[path] = adapter
    except AdapterError as err:
        raise AdapterFormatError(f"{weights}: {err}") from None
    for adapter, adapter_tensors in check_adapter_tensors(adapters, layer_tensors, tensors, weights, "served"):
        adapter.load_peft_tensors(adapter_tensors)
    folded = {}
    with torch.no_grad():
        for path, adapter in adapters.items():
            a, b, scale = adapter.low_rank(bases[path])
            row_scale = adapter.row_scale(bases[path]) if hasattr(adapter, "row_scale") else None
            folded[path] = LowRank(a.float().contiguous(), b.float().contiguous(), float(scale),
                                   None if row_scale is None else row_scale.float().contiguous())
    return folded


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdaptedLinear) else module
