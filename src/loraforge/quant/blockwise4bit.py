"""Blockwise 4-bit NF4 and FP4 weights, in bitsandbytes' storage layout (QLoRA's base-weight format).

Layout, for a weight of ``n`` elements and block size ``B`` (``B`` divides ``n``):

- the weight is flattened row-major and cut into ``n / B`` blocks of ``B`` consecutive elements
  (blocks may cross row boundaries, as in bitsandbytes);
- ``absmax``: ``(n / B,)`` fp32, the largest ``|w|`` of each block;
- each element becomes the 4-bit code of the nearest entry of a 16-value table (``NF4_CODE`` or
  ``FP4_CODE``) to ``w / absmax``;
- ``packed``: ``(n / 2,)`` uint8, two codes per byte, the first element in the HIGH nibble
  (the opposite of GGUF);
- with double quantization, ``absmax`` is itself stored in 8 bits (``double_quant.py``).

The packed bytes, absmax and nested constants are byte-identical to
``bitsandbytes.functional.quantize_4bit(w, blocksize=B, quant_type=..., compress_statistics=...)``
on CPU (bitsandbytes 0.50), for fp32, fp16 and bf16 input, and ``dequantize`` equals its
``dequantize_4bit``. (Its CPU dequantization kernel misreads absmax when a block crosses a row
boundary, e.g. a (40, 192) weight with block 128; its quantization, its CUDA kernel and this module
treat the weight as flat.) bitsandbytes is only a test reference: nothing here imports it.

Everything is plain device-agnostic torch: it runs on CPU and, unchanged, on CUDA. ``matmul`` dequantizes
this one layer (on CPU a tile at a time, ``kernels``) and multiplies in the input's dtype; autograd never
keeps the dense weight (``base.quantized_matmul``).
"""

from __future__ import annotations

from functools import cache

import torch
from torch import nn

from loraforge.quant import native_dequant
from loraforge.quant.base import quantized_matmul
from loraforge.quant.double_quant import (
    NESTED_BLOCK_SIZE,
    double_dequantize,
    double_quantize,
)

NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
"""NormalFloat4: quantiles of N(0, 1) scaled to [-1, 1], indexed by 4-bit code (exact fp32 values)."""

FP4_CODE = (
    0.0,
    0.0052083334885537624,
    0.6666666865348816,
    1.0,
    0.3333333432674408,
    0.5,
    0.1666666716337204,
    0.25,
    -0.0,
    -0.0052083334885537624,
    -0.6666666865348816,
    -1.0,
    -0.3333333432674408,
    -0.5,
    -0.1666666716337204,
    -0.25,
)
"""bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit; values 0, 0.0625, 2, 3, 4, 6, 8, 12 divided
by 12) indexed by 4-bit code: bit 3 is the sign. Exact fp32 values of ``get_4bit_type('fp4')``."""

FP4_CODES_BY_VALUE = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)
"""FP4 codes in ascending value order, with +0 (code 0) ranked before -0 (code 8) as bitsandbytes'
CPU path ranks them. Hence values in (-0.0026, 0] get code 0 and values in (0, 0.0026] get code 8;
both decode to 0."""

FORMATS = ("nf4", "fp4")
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
"""bitsandbytes' block sizes; any of them gives files that bitsandbytes reads as-is."""

_CHUNK_ELEMENTS = 1 << 20
"""Elements quantized per step, so that temporaries stay small next to the weight itself."""


