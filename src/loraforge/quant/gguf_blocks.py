"""GGUF's Q4_0, Q4_1 and Q8_0 blocks as quantized weight formats (ggml-common.h layout).

Each block holds 32 consecutive weights of one row (blocks run along ``in_features``):

======  =====  ============================================  ==================
type    bytes  layout                                        value
======  =====  ============================================  ==================
Q4_0    18     fp16 d, 16 bytes of nibbles                   d·(q − 8)
Q4_1    20     fp16 d, fp16 m, 16 bytes of nibbles           d·q + m
Q8_0    34     fp16 d, 32 int8                               d·q
======  =====  ============================================  ==================

Nibble byte j holds element j in its LOW nibble and element j+16 in its HIGH nibble.

A weight keeps the block fields as separate buffers (``d`` ``(out, n_blocks)`` fp16, ``m`` likewise,
``qs`` ``(out, n_blocks, 16|32)``) and converts to and from the file's raw bytes ``(out, n_blocks ·
bytes)`` without touching a value, so a weight read from a GGUF file writes back byte for byte.
Dequantization is done in fp32 exactly as ggml does (``d * q + m``), and the quantizers reproduce
ggml's reference quantizers (``quantize_row_q4_0_ref`` & co.) bit for bit.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from loraforge.quant import native_dequant
from loraforge.quant.base import quantized_matmul

BLOCK_SIZE = 32
"""Weights per GGUF block, for every type here."""


class GGUFBlockWeight(nn.Module):
    """Shared machinery of the three block types; see the module docstring for the layouts.

    Subclasses set ``format``, ``type_size`` and ``fields`` (name, dtype, count per block), in the
    order the fields sit in a block.
    """

    format: ClassVar[str]
    type_size: ClassVar[int]
    fields: ClassVar[tuple[tuple[str, torch.dtype, int], ...]]
    native_layout: ClassVar[tuple[str, int]]
    """``(native_dequant.LAYOUTS entry, code offset)`` of the native decode; a field ``m`` is added as the min."""
    group_size = BLOCK_SIZE

    def __init__(self, **tensors: torch.Tensor):
        super().__init__()
        out, n_blocks = tensors["d"].shape
        for name, dtype, count in self.fields:
            tensor = tensors[name]
            expected = (out, n_blocks) if count == 1 else (out, n_blocks, count)
            if tensor.dtype != dtype or tuple(tensor.shape) != expected:
                raise ValueError(
                    f"{self.format}: field {name!r} must be {dtype} of shape {expected}, "
                    f"got {tensor.dtype} {tuple(tensor.shape)}"
                )
            self.register_buffer(name, tensor.contiguous())

    @property
    def shape(self) -> tuple[int, int]:
        out, n_blocks = self.d.shape
        return out, n_blocks * BLOCK_SIZE

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, name).numel() * getattr(self, name).element_size() for name, _, _ in self.fields)

    def codes(self) -> torch.Tensor:
        """Unpacked codes ``(out, in)`` as stored (0..15 for Q4_x, int8 for Q8_0)."""
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, in_features = self.shape
        return self.tile_dequantizer()(slice(0, out), slice(0, in_features), dtype)

    tile_columns = BLOCK_SIZE

    def tile_dequantizer(self):
        """``(rows, cols, dtype[, out, fold]) -> dense tile`` for ``kernels``; ``cols`` aligned to the block size. On CPU the native
        decode (``native_dequant``) writes the tile in one pass. The tile's slices of the block fields are made once
        for a tile asked again (``native_dequant.last_slices``)."""

        @native_dequant.last_slices
        def views(rows: slice, cols: slice) -> tuple:
            blocks = slice(cols.start // BLOCK_SIZE, cols.stop // BLOCK_SIZE)
            return ({name: getattr(self, name)[rows, blocks] for name, _, _ in self.fields},)

        def tile(rows: slice, cols: slice, dtype: torch.dtype, out: torch.Tensor | None = None,
                 fold: native_dequant.Fold | None = None) -> torch.Tensor:
            (fields,) = views(rows, cols)
            if native_dequant.runs(fields["qs"], dtype):
                layout, offset = self.native_layout
                return native_dequant.decode(fields["qs"], fields["d"], layout, BLOCK_SIZE, dtype, cols.stop - cols.start,
                                             min=fields.get("m"), offset=offset, out=out, fold=fold)
            w = self._block_values(**fields)
            return native_dequant.plus(w.reshape(w.shape[0], -1).to(dtype), fold)

        return tile

    def _block_values(self, **fields: torch.Tensor) -> torch.Tensor:
        """fp32 ``(rows, blocks, 32)`` weights from block fields ``(rows, blocks[, count])``, as ggml computes them."""
        raise NotImplementedError

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for ``x`` ``(..., in)`` in ``x.dtype`` (``kernels`` picks the path)."""
        return quantized_matmul(self, x)

    def select_rows(self, index: torch.Tensor) -> GGUFBlockWeight:
        """A weight of the same type whose row i is row ``index[i]`` of this one; no block changes."""
        return type(self)(**{name: getattr(self, name)[index] for name, _, _ in self.fields})

    def tensors(self) -> dict[str, torch.Tensor]:
        """The block fields by name, for a safetensors round trip with :meth:`from_tensors`."""
        return {name: getattr(self, name) for name, _, _ in self.fields}

    @property
    def meta(self) -> dict:
        """What ``from_tensors`` needs besides the tensors (json-serialisable)."""
        return {"format": self.format}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> GGUFBlockWeight:
        return cls(**{name: tensors[name] for name, _, _ in cls.fields})

    @classmethod
    def from_gguf_bytes(cls, raw: torch.Tensor, shape: tuple[int, int]) -> GGUFBlockWeight:
        """Split a GGUF tensor's raw bytes into block fields, without changing a bit.

        Args:
            raw: uint8, ``(out, n_blocks · type_size)`` or flat with that many bytes.
            shape: ``(out_features, in_features)`` of the weight; ``in_features`` must be a multiple of 32.

        Raises:
            ValueError: ``in_features`` is not a multiple of 32, or ``raw`` has the wrong byte count.
        """
        out, in_features = shape
        if in_features % BLOCK_SIZE:
            raise ValueError(f"{cls.format}: in_features {in_features} is not a multiple of the block size {BLOCK_SIZE}")
        n_blocks = in_features // BLOCK_SIZE
        if raw.dtype != torch.uint8 or raw.numel() != out * n_blocks * cls.type_size:
            raise ValueError(
                f"{cls.format}: a ({out}, {in_features}) weight needs {out * n_blocks * cls.type_size} bytes, "
                f"got {raw.numel()} ({raw.dtype})"
            )
        blocks = raw.reshape(out, n_blocks, cls.type_size)
        tensors, start = {}, 0
        for name, dtype, count in cls.fields:
            width = count * torch.empty((), dtype=dtype).element_size()
            field = blocks[..., start : start + width].contiguous().view(dtype)
            tensors[name] = field.reshape(out, n_blocks) if count == 1 else field
            start += width
        return cls(**tensors)

    def to_gguf_bytes(self) -> torch.Tensor:
        """The raw GGUF bytes, uint8 ``(out, n_blocks · type_size)``."""
        out, n_blocks = self.d.shape
        parts = [getattr(self, name).reshape(out, n_blocks, -1).view(torch.uint8) for name, _, _ in self.fields]
        return torch.cat(parts, dim=-1).reshape(out, n_blocks * self.type_size)

    def extra_repr(self) -> str:
        out, in_features = self.shape
        return f"out_features={out}, in_features={in_features}"


