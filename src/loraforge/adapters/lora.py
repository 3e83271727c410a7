"""LoRA: ``y = W x + s · B A dropout(x)`` with A ``(r, in)``, B ``(out, r)`` and s = alpha/r (rsLoRA: alpha/√r)."""

from __future__ import annotations

import math

import torch
from torch import nn

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
        self.reset_parameters(init)

    def reset_parameters(self, init: str) -> None:
        """kaiming: A ~ kaiming-uniform(a=√5), B = 0 (PEFT's default); gaussian: A ~ N(0, 1/r), B = 0;
        none: both random (nn.Linear's init), so that a fresh adapter already changes the output."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        if init == "none":
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)

    def lora_out(self, x: torch.Tensor) -> torch.Tensor:
        """``s · B A x`` in the adapter's dtype, for ``x`` already dropped out; shape ``(..., out)``."""
        x = x.to(self.lora_A.dtype)
        return (x @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return self.lora_out(self.dropout(x)).to(base_out.dtype)

    def lora_weight(self) -> torch.Tensor:
        """``s · B A``, shape ``(out, in)``."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return self.lora_weight()

    def merge(self, base: nn.Module) -> None:
        weight = _dense_param(base)
        weight.data += self.lora_weight().detach().to(weight.dtype)

    def unmerge(self, base: nn.Module) -> None:
        weight = _dense_param(base)
        weight.data -= self.lora_weight().detach().to(weight.dtype)

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
