"""Optimizer choice: torch AdamW, or bitsandbytes' paged / 8-bit AdamW where they can work.

Paging (``paged_adamw``) keeps optimizer state in CUDA unified memory, so a memory spike (a long
batch) evicts state to host RAM instead of failing with OOM. It only exists on CUDA; on CPU the
state already lives in host RAM and there is nothing to page, so we warn and use torch's AdamW.
``adamw_8bit`` stores both moments in 8-bit blocks (~75% less optimizer memory); it also needs CUDA.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
                    device: torch.device) -> torch.optim.Optimizer:
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name not in ("paged_adamw", "adamw_8bit"):
        raise ValueError(f"train.optim {name!r} is not one of adamw, paged_adamw, adamw_8bit")
    if device.type != "cuda":
        warnings.warn(f"train.optim: {name} needs a CUDA device (bitsandbytes); on {device.type} loraforge uses "
                      "torch AdamW, whose state lives in host memory anyway", stacklevel=2)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ImportError(f"train.optim: {name} needs bitsandbytes: pip install bitsandbytes") from None
    cls = bnb.optim.PagedAdamW if name == "paged_adamw" else bnb.optim.AdamW8bit
    return cls(params, lr=lr, weight_decay=weight_decay)
