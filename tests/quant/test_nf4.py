"""NF4/FP4 blockwise weights: byte-identical to bitsandbytes' CPU path, and the QuantLinear built on them."""

import copy

import pytest
import torch
from references import require

from loraforge.quant.base import QuantizedWeight, QuantLinear
from loraforge.quant.blockwise4bit import FP4_CODE, NF4_CODE, Blockwise4bitWeight, dequantize_4bit, quantize_4bit

bnb = require("bitsandbytes")
bnbF = bnb.functional

# (rows, cols, block_size): square, odd last dimension, blocks crossing rows, large blocks.
SHAPES = [(64, 64, 64), (96, 33, 32), (40, 192, 128), (24, 96, 256), (12, 1024, 4096)]


def reference(weight, block_size, quant_type, double_quant):
    packed, state = bnbF.quantize_4bit(
        weight, blocksize=block_size, quant_type=quant_type, compress_statistics=double_quant
    )
    return packed.flatten(), state


def reference_dequantize(packed, state):
    """bitsandbytes' ``dequantize_4bit``, asked for one block per row and reshaped.

    Its CPU kernel (0.50) reads the wrong absmax when a block crosses a row boundary, e.g. (40, 192) with
    block 128, although its ``quantize_4bit`` (and its CUDA kernel) treat the weight as flat; with one
    block per row the CPU kernel gives the flat result.
    """
    block_size = state.blocksize
    blocks = copy.copy(state)
    blocks.shape = torch.Size([state.shape.numel() // block_size, block_size])
    return bnbF.dequantize_4bit(packed.view(-1, 1), blocks).view(state.shape)


def assert_matches_reference(ours: Blockwise4bitWeight, packed, state):
    assert torch.equal(ours.packed, packed)
    if ours.double_quant:
        assert torch.equal(ours.absmax_codes, state.absmax)
        assert torch.equal(ours.nested_absmax, state.state2.absmax)
        assert torch.equal(ours.absmax_offset, state.offset)
    else:
        assert torch.equal(ours.absmax, state.absmax)


def test_code_tables_are_bitsandbytes():
    assert torch.equal(torch.tensor(NF4_CODE), bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(torch.tensor(FP4_CODE), bnbF.get_4bit_type("fp4", device="cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bytes_and_dequantization_match_bitsandbytes(quant_type, double_quant, dtype):
    generator = torch.Generator().manual_seed(0)
    for rows, cols, block_size in SHAPES:
        weight = (torch.randn(rows, cols, generator=generator) * 0.02).to(dtype)
        packed, state = reference(weight, block_size, quant_type, double_quant)
        ours = Blockwise4bitWeight.from_dense(weight, quant_type, block_size, double_quant)
        assert_matches_reference(ours, packed, state)
        assert torch.equal(ours.dequantize(dtype), reference_dequantize(packed, state))
        if cols % block_size == 0:
            assert torch.equal(ours.dequantize(dtype), bnbF.dequantize_4bit(packed.view(-1, 1), state))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_ties_zero_blocks_and_signed_zeros_match_bitsandbytes(quant_type):
    """Values exactly on midpoints between codes, their fp32 neighbours, a zero block, tiny values of both signs."""
    codes = torch.tensor(NF4_CODE if quant_type == "nf4" else FP4_CODE).sort().values
    midpoints = (codes[:-1] + codes[1:]) / 2
    edges = torch.cat([midpoints, midpoints.nextafter(torch.tensor(2.0)), midpoints.nextafter(torch.tensor(-2.0))])
    tiny = torch.tensor([1e-4, -1e-4, 0.0, -0.0, 0.0026, -0.0026, 1e-30, -1e-30])
    block = torch.cat([torch.tensor([1.0]), edges, tiny, codes, codes.neg()])
    block = torch.cat([block, torch.zeros(128 - block.numel())])
    weight = torch.stack([block, block * 3.0, torch.zeros(128), block.flip(0) * -0.5])
    packed, state = reference(weight, 128, quant_type, double_quant=False)
    ours = Blockwise4bitWeight.from_dense(weight, quant_type, 128, double_quant=False)
    assert_matches_reference(ours, packed, state)
    assert torch.equal(ours.dequantize(), bnbF.dequantize_4bit(packed.view(-1, 1), state))


def test_first_element_goes_in_the_high_nibble():
    weight = torch.tensor([[-1.0, 1.0] + [0.0] * 62])
    packed, _ = quantize_4bit(weight, 64, "nf4")
    assert packed[0].item() == (0 << 4) | 15
    assert packed[1].item() == (7 << 4) | 7


def test_dequantize_4bit_takes_any_dtype_and_shape():
    weight = torch.randn(32, 16)
    packed, absmax = quantize_4bit(weight, 64, "nf4")
    dense = dequantize_4bit(packed, absmax, (32, 16), 64, "nf4", torch.float32)
    assert dense.shape == (32, 16)
    assert torch.equal(dequantize_4bit(packed, absmax, (32, 16), 64, "nf4", torch.bfloat16), dense.to(torch.bfloat16))
    assert (dense - weight).abs().max() <= weight.abs().max() * 0.2


def test_quant_linear_matches_bitsandbytes_linear4bit():
    generator = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(48, 64, generator=generator) * 0.05, torch.randn(48, generator=generator)
    reference_layer = bnb.nn.Linear4bit(64, 48, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    reference_layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4", blocksize=64)
    reference_layer.bias = torch.nn.Parameter(bias.clone())
    reference_layer = reference_layer.to("cpu")
    layer = QuantLinear(Blockwise4bitWeight.from_dense(weight, "nf4", 64, double_quant=True), bias, torch.float32)
    assert torch.equal(layer.qweight.packed, reference_layer.weight.data.flatten())
    x = torch.randn(3, 5, 64, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference_layer(x))


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_forward_is_linear_with_dequantized_weight(compute_dtype):
    generator = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(32, 64, generator=generator), torch.randn(32, generator=generator)
    layer = QuantLinear(Blockwise4bitWeight.from_dense(weight, "fp4", 32, double_quant=True), bias, compute_dtype)
    x = torch.randn(2, 7, 64, generator=generator)
    dense = layer.qweight.dequantize(compute_dtype)
    expected = (torch.nn.functional.linear(x.to(compute_dtype), dense) + bias.to(compute_dtype)).to(x.dtype)
    assert torch.equal(layer(x), expected)


def test_backward_reaches_the_input_without_saving_the_dense_weight():
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(32, 64, generator=generator)
    layer = QuantLinear(Blockwise4bitWeight.from_dense(weight, "nf4", 64), None, torch.float32)
    x = torch.randn(4, 64, generator=generator, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = layer(x * 2.0)
    out.square().sum().backward()
    assert torch.Size([32, 64]) not in saved
    dense_x = x.detach().clone().requires_grad_()
    torch.nn.functional.linear(dense_x * 2.0, layer.qweight.dequantize()).square().sum().backward()
    torch.testing.assert_close(x.grad, dense_x.grad)


def test_dtype_casts_leave_quantization_constants_alone():
    layer = QuantLinear(Blockwise4bitWeight.from_dense(torch.randn(16, 64), "nf4", 64), torch.randn(16), torch.float32)
    before = layer.qweight.dequantize()
    layer.to(torch.bfloat16)
    layer.half()
    assert layer.qweight.nested_absmax.dtype == torch.float32
    assert layer.bias.dtype == torch.float32
    assert torch.equal(layer.qweight.dequantize(), before)


@pytest.mark.parametrize("double_quant", [False, True])
def test_tensors_round_trip(double_quant):
    weight = Blockwise4bitWeight.from_dense(torch.randn(24, 64), "fp4", 32, double_quant)
    rebuilt = Blockwise4bitWeight.from_tensors(weight.tensors(), weight.meta)
    assert isinstance(rebuilt, QuantizedWeight)
    assert rebuilt.meta == weight.meta
    assert torch.equal(rebuilt.dequantize(), weight.dequantize())
    assert rebuilt.nbytes == weight.nbytes


def test_from_tensors_names_the_bad_tensor():
    weight = Blockwise4bitWeight.from_dense(torch.randn(24, 64), "nf4", 64)
    tensors = weight.tensors()
    tensors["packed"] = tensors["packed"][:-1]
    del tensors["absmax_offset"]
    with pytest.raises(ValueError, match=r"'packed' is \(767,\).*missing tensor 'absmax_offset'"):
        Blockwise4bitWeight.from_tensors(tensors, weight.meta)


def test_nf4_double_quant_costs_about_4_127_bits_per_parameter():
    """Counted: 4 bits of code + 8/64 of absmax code + 32/(64*256) of nested absmax + one 32-bit offset."""
    n = 1024 * 1024
    weight = Blockwise4bitWeight.from_dense(torch.randn(1024, 1024), "nf4", 64, double_quant=True)
    assert weight.nbytes == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4
    assert 8 * weight.nbytes / n == pytest.approx(4.127, abs=5e-4)
    single = Blockwise4bitWeight.from_dense(torch.randn(1024, 1024), "nf4", 64, double_quant=False)
    assert 8 * single.nbytes / n == 4.5


def test_bad_block_size_and_format():
    with pytest.raises(ValueError, match="does not divide the element count 96"):
        quantize_4bit(torch.randn(3, 32), 64)
    with pytest.raises(ValueError, match="block_size must be one of"):
        quantize_4bit(torch.randn(3, 32), 48)
    with pytest.raises(ValueError, match="unknown 4-bit format 'nf3'"):
        quantize_4bit(torch.randn(2, 32), 32, "nf3")
