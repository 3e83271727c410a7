"""Give freed host memory back to the operating system.

glibc's malloc keeps freed blocks for reuse. A training step on CPU allocates and frees gigabytes of
activations of many sizes, and glibc raises its mmap threshold after the first large free, so later
tensors come from the heap and the freed gaps between live ones stay resident: measured on the default
model (batch 4×256), QLoRA's peak RSS grew from 3.8 GB on the first step to 5.3 GB on the second, while
``malloc_trim(0)`` after each step kept it at 4.1 GB (BENCHMARKS.md, "QLoRA memory on CPU").

A dense tensor that a checkpoint loader made from a memory-mapped safetensors file also keeps that whole
mapping alive, and every page of it that was read stays in RSS: quantizing the default model left 0.4 GB
of the fp32 file resident through the one embedding tensor that still pointed into it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache

import torch
from torch import nn


@cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None on a C library without it (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim(0)``); a no-op elsewhere.

    It takes milliseconds; pages it releases are faulted in again when reused."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def copy_to_anonymous_memory(model: nn.Module, skip: tuple[type[nn.Module], ...] = ()) -> None:
    """Copy every CPU parameter and buffer of ``model`` (outside modules of the ``skip`` types) into memory
    of its own, one tensor at a time, so that no tensor points into a memory-mapped checkpoint any more and
    the mapping, with every page of it that was read, can be released. Tied parameters stay tied."""
    skipped = {id(t) for module in model.modules() if isinstance(module, skip)
               for t in [*module.parameters(), *module.buffers()]}
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu" and id(tensor) not in skipped:
                tensor.data = tensor.data.clone()
