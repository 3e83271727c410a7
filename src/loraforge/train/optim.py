"""Optimizer choice (torch AdamW, or bitsandbytes' paged / 8-bit AdamW where they can work), and the
parameter groups: one, or LoRA+'s two learning rates.

Paging (``paged_adamw``) keeps optimizer state in CUDA unified memory, so a memory spike (a long
batch) evicts state to host RAM instead of failing with OOM. It only exists on CUDA; on CPU the
state already lives in host RAM and there is nothing to page, so we warn and use torch's AdamW.
``adamw_8bit`` stores both moments in 8-bit blocks (~75% less optimizer memory); it also needs CUDA.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


def parameter_groups(model: nn.Module, lr: float, weight_decay: float,
                     loraplus_lr_ratio: float | None) -> list[dict]:
    """The trainable parameters of ``model`` as optimizer param groups, each with its ``lr``, its
    ``weight_decay`` and a ``name``.

    Without LoRA+: one group ``"all"``. With LoRA+ (Hayou et al. 2024), the groups of PEFT's
    ``create_loraplus_optimizer``, by parameter name and shape:

    - ``"A"``: everything not below (LoRA's A, AdaLoRA's E): ``lr``, ``weight_decay``;
    - ``"B"``: parameters named ``lora_B``, and every 1-D parameter (DoRA's magnitude, VeRA's scaling
      vectors): ``loraplus_lr_ratio * lr``, ``weight_decay``;
    - ``"B_no_decay"``: those of ``"B"`` named ``bias``: ``loraplus_lr_ratio * lr``, no weight decay.

    PEFT's LayerNorm exclusion from decay and its embedding group never apply: loraforge trains adapter
    parameters only, and adapts linear layers only. Empty groups are left out. The schedule multiplies
    every group's ``lr`` by the same factor, so B's stays ``loraplus_lr_ratio`` times A's.
    """
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if loraplus_lr_ratio is None:
        return [{"name": "all", "params": [p for _, p in trainable], "lr": lr, "weight_decay": weight_decay}]
    groups = {"A": [], "B": [], "B_no_decay": []}
    for name, param in trainable:
        if "lora_B" in name or param.ndim == 1:
            groups["B_no_decay" if "bias" in name else "B"].append(param)
        else:
            groups["A"].append(param)
    settings = {"A": (lr, weight_decay), "B": (lr * loraplus_lr_ratio, weight_decay),
                "B_no_decay": (lr * loraplus_lr_ratio, 0.0)}
    return [{"name": name, "params": params, "lr": settings[name][0], "weight_decay": settings[name][1]}
            for name, params in groups.items() if params]


def build_optimizer(name: str, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    """``train.optim`` over the param ``groups`` of :func:`parameter_groups` (each sets its lr and decay)."""
    if name == "adamw":
        return torch.optim.AdamW(groups)
    if name not in ("paged_adamw", "adamw_8bit"):
        raise ValueError(f"train.optim {name!r} is not one of adamw, paged_adamw, adamw_8bit")
    if device.type != "cuda":
        warnings.warn(f"train.optim: {name} needs a CUDA device (bitsandbytes); on {device.type} loraforge uses "
                      "torch AdamW, whose state lives in host memory anyway", stacklevel=2)
        return torch.optim.AdamW(groups)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ImportError(f"train.optim: {name} needs bitsandbytes: pip install bitsandbytes") from None
    cls = bnb.optim.PagedAdamW if name == "paged_adamw" else bnb.optim.AdamW8bit
    return cls(groups)
