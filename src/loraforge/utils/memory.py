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

M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter number for the mmap threshold (malloc.h)."""
MMAP_THRESHOLD_BYTES = 128 * 1024
"""glibc's initial mmap threshold, kept fixed by ``return_large_blocks_on_free``."""


@cache
def _glibc(function: str):
    """A glibc malloc function (``malloc_trim``, ``mallopt``), or None on a C library without it (musl,
    macOS, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), function) if name else None
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim(0)``); a no-op elsewhere.

    It takes milliseconds; pages it releases are faulted in again when reused."""
    trim = _glibc("malloc_trim")
    if trim is not None:
        trim(0)


def return_large_blocks_on_free() -> None:
    """Keep glibc's mmap threshold at its initial 128 KiB for the rest of the process (a no-op elsewhere).

    By default glibc raises the threshold to the size of each mmapped block freed, up to 32 MiB, so after
    the first few frees a training step's activations come from the heap, and the forward pass's freed
    temporaries stay resident as gaps between live activations. How much depends on the allocation order:
    on the default model (batch 4x256) the gaps were 0.78x the live heap at the peak, +1.0 GiB of RSS; on a
    1B Llama (batch 2x256) almost none (``benchmarks/memory_estimate.py``). With the threshold fixed every
    block of 128 KiB or more is a mapping of its own, unmapped on free, so the peak RSS is the live tensors
    (what ``train.memory`` estimates); the price is a page fault per 4 KiB of each new block."""
    mallopt = _glibc("mallopt")
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


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
