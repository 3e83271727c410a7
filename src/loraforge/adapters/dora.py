"""DoRA: weight-decomposed LoRA (Liu et al. 2024), numerically as in PEFT.

``W' = m ⊙ (W + s·B A) / ‖W + s·B A‖`` with the norm taken per output row and *detached* from the
graph (the paper's section 4.3 trick that saves memory; gradients still reach m, A and B). In the
forward pass this is computed without forming W':
``y = W x + (m/‖·‖ − 1) ⊙ W x + (m/‖·‖) ⊙ s·B A x``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.adapters.lora import LoraAdapter, _dense_param
from loraforge.quant.base import dense_weight


class DoraAdapter(LoraAdapter):
    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float, init: str):
        super().__init__(base, r, scaling, dropout, init)
        with torch.no_grad():
            norm = self.weight_norm(dense_weight(base, torch.float32))
        self.lora_magnitude_vector = nn.Parameter(norm)
        self._merge_scale: torch.Tensor | None = None

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """Row norms ``‖W + s·B A‖`` of shape ``(out,)``, detached."""
        combined = weight.to(self.lora_A.dtype) + self.lora_weight().detach()
        return torch.linalg.norm(combined, dim=1).detach()

    def magnitude_scale(self, base: nn.Module) -> torch.Tensor:
        """``m / ‖W + s·B A‖`` of shape ``(out,)``."""
        return self.lora_magnitude_vector / self.weight_norm(dense_weight(base, self.lora_A.dtype))

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        scale = self.magnitude_scale(base)
        x_in = self.dropout(x)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base_result = base_out if base.bias is None else base_out - base.bias
        else:
            base_result = F.linear(x_in.to(base_out.dtype), dense_weight(base, base_out.dtype))
        lora_result = self.lora_out(x_in)
        return ((scale - 1) * base_result.to(scale.dtype) + scale * lora_result).to(base_out.dtype)

    def row_scale(self, base: nn.Module) -> torch.Tensor:
        """``(out,)`` for serving: with ``low_rank``'s pair, ``delta = (row_scale − 1) ⊙ W x + row_scale ⊙ s·B A x``."""
        return self.magnitude_scale(base).detach()

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        weight = dense_weight(base, self.lora_A.dtype)
        merged = self.magnitude_scale(base)[:, None] * (weight + self.lora_weight())
        return merged - weight

    def merge(self, base: nn.Module) -> None:
        weight = _dense_param(base)
        scale = self.magnitude_scale(base).detach()
        weight.data = (scale[:, None] * (weight.data.to(scale.dtype) + self.lora_weight().detach())).to(
            weight.dtype
        )
        self._merge_scale = scale

    def unmerge(self, base: nn.Module) -> None:
        weight = _dense_param(base)
        original = weight.data.to(self._merge_scale.dtype) / self._merge_scale[:, None] - self.lora_weight()
        weight.data = original.detach().to(weight.dtype)
        self._merge_scale = None

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().peft_tensors(), "lora_magnitude_vector": self.lora_magnitude_vector}

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_peft_tensors(tensors)
        with torch.no_grad():
            self.lora_magnitude_vector.copy_(tensors["lora_magnitude_vector"])