@cache
def _codebook(quant_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values, midpoints, codes_by_value)``: the 16 fp32 values by code, the 15 fp32 midpoints between
    value-sorted entries, and the 16 codes (uint8) in value order."""
    if quant_type == "nf4":
        values = torch.tensor(NF4_CODE, dtype=torch.float32)
        by_value = torch.arange(16)
    else:
        values = torch.tensor(FP4_CODE, dtype=torch.float32)
        by_value = torch.tensor(FP4_CODES_BY_VALUE)
    ascending = values[by_value]
    midpoints = (ascending[:-1] + ascending[1:]) / 2
    return values, midpoints, by_value.to(torch.uint8)


@cache
def _byte_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """``(256,)`` int64 on ``device``: for each packed byte, the fp32 pair (high-nibble value, low-nibble value) it
    decodes to, its 8 bytes seen as one int64. A 1-D gather of 8-byte elements decodes two weights per byte
    with no nibble unpacking; on CPU it takes about half the time of gathering the rows of a ``(256, 2)`` fp32
    table."""
    values = _codebook(quant_type)[0]
    byte = torch.arange(256)
    pairs = torch.stack([values[byte >> 4], values[byte & 0xF]], dim=1).contiguous()
    return pairs.view(torch.int64).view(256).to(device)


def _check_format(quant_type: str, block_size: int) -> None:
    if quant_type not in FORMATS:
        raise ValueError(f"unknown 4-bit format {quant_type!r}; expected one of {FORMATS}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")


def quantize_4bit(
    weight: torch.Tensor, block_size: int = 64, quant_type: str = "nf4"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float tensor to packed 4-bit codes with one fp32 absmax per block.

    Args:
        weight: any shape, fp32/fp16/bf16; ``block_size`` must divide ``weight.numel()``.
        block_size: elements per block (see ``BLOCK_SIZES``).
        quant_type: ``"nf4"`` or ``"fp4"``.

    Returns:
        ``packed`` ``(numel / 2,)`` uint8 (first element of each pair in the high nibble) and
        ``absmax`` ``(numel / block_size,)`` fp32.

    Raises:
        ValueError: unknown ``quant_type``, unsupported ``block_size``, or one that does not divide the
            element count.

    Each element is multiplied by ``1 / absmax`` in fp32 (a zero block uses ``1 / 1e-38``), clamped to
    [-1, 1], and takes the nearest code; a value exactly on a midpoint between two entries takes the
    lower one. These are bitsandbytes' CPU rules.
    """
    _check_format(quant_type, block_size)
    n = weight.numel()
    if n % block_size:
        raise ValueError(
            f"block_size {block_size} does not divide the element count {n} of a {tuple(weight.shape)} tensor"
        )
    _, midpoints, by_value = _codebook(quant_type)
    midpoints, by_value = midpoints.to(weight.device), by_value.to(weight.device)
    blocks = weight.detach().reshape(-1, block_size)
    packed = torch.empty(n // 2, dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(n // block_size, dtype=torch.float32, device=weight.device)
    rows = max(1, _CHUNK_ELEMENTS // block_size)
    half = block_size // 2
    for start in range(0, blocks.shape[0], rows):
        chunk = blocks[start : start + rows].float()  # (rows, block_size)
        chunk_absmax = chunk.abs().amax(dim=1)
        scaled = (chunk * (1.0 / chunk_absmax.clamp(min=1e-38))[:, None]).clamp_(-1.0, 1.0)
        codes = by_value[torch.bucketize(scaled, midpoints, out_int32=True)]
        packed[start * half : (start + chunk.shape[0]) * half] = ((codes[:, 0::2] << 4) | codes[:, 1::2]).view(-1)
        absmax[start : start + chunk.shape[0]] = chunk_absmax
    return packed, absmax


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...],
    block_size: int = 64,
    quant_type: str = "nf4",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of ``quantize_4bit``: ``code_value * absmax`` in fp32, then cast to ``dtype``.

    Args:
        packed: ``(numel / 2,)`` uint8.
        absmax: ``(numel / block_size,)`` fp32.
        shape: the dense shape to return.

    Returns:
        A ``shape`` tensor of ``dtype`` on ``packed``'s device.
    """
    pairs = _byte_table(quant_type, packed.device).index_select(0, packed.to(torch.int32).reshape(-1))
    values = pairs.view(torch.float32).view(-1, block_size)
    values.mul_(absmax.reshape(-1, 1))
    return values.view(shape).to(dtype)


class Blockwise4bitWeight(nn.Module):
    """A frozen NF4 or FP4 weight, optionally with double-quantized absmax; meets ``QuantizedWeight``.

    Buffers (all in bitsandbytes' layout):

    - ``packed`` ``(out * in / 2,)`` uint8;
    - without double quantization: ``absmax`` ``(n_blocks,)`` fp32;
    - with it: ``absmax_codes`` ``(n_blocks,)`` uint8, ``nested_absmax`` ``(ceil(n_blocks / 256),)`` fp32
      and ``absmax_offset`` ``()`` fp32.

    Build one with ``from_dense`` (quantize) or ``from_tensors`` (load).
    """

    def __init__(
        self,
        format: str,
        shape: tuple[int, int],
        block_size: int,
        packed: torch.Tensor,
        absmax: torch.Tensor | None = None,
        absmax_codes: torch.Tensor | None = None,
        nested_absmax: torch.Tensor | None = None,
        absmax_offset: torch.Tensor | None = None,
    ):
        super().__init__()
        _check_format(format, block_size)
        self.format = format
        self._shape = (int(shape[0]), int(shape[1]))
        self.block_size = block_size
        self.double_quant = absmax is None
        self.register_buffer("packed", packed)
        if self.double_quant:
            self.register_buffer("absmax_codes", absmax_codes)
            self.register_buffer("nested_absmax", nested_absmax)
            self.register_buffer("absmax_offset", absmax_offset)
        else:
            self.register_buffer("absmax", absmax)

    @classmethod
    def from_dense(
        cls, weight: torch.Tensor, format: str = "nf4", block_size: int = 64, double_quant: bool = True
    ) -> Blockwise4bitWeight:
        """Quantize a dense ``(out_features, in_features)`` weight (fp32, fp16 or bf16)."""
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-D (out_features, in_features) weight, got shape {tuple(weight.shape)}")
        packed, absmax = quantize_4bit(weight, block_size, format)
        if not double_quant:
            return cls(format, tuple(weight.shape), block_size, packed, absmax=absmax)
        codes, nested_absmax, offset = double_quantize(absmax)
        return cls(
            format,
            tuple(weight.shape),
            block_size,
            packed,
            absmax_codes=codes,
            nested_absmax=nested_absmax,
            absmax_offset=offset,
        )

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    def block_absmax(self) -> torch.Tensor:
        """The ``(n_blocks,)`` fp32 absmax, decoded from its 8-bit form under double quantization."""
        if self.double_quant:
            return double_dequantize(self.absmax_codes, self.nested_absmax, self.absmax_offset)
        return self.absmax

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight in ``dtype``."""
        tile = self.tile_dequantizer()
        if tile is not None and native_dequant.runs(self.packed, dtype):
            return tile(slice(0, self._shape[0]), slice(0, self._shape[1]), dtype)
        return dequantize_4bit(self.packed, self.block_absmax(), self._shape, self.block_size, self.format, dtype)

    @property
    def tile_columns(self) -> int:
        return self.block_size

    def tile_dequantizer(self):
        """``(rows, cols, dtype[, out, fold]) -> dense tile`` for ``kernels``; ``cols`` aligned to ``block_size``. None
        when blocks cross rows (``block_size`` doesn't divide ``in_features``). On CPU the native decode
        (``native_dequant``) writes the tile in one pass, decoding a double-quantized absmax block by block as it goes;
        torch's decode (other devices) decodes the absmax once for all tiles."""
        out, in_features = self._shape
        if in_features % self.block_size:
            return None
        packed = self.packed.view(out, in_features // 2)
        bs = self.block_size
        blocks = in_features // bs
        table = _codebook(self.format)[0]
        stored = (self.absmax_codes if self.double_quant else self.absmax).view(-1, blocks)  # as kept: codes or fp32
        absmax = None  # torch's decode: the decoded absmax, on first use

        @native_dequant.last_slices
        def views(rows: slice, cols: slice) -> tuple:
            groups = slice(cols.start // bs, cols.stop // bs)
            nested = (self.nested_absmax, self.absmax_offset, (rows.start or 0) * blocks + groups.start
                      ) if self.double_quant else None
            return packed[rows, cols.start // 2 : cols.stop // 2], stored[rows, groups], nested, groups

        def tile(rows: slice, cols: slice, dtype: torch.dtype, out: torch.Tensor | None = None,
                 fold: native_dequant.Fold | None = None) -> torch.Tensor:
            nonlocal absmax
            codes, scale, nested, groups = views(rows, cols)
            shape = (codes.shape[0], cols.stop - cols.start)
            if native_dequant.runs(codes, dtype):
                return native_dequant.decode(codes, scale, "high_first", bs, dtype, shape[1], table=table, out=out,
                                             fold=fold, double_quant=nested)
            if absmax is None:
                absmax = self.block_absmax().view(-1, blocks)
            return native_dequant.plus(dequantize_4bit(codes, absmax[rows, groups], shape, bs, self.format, dtype), fold)

        return tile

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` in ``x.dtype``: ``(..., in_features)`` -> ``(..., out_features)`` (``kernels`` picks the
        path: a tiled dequantize-and-matmul on CPU; NF4/FP4 levels don't fit torch's int4 kernel)."""
        return quantized_matmul(self, x)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed codes and quantization constants (the shared code tables not counted)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The buffers by name, for safetensors."""
        return dict(self.named_buffers())

    @property
    def meta(self) -> dict:
        """What ``from_tensors`` needs besides the tensors; json-able."""
        return {
            "format": self.format,
            "shape": list(self._shape),
            "block_size": self.block_size,
            "double_quant": self.double_quant,
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> Blockwise4bitWeight:
        """Rebuild from ``tensors()`` and ``meta``; raises ``ValueError`` on a missing or mis-sized tensor."""
        shape, block_size = tuple(meta["shape"]), int(meta["block_size"])
        n = shape[0] * shape[1]
        n_blocks = n // block_size
        expected = {"packed": ((n // 2,), torch.uint8)}
        if meta["double_quant"]:
            expected["absmax_codes"] = ((n_blocks,), torch.uint8)
            expected["nested_absmax"] = ((-(-n_blocks // NESTED_BLOCK_SIZE),), torch.float32)
            expected["absmax_offset"] = ((), torch.float32)
        else:
            expected["absmax"] = ((n_blocks,), torch.float32)
        problems = []
        for name, (size, dtype) in expected.items():
            tensor = tensors.get(name)
            if tensor is None:
                problems.append(f"missing tensor {name!r}")
            elif tuple(tensor.shape) != size or tensor.dtype != dtype:
                problems.append(f"{name!r} is {tuple(tensor.shape)} {tensor.dtype}, expected {size} {dtype}")
        if problems:
            raise ValueError(f"bad {meta['format']} weight of shape {shape}: " + "; ".join(problems))
        return cls(meta["format"], shape, block_size, **{name: tensors[name] for name in expected})

    def extra_repr(self) -> str:
        return (
            f"format={self.format}, shape={self._shape}, block_size={self.block_size}, "
            f"double_quant={self.double_quant}"
        )
