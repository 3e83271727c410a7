"""Low-bit matmuls for frozen quantized weights: what ``QuantizedWeight.matmul`` runs.

Three CPU paths, chosen per call by the number of input rows (tokens) ``M``:

- **native kernel** (``M ≤ NATIVE_MAX_ROWS[bits, dtype]``: decode-size inputs in bf16, inference only: ``linear(...,
  int8_activations=True)``, which ``quantized_matmul`` passes when autograd isn't recording, so training's forward
  keeps exact products): our C++ kernel (``native/lowbit.cpp``), as llama.cpp computes it: each activation row is quantized per 32-block to int8 (``d = amax/127`` as fp16, codes
  rounded half to even, and ``s = fp16(d·Σq)`` as in Q8_1), and each block's integer dot product with the stored
  codes is scaled in fp32 (``y = Σ_b d_w·d_a·Σ(q − offset)·q_a + Σ_g m_g·s_g``). Formats: GGUF Q4_0, Q4_1, Q8_0
  and INT4/INT8 of any group size, read as stored (no packed copy); ``FusedKernel`` runs several weights of one
  input in one call. The int8 activation adds llama.cpp's error: ``|Δy| ≤ Σ_b (d_a/2)·Σ|w|`` per output, half a
  step of 1/127 of each block's largest input (test_native_kernel.py states the exact bound). ``KERNEL = "torch"`` (setting
  ``LORAFORGE_QUANT_KERNEL=torch``) turns it off for exact products; a CPU without a compiler falls back, once
  warned (``native.LOWBIT``).
- **int4 kernel** (``M ≤ INT4PACK_MAX_ROWS[dtype]``, decode-size inputs): torch's group-wise int4 CPU kernel
  ``aten._weight_int4pack_mm_for_cpu``, for formats whose weights are ``scale·q + min`` with 4-bit ``q``
  per group along ``in_features`` (INT2/3/4 of any group size, GGUF Q4_0 and Q4_1). The kernel computes
  ``(q − 8)·s + z``, so ``s = scale`` and ``z = min + 8·scale`` (in fp32 the error against the fp32
  dequantized weight is a rounding of ``z``, ~1e-7 relative; in bf16 ``s`` and ``z`` are rounded to bf16,
  where the other path rounds each dequantized weight: both ~4e-3 relative). 8-bit codes (GGUF Q8_0, INT8)
  take it as two 4-bit parts, ``q = 16·hi + lo``, whose products add up (``_parts``): the same bytes read
  as the int8 codes, in two calls. Its weight is packed once, on the first call that uses it, and kept: the
  packed codes cost as much as the format's own codes (4 or 8 bits per weight) plus ``2·32/group_size``
  bits per weight and part of scales-and-zeros in each compute dtype used (bf16 g32: 2 more bits).
  Training never takes this path (``M`` is batch × sequence), so it never pays that memory.
  ``fused_int4pack`` packs several weights of one input (q/k/v, gate/up) as one, for one call per part.
- **tiled dequantize-and-matmul** (every other case, and formats the kernel can't take: NF4/FP4, whose
  16 levels are not evenly spaced). The weight is dequantized ``TILE_ELEMENTS`` at
  a time, each tile multiplied right after it is decoded, its product written into its own columns of the
  output: the dense layer never exists whole (unless it fits one tile), and nothing but the one reused tile
  buffer outlives the call.

The backward needs only the input's gradient ``grad_y @ W`` (the base weight is frozen); it dequantizes
in column tiles the same way. Other devices (CUDA) dequantize the layer whole and call ``F.linear``.

The tiles are decoded into one buffer per thread and dtype (:func:`workspace`), reused by every call: a fresh
multi-MB tensor per call would be page-faulted in (and zeroed by the kernel) each time. Each weight's tile decoder
(with its slices of the weight, ``native_dequant.last_slices``) is kept on the weight between calls
(:func:`_tile_function`, dropped by :func:`forget` on a device move), as are the workspace's views: rebuilding them
all on every call cost ~3.5 ms of a 0.8 s training step on six of the default model's layers (BENCHMARKS.md,
session 10). Training with a LoRA on
the base (``adapters.low_rank_linear``) may pass ``low_rank = (b, a, s)``: each tile then becomes ``W + s·b a``
before its product (the native decode adds each row's ``s·b[i] a`` as it decodes the row), so one GEMM gives the
base and the adapter's output (or input gradient) together.

Thresholds (``NATIVE_MAX_ROWS``, ``INT4PACK_MAX_ROWS``) come from ``benchmarks/quant_kernels.py`` (BENCHMARKS.md, "Low-bit
matmul kernels"): in bf16 the native kernel wins up to a few rows and torch's int4 kernel up to a few dozen; in
fp32 torch's int4 kernel never beats the tiled path, and the native kernel, which would, is off (fp32 is the
exact dtype; see ``NATIVE_MAX_ROWS``).

A weight format takes part by providing:

- ``tile_dequantizer()``: a function ``(rows: slice, cols: slice, dtype, out=None, fold=None) -> (rows, cols)``
  dense tile, bit-identical to the same slice of ``dequantize(dtype)``, written into ``out`` (a buffer of that
  shape with dense rows, any row stride) where it can, plus ``fold``'s ``s·b a`` (``native_dequant.Fold``, sliced to
  the tile: the native decode adds it to each row as it is decoded, ``native_dequant.plus`` otherwise), or None
  when the layout can't be tiled;
  ``tile_columns`` (int): the column alignment tiles need (group or block size);
- optionally ``int4_group_size`` (the group size, or None where the format's codes don't fit 4 bits) and
  ``int4_affine()``: ``(codes (out, in) uint8 in 0..15, scale (out, groups) fp32, min (out, groups) fp32,
  group_size)`` with ``w = scale·q + min``.
"""

