"""Low-bit matmuls for frozen quantized weights: what ``QuantizedWeight.matmul`` runs.

Two CPU paths, chosen per call by the number of input rows (tokens) ``M``:

- **int4 kernel** (``M ≤ INT4PACK_MAX_ROWS[dtype]``, decode-size inputs): torch's group-wise int4 CPU kernel
  ``aten._weight_int4pack_mm_for_cpu``, for formats whose weights are ``scale·q + min`` with 4-bit ``q``
  per group along ``in_features`` (INT2/3/4 of any group size, GGUF Q4_0 and Q4_1). The kernel computes
  ``(q − 8)·s + z``, so ``s = scale`` and ``z = min + 8·scale`` (in fp32 the error against the fp32
  dequantized weight is a rounding of ``z``, ~1e-7 relative; in bf16 ``s`` and ``z`` are rounded to bf16,
  where the other path rounds each dequantized weight: both ~4e-3 relative). Its weight is packed once, on the first call
  that uses it, and kept: the packed codes cost as much as the format's own codes (4 bits per weight) plus
  ``2·32/group_size`` bits per weight of scales-and-zeros in the input's dtype (fp32 g32: 2 more bits).
  Training never takes this path (``M`` is batch × sequence), so it never pays that memory.
- **tiled dequantize-and-matmul** (every other case, and formats the kernel can't take: NF4/FP4, whose
  16 levels are not evenly spaced, and Q8_0, whose per-32-block scales don't fit
  ``aten._weight_int8pack_mm``'s one scale per output row). The weight is dequantized ``TILE_ELEMENTS`` at
  a time, each tile multiplied while it is still in cache and then dropped: the dense layer never exists
  whole, nothing outlives the call, and no large buffer is allocated (a fresh multi-MB buffer per layer
  costs page faults on every call and leaves pages that glibc keeps).

The backward needs only the input's gradient ``grad_y @ W`` (the base weight is frozen); it dequantizes
in column tiles the same way. Other devices (CUDA) dequantize the layer whole and call ``F.linear``.

Thresholds (``INT4PACK_MAX_ROWS``) come from ``benchmarks/quant_kernels.py`` (BENCHMARKS.md, "Low-bit
matmul kernels"): in fp32 torch's int4 kernel costs time in proportion to the rows and only wins for one
row (single-sequence decode); in bf16 it wins up to a few dozen.

A weight format takes part by providing:

- ``tile_dequantizer()``: a function ``(rows: slice, cols: slice, dtype) -> (rows, cols)`` dense tile,
  bit-identical to the same slice of ``dequantize(dtype)``, or None when the layout can't be tiled;
  ``tile_columns`` (int): the column alignment tiles need (group or block size);
- optionally ``int4_group_size`` (the group size, or None where the format's codes don't fit 4 bits) and
  ``int4_affine()``: ``(codes (out, in) uint8 in 0..15, scale (out, groups) fp32, min (out, groups) fp32,
  group_size)`` with ``w = scale·q + min``.
"""

from __future__ import annotations

import itertools

from dataclasses import dataclass

import torch
import torch.nn.functional as F

TILE_ELEMENTS = 1 << 20
"""Weights dequantized per tile: 4 MiB in fp32, so that a tile stays in cache (L3) while it is multiplied, and few
enough tiles that the per-op overhead stays small."""

INT4PACK_MAX_ROWS = {torch.float32: 1, torch.bfloat16: 32, torch.float16: 1}
"""Largest number of input rows for which torch's int4 CPU kernel beats the tiled path, by compute dtype
(measured; see the module docstring)."""

INT4PACK_GROUP_SIZES = (32, 64, 128, 256)


