"""LoRA: ``y = W x + s · B A dropout(x)`` with A ``(r, in)``, B ``(out, r)`` and s = alpha/r (rsLoRA: alpha/√r).

PiSSA (Meng et al. 2024; PEFT's ``init_lora_weights="pissa"``) is an init of LoRA: A and B start as the
weight's top-r singular triplets, ``A = √(S_r/s) Vᵀ_r``, ``B = U_r √(S_r/s)``, and the base keeps the
residual ``W − s·B A``, so the model's output is unchanged at step 0. A trained PiSSA adapter applies to
that residual; saved for the original weight it becomes the rank-2r pair ``[A; A₀]``, ``[B, −B₀]``
(PEFT's ``pissa_convert``): ``W_res + s·B A = W + s·(B A − B₀ A₀)``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from loraforge.adapters.low_rank_linear import low_rank_linear
from loraforge.adapters.spec import AdapterError
from loraforge.quant.base import QuantLinear


class LoraAdapter(nn.Module):
    """Every method's constructor takes ``(base, r, scaling, dropout, init)``; see ``inject.METHODS``."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float, init: str):
        super().__init__()
        self.r = r
        self.scaling = scaling
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, r))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.pissa_initial: tuple[torch.Tensor, torch.Tensor] | None = None
        """PiSSA's ``(A₀, B₀)``, kept to save the adapter for the original weight."""
        self.reset_parameters(init, base)

    def reset_parameters(self, init: str, base: nn.Module | None = None) -> None:
        """kaiming: A ~ kaiming-uniform(a=√5), B = 0 (PEFT's default); gaussian: A ~ N(0, 1/r), B = 0;
        none: both random (nn.Linear's init), so that a fresh adapter already changes the output;
        pissa / pissa_niter_N: from ``base``'s weight, which keeps the residual (see the module docstring)."""
        if init.startswith("pissa"):
            self._pissa_init(base, int(init.rpartition("_niter_")[2]) if "_niter_" in init else None)
            return
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        if init == "none":
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)

    def _pissa_init(self, base: nn.Module, niter: int | None) -> None:
        """A and B from the top-r singular triplets of the base weight (exact SVD, or ``torch.svd_lowrank``
        with ``niter`` iterations), in fp32; the base weight becomes the residual."""
        weight = _dense_param(base)
        dense = weight.data.to(torch.float32)
        if niter is None:
            u, s, vh = torch.linalg.svd(dense, full_matrices=False)
            u, s, vh = u[:, : self.r], s[: self.r], vh[: self.r]
        else:
            u, s, v = torch.svd_lowrank(dense, q=self.r, niter=niter)
            vh = v.T
        root = torch.sqrt(s / self.scaling)
        with torch.no_grad():
            self.lora_A.copy_(root[:, None] * vh)
            self.lora_B.copy_(u * root[None, :])
            weight.data = (dense - self.scaling * self.lora_B @ self.lora_A).to(weight.dtype)
        self.pissa_initial = (self.lora_A.detach().clone(), self.lora_B.detach().clone())

    def original_base_tensors(self) -> dict[str, torch.Tensor]:
        """``peft_tensors`` as they apply to the weight before a PiSSA init (rank 2r), else as they are."""
        if self.pissa_initial is None:
            return self.peft_tensors()
        a0, b0 = self.pissa_initial
        return {"lora_A.weight": torch.cat([self.lora_A, a0.to(self.lora_A)], dim=0),
                "lora_B.weight": torch.cat([self.lora_B, -b0.to(self.lora_B)], dim=1)}

    def lora_out(self, x: torch.Tensor) -> torch.Tensor:
        """``s · B A x`` in the adapter's dtype, for ``x`` already dropped out; shape ``(..., out)``."""
        x = x.to(self.lora_A.dtype)
        return (x @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return self.lora_out(self.dropout(x)).to(base_out.dtype)

    def add_delta(self, x: torch.Tensor, base_out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """``base_out + delta(...)`` (``layer.add_delta``): ``s · (x Aᵀ) Bᵀ`` accumulated into ``base_out`` by one
        GEMM, so no ``(M, out)`` pass scales the update or adds it, forward or backward. Where ``delta`` is
        overridden (DoRA) or the dtypes differ, the plain sum."""
        if type(self).delta is not LoraAdapter.delta or base_out.dtype != self.lora_A.dtype:
            return base_out + self.delta(x, base_out, base)
        return base_out.addmm_(self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.T, self.lora_B.T, alpha=self.scaling)

    def fused_linear(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        """``base(x) + delta(x, ...)`` as one autograd op (``low_rank_linear``, training's path), or None where
        ``delta`` is overridden (DoRA), dropout is on, or the op declines the base."""
        if type(self).delta is not LoraAdapter.delta or not isinstance(self.dropout, nn.Identity):
            return None
        return low_rank_linear(x, self.lora_A, self.lora_B, self.scaling, base)

    def lora_weight(self) -> torch.Tensor:
        """``s · B A``, shape ``(out, in)``."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return self.lora_weight()

    def low_rank(self, base: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The update as a plain pair for serving: ``delta(x) = scale · x Aᵀ Bᵀ``."""
        return self.lora_A.detach(), self.lora_B.detach(), self.scaling

    def merge(self, base: nn.Module) -> None:
        """Add ``delta_weight`` to a dense base weight in place (methods whose update is a weight delta share this)."""
        weight = _dense_param(base)
        weight.data += self.delta_weight(base).detach().to(weight.dtype)

    def unmerge(self, base: nn.Module) -> None:
        weight = _dense_param(base)
        weight.data -= self.delta_weight(base).detach().to(weight.dtype)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.lora_A.copy_(tensors["lora_A.weight"])
            self.lora_B.copy_(tensors["lora_B.weight"])


def _dense_param(base: nn.Module) -> nn.Parameter:
    """The base weight that a merge writes into; quantized bases can't take an in-place merge."""
    if isinstance(base, QuantLinear):
        raise AdapterError(
            f"can't merge in place into a {base.qweight.format} base: that would re-quantize with rounding loss. "
            "Export a merged model instead (`loraforge export`), which dequantizes and merges, or train with "
            "`adapter.method: qalora`, whose merge into the quantized weights is lossless."
        )
    return base.weight


def spec_for_original_base(spec):
    """The spec of a PiSSA adapter saved for the original weight: twice the rank at the same scale."""
    if not spec.init.startswith("pissa"):
        return spec
    factor = math.sqrt(2) if spec.use_rslora else 2.0  # alpha/r and alpha/√r stay the same at rank 2r
    return dataclasses.replace(spec, r=2 * spec.r, alpha=spec.alpha * factor, init="kaiming",
                               rank_pattern={k: 2 * v for k, v in spec.rank_pattern.items()},
                               alpha_pattern={k: v * factor for k, v in spec.alpha_pattern.items()})