from __future__ import annotations

import itertools
import os
import threading

import torch
import torch.nn.functional as F

from loraforge.native import LOWBIT
from loraforge.quant import native_dequant

TILE_ELEMENTS = 1 << 23
"""Weights dequantized per tile: 32 MiB in fp32 (the one reused buffer per thread, whatever the model's size).
Each tile is one GEMM call, and each call packs its whole other operand (the input, or the output's gradient)
again, so fewer, larger tiles pay: on the 1.1B TinyLlama-shaped model (layers up to 5632×2048, batch 4×256,
2 cores, AVX2) a QLoRA step took 1.04-1.06× LoRA's with 1M-weight tiles, 1.01-1.02× with 4M and 1.01× with 8M
(BENCHMARKS.md, "Larger tiles"). The default model's layers (at most 1536×576) are one tile either way."""

INT4PACK_MAX_ROWS = {torch.float32: 0, torch.bfloat16: 32, torch.float16: 1}
"""Largest number of input rows for which torch's int4 CPU kernel beats the tiled path, by compute dtype
(measured; see the module docstring). fp32: 0, from ``quant_kernels.py --threads 1`` (BENCHMARKS.md, 11:36 UTC
2026-11-30): at one row the int4 kernel took 0.95-7.2 ms against the tiled path's 0.79-7.0 ms over six default-model
weights, slower in four, and it keeps a packed copy; the native kernel is 20-70x faster than both there."""

INT8_SPLIT_MAX_ROWS = {torch.bfloat16: 8}
"""The same for 8-bit codes (Q8_0, INT8), which take the int4 kernel as two parts. Measured with 1 thread on
an AVX512-BF16 CPU, a 49152x576 Q8_0 weight (the default model's head): bf16 3.5 ms for 1 row against the
tiled path's 18.7 ms, 12.1 against 18.9 for 8 rows, 25.0 against 18.8 for 16; in fp32 the kernel is 4-12x
slower than the tiled path even for one row, so only bf16 takes it."""

INT4PACK_GROUP_SIZES = (32, 64, 128, 256)