class Q4_0Weight(GGUFBlockWeight):
    """Q4_0: ``w = d·(q − 8)``, q in 0..15, one fp16 ``d`` per 32 weights."""

    format = "q4_0"
    type_size = 18
    fields = (("d", torch.float16, 1), ("qs", torch.uint8, 16))
    native_layout = ("split16", 8)
    int4_group_size = BLOCK_SIZE
    """Torch's int4 kernel takes these blocks (``kernels``)."""

    def codes(self) -> torch.Tensor:
        return unpack_nibbles(self.qs).reshape(self.shape)

    def to_q4_1(self) -> Q4_1Weight:
        """The same weights as Q4_1: ``d·(q − 8) = d·q + m`` with ``m = −8d`` (exact in fp16 and fp32)."""
        return Q4_1Weight(d=self.d, m=(self.d.float() * -8).half(), qs=self.qs)

    def _block_values(self, d: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
        q = unpack_nibbles(qs).view(torch.int8).sub_(8)  # codes < 16, so the int8 view is exact
        return torch.mul(d.float()[..., None], q)  # int8 -> fp32 inside the multiply: one pass, one buffer

    def int4_affine(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """``(codes, scale, min, 32)`` with ``w = scale·q + min`` for ``kernels``: scale d, min −8d."""
        d = self.d.float()
        return self.codes(), d, -8 * d, BLOCK_SIZE


class Q4_1Weight(GGUFBlockWeight):
    """Q4_1: ``w = d·q + m``, q in 0..15, fp16 ``d`` and ``m`` per 32 weights."""

    format = "q4_1"
    type_size = 20
    fields = (("d", torch.float16, 1), ("m", torch.float16, 1), ("qs", torch.uint8, 16))
    native_layout = ("split16", 0)
    int4_group_size = BLOCK_SIZE
    """Torch's int4 kernel takes these blocks (``kernels``)."""

    def codes(self) -> torch.Tensor:
        return unpack_nibbles(self.qs).reshape(self.shape)

    def _block_values(self, d: torch.Tensor, m: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
        w = torch.mul(d.float()[..., None], unpack_nibbles(qs))  # uint8 -> fp32 inside the multiply
        return w.add_(m.float()[..., None])  # then + m, rounded separately as ggml does (no fused multiply-add)

    def int4_affine(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """``(codes, scale, min, 32)`` with ``w = scale·q + min`` for ``kernels``: scale d, min m."""
        return self.codes(), self.d.float(), self.m.float(), BLOCK_SIZE


class Q8_0Weight(GGUFBlockWeight):
    """Q8_0: ``w = d·q``, q int8, one fp16 ``d`` per 32 weights."""

    format = "q8_0"
    type_size = 34
    fields = (("d", torch.float16, 1), ("qs", torch.int8, 32))
    native_layout = ("s8", 0)

    def codes(self) -> torch.Tensor:
        return self.qs.reshape(self.shape)

    def _block_values(self, d: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
        return qs.float() * d.float()[..., None]


BLOCK_FORMATS: dict[str, type[GGUFBlockWeight]] = {"q4_0": Q4_0Weight, "q4_1": Q4_1Weight, "q8_0": Q8_0Weight}
"""Format name (lower case, as in ``GGMLQuantizationType[name.upper()]``) -> weight class."""


def unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """``(..., 16)`` packed bytes -> ``(..., 32)`` uint8 codes: low nibbles are elements 0..15, high 16..31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """``(..., 32)`` codes in 0..15 -> ``(..., 16)`` bytes; the inverse of :func:`unpack_nibbles`."""
    q = q.to(torch.uint8)
    return q[..., :16] | (q[..., 16:] << 4)


def _blocks(weight: torch.Tensor) -> torch.Tensor:
    """``(out, in)`` -> fp32 ``(out, n_blocks, 32)``, with a clear error when ``in`` isn't a multiple of 32."""
    if weight.dim() != 2 or weight.shape[1] % BLOCK_SIZE:
        raise ValueError(
            f"GGUF block quantization needs a 2-D weight whose in_features is a multiple of {BLOCK_SIZE}; "
            f"got shape {tuple(weight.shape)}"
        )
    return weight.detach().float().reshape(weight.shape[0], -1, BLOCK_SIZE)


def _reciprocal(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def quantize_q4_0(weight: torch.Tensor) -> Q4_0Weight:
    """Round ``weight`` ``(out, in)`` to Q4_0 as ggml's ``quantize_row_q4_0_ref`` does.

    ``d = v / −8`` where ``v`` is the block's value of largest magnitude (sign kept), and
    ``q = min(15, trunc(x / d + 8.5))``.
    """
    blocks = _blocks(weight)
    imax = blocks.abs().argmax(dim=-1, keepdim=True)
    d = torch.take_along_dim(blocks, imax, dim=-1) / -8
    q = torch.trunc(blocks * _reciprocal(d) + 8.5).clamp(0, 15)
    return Q4_0Weight(d=d[..., 0].half(), qs=pack_nibbles(q))


def quantize_q4_1(weight: torch.Tensor) -> Q4_1Weight:
    """Round ``weight`` ``(out, in)`` to Q4_1 as ggml's ``quantize_row_q4_1_ref`` does.

    ``d = (max − min) / 15``, ``m = min``, ``q = min(15, trunc((x − min) / d + 0.5))``, with the fp32
    ``d`` and ``min`` used for the codes and their fp16 roundings stored.
    """
    blocks = _blocks(weight)
    low = blocks.amin(dim=-1, keepdim=True)
    d = (blocks.amax(dim=-1, keepdim=True) - low) / 15
    q = torch.trunc((blocks - low) * _reciprocal(d) + 0.5).clamp(0, 15)
    return Q4_1Weight(d=d[..., 0].half(), m=low[..., 0].half(), qs=pack_nibbles(q))


def quantize_q8_0(weight: torch.Tensor) -> Q8_0Weight:
    """Round ``weight`` ``(out, in)`` to Q8_0 as ggml's ``quantize_row_q8_0_ref`` does.

    ``d = absmax / 127`` and ``q = roundf(x / d)`` (halves away from zero).
    """
    blocks = _blocks(weight)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    scaled = (blocks * _reciprocal(d)).abs()
    whole = torch.floor(scaled)
    # floor(|x| + 0.5) would round |x| = 0.5 − 2⁻²⁵ up in fp32; this form is exact, as ggml's roundf is.
    q = torch.sign(blocks) * (whole + torch.floor(2 * (scaled - whole)))
    return Q8_0Weight(d=d[..., 0].half(), qs=q.to(torch.int8))


QUANTIZERS = {"q4_0": quantize_q4_0, "q4_1": quantize_q4_1, "q8_0": quantize_q8_0}
"""Format name -> round-to-nearest quantizer ``(out, in) tensor -> weight``."""
