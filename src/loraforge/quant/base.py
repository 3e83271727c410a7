"""The interface every quantized weight format meets, and the linear layer built on it.

A format (NF4/FP4 blocks, group-wise INTk, GGUF Q4_0/Q4_1/Q8_0 blocks) is a small ``nn.Module`` that holds
its packed tensors as buffers and answers:

- ``shape``: ``(out_features, in_features)`` of the dense weight it stands for;
- ``dequantize(dtype)``: the dense ``(out_features, in_features)`` weight;
- ``matmul(x)``: ``x @ W.T`` for ``x`` of shape ``(..., in_features)``: ``quantized_matmul``, which runs
  ``kernels.py`` (in inference our int8-activation kernel or torch's int4 kernel for decode-size inputs where
  the format maps onto them, else a dequantize-and-matmul a tile at a time) and keeps autograd from storing any dense weight;
- ``nbytes``: storage bytes of the packed tensors (codes, scales, nested constants);
- ``tensors()`` / ``from_tensors(tensors, meta)``: the safetensors round trip.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from loraforge.quant import kernels


@runtime_checkable
class QuantizedWeight(Protocol):
    format: str

    @property
    def shape(self) -> tuple[int, int]: ...

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor: ...

    def matmul(self, x: torch.Tensor) -> torch.Tensor: ...

    @property
    def nbytes(self) -> int: ...


class _QuantizedLinear(torch.autograd.Function):
    """``x @ W.T`` for a frozen quantized ``W``. Backward computes the input gradient ``grad @ W`` from the
    quantized weight again instead of letting autograd keep every layer's dense weight alive until the
    backward pass; no weight gradient is ever formed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
        ctx.weight = weight
        return kernels.linear(weight, x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        return kernels.input_grad(ctx.weight, grad_out), None


def quantized_matmul(weight: QuantizedWeight, x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` in ``x.dtype``, never holding more than a tile of ``weight`` dense (``kernels``).

    Shapes: ``x`` ``(..., in_features)`` -> ``(..., out_features)``. Gradients flow to ``x`` (and to
    anything upstream, such as a LoRA adapter), never to ``weight``.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _QuantizedLinear.apply(x, weight)
    # nothing to differentiate: the same product without autograd's overhead, and in inference (no autograd at all)
    # llama.cpp's int8-activation kernel for decode-size inputs (``kernels``)
    return kernels.linear(weight, x, int8_activations=not torch.is_grad_enabled())


class _MovesOnly(nn.Module):
    """A module of quantized tensors that follows device moves but not dtype casts: ``model.to(torch.bfloat16)``
    or ``model.half()`` must not round the quantization constants (nor a bias kept in the compute dtype)."""

    def _apply(self, fn, recurse=True):
        def move_only(tensor: torch.Tensor) -> torch.Tensor:
            moved = fn(tensor)
            return moved if moved.dtype == tensor.dtype else tensor.to(moved.device)

        result = super()._apply(move_only, recurse)
        for module in self.modules():
            kernels.forget(module)  # what kernels kept refers to the tensors from before
        return result


class QuantLinear(_MovesOnly):
    """A frozen linear layer whose weight is stored quantized; ``compute_dtype`` is the matmul dtype.

    Shapes: input ``(..., in_features)`` -> output ``(..., out_features)``.
    """

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None, compute_dtype: torch.dtype):
        super().__init__()
        self.qweight = weight
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        self.register_buffer("bias", None if bias is None else bias.detach().to(compute_dtype))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.qweight.dequantize(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.qweight.matmul(x if x.dtype == self.compute_dtype else x.to(self.compute_dtype))
        if self.bias is not None:
            out = out + self.bias
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"format={self.qweight.format}, compute_dtype={self.compute_dtype}"
        )


class QuantEmbedding(_MovesOnly):
    """A frozen embedding table stored quantized, one row per token: a lookup dequantizes only the rows it
    gathers, in ``dtype``. A tied output head is a ``QuantLinear`` of the same ``weight`` (stored once).

    ``weight`` must offer ``select_rows(index)`` (a weight of the gathered rows, no value changed), as the
    GGUF block formats do. Shapes: ids ``(...)`` -> ``(..., embedding_dim)``.
    """

    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype):
        super().__init__()
        self.qweight = weight
        self.num_embeddings, self.embedding_dim = weight.shape
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.qweight.select_rows(ids.reshape(-1)).dequantize(self.dtype)
        return rows.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.qweight.format}, dtype={self.dtype}"


def dense_weight(layer: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The ``(out_features, in_features)`` weight of an ``nn.Linear`` or a ``QuantLinear``."""
    if isinstance(layer, QuantLinear):
        return layer.dequantize(dtype)
    weight = layer.weight
    return weight if dtype is None else weight.to(dtype)
