"""QA-LoRA (Xu et al. 2023): LoRA on group-average-pooled input, so its update folds into the base's
quantization constants without loss.

The base is group-quantized along ``in_features`` (INTk, GGUF Q4_1 or Q4_0; group size G, taken from
the base weight; n = in_features / G groups). The adapter sees the input pooled per group, with
PEFT's scaling (``peft.tuners.lora.variants.QALoraLinearVariant``), so that files move between the two:

    pool(x)_g = n · mean(x[g·G : (g+1)·G])          (..., in) -> (..., n)
    y = W x + s · B A pool(x)                       A: (r, n), B: (out, r), s = alpha / r

The update is constant inside each group: it equals a weight ``ΔW[:, i] = s·(B A)[:, g(i)]·n/G``.
Since every weight of a group is ``scale·q + min``, adding ``Δ_g = s·(B A)[:, g]·n/G`` to the group's
``min`` merges the adapter exactly; the only loss is the fp16 rounding of the new ``min``
(:func:`fold_into_group_min`, the one place adapters touch quantization internals).
"""

from __future__ import annotations

import torch
from torch import nn

from loraforge.adapters.lora import LoraAdapter
from loraforge.adapters.low_rank_linear import low_rank_linear
from loraforge.adapters.spec import AdapterError
from loraforge.quant.base import QuantizedWeight, QuantLinear
from loraforge.quant.gguf_blocks import Q4_0Weight, Q4_1Weight
from loraforge.quant.intk import IntKWeight

GROUP_AFFINE_FORMATS = (IntKWeight, Q4_1Weight, Q4_0Weight)
"""Weight formats whose groups are ``scale·q + offset``, so a per-group constant folds into the offset."""


