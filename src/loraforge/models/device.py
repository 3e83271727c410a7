"""Which device a command puts its model on."""

from __future__ import annotations

import torch

from loraforge.models.sources import ModelSourceError


def resolve_device(name: str | None = None) -> torch.device:
    """``name`` (``cpu``, ``cuda``, ``cuda:1``, ...) as a ``torch.device``; ``None`` means CUDA when one is
    visible, else the CPU. Raises ``ModelSourceError`` for a malformed name or a GPU that isn't there."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModelSourceError(f"--device {name!r} is not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0 or (device.index or 0) >= count:
            raise ModelSourceError(f"--device {name}: {count} CUDA device(s) visible; use --device cpu"
                                   + (f" or cuda:0..cuda:{count - 1}" if count else ""))
    elif device.type != "cpu":
        raise ModelSourceError(f"--device {name}: only cpu and cuda are supported")
    return device
