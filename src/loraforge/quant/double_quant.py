"""Double quantization: the per-block absmax of a 4-bit weight, itself stored in 8 bits.

This is QLoRA's trick for the quantization constants, in bitsandbytes' layout:

1. ``offset = absmax.mean()`` (fp32 scalar);
2. ``absmax - offset`` is cut into blocks of 256 values (the last block may be shorter); each block
   keeps its own fp32 absmax (``nested_absmax``) and stores every value, divided by that absmax, as
   the index of the (nearly, see ``quantize_blockwise_8bit``) nearest entry of the signed 8-bit
   dynamic map (``dynamic_map()``).

Dequantization is ``dynamic_map()[codes] * nested_absmax[block] + offset``, all in fp32.

Codes, ``nested_absmax`` and ``offset`` are byte-identical to ``state.absmax``, ``state.state2.absmax``
and ``state.offset`` of ``bitsandbytes.functional.quantize_4bit(..., compress_statistics=True)``.
"""

from __future__ import annotations

from functools import cache

import torch

from loraforge.native import DEQUANT

NESTED_BLOCK_SIZE = 256
"""Values per block of the nested 8-bit quantization (fixed, as in bitsandbytes)."""


@cache
def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map(signed=True)``): 256 sorted fp32 values,
    built once per device (dequantization reads it on every call).

    For k = 0..6 it holds ±10**(k-6) times the 2**k midpoints of ``linspace(0.1, 1, 2**k + 1)``
    (computed in fp32), plus 0 and 1. The range is [-0.99297, 1.0]: it is not symmetric.
    """
    values = [0.0, 1.0]
    for k in range(7):
        edges = torch.linspace(0.1, 1.0, 2**k + 1, dtype=torch.float32)
        magnitudes = 10.0 ** (k - 6) * ((edges[:-1] + edges[1:]) / 2)
        values += magnitudes.tolist() + (-magnitudes).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32).to(device)


_LUT_SIZE = 65536


@cache
def _nearest_code_table(device: torch.device) -> torch.Tensor:
    """``(65536,)`` int64, on ``device``: for each of 65536 evenly spaced points of [-1, 1], its dynamic-map code.

    Point ``i`` is ``-1 + 2*i / 65535`` (fp32); its code is the number of map midpoints strictly below
    it, so a point exactly on a midpoint takes the lower entry.
    """
    code = dynamic_map()
    midpoints = 0.5 * (code[:-1] + code[1:])
    points = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / (_LUT_SIZE - 1)
    return torch.searchsorted(midpoints, points, side="left").to(device)


def quantize_blockwise_8bit(
    values: torch.Tensor, block_size: int = NESTED_BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 1-D tensor to dynamic-map codes in blocks of ``block_size``.

    Args:
        values: ``(n,)`` float tensor (cast to fp32).
        block_size: values per block; the last block may be shorter.

    Returns:
        ``codes`` ``(n,)`` uint8 and ``absmax`` ``(ceil(n / block_size),)`` fp32.

    The rounding is bitsandbytes' CPU rule, kept exactly so that the codes match it byte for byte:
    each value is multiplied by ``1 / absmax`` (fp32), clamped to [-1, 1], snapped to the nearest of
    65536 evenly spaced points (``trunc(((v + 1) * 0.5) * 65535 + 0.5)`` in fp32), and that point's
    nearest map entry is taken (``_nearest_code_table``). This is the nearest entry except within about
    1.5e-5 of a midpoint. A block whose absmax is 0 gets code 0 throughout.
    """
    flat = values.reshape(-1).float()
    n = flat.numel()
    n_blocks = -(-n // block_size)
    padded = torch.nn.functional.pad(flat, (0, n_blocks * block_size - n)).view(n_blocks, block_size)
    absmax = padded.abs().amax(dim=1)
    empty = absmax == 0
    inverse = (1.0 / absmax).masked_fill_(empty, 0.0)
    scaled = (padded * inverse[:, None]).clamp_(-1.0, 1.0)
    point = ((scaled + 1.0) * 0.5 * (_LUT_SIZE - 1) + 0.5).to(torch.int32)
    codes = _nearest_code_table(values.device)[point].masked_fill_(empty[:, None], 0)
    return codes.view(-1)[:n].to(torch.uint8), absmax


def dequantize_blockwise_8bit(
    codes: torch.Tensor, absmax: torch.Tensor, block_size: int = NESTED_BLOCK_SIZE
) -> torch.Tensor:
    """Inverse of ``quantize_blockwise_8bit``: ``(n,)`` uint8 codes -> ``(n,)`` fp32 values."""
    values = dynamic_map(codes.device).index_select(0, codes.to(torch.int32).reshape(-1))
    full = values.numel() // block_size * block_size  # blocks of block_size, then a shorter last one
    values[:full].view(-1, block_size).mul_(absmax[: full // block_size, None])
    if full < values.numel():
        values[full:].mul_(absmax[-1])
    return values


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize the fp32 per-block absmax of a 4-bit weight.

    Returns ``(codes, nested_absmax, offset)``: ``(n,)`` uint8, ``(ceil(n / 256),)`` fp32 and a 0-dim fp32.
    """
    offset = absmax.float().mean()
    codes, nested_absmax = quantize_blockwise_8bit(absmax.float() - offset)
    return codes, nested_absmax, offset


def double_dequantize(codes: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Inverse of ``double_quantize``: the ``(n,)`` fp32 absmax, rounded through 8 bits (on CPU in one native pass,
    ``native.DEQUANT``, with the same roundings)."""
    if codes.device.type == "cpu" and DEQUANT.library() is not None:
        return DEQUANT.library().double_dequantize(codes, nested_absmax, offset, dynamic_map())
    return dequantize_blockwise_8bit(codes, nested_absmax).add_(offset)
