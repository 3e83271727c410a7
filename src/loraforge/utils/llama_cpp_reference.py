"""llama.cpp (llama-cpp-python), which the tests and benchmarks compare against, loaded so that it runs on any CPU.

loraforge itself never runs llama.cpp; its tests read our GGUF exports with it and its benchmarks race it.
llama-cpp-python compiles llama.cpp with ``-march=native``. On a CPU with AMX, ggml then places the weights of
Q4_0/Q4_1/Q8_0 (and K-quant) models in its AMX buffer type, and its AMX matmul segfaults (llama.cpp #20824). That
was seen on a 2-core Sapphire Rapids Xeon, 2026-12-01, on the default model's Q4_1 file and on a tiny Q8_0 export.
``use_extra_bufts = False`` keeps the weights in llama.cpp's plain CPU buffers, which also turns off its weight
repacking. ``Llama`` doesn't expose that field, so :func:`load` sets it on the model's default parameters for the one
call.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path


@cache
def cpu_has_amx() -> bool:
    """Whether this CPU reports AMX (``amx_int8`` or ``amx_bf16`` in ``/proc/cpuinfo``; False where that isn't readable)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_int8" in flags or "amx_bf16" in flags


def load(model_path: str | Path, plain_buffers: bool | None = None, **options):
    """``llama_cpp.Llama(model_path=..., **options)``, with ggml's extra buffer types off where ``plain_buffers``.

    ``plain_buffers``: True for a reference that computes alike on every CPU (the tests); None (benchmarks) turns
    them off only where the CPU has AMX, so that llama.cpp keeps its fastest working path elsewhere.
    Raises ``ImportError`` when llama-cpp-python isn't installed."""
    import llama_cpp

    if plain_buffers is None:
        plain_buffers = cpu_has_amx()
    if not plain_buffers:
        return llama_cpp.Llama(model_path=str(model_path), **options)
    low_level = llama_cpp.llama_cpp
    defaults = low_level.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    low_level.llama_model_default_params = without_extra_buffers
    try:
        return llama_cpp.Llama(model_path=str(model_path), **options)
    finally:
        low_level.llama_model_default_params = defaults