NATIVE_MAX_ROWS = {(4, torch.bfloat16): 32, (8, torch.bfloat16): 16, (4, torch.float32): 0, (8, torch.float32): 0}
"""Largest number of input rows for which our int8-activation kernel (``native/lowbit.cpp``) runs, by code bits (4: Q4_0,
Q4_1, INT4; 8: Q8_0, INT8) and compute dtype: the crossovers measured by ``benchmarks/quant_kernels.py --threads 1``
(BENCHMARKS.md, 2026-11-30 11:36-11:38 UTC, AVX512-VNNI) on the default model's weights (960/3072×576, 576×1536 and
the 49152×576 Q8_0 head). bf16, 4-bit: ahead of torch's int4 kernel at 1-2 rows (960×576: 0.027 vs 0.034 ms),
even at 4 (0.055 vs 0.056), 0-15% behind at 8-16 and 10-25% at 32 (2.10 vs 1.69 ms for 3072×576); it still takes
those rows, because the int4 kernel's pack is a second copy of the codes plus bf16 scales (~6 bits per weight: for
the default model 211 against 167 MiB of serving RSS), which would double a large model's weight memory as soon as
any step had 5-32 tokens. bf16, 8-bit: ahead of the int4 kernel's two parts and of the tiled path through 16
rows (head: 12.2 ms vs 23.2 and 21.3), even at 32. fp32: torch's int4 kernel is slow there, so the rival is the
tiled path: 4-bit ahead through 64 rows (3072×576: 3.5 vs 5.4 ms), even at 128; 8-bit ahead through 32, mixed
at 64. Yet fp32 stays 0: fp32 is the exact compute dtype (a quantized model's output equals its dequantized
weights' to ~1e-6 whatever the batch, which the exports, merges and engine-vs-transformers checks rely on), and the
8-bit input would make a row's result depend on how many rows share its step (above or below the threshold);
bf16 already rounds every product to ~4e-3. Set (4, float32): 64 and (8, float32): 32 to take the measured gain.
fp16 is not measured, so it never takes the kernel."""

KERNEL_SETTING = "LORAFORGE_QUANT_KERNEL"
KERNELS = ("native", "torch")
"""``native``: our int8-activation kernel for decode-size inputs (llama.cpp's numerics, the default); ``torch``:
torch's kernels only (exact products of the dequantized weight, slower decode)."""

KERNEL: str | None = None
"""The choice in effect, read from ``$LORAFORGE_QUANT_KERNEL`` on first use (tests set it directly)."""

LowRank = native_dequant.Fold
"""``(b (out, r), a (r, in), s)``: the update ``s·b a`` that ``linear`` and ``input_grad`` add to the dequantized
weight before its product (a whole layer's ``native_dequant.Fold``, sliced per tile by ``_sliced``)."""

_WORKSPACES = threading.local()

_NO_MIN = torch.empty(0, dtype=torch.float16)
_NATIVE_LAYOUTS = {"q4_0": (4, False, False, 8), "q4_1": (4, False, False, 0), "q8_0": (8, False, True, 0)}
"""GGUF format -> (code bits, INTk nibble order, signed codes, code offset) for ``LOWBIT.library().mm``."""


def linear(weight, x: torch.Tensor, int8_activations: bool = False, low_rank: LowRank | None = None) -> torch.Tensor:
    """``x @ W.T`` for ``x`` ``(..., in_features)`` in ``x.dtype`` -> ``(..., out_features)``; no autograd.

    ``int8_activations``: inference may take the native kernel (llama.cpp's numerics) for decode-size inputs;
    otherwise (training's forward) the products are those of the dequantized weight. ``low_rank``: ``x @ (W + s·b
    a).T`` instead (the tiled path only)."""
    out_features, in_features = weight.shape
    rows = x.reshape(-1, in_features)
    if x.device.type != "cpu":
        return F.linear(x, native_dequant.plus(weight.dequantize(x.dtype), low_rank))
    m = rows.shape[0]
    group = _native_group(weight) if int8_activations and low_rank is None and _native_on() else None
    if group is not None and m <= NATIVE_MAX_ROWS.get((group.bits, x.dtype), 0):
        y = group.mm(rows)
    else:
        fits = low_rank is None and m <= int4pack_max_rows(weight, x.dtype)
        packed = _int4pack(weight) if fits else None
        y = packed.mm(rows) if packed is not None else _tiled_forward(weight, rows, low_rank)
    return _shaped(y, (*x.shape[:-1], out_features))


