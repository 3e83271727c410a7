"""Group-wise asymmetric INTk (k = 2, 3, 4, 8): QA-LoRA's base weight format.

Each row is cut into groups of ``group_size`` (32, 64 or 128) consecutive weights along
``in_features``. A group stores k-bit codes q in 0..2^k−1 and two fp16 constants, ``scale`` and
``min``; its weights are ``w = scale·q + min`` (computed in fp32). ``min`` is ``−scale·zero`` in the
zero-point convention, and the term a QA-LoRA merge changes.

With k = 4 and group 32 this is GGUF's Q4_1 exactly (d = scale, m = min), and any k ≤ 4 maps onto
Q4_1 without loss (codes below 2^k fit in a nibble; a group of 64 or 128 spans 2 or 4 blocks).

Packing: every 8 codes of a row form one little-endian ``8·k``-bit word (code j at bit ``k·j``),
stored as k bytes, so ``codes`` is uint8 ``(out, in·k/8)``.
"""

from __future__ import annotations

import torch
from torch import nn

from loraforge.quant import native_dequant
from loraforge.quant.base import quantized_matmul
from loraforge.quant.gguf_blocks import BLOCK_SIZE, Q4_1Weight, pack_nibbles

BITS = (2, 3, 4, 8)
_NATIVE_LAYOUTS = {2: "int2", 3: "int3", 4: "low_first", 8: "u8"}
"""Code bits -> ``native_dequant.LAYOUTS`` entry."""
GROUP_SIZES = (32, 64, 128)


