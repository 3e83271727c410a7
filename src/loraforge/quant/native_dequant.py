"""The native fused dequantizer (``native/dequant.cpp``) behind the weight formats' tile decoders on CPU.

Training decodes every quantized layer twice per step (``kernels``: the forward, and the backward's input
gradient); in torch that is a chain of ~8 ops per tile, here one pass per row, bit-identical to the torch decode
the formats keep for other devices, fp16 output, and a CPU where the library can't be built (``native.DEQUANT``
warns once).

The instruction set follows torch's CPU capability (``torch.backends.cpu.get_cpu_capability()``), so that a run
capped with ``ATEN_CPU_CAPABILITY=avx2`` decodes with AVX2 as well.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch

from loraforge.native import DEQUANT
from loraforge.quant.double_quant import dynamic_map

LAYOUTS = ("high_first", "low_first", "split16", "int2", "int3", "u8", "s8")
"""How a row's codes are packed, in ``dequant.cpp``'s ``Layout`` order: NF4/FP4 nibbles (first element high), INT4
nibbles (first element low), GGUF Q4_x (byte j: elements j and j+16 of a block), INT2 and INT3 words, INT8
bytes, Q8_0 signed bytes."""

DTYPES = (torch.float32, torch.bfloat16)
"""Output dtypes the native decode writes; others take the torch decode."""

Fold = tuple[torch.Tensor, torch.Tensor, float]
"""``(b (rows, r), a (r, cols), s)``: a low-rank update ``s·b a`` added to a tile as it is decoded."""

DoubleQuant = tuple[torch.Tensor, torch.Tensor, int]
"""``(nested_absmax (ceil(n / 256),) fp32, offset () fp32, origin)``: how uint8 ``scale`` codes (a tile of a weight's
``(n,)`` double-quantized absmax codes, element ``[0, 0]`` at index ``origin``) are decoded, as
``double_quant.double_dequantize`` decodes them."""

_CAPABILITY_ISAS = {"AVX512": "avx512", "AVX2": "avx2"}
_NO_TENSOR = torch.empty(0)
_NO_MIN = torch.empty(0, dtype=torch.float16)


def runs(codes: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the native decode takes a tile of ``codes`` in ``dtype``: on CPU, fp32 or bf16, library built."""
    return codes.device.type == "cpu" and dtype in DTYPES and DEQUANT.library() is not None


@cache
def isa() -> str:
    """The instruction set the decode runs: the fastest the library has at or below torch's CPU capability."""
    available = DEQUANT.library().available_isas()
    wanted = _CAPABILITY_ISAS.get(torch.backends.cpu.get_cpu_capability(), "scalar")
    ranked = ("avx512", "avx2", "scalar")
    return next(name for name in ranked[ranked.index(wanted):] if name in available)


def decode(codes: torch.Tensor, scale: torch.Tensor, layout: str, group: int, dtype: torch.dtype, cols: int, *,
           min: torch.Tensor | None = None, table: torch.Tensor | None = None, offset: int = 0,
           out: torch.Tensor | None = None, fold: Fold | None = None,
           double_quant: DoubleQuant | None = None) -> torch.Tensor:
    """A dense ``(rows, cols)`` tile in ``dtype`` (only where :func:`runs`), written into ``out`` when given, plus
    ``fold``'s update where given.

    Args:
        codes: the tile's packed codes, uint8 or int8 ``(rows, cols · bits / 8)`` (GGUF: ``(rows, blocks, 16|32)``),
            rows dense (a slice of the weight's columns is fine).
        scale: ``(rows, cols / group)`` fp32 (NF4/FP4 absmax), fp16 (INTk scale, GGUF d), or uint8 double-quantized
            absmax codes (with ``double_quant``), each decoded as its row reaches it.
        layout: one of ``LAYOUTS``.
        group: weights per scale, a multiple of 32.
        min: fp16 like ``scale``, added after the product (INTk, Q4_1).
        table: NF4/FP4's 16 fp32 code values: ``w = table[q] · scale``; without it ``w = scale · (q − offset)``.
        out: a ``(rows, cols)`` buffer in ``dtype`` with dense rows (any row stride) to write (``kernels``' reused
            workspace).
        fold: ``(b (rows, r), a (r, cols), s)`` fp32 (fp32 tiles only): each row ``i`` gets ``s·b[i] a`` added right
            after it is decoded, while it is in cache (training's fold, ``kernels.LowRank`` sliced to the tile).
        double_quant: what decodes uint8 ``scale`` codes (``DoubleQuant``).
    """
    if out is None:
        out = torch.empty(codes.shape[0], cols, dtype=dtype)
    b, a, s = (_NO_TENSOR, _NO_TENSOR, 0.0) if fold is None else fold
    nested, nested_offset, origin = (_NO_TENSOR, _NO_TENSOR, 0) if double_quant is None else double_quant
    DEQUANT.library().decode(codes, scale, _NO_MIN if min is None else min, _NO_TENSOR if table is None else table,
                             LAYOUTS.index(layout), group, offset, out, isa(), b, a, s, nested, nested_offset,
                             dynamic_map() if double_quant is not None else _NO_TENSOR, origin)
    return out


def last_slices(views: Callable[[slice, slice], tuple]) -> Callable[[slice, slice], tuple]:
    """``views(rows, cols)`` (a tile decoder's slices of its weight's tensors), remembered for the last tile asked:
    a layer that is one tile, as most are, slices once rather than on every call (a few tensor slices cost ~30 µs
    per call inside a training step). The views follow in-place changes to the tensors; a decoder whose tensors are
    replaced is made anew (``kernels`` keeps one per weight only while its tensors are the same objects)."""
    last: list = [None]  # (key, views), read and replaced whole: threads sharing the decoder never mix two tiles

    def remembered(rows: slice, cols: slice) -> tuple:
        key = (rows.start, rows.stop, cols.start, cols.stop)
        kept = last[0]
        if kept is None or kept[0] != key:
            kept = last[0] = key, views(rows, cols)
        return kept[1]

    return remembered


def plus(dense: torch.Tensor, fold: Fold | None) -> torch.Tensor:
    """``dense`` (a tile of its own) plus ``fold``'s ``s·b a``, in place: the fold where the native decode doesn't
    run (torch's decode, other devices)."""
    if fold is not None:
        b, a, s = fold
        dense.addmm_(b, a, alpha=s)
    return dense
