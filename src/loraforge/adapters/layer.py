"""The shared adapter layer: a base linear (dense or quantized) wrapped with named adapters.

Every method (``lora.py``, ``dora.py``, ...) provides an ``nn.Module`` that meets :class:`Adapter`.
:class:`AdaptedLinear` knows nothing of the methods: it adds each active adapter's ``delta`` to the
base output, routes rows of a mixed batch to their own adapter, and asks adapters to merge.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from loraforge.adapters.low_rank_linear import autocast_on

BASE = None
"""The routing entry for a batch row that runs on the base model alone."""


class Adapter(Protocol):
    """One named adapter on one base linear.

    ``delta(x, base_out, base)`` returns what to add to the base output ``base_out`` (``(..., out)``,
    bias included) for input ``x`` (``(..., in)``). ``merge``/``unmerge`` fold it into the base layer's
    weight and back. ``peft_tensors`` maps PEFT's key suffix (``lora_A.weight``) to the tensor saved.
    """

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, base: nn.Module) -> torch.Tensor: ...

    def delta_weight(self, base: nn.Module) -> torch.Tensor: ...

    def merge(self, base: nn.Module) -> None: ...

    def unmerge(self, base: nn.Module) -> None: ...

    def peft_tensors(self) -> dict[str, torch.Tensor]: ...

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...


def add_delta(adapter: Adapter, x: torch.Tensor, base_out: torch.Tensor, base: nn.Module) -> torch.Tensor:
    """``base_out + adapter.delta(x, base_out, base)`` for 2-D ``x`` ``(M, in)`` and ``base_out`` ``(M, out)``.

    An adapter may offer ``add_delta`` with the same arguments to compute this faster; it is used in training
    (autograd recording), where ``base_out`` is the fresh output of a dense or quantized linear's matmul that
    nothing else holds (autograd saves inputs of those, not outputs), so the update may be added in place.
    Inference keeps the plain sum: it leaves the base's output alone, whatever buffer a kernel returns; so does
    autocast, whose casts an in-place GEMM would not get (a quantized base's fp32 output, a bf16 update).
    """
    fused = getattr(adapter, "add_delta", None) if torch.is_grad_enabled() and not autocast_on(x) else None
    return fused(x, base_out, base) if fused is not None else base_out + adapter.delta(x, base_out, base)


def fused_linear(adapter: Adapter, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
    """``base(x) + adapter.delta(x, ...)`` for 2-D ``x`` by the adapter's own ``fused_linear`` (one autograd op for
    base and update: ``low_rank_linear``) in training (autograd recording), or None where it has none or declines.
    Inference keeps the base's own forward (the engine's kernels) and the plain sum."""
    fused = getattr(adapter, "fused_linear", None) if torch.is_grad_enabled() else None
    return fused(x, base) if fused is not None else None


class AdaptedLinear(nn.Module):
    """A base linear plus named adapters.

    State: ``active`` (names whose delta is added), ``merged`` (names folded into the base weight, in
    merge order), ``disabled`` (base output only), and ``row_adapters`` (per batch row: an adapter name
    or ``BASE``; set by ``mixed_adapter_batch``).
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        self.row_adapters: list[str | None] | None = None

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_adapters is not None and not self.disabled:
            return self._mixed_forward(x, self.base_layer(x))
        rows = x.reshape(-1, x.shape[-1])  # (tokens, in): the base output is then a 2-D tensor of its own
        pending = [] if self.disabled else [name for name in self.active if name not in self.merged]
        result = fused_linear(self.adapters[pending[0]], rows, self.base_layer) if pending else None
        if result is None:
            result = self.base_layer(rows)
        else:
            pending = pending[1:]
        for name in pending:
            result = add_delta(self.adapters[name], rows, result, self.base_layer)
        return result.view(*x.shape[:-1], result.shape[-1])

    def _mixed_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Each batch row (dim 0) gets its own adapter's delta, or none for ``BASE``."""
        if self.merged:
            raise RuntimeError("a mixed-adapter batch needs unmerged adapters; call unmerge() first")
        if len(self.row_adapters) != x.shape[0]:
            raise ValueError(f"mixed batch: {len(self.row_adapters)} adapter names for a batch of {x.shape[0]} rows")
        result = result.clone()
        for name in dict.fromkeys(self.row_adapters):
            if name is BASE or name not in self.adapters:
                continue
            rows = torch.tensor([i for i, n in enumerate(self.row_adapters) if n == name], device=x.device)
            result[rows] += self.adapters[name].delta(x[rows], result[rows], self.base_layer)
        return result

    def merge(self, names: list[str]) -> None:
        """Fold adapters into the base weight; merging an already-merged adapter does nothing."""
        for name in names:
            if name not in self.merged:
                self.adapters[name].merge(self.base_layer)
                self.merged.append(name)

    def unmerge(self) -> None:
        """Undo every merge, last merged first."""
        while self.merged:
            self.adapters[self.merged.pop()].unmerge(self.base_layer)
