"""The 8-bit dynamic blockwise quantization behind double quantization, against bitsandbytes' CPU path."""

import pytest
import torch
from references import require

from loraforge.quant.double_quant import (
    double_dequantize,
    double_quantize,
    dequantize_blockwise_8bit,
    dynamic_map,
    quantize_blockwise_8bit,
)

bnb = require("bitsandbytes")
bnbF = bnb.functional


def test_dynamic_map_is_bitsandbytes():
    assert torch.equal(dynamic_map(), bnbF.create_dynamic_map(signed=True))


def awkward_values(generator: torch.Generator, n: int) -> torch.Tensor:
    """Map entries, midpoints, points of the 65536-step grid and their fp32 neighbours, a zero block."""
    code = dynamic_map()
    midpoints = (code[:-1] + code[1:]) / 2
    grid = -1.0 + 2.0 * torch.arange(65536, dtype=torch.float32) / 65535
    pool = torch.cat([code, midpoints, grid[torch.randint(0, 65536, (2000,), generator=generator)]])
    pool = torch.cat([pool, pool.nextafter(torch.tensor(2.0)), pool.nextafter(torch.tensor(-2.0))])
    values = pool[torch.randint(0, pool.numel(), (n,), generator=generator)]
    values[::256] = 1.0  # each block's absmax is 1, so the values reach the rounding as they are
    values[256:512] = 0.0
    return values


@pytest.mark.parametrize("n", [1, 255, 256, 1000, 2051])
def test_codes_and_dequantization_match_bitsandbytes(n):
    generator = torch.Generator().manual_seed(n)
    for values in (torch.randn(n, generator=generator) * 3.0, awkward_values(generator, n)):
        reference_codes, state = bnbF.quantize_blockwise(values, blocksize=256)
        codes, absmax = quantize_blockwise_8bit(values)
        assert torch.equal(codes, reference_codes)
        assert torch.equal(absmax, state.absmax)
        assert torch.equal(dequantize_blockwise_8bit(codes, absmax), bnbF.dequantize_blockwise(reference_codes, state))


def test_double_quantize_matches_bitsandbytes_state():
    weight = torch.randn(3000 * 64, generator=torch.Generator().manual_seed(0))
    _, plain = bnbF.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    _, nested = bnbF.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    codes, nested_absmax, offset = double_quantize(plain.absmax)
    assert torch.equal(codes, nested.absmax)
    assert torch.equal(nested_absmax, nested.state2.absmax)
    assert torch.equal(offset, nested.offset)
    reference_absmax = bnbF.dequantize_blockwise(nested.absmax, nested.state2) + nested.offset
    assert torch.equal(double_dequantize(codes, nested_absmax, offset), reference_absmax)


def test_equal_absmax_everywhere_gives_code_zero_and_exact_decode():
    absmax = torch.full((10,), 0.25)
    codes, nested_absmax, offset = double_quantize(absmax)
    assert codes.tolist() == [0] * 10
    assert nested_absmax.tolist() == [0.0]
    assert torch.equal(double_dequantize(codes, nested_absmax, offset), absmax)