def linear(weight, x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` for ``x`` ``(..., in_features)`` in ``x.dtype`` -> ``(..., out_features)``; no autograd."""
    out_features, in_features = weight.shape
    rows = x.reshape(-1, in_features)
    if x.device.type != "cpu":
        return F.linear(x, weight.dequantize(x.dtype))
    packed = _int4pack(weight, x.dtype) if rows.shape[0] <= INT4PACK_MAX_ROWS.get(x.dtype, 0) else None
    if packed is not None:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows.contiguous(), packed.codes, packed.group_size,
                                                       packed.scales_and_zeros[x.dtype])
    else:
        y = _tiled_forward(weight, rows)
    return y.reshape(*x.shape[:-1], out_features)


def input_grad(weight, grad_y: torch.Tensor) -> torch.Tensor:
    """``grad_y @ W`` for ``grad_y`` ``(..., out_features)`` -> ``(..., in_features)``: the backward of
    :func:`linear` with respect to its input."""
    out_features, in_features = weight.shape
    if grad_y.device.type != "cpu":
        return grad_y @ weight.dequantize(grad_y.dtype)
    rows = grad_y.reshape(-1, out_features)
    return _tiled_input_grad(weight, rows).reshape(*grad_y.shape[:-1], in_features)


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
    limit = INT4PACK_MAX_ROWS.get(dtype, 0)
    if limit and _maps_to_int4(weight):
        return f"torch int4 kernel up to {limit} tokens, {tiled} above"
    return tiled


def _tiled_forward(weight, x: torch.Tensor) -> torch.Tensor:
    """``x (M, K) @ W.T`` with ``W`` dequantized in row tiles: ``y.T[r] = W[r] @ x.T``."""
    out_features, in_features = weight.shape
    tile = weight.tile_dequantizer()
    if tile is None:
        return F.linear(x, weight.dequantize(x.dtype))
    step = max(1, TILE_ELEMENTS // in_features)
    if step >= out_features:  # one tile: the layer whole, and the very same op as a dense layer
        return F.linear(x, tile(slice(0, out_features), slice(0, in_features), x.dtype))
    y_t = torch.empty(out_features, x.shape[0], dtype=x.dtype, device=x.device)
    x_t, everything = x.t(), slice(0, in_features)
    for start in range(0, out_features, step):
        rows = slice(start, min(start + step, out_features))
        torch.mm(tile(rows, everything, x.dtype), x_t, out=y_t[rows])
    return y_t.t().contiguous()


def _tiled_input_grad(weight, grad_y: torch.Tensor) -> torch.Tensor:
    """``grad_y (M, N) @ W`` with ``W`` dequantized in column tiles: ``g.T[c] = W[:, c].T @ grad_y.T``."""
    out_features, in_features = weight.shape
    tile = weight.tile_dequantizer()
    if tile is None:
        return grad_y @ weight.dequantize(grad_y.dtype)
    align = weight.tile_columns
    step = max(align, TILE_ELEMENTS // out_features // align * align)
    if step >= in_features:
        return grad_y @ tile(slice(0, out_features), slice(0, in_features), grad_y.dtype)
    g_t = torch.empty(in_features, grad_y.shape[0], dtype=grad_y.dtype, device=grad_y.device)
    grad_t, everything = grad_y.t(), slice(0, out_features)
    for start in range(0, in_features, step):
        cols = slice(start, min(start + step, in_features))
        torch.mm(tile(everything, cols, grad_y.dtype).t(), grad_t, out=g_t[cols])
    return g_t.t().contiguous()


@dataclass
class Int4Pack:
    """A weight in torch's int4 CPU kernel layout: packed codes, and ``(groups, out, 2)`` scales-and-zeros
    by compute dtype (fp32 always; other dtypes cast from it on first use)."""

    codes: torch.Tensor
    group_size: int
    scales_and_zeros: dict

    def for_dtype(self, dtype: torch.dtype) -> Int4Pack:
        if dtype not in self.scales_and_zeros:
            self.scales_and_zeros[dtype] = self.scales_and_zeros[torch.float32].to(dtype)
        return self


def _int4pack(weight, dtype: torch.dtype) -> Int4Pack | None:
    """The weight packed for ``_weight_int4pack_mm_for_cpu`` (built on first use and cached on the weight),
    or None where the format or shape doesn't map (kernel needs out_features % 16 == 0)."""
    cache = weight.__dict__.setdefault("_kernel_cache", {})
    device = _storage_device(weight)
    if cache.get("int4pack_device") != device:
        cache["int4pack"] = _pack_int4(weight)
        cache["int4pack_device"] = device
    packed = cache["int4pack"]
    return None if packed is None else packed.for_dtype(dtype)


def _maps_to_int4(weight) -> bool:
    """Whether torch's int4 kernel can take ``weight`` (format, group size, out_features % 16 == 0)."""
    group_size = getattr(weight, "int4_group_size", None)
    return group_size in INT4PACK_GROUP_SIZES and weight.shape[0] % 16 == 0


def _pack_int4(weight) -> Int4Pack | None:
    if not _maps_to_int4(weight):
        return None
    codes, scale, low, group_size = weight.int4_affine()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    pair = torch.stack((scale.t(), (low + 8 * scale).t()), dim=-1).contiguous()  # (groups, out, 2)
    return Int4Pack(packed, group_size, {torch.float32: pair})
