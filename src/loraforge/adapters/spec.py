"""What to inject: the adapter method, its hyper-parameters and where it goes."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

INIT_CHOICES = ("kaiming", "gaussian", "none")


class AdapterError(ValueError):
    """Bad adapter settings or an adapter that doesn't fit the model; the message says what would be right."""


@dataclass
class AdapterSpec:
    """Hyper-parameters of one named adapter.

    ``target_modules`` is ``"all-linear"`` (every linear layer but the output head), a list of module
    names (a module matches when its path equals a name or ends with ``"." + name``), or a regex string
    that must match the whole module path. ``rank_pattern`` / ``alpha_pattern`` map a module-name
    pattern (matched against the end of the path, as in PEFT) to a per-module rank / alpha.
    """

    method: str = "lora"
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "kaiming"
    target_modules: str | list[str] = "all-linear"
    layers_to_transform: list[int] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.r, int) or self.r <= 0:
            problems.append(f"adapter.r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            problems.append(f"adapter.alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            problems.append(f"adapter.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INIT_CHOICES:
            problems.append(f"adapter.init {self.init!r} is not one of {list(INIT_CHOICES)}")
        for pattern, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank <= 0:
                problems.append(f"adapter.rank_pattern[{pattern!r}] must be a positive integer, got {rank!r}")
        for pattern, alpha in self.alpha_pattern.items():
            if not alpha > 0:
                problems.append(f"adapter.alpha_pattern[{pattern!r}] must be > 0, got {alpha!r}")
        if problems:
            raise AdapterError("\n".join(problems))

    def rank_and_alpha(self, module_path: str) -> tuple[int, float]:
        """The rank and alpha for one module, after ``rank_pattern`` / ``alpha_pattern``."""
        r = _first_pattern_match(self.rank_pattern, module_path, self.r)
        alpha = _first_pattern_match(self.alpha_pattern, module_path, self.alpha)
        return r, alpha

    def scaling(self, r: int, alpha: float) -> float:
        """LoRA's output scale: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _first_pattern_match(patterns: dict, module_path: str, default):
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module_path):
            return value
    return default
