"""Learning-rate schedules: linear warmup, then cosine, linear or constant."""

from __future__ import annotations

import math
from collections.abc import Callable


def lr_multiplier(scheduler: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The factor on the peak learning rate at optimizer step ``step`` (0-based), for ``LambdaLR``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if scheduler == "linear":
            return 1.0 - progress
        if scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"train.scheduler {scheduler!r} is not one of cosine, linear, constant")

    return factor


def warmup_steps(warmup_steps: int, warmup_ratio: float, total_steps: int) -> int:
    return warmup_steps or int(math.ceil(warmup_ratio * total_steps))