def input_grad(weight, grad_y: torch.Tensor, low_rank: LowRank | None = None) -> torch.Tensor:
    """``grad_y @ W`` (``low_rank``: ``grad_y @ (W + s·b a)``) for ``grad_y`` ``(..., out_features)`` ->
    ``(..., in_features)``: the backward of :func:`linear` with respect to its input."""
    out_features, in_features = weight.shape
    if grad_y.device.type != "cpu":
        return grad_y @ native_dequant.plus(weight.dequantize(grad_y.dtype), low_rank)
    rows = grad_y.reshape(-1, out_features)
    return _shaped(_tiled_input_grad(weight, rows, low_rank)[0], (*grad_y.shape[:-1], in_features))


def input_grad_and_rank(weight, grad_y: torch.Tensor, low_rank: LowRank) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_y @ (W + s·b a), grad_y @ b)`` for 2-D ``grad_y`` ``(M, out_features)``: the input gradient of
    :func:`linear` with ``low_rank`` and the gradient's rank-``r`` projection that the adapter's own gradients need.

    Where the layer is one tile (on CPU), both come from one GEMM over ``[W + s·b a | b]`` ``(out, in + r)``: the
    tile is decoded into the workspace's first ``in`` columns and ``b`` copied beside it, so ``grad_y`` is read once
    and the r-column product rides on the big one (a separate ``grad_y @ b`` re-reads all of ``grad_y`` for r
    columns). The two results are then column slices of one ``(M, in + r)`` tensor."""
    if grad_y.device.type == "cpu":
        grad_x, grad_rank = _tiled_input_grad(weight, grad_y, low_rank, with_rank=True)
    else:
        grad_x, grad_rank = input_grad(weight, grad_y, low_rank), None
    return grad_x, grad_y @ low_rank[0] if grad_rank is None else grad_rank


def _shaped(y: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``y`` itself where it has ``shape`` already (no view: autograd forbids writing in place into a view that a
    custom Function returns, and adapters add their update into the base output), else reshaped."""
    return y if y.shape == shape else y.reshape(shape)


