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

from loraforge.adapters.inject import base_of, build_adapters
from loraforge.adapters.peft_format import WEIGHTS_NAME, AdapterFormatError, check_adapter_tensors, plan_adapter
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
    plan = plan_adapter(model, config, tensors, Path(source))
    try:
        adapters = build_adapters(model, plan.spec, "served", list(plan.ranks), plan.ranks, plan.saved_shared, config)
    except AdapterError as err:
        raise AdapterFormatError(f"{weights}: {err}") from None
    for adapter, adapter_tensors in check_adapter_tensors(adapters, plan.layer_tensors, tensors, weights, "served"):
        adapter.load_peft_tensors(adapter_tensors)
    bases = {path: base_of(model.get_submodule(path)) for path in adapters}
    folded = {}
    with torch.no_grad():
        for path, adapter in adapters.items():
            a, b, scale = adapter.low_rank(bases[path])
            row_scale = adapter.row_scale(bases[path]) if hasattr(adapter, "row_scale") else None
            folded[path] = LowRank(a.float().contiguous(), b.float().contiguous(), float(scale),
                                   None if row_scale is None else row_scale.float().contiguous())
    return folded