class QALoraAdapter(nn.Module):
    """QA-LoRA on a group-quantized base; built as ``cls(base, r, scaling, dropout, init)`` like every method.

    Raises:
        AdapterError: the base is not a ``QuantLinear`` with INTk, Q4_1 or Q4_0 weights.
    """

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float, init: str):
        super().__init__()
        self.group_size = group_size_of(base)
        self.n_groups = base.in_features // self.group_size
        self.r = r
        self.scaling = scaling
        self.lora_A = nn.Parameter(torch.empty(r, self.n_groups))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, r))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        LoraAdapter.reset_parameters(self, init)
        self._unmerged: tuple[QuantizedWeight, ...] = ()

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in)`` -> ``(..., n_groups)``: each group's mean times ``n_groups`` (PEFT's convention)."""
        return x.unflatten(-1, (self.n_groups, self.group_size)).mean(dim=-1) * self.n_groups

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        pooled = self.pool(self.dropout(x).to(self.lora_A.dtype))
        return ((pooled @ self.lora_A.T @ self.lora_B.T) * self.scaling).to(base_out.dtype)

    def add_delta(self, x: torch.Tensor, base_out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """``base_out + delta(...)`` with the update accumulated into ``base_out`` by one GEMM (as
        ``LoraAdapter.add_delta``)."""
        if base_out.dtype != self.lora_A.dtype:
            return base_out + self.delta(x, base_out, base)
        pooled = self.pool(self.dropout(x).to(self.lora_A.dtype))
        return base_out.addmm_(pooled @ self.lora_A.T, self.lora_B.T, alpha=self.scaling)

    def fused_linear(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        """``base(x) + delta(x, ...)`` as one autograd op (``low_rank_linear``, training's path), or None where
        dropout is on or the op declines the base."""
        if not isinstance(self.dropout, nn.Identity):
            return None
        return low_rank_linear(x, self.lora_A, self.lora_B, self.scaling, base, pool=self.pool, expand=self.expand)

    def expand(self, a: torch.Tensor) -> torch.Tensor:
        """``(r, n) -> (r, in)``: ``a P``, the factor as it applies to the unpooled input. Pooling is linear,
        ``pool(x) = x Pᵀ`` with P ``(n, in)`` holding ``n/G`` on each group, so ``pool(x) aᵀ = x (a P)ᵀ``: each
        group's column of ``a`` repeated, times n/G."""
        return a.repeat_interleave(self.group_size, dim=1) * (self.n_groups / self.group_size)

    def group_delta(self) -> torch.Tensor:
        """``Δ`` ``(out, n_groups)``: what each group's weights move by, ``s·(B A)·n/G``."""
        return (self.lora_B @ self.lora_A) * (self.scaling * self.n_groups / self.group_size)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return self.group_delta().repeat_interleave(self.group_size, dim=1)

    def low_rank(self, base: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The exact plain pair for serving: ``(expand(A), B, s)``."""
        return self.expand(self.lora_A.detach()), self.lora_B.detach(), self.scaling

    def merge(self, base: nn.Module) -> None:
        """Fold into the base's per-group min terms; the base stays quantized (a Q4_0 base becomes Q4_1)."""
        self._unmerged = (base.qweight,)
        base.qweight = self.fold_into(base.qweight)

    def unmerge(self, base: nn.Module) -> None:
        """Put back the exact weight from before :meth:`merge`."""
        (base.qweight,) = self._unmerged
        self._unmerged = ()

    def fold_into(self, weight: QuantizedWeight) -> QuantizedWeight:
        """``weight`` (this layer's base) with the update folded into its group offsets, losslessly but for
        fp16 rounding; how a merged export keeps the base quantized."""
        return fold_into_group_min(weight, self.group_delta().detach())

    # Same tensors and PEFT key names as LoRA (only lora_A's width differs).
    peft_tensors = LoraAdapter.peft_tensors
    load_peft_tensors = LoraAdapter.load_peft_tensors


def group_size_of(base: nn.Module) -> int:
    """The quantization group size of a QA-LoRA base, or an error that says what quantization it needs."""
    weight = getattr(base, "qweight", None) if isinstance(base, QuantLinear) else None
    if not isinstance(weight, GROUP_AFFINE_FORMATS):
        found = weight.format if weight is not None else f"a dense {type(base).__name__}"
        raise AdapterError(
            f"QA-LoRA needs a group-quantized base weight (group-wise asymmetric INT2/3/4/8, or GGUF Q4_0/Q4_1 "
            f"loaded natively), but this ({base.out_features}x{base.in_features}) layer is {found}. Quantize "
            "the base group-wise (INTk) or load a Q4_0/Q4_1 GGUF natively; for other bases use method lora or dora."
        )
    return weight.group_size


def fold_into_group_min(weight: QuantizedWeight, group_delta: torch.Tensor) -> QuantizedWeight:
    """A new weight equal to ``weight`` plus ``group_delta`` on every weight of each group.

    Codes and scales are kept; each group's offset becomes ``fp16(offset + Δ)`` (computed in fp32), so
    the merged weight differs from the exact sum by at most half an fp16 ulp of the new offset.
    A Q4_0 group ``d·(q − 8)`` is ``d·q − 8d``: it becomes a Q4_1 group with ``m = fp16(−8d + Δ)``.

    Args:
        weight: an INTk, Q4_1 or Q4_0 weight, ``(out, in)``.
        group_delta: ``(out, in / group_size)`` float.
    """
    delta = group_delta.to(torch.float32)
    if isinstance(weight, IntKWeight):
        new_min = (weight.min.float() + delta).half()
        return IntKWeight(weight.codes, weight.scale, new_min, weight.bits, weight.group_size)
    if isinstance(weight, Q4_0Weight):
        weight = weight.to_q4_1()
    if isinstance(weight, Q4_1Weight):
        return Q4_1Weight(d=weight.d, m=(weight.m.float() + delta).half(), qs=weight.qs)
    raise AdapterError(f"QA-LoRA can't fold into a {weight.format} weight; it needs INTk, Q4_1 or Q4_0")


def peft_fields(spec, model: nn.Module, name: str, paths: list[str]) -> dict:
    """QA-LoRA's field of PEFT's ``LoraConfig``: one ``qalora_group_size``, which every layer must share."""
    sizes = {path: group_size_of(model.get_submodule(path).base_layer) for path in paths}
    if len(set(sizes.values())) > 1:
        raise AdapterError(f"QA-LoRA layers have different quantization group sizes {sizes}; PEFT's format holds one")
    return {"qalora_group_size": next(iter(sizes.values()))}


def after_load(adapter: QALoraAdapter, path: str, config: dict) -> None:
    """A QA-LoRA file fits only a base quantized in the groups it was trained on."""
    trained = int(config.get("qalora_group_size", 16))
    if trained != adapter.group_size:
        raise AdapterError(f"{path}: the adapter was trained with qalora_group_size {trained}, but this base is "
                           f"quantized in groups of {adapter.group_size}; QA-LoRA needs the same groups it was "
                           "trained on")