def workspace(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """A ``(rows, cols)`` CPU buffer in ``dtype``, the same memory on every call of this thread (grown when a
    larger one is asked for): where a tile is decoded and used before the next call. Its size is one tile's,
    ``TILE_ELEMENTS`` (a row or column wider than that: one row or column), whatever the model's size."""
    views = _WORKSPACES.__dict__.setdefault("views", {})
    view = views.get((rows, cols, dtype))
    if view is not None:
        return view
    buffers = _WORKSPACES.__dict__.setdefault("buffers", {})
    flat = buffers.get(dtype)
    if flat is None or flat.numel() < rows * cols:
        flat = buffers[dtype] = torch.empty(rows * cols, dtype=dtype)
        for key in [key for key in views if key[2] == dtype]:  # views of the smaller buffer: let it go
            del views[key]
    view = views[rows, cols, dtype] = flat[: rows * cols].view(rows, cols)
    return view


KEPT = ("_tile_function", "_native_group", "_kernel_cache")
"""What this module keeps on a weight between calls (each holds references to the weight's tensors)."""


def forget(weight) -> None:
    """Drop what this module keeps on ``weight``: after a device move (``base._MovesOnly``), so that the old tensors
    are freed now rather than on the next call that would notice them replaced."""
    for name in KEPT:
        weight.__dict__.pop(name, None)


def _tile_function(weight):
    """``weight.tile_dequantizer()``, kept on the weight (a call builds views and a closure: ~4 µs alone, several
    times that inside a training step) while it is the same object with the same tensors: a device move, a load
    that replaces them, FSDP's storage-as-parameters or a ``deepcopy`` (a new ``id``) make a new one."""
    tensors = (*weight._buffers.values(), *weight._parameters.values())
    kept = weight.__dict__.get("_tile_function")
    if kept is None or kept[0] != id(weight) or len(kept[1]) != len(tensors) or any(
            a is not b for a, b in zip(kept[1], tensors)):
        kept = weight.__dict__["_tile_function"] = (id(weight), tensors, weight.tile_dequantizer())
    return kept[2]


def _sliced(low_rank: LowRank | None, rows: slice = slice(None), cols: slice = slice(None)) -> LowRank | None:
    """``(b[rows], a[:, cols], s)``: the part of the update that falls on the tile ``W[rows, cols]``."""
    if low_rank is None:
        return None
    b, a, scale = low_rank
    return b[rows], a[:, cols], scale


def kernel_choice() -> str:
    """``KERNEL``, read from ``$LORAFORGE_QUANT_KERNEL`` (default ``native``) on first use.

    Raises:
        ValueError: the variable holds something other than one of ``KERNELS``.
    """
    global KERNEL
    if KERNEL is None:
        value = os.environ.get(KERNEL_SETTING, "native")
        if value not in KERNELS:
            raise ValueError(f"{KERNEL_SETTING}={value!r} is not one of {', '.join(KERNELS)}")
        KERNEL = value
    return KERNEL


def _native_on() -> bool:
    return kernel_choice() == "native" and LOWBIT.library() is not None


def native_max_rows(weight, dtype: torch.dtype) -> int:
    """Up to how many input rows ``linear`` takes our int8-activation kernel for ``weight`` in ``dtype`` (0: never)."""
    layout = _native_layout(weight)
    if layout is None or not _native_on():
        return 0
    return NATIVE_MAX_ROWS.get((layout[0], dtype), 0)


def _native_layout(weight) -> tuple | None:
    """``(bits, pairs, signed, offset, group_blocks)``: how the native kernel reads ``weight``'s codes, or None for
    formats it doesn't take (NF4/FP4, INT2/3)."""
    fmt = getattr(weight, "format", None)
    if weight._buffers.get("qs" if fmt in _NATIVE_LAYOUTS else "codes") is None:
        return None  # storage turned into (possibly sharded) parameters: FSDP2's quantized_storage_as_parameters
    if fmt in _NATIVE_LAYOUTS:
        return (*_NATIVE_LAYOUTS[fmt], 1)
    if fmt in ("int4", "int8"):
        return weight.bits, weight.bits == 4, False, 0, weight.group_size // 32
    return None


def _native_tensors(weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, scales, mins)`` as stored: GGUF ``qs``/``d``/``m`` (an empty ``m`` for Q4_0 and Q8_0), INTk's
    ``codes``/``scale``/``min``."""
    if weight.format in _NATIVE_LAYOUTS:
        return weight.qs, weight.d, getattr(weight, "m", _NO_MIN)
    return weight.codes, weight.scale, weight.min


def _native_group(weight) -> NativeGroup | None:
    """``weight`` alone as a ``NativeGroup`` (kept on the weight: it holds references only), or None where the
    native kernel doesn't take its format."""
    group = weight.__dict__.get("_native_group")
    if group is None or group.tensors[0][0] is not weight._buffers.get(group.codes_name):  # buffers replaced: rebuild
        layout = _native_layout(weight)
        group = None if layout is None else NativeGroup((weight,), layout)
        weight.__dict__["_native_group"] = group
    return group


class NativeGroup:
    """Weights of one input and one native layout (q/k/v, gate/up) multiplied by one native-kernel call, their
    products side by side. It holds references to the weights' own buffers, no copy, and the kernel's ``Group``
    of them (checked once, on first use), so that a decode step's call passes only its input."""

    def __init__(self, weights: tuple, layout: tuple):
        self.weights = weights
        self.layout = layout
        self.tensors = tuple(list(t) for t in zip(*(_native_tensors(w) for w in weights)))
        self.codes_name = "qs" if weights[0].format in _NATIVE_LAYOUTS else "codes"
        self.bits = layout[0]
        self._group = None

    def mm(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows (M, in) @ W.T`` -> ``(M, out_features)`` in ``rows.dtype``."""
        if self._group is None:
            self._group = LOWBIT.library().Group(*self.tensors, *self.layout)
        return self._group.mm(rows, "")


class FusedKernel:
    """The decode-size product of several weights of one input (q/k/v, gate/up) stacked along ``out_features``:
    the native kernel up to ``native_rows`` input rows, torch's int4 kernel (one pack of them all, built on first
    use) up to ``max_rows``. ``mm`` is only for ``M ≤ max_rows``; larger inputs run the layers one by one."""

    def __init__(self, weights: tuple, dtype: torch.dtype):
        self.weights = weights
        layouts = {_native_layout(w) for w in weights}
        self.native = NativeGroup(weights, layouts.pop()) if len(layouts) == 1 and all(
            native_max_rows(w, dtype) for w in weights) else None
        self.native_rows = min(native_max_rows(w, dtype) for w in weights) if self.native is not None else 0
        mappable = all(_maps_to_int4(w) for w in weights) and len({(_group_size(w), _code_bits(w)) for w in weights}) == 1
        self.int4_rows = min(int4pack_max_rows(w, dtype) for w in weights) if mappable else 0
        self.max_rows = max(self.native_rows, self.int4_rows)
        self.packed: Int4Pack | None = None

    def mm(self, rows: torch.Tensor) -> torch.Tensor:
        if rows.shape[0] <= self.native_rows:
            return self.native.mm(rows)
        if self.packed is None:
            self.packed = fused_int4pack(list(self.weights))
        return self.packed.mm(rows)


def fused_kernel(weights: list, dtype: torch.dtype) -> FusedKernel | None:
    """A ``FusedKernel`` of ``weights`` (all of one ``in_features``) in ``dtype``, or None when no fused path takes
    them all alike (formats, group sizes, code widths differ, or neither kernel maps)."""
    if not weights or len({w.shape[1] for w in weights}) != 1:
        return None
    fused = FusedKernel(tuple(weights), dtype)
    return fused if fused.max_rows else None


def int4pack_max_rows(weight, dtype: torch.dtype) -> int:
    """Up to how many input rows ``linear`` takes torch's int4 kernel for ``weight`` in ``dtype`` (0: never)."""
    if not _maps_to_int4(weight):
        return 0
    return (INT4PACK_MAX_ROWS if _code_bits(weight) == 4 else INT8_SPLIT_MAX_ROWS).get(dtype, 0)


def _storage_device(weight) -> torch.device:
    """Where ``weight``'s packed tensors live: buffers, or frozen parameters once FSDP2 shards them
    (``train.distributed.quantized_storage_as_parameters``)."""
    return next(itertools.chain(weight.buffers(), weight.parameters())).device


def describe(weight, dtype: torch.dtype) -> str:
    """Which path ``linear`` takes for ``weight`` in ``dtype``, in words (``loraforge info``)."""
    device = _storage_device(weight)
    if device.type != "cpu":
        return "whole-layer dequantize + matmul"
    tiled = "tiled dequantize+matmul" if weight.tile_dequantizer() is not None else "whole-layer dequantize + matmul"
    paths = []
    if native_max_rows(weight, dtype):
        paths.append(f"native int8-activation kernel ({LOWBIT.library().available_isas()[0]}) up to "
                     f"{native_max_rows(weight, dtype)} tokens")
    limit = int4pack_max_rows(weight, dtype)
    if limit > native_max_rows(weight, dtype):
        paths.append(f"torch int4 kernel up to {limit} tokens")
    path = ", ".join([*paths, f"{tiled} above"]) if paths else tiled
    if _native_layout(weight) is not None and kernel_choice() == "native" and LOWBIT.library() is None:
        path += " (native kernel not built: see the warning)"
    return path


def _tiled_forward(weight, x: torch.Tensor, low_rank: LowRank | None = None) -> torch.Tensor:
    """``x (M, K) @ W.T`` with ``W`` dequantized in row tiles, each product written into its columns of the output:
    ``y[:, r] = x @ W[r].T``."""
    out_features, in_features = weight.shape
    tile = _tile_function(weight)
    if tile is None:
        return F.linear(x, native_dequant.plus(weight.dequantize(x.dtype), low_rank))
    step = max(1, TILE_ELEMENTS // in_features)
    everything = slice(0, in_features)
    if step >= out_features:  # one tile: the layer whole, and the very same op as a dense layer
        rows = slice(0, out_features)
        return F.linear(x, tile(rows, everything, x.dtype, workspace(out_features, in_features, x.dtype), low_rank))
    y = torch.empty(x.shape[0], out_features, dtype=x.dtype, device=x.device)
    for start in range(0, out_features, step):
        rows = slice(start, min(start + step, out_features))
        dense = tile(rows, everything, x.dtype, workspace(rows.stop - start, in_features, x.dtype),
                     _sliced(low_rank, rows=rows))
        torch.mm(x, dense.t(), out=y[:, rows])
    return y


def _tiled_input_grad(weight, grad_y: torch.Tensor, low_rank: LowRank | None = None, with_rank: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(grad_y (M, N) @ W, None)`` with ``W`` dequantized in column tiles, each product written into its columns of
    the result: ``g[:, c] = grad_y @ W[:, c]``. ``with_rank`` (and ``low_rank``) on a one-tile layer: ``grad_y @ b``
    too, from the same GEMM (:func:`input_grad_and_rank`), else None in its place."""
    out_features, in_features = weight.shape
    tile = _tile_function(weight)
    if tile is None:
        return grad_y @ native_dequant.plus(weight.dequantize(grad_y.dtype), low_rank), None
    align = weight.tile_columns
    step = max(align, TILE_ELEMENTS // out_features // align * align)
    everything = slice(0, out_features)
    if step >= in_features:
        cols = slice(0, in_features)
        rank = low_rank[0].shape[1] if with_rank and low_rank is not None else 0
        buffer = workspace(out_features, in_features + rank, grad_y.dtype)
        dense = tile(everything, cols, grad_y.dtype, buffer[:, :in_features], low_rank)
        if not rank:
            return grad_y @ dense, None
        if dense.data_ptr() != buffer.data_ptr():  # a decode that made its own tile (torch's)
            buffer[:, :in_features].copy_(dense)
        buffer[:, in_features:].copy_(low_rank[0])
        both = grad_y @ buffer
        return both[:, :in_features], both[:, in_features:]
    g = torch.empty(grad_y.shape[0], in_features, dtype=grad_y.dtype, device=grad_y.device)
    for start in range(0, in_features, step):
        cols = slice(start, min(start + step, in_features))
        dense = tile(everything, cols, grad_y.dtype, workspace(out_features, cols.stop - start, grad_y.dtype),
                     _sliced(low_rank, cols=cols))
        torch.mm(grad_y, dense, out=g[:, cols])
    return g, None


class Int4Pack:
    """A weight (or several of one input, stacked along ``out_features``) in torch's int4 CPU kernel layout.

    4-bit codes are one part; 8-bit codes ``u = 16·hi + lo`` are two, the high and the low nibbles, whose
    products add up to the weight's (``_parts``). Each part holds its packed codes; its ``(groups, out, 2)``
    scales-and-zeros are built per compute dtype on first use from ``weights`` (so no fp32 copy is kept
    beside the bf16 one that a bf16 engine uses).
    """

    def __init__(self, weights: tuple, codes: tuple[torch.Tensor, ...], group_size: int):
        self.weights = weights
        self.codes = codes
        self.group_size = group_size
        self.out_features = sum(w.shape[0] for w in weights)
        self.scales_and_zeros: dict[torch.dtype, tuple[torch.Tensor, ...]] = {}

    def for_dtype(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Each part's scales-and-zeros in ``dtype``."""
        if dtype not in self.scales_and_zeros:
            per_weight = [[pair for _, pair in _parts(w, codes=False)] for w in self.weights]
            self.scales_and_zeros[dtype] = tuple(torch.cat(pairs, dim=1).to(dtype).contiguous()
                                                 for pairs in zip(*per_weight))
        return self.scales_and_zeros[dtype]

    def mm(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows (M, in) @ W.T`` -> ``(M, out_features)`` in ``rows.dtype``."""
        rows = rows.contiguous()
        pairs = self.for_dtype(rows.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.codes[0], self.group_size, pairs[0])
        for codes, pair in zip(self.codes[1:], pairs[1:]):
            y += torch.ops.aten._weight_int4pack_mm_for_cpu(rows, codes, self.group_size, pair)
        return y


def _int4pack(weight) -> Int4Pack | None:
    """The weight packed for ``_weight_int4pack_mm_for_cpu`` (built on first use and cached on the weight),
    or None where the format or shape doesn't map (kernel needs out_features % 16 == 0)."""
    cache = weight.__dict__.setdefault("_kernel_cache", {})
    device = _storage_device(weight)
    if cache.get("int4pack_device") != device:
        cache["int4pack"] = fused_int4pack([weight])
        cache["int4pack_device"] = device
    return cache["int4pack"]


def fused_int4pack(weights: list) -> Int4Pack | None:
    """One ``Int4Pack`` of ``weights`` (all of one ``in_features``) stacked along ``out_features``: their
    products in one kernel call per part (q/k/v, gate/up). None unless every weight maps onto the kernel
    with the same group size and code width."""
    if not weights or not all(_maps_to_int4(w) for w in weights):
        return None
    if len({(_group_size(w), _code_bits(w), w.shape[1]) for w in weights}) != 1:
        return None
    per_weight = [[codes for codes, _ in _parts(w, pairs=False)] for w in weights]
    packed = tuple(torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.cat(codes), 1) for codes in zip(*per_weight))
    return Int4Pack(tuple(weights), packed, _group_size(weights[0]))


def _code_bits(weight) -> int:
    """4 for formats with 4-bit codes (``int4_group_size``), 8 for Q8_0 and INT8."""
    return 4 if getattr(weight, "int4_group_size", None) is not None else 8


def _affine(weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(codes (out, in) in 0..2^bits − 1, scale, min, group_size)`` with ``w = scale·q + min``, fp32 scale and min
    ``(out, groups)``: the format's ``int4_affine`` (4-bit codes and INT8), or Q8_0's ``w = d·q`` with
    ``q + 128`` in 0..255 and ``min = −128·d``."""
    if getattr(weight, "format", None) == "q8_0":
        d = weight.d.float()
        return weight.codes().to(torch.int32) + 128, d, -128 * d, weight.group_size
    return weight.int4_affine()


def _parts(weight, codes: bool = True, pairs: bool = True) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """``[(4-bit codes (out, in) int32, scales-and-zeros (groups, out, 2) fp32)]`` per part: the kernel
    computes ``(c − 8)·s + z`` per part, and the parts' sum is ``scale·q + min``.

    One part for 4-bit codes (``s = scale``, ``z = min + 8·scale``); two for 8-bit codes ``q = 16·hi + lo``:
    ``hi`` with ``s = 16·scale``, ``z = 128·scale + min``, and ``lo`` with ``s = scale``, ``z = 8·scale``.
    """
    q, scale, low, _ = _affine(weight)
    q = q.to(torch.int32)
    if _code_bits(weight) == 4:
        split = [(q, scale, low + 8 * scale)]
    else:
        split = [(q >> 4, 16 * scale, 128 * scale + low), (q & 15, scale, 8 * scale)]
    return [(c if codes else None, torch.stack((s.t(), z.t()), dim=-1) if pairs else None) for c, s, z in split]


def _maps_to_int4(weight) -> bool:
    """Whether torch's int4 kernel can take ``weight``: 4-bit codes, or 8-bit codes (Q8_0, INT8) split into
    two 4-bit parts, in groups the kernel knows; and out_features % 16 == 0."""
    return _group_size(weight) in INT4PACK_GROUP_SIZES and weight.shape[0] % 16 == 0


def _group_size(weight) -> int | None:
    """The kernel's group size for ``weight``, or None where its codes are neither 4-bit nor Q8_0/INT8."""
    if getattr(weight, "format", None) in ("q8_0", "int8"):
        return weight.group_size
    return getattr(weight, "int4_group_size", None)
