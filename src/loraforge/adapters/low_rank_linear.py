"""Training's op for a linear base with a low-rank adapter: ``y = base(x) + s·(x aᵀ) bᵀ`` as one autograd node.

LoRA passes ``a = A``. QA-LoRA's update is ``s·(pool(x) Aᵀ) bᵀ`` with a linear ``pool`` ``(M, in) -> (M, n)``:
it passes ``pool`` and ``expand(A) = A P`` ``(r, in)``, the same update as a map of ``x``; the op then runs
``pool(x) Aᵀ`` (cheaper than ``x (A P)ᵀ``), saves the pooled input for A's gradient, and folds ``expand(A)``.
Shapes: ``x`` ``(M, in)``, ``a`` ``(r, in)`` (QA-LoRA: ``(r, n)``), ``b`` ``(out, r)`` -> ``(M, out)``.

Autograd's graph of the plain sum runs the base's matmul, ``x aᵀ``, the update's GEMM into the output, and in
the backward two GEMMs for the input gradient's adapter part plus a pass adding it to the base's part. This op:

- forward: ``xa = pool(x) aᵀ`` ``(M, r)``, kept for ``b``'s gradient; then ``x (W + s·b a')ᵀ`` as one GEMM (the
  fold; ``a' = expand(a)``, or ``a``), or ``x Wᵀ`` with ``s·xa bᵀ`` accumulated into it;
- backward: ``gb = g b`` ``(M, r)``, ``∇b = s·gᵀ xa``, ``∇a = s·gbᵀ pool(x)``, and ``∇x = g (W + s·b a')`` (the
  fold: with ``gb``, one GEMM over ``[W + s·b a' | b]`` where the layer is one tile, ``kernels.input_grad_and_rank``)
  or ``g W`` with ``s·gb a'`` accumulated into it. Nothing is computed for an input that needs no gradient (the
  first layer's ``x``).

The fold is for quantized bases: ``kernels`` adds ``s·b a`` to each tile right after decoding it, while it is
in cache and ours to write, so the update costs an r-deep GEMM over a hot tile and no pass over the ``(M, out)``
output or ``(M, in)`` gradient. A dense base keeps the separate sum: folding would first copy ``W``. The fold is
done in fp32 only: in bf16, ``W + s·b a`` rounded to bf16 would drop an update below half of W's ulp, which the
separate sum keeps. The choice never depends on ``M``, so a run's numbers don't change with how its batch is
split (data-parallel ranks, a resume on another number of processes). Under autocast the caller takes the plain
sum.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.quant import kernels
from loraforge.quant.base import QuantLinear


def low_rank_linear(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, base: nn.Module,
                    pool: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    expand: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor | None:
    """``base(x) + scale·(pool(x) aᵀ) bᵀ`` for 2-D ``x`` through the fused op, or None where it doesn't apply and
    the caller sums as usual: autocast on, ``x``, ``a``, ``b`` and the base's compute dtype not all one dtype, a
    base that is neither an ``nn.Linear`` nor a ``QuantLinear``, or a base with a trainable weight or bias.

    ``pool`` (linear, ``(M, in) -> (M, n)``) and ``expand`` (``a`` ``(r, n)`` -> ``a P`` ``(r, in)``, with
    ``pool(x) = x Pᵀ``) come together; without them ``pool(x) = x``."""
    if isinstance(base, QuantLinear):
        dtype = base.compute_dtype
    elif type(base) is nn.Linear:
        dtype = base.weight.dtype
    else:
        return None
    if autocast_on(x) or not x.dtype == a.dtype == b.dtype == dtype:
        return None
    if any(p.requires_grad for p in base.parameters()):  # the op forms no weight gradient
        return None
    weight = None if isinstance(base, QuantLinear) else base.weight
    return _LowRankLinear.apply(x, a, b, weight, base, scale, pool, expand)


def autocast_on(x: torch.Tensor) -> bool:
    """Whether autocast is on for ``x``'s device (the meta device has none)."""
    device = x.device.type
    return torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)


class _LowRankLinear(torch.autograd.Function):
    """See the module docstring. A dense base's weight is an input, held like the adapter's tensors (the same
    object in the backward, as for ``F.linear``: FSDP frees and refills its storage in between); a quantized base is
    read from the layer again in the backward."""

    @staticmethod
    def forward(ctx, x, a, b, weight, base, scale, pool, expand):
        pooled = x if pool is None else pool(x)
        xa = pooled @ a.t()
        applied = a if expand is None else expand(a)  # (r, in): the update as a map of x
        low_rank = (b, applied, scale)
        fold = _folds(x.dtype, weight)
        y = _product(x, weight, base, low_rank if fold else None)
        if not fold:
            y.addmm_(xa, b.t(), alpha=scale)
        ctx.base, ctx.scale = base, scale
        ctx.parameters = applied, b, weight  # parameters (QA-LoRA: a small product of one), held as they are
        ctx.save_for_backward(pooled, xa)  # packed by saved-tensor hooks (offloading, the memory estimate)
        return y

    @staticmethod
    def backward(ctx, grad):
        pooled, xa = ctx.saved_tensors
        (applied, b, weight), scale = ctx.parameters, ctx.scale
        grad_x = grad_a = grad_b = None
        fold = _folds(grad.dtype, weight)
        if ctx.needs_input_grad[0] and fold:  # the input gradient and g b from one GEMM (kernels.input_grad_and_rank)
            grad_x, grad_rank = kernels.input_grad_and_rank(ctx.base.qweight, grad, (b, applied, scale))
        else:
            grad_rank = grad @ b
        if ctx.needs_input_grad[1]:
            grad_a = (grad_rank.t() @ pooled).mul_(scale)
        if ctx.needs_input_grad[2]:
            grad_b = (grad.t() @ xa).mul_(scale)
        if ctx.needs_input_grad[0] and not fold:
            grad_x = _input_grad(grad, weight, ctx.base)
            grad_x.addmm_(grad_rank, applied, alpha=scale)
        return grad_x, grad_a, grad_b, None, None, None, None, None


def _folds(dtype: torch.dtype, weight: torch.Tensor | None) -> bool:
    """Whether the update is folded into the weight (see the module docstring): a quantized base (``weight``
    None) in fp32."""
    return weight is None and dtype == torch.float32


def _product(x: torch.Tensor, weight: torch.Tensor | None, base: nn.Module, low_rank: kernels.LowRank | None
             ) -> torch.Tensor:
    """``x (W + s·b a)ᵀ + bias`` (``low_rank``, quantized bases) or ``x Wᵀ + bias``: a fresh ``(M, out)`` tensor."""
    if weight is None:
        y = kernels.linear(base.qweight, x, low_rank=low_rank)
        return y if base.bias is None else y.add_(base.bias)
    return F.linear(x, weight, base.bias)


def _input_grad(grad: torch.Tensor, weight: torch.Tensor | None, base: nn.Module) -> torch.Tensor:
    """``g W``: a fresh ``(M, in)`` tensor."""
    if weight is None:
        return kernels.input_grad(base.qweight, grad)
    return grad @ weight