class IntKWeight(nn.Module):
    """Packed INTk codes with per-group fp16 ``scale`` and ``min``; see the module docstring.

    Buffers: ``codes`` uint8 ``(out, in·bits/8)``, ``scale`` and ``min`` fp16 ``(out, in/group_size)``.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, min: torch.Tensor, bits: int, group_size: int):
        super().__init__()
        _check_choice(bits, group_size)
        out, n_groups = scale.shape
        in_features = n_groups * group_size
        if codes.dtype != torch.uint8 or tuple(codes.shape) != (out, in_features * bits // 8):
            raise ValueError(f"int{bits}: codes must be uint8 of shape {(out, in_features * bits // 8)}, got {codes.dtype} {tuple(codes.shape)}")
        if scale.dtype != torch.float16 or min.dtype != torch.float16 or min.shape != scale.shape:
            raise ValueError(f"int{bits}: scale and min must both be fp16 of shape {(out, n_groups)}")
        self.bits = bits
        self.group_size = group_size
        self.format = f"int{bits}"
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("min", min.contiguous())

    @property
    def shape(self) -> tuple[int, int]:
        out, n_groups = self.scale.shape
        return out, n_groups * self.group_size

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.min))

    def unpacked_codes(self) -> torch.Tensor:
        """Codes ``(out, in)`` uint8 in 0..2^bits−1."""
        return unpack_codes(self.codes, self.bits)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, in_features = self.shape
        return self.tile_dequantizer()(slice(0, out), slice(0, in_features), dtype)

    @property
    def tile_columns(self) -> int:
        return self.group_size

    def tile_dequantizer(self):
        """``(rows, cols, dtype[, out, fold]) -> dense tile`` for ``kernels``; ``cols`` aligned to ``group_size``. On CPU the native
        decode (``native_dequant``) writes the tile in one pass. The tile's slices of the codes, scales and mins are
        made once for a tile asked again (``native_dequant.last_slices``)."""
        group = self.group_size

        @native_dequant.last_slices
        def views(rows: slice, cols: slice) -> tuple:
            groups = slice(cols.start // group, cols.stop // group)
            codes = self.codes[rows, cols.start * self.bits // 8 : cols.stop * self.bits // 8]
            return codes, self.scale[rows, groups], self.min[rows, groups]

        def tile(rows: slice, cols: slice, dtype: torch.dtype, out: torch.Tensor | None = None,
                 fold: native_dequant.Fold | None = None) -> torch.Tensor:
            codes, scale, low = views(rows, cols)
            if native_dequant.runs(codes, dtype):
                return native_dequant.decode(codes, scale, _NATIVE_LAYOUTS[self.bits], group, dtype, cols.stop - cols.start,
                                             min=low, out=out, fold=fold)
            q = unpack_codes(codes, self.bits).reshape(codes.shape[0], -1, group)
            w = torch.addcmul(low.float()[..., None], scale.float()[..., None], q)  # one pass, one buffer
            return native_dequant.plus(w.reshape(codes.shape[0], -1).to(dtype), fold)

        return tile

    @property
    def int4_group_size(self) -> int | None:
        """The group size for torch's int4 kernel (``kernels``); None for INT8, whose codes don't fit 4 bits."""
        return self.group_size if self.bits <= 4 else None

    def int4_affine(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """``(codes (out, in), scale, min, group_size)`` with ``w = scale·q + min`` for torch's int4 kernel."""
        return self.unpacked_codes(), self.scale.float(), self.min.float(), self.group_size

    def to_q4_1(self) -> Q4_1Weight:
        """The same weights as GGUF Q4_1 blocks (bits ≤ 4): d = scale, m = min, repeated over the
        ``group_size / 32`` blocks of each group; codes below 2^bits fit a nibble unchanged.

        Raises:
            ValueError: for 8-bit codes, which don't fit in 4 bits.
        """
        if self.bits > 4:
            raise ValueError(f"int{self.bits} codes don't fit Q4_1's 4 bits; only INT2/3/4 map onto Q4_1 exactly")
        out, in_features = self.shape
        repeat = self.group_size // BLOCK_SIZE
        codes = self.unpacked_codes().reshape(out, in_features // BLOCK_SIZE, BLOCK_SIZE)
        return Q4_1Weight(
            d=self.scale.repeat_interleave(repeat, dim=1),
            m=self.min.repeat_interleave(repeat, dim=1),
            qs=pack_nibbles(codes),
        )

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for ``x`` ``(..., in)`` in ``x.dtype`` (``kernels`` picks the path)."""
        return quantized_matmul(self, x)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "scale": self.scale, "min": self.min}

    @property
    def meta(self) -> dict:
        """What ``from_tensors`` needs besides the tensors (json-serialisable)."""
        return {"format": self.format, "bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> IntKWeight:
        return cls(tensors["codes"], tensors["scale"], tensors["min"], int(meta["bits"]), int(meta["group_size"]))

    def extra_repr(self) -> str:
        out, in_features = self.shape
        return f"out_features={out}, in_features={in_features}, bits={self.bits}, group_size={self.group_size}"


def quantize_intk(weight: torch.Tensor, bits: int = 4, group_size: int = 32, name: str = "weight") -> IntKWeight:
    """Round-to-nearest group-wise asymmetric quantization of ``weight`` ``(out, in)``.

    Per group: ``min`` and ``scale = (max − min) / (2^bits − 1)`` are rounded to fp16 first, and the
    codes are ``clamp(round((w − min₁₆) / scale₁₆), 0, 2^bits − 1)``, so that they are the nearest codes
    for the constants actually stored. A constant group gets scale 0 and codes 0.

    Args:
        weight: ``(out_features, in_features)`` float tensor.
        bits: 2, 3, 4 or 8.
        group_size: 32, 64 or 128; must divide ``in_features``.
        name: the layer's module path, named in errors.

    Raises:
        ValueError: an unsupported ``bits``/``group_size``, or a ``group_size`` that doesn't divide
            ``in_features`` (the message names ``name``).
    """
    _check_choice(bits, group_size)
    if weight.dim() != 2:
        raise ValueError(f"{name}: INTk quantization needs a 2-D weight, got shape {tuple(weight.shape)}")
    out, in_features = weight.shape
    if in_features % group_size:
        divisors = [g for g in GROUP_SIZES if in_features % g == 0]
        hint = f"use group_size {divisors}" if divisors else "leave this layer unquantized (exclude it)"
        raise ValueError(
            f"{name}: group_size {group_size} does not divide in_features {in_features}; {hint}"
        )
    groups = weight.detach().float().reshape(out, -1, group_size)
    levels = 2**bits - 1
    low = groups.amin(dim=-1).half()
    scale = ((groups.amax(dim=-1) - low.float()) / levels).half()
    inverse = torch.where(scale == 0, torch.zeros_like(scale, dtype=torch.float32), 1 / scale.float())
    q = torch.round((groups - low.float()[..., None]) * inverse[..., None]).clamp(0, levels)
    return IntKWeight(pack_codes(q.reshape(out, in_features).to(torch.uint8), bits), scale, low, bits, group_size)


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``(..., n)`` with n a multiple of 8 -> packed uint8 ``(..., n·bits/8)``."""
    if bits == 8:
        return q.to(torch.uint8).contiguous()
    words = q.to(torch.int32).reshape(*q.shape[:-1], -1, 8)
    shifts = torch.arange(8, dtype=torch.int32, device=q.device) * bits
    word = (words << shifts).sum(dim=-1, dtype=torch.int32)
    byte_shifts = torch.arange(bits, dtype=torch.int32, device=q.device) * 8
    packed = (word[..., None] >> byte_shifts) & 0xFF
    return packed.to(torch.uint8).reshape(*q.shape[:-1], -1)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of :func:`pack_codes`: packed ``(..., n·bits/8)`` -> uint8 codes ``(..., n)``."""
    if bits == 8:
        return packed
    if bits == 4:  # the same layout, read a byte at a time: code 2j in byte j's low nibble, 2j+1 in its high
        return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)
    byte_shifts = torch.arange(bits, dtype=torch.int32, device=packed.device) * 8
    word = (packed.to(torch.int32).reshape(*packed.shape[:-1], -1, bits) << byte_shifts).sum(dim=-1, dtype=torch.int32)
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device) * bits
    q = (word[..., None] >> shifts) & (2**bits - 1)
    return q.to(torch.uint8).reshape(*packed.shape[:-1], -1)


def _check_choice(bits: int, group_size: int) -> None:
    if bits not in BITS:
        raise ValueError(f"INTk bits must be one of {list(BITS)}, got {bits!r}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"INTk group_size must be one of {list(GROUP_SIZES)}, got {group_size!r}")
