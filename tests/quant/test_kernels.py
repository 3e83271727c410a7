"""quant/kernels.py: every matmul path (torch's int4 kernel, tiled dequantize-and-matmul, whole-layer fallback),
forward and input gradient, against the dense weight: gguf-py's dequantization for the GGUF block types, the
format's own ``dequantize`` (itself tested against bitsandbytes and gguf-py) for NF4/FP4 and INTk."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loraforge.quant import kernels
from loraforge.quant.base import QuantLinear
from loraforge.quant.blockwise4bit import Blockwise4bitWeight
from loraforge.quant.gguf_blocks import QUANTIZERS
from loraforge.quant.intk import quantize_intk
from tests.references import require

OUT, IN = 48, 256
"""Several row and column tiles with ``TILE_ELEMENTS = 2000`` (see ``small_tiles``), and ragged last tiles."""

FORMATS = {
    "int4-g32": lambda w: quantize_intk(w, 4, 32),
    "int4-g64": lambda w: quantize_intk(w, 4, 64),
    "int3-g128": lambda w: quantize_intk(w, 3, 128),
    "int8-g64": lambda w: quantize_intk(w, 8, 64),
    "nf4-dq": lambda w: Blockwise4bitWeight.from_dense(w, "nf4", 64, True),
    "fp4": lambda w: Blockwise4bitWeight.from_dense(w, "fp4", 128, False),
    **{name: QUANTIZERS[name] for name in ("q4_0", "q4_1", "q8_0")},
}
INT4_KERNEL = {"int4-g32", "int4-g64", "int3-g128", "q4_0", "q4_1", "int8-g64", "q8_0"}
"""Formats whose weights are ``scale·q + min`` with q < 16, or q < 256 as two 4-bit parts: torch's int4 kernel
takes them."""
INT8_SPLIT = {"int8-g64", "q8_0"}
"""Of those, the 8-bit formats: two 4-bit parts, and only in bf16 (``kernels.INT8_SPLIT_MAX_ROWS``)."""


def _weight(name: str, out: int = OUT, in_features: int = IN):
    torch.manual_seed(len(name))
    return FORMATS[name](torch.randn(out, in_features) * 0.05)


def _dense_reference(name: str, weight) -> torch.Tensor:
    """The dense fp64 weight: from gguf-py's dequantization of the file bytes for GGUF types, else ours."""
    if name.startswith("q"):
        gguf = require("gguf")
        raw = weight.to_gguf_bytes().numpy()
        return torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name.upper()]).astype(np.float64))
    return weight.dequantize().double()


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(kernels, "TILE_ELEMENTS", 2000)


def _tolerance(dtype: torch.dtype, reference: torch.Tensor) -> float:
    scale = float(reference.abs().amax())
    return (2e-6 if dtype == torch.float32 else 2e-2) * max(scale, 1.0)


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 33, 300])
def test_forward_and_input_grad_match_the_dense_weight(name, dtype, rows, small_tiles):
    weight = _weight(name)
    dense = _dense_reference(name, weight)
    x = torch.randn(rows, IN, dtype=dtype, requires_grad=True)
    y = weight.matmul(x)
    assert y.shape == (rows, OUT) and y.dtype == dtype and y.is_contiguous()
    expected = x.detach().double() @ dense.T
    assert (y.double() - expected).abs().max() <= _tolerance(dtype, expected)
    grad = torch.randn(rows, OUT, dtype=dtype)
    y.backward(grad)
    expected_grad = grad.double() @ dense
    assert x.grad.shape == x.shape and x.grad.dtype == dtype
    assert (x.grad.double() - expected_grad).abs().max() <= _tolerance(dtype, expected_grad)


@pytest.mark.parametrize("name", ["nf4-dq", "int4-g32", "q4_1"])
@pytest.mark.parametrize("tiles", ["one", "several"])
def test_the_input_grad_comes_with_the_gradients_rank_projection(name, tiles, monkeypatch):
    """``input_grad_and_rank`` gives ``g (W + s·b a)`` and ``g b`` (fp64 references); on a one-tile layer both are
    columns of one product (the r columns ride on the input gradient's GEMM), over several tiles ``g b`` is its own."""
    if tiles == "several":
        monkeypatch.setattr(kernels, "TILE_ELEMENTS", 2000)
    weight = _weight(name)
    dense = _dense_reference(name, weight)
    generator = torch.Generator().manual_seed(5)
    grad = torch.randn(70, OUT, generator=generator)
    b, a = torch.randn(OUT, 4, generator=generator), torch.randn(4, IN, generator=generator)
    grad_x, grad_rank = kernels.input_grad_and_rank(weight, grad, (b, a, 0.5))
    expected = grad.double() @ (dense + 0.5 * b.double() @ a.double())
    assert (grad_x.double() - expected).abs().max() <= _tolerance(torch.float32, expected)
    torch.testing.assert_close(grad_rank.double(), grad.double() @ b.double(), rtol=1e-5, atol=1e-5)
    one_product = grad_x.untyped_storage().data_ptr() == grad_rank.untyped_storage().data_ptr()
    assert one_product == (tiles == "one")


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_tiles_are_bit_identical_to_slices_of_the_dense_weight(name):
    weight = _weight(name)
    dense = weight.dequantize(torch.float32)
    tile = weight.tile_dequantizer()
    align = weight.tile_columns
    for rows, cols in [(slice(0, OUT), slice(0, IN)), (slice(5, 17), slice(align, 2 * align)),
                       (slice(47, 48), slice(IN - align, IN))]:
        assert torch.equal(tile(rows, cols, torch.float32), dense[rows, cols])
        assert torch.equal(tile(rows, cols, torch.bfloat16), weight.dequantize(torch.bfloat16)[rows, cols])


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_kernel_is_packed_once_for_decode_and_never_for_training_sizes(name, dtype):
    weight = _weight(name)
    many = kernels.INT4PACK_MAX_ROWS[dtype] + 1
    weight.matmul(torch.randn(2, many, IN, dtype=dtype))
    assert "_kernel_cache" not in weight.__dict__  # training-size inputs: no packed copy, no extra memory
    weight.matmul(torch.randn(1, IN, dtype=dtype))
    takes_kernel = name in INT4_KERNEL and dtype == torch.bfloat16  # fp32: INT4PACK_MAX_ROWS is 0 (measured)
    assert ("_kernel_cache" in weight.__dict__) == takes_kernel
    if not takes_kernel:
        return
    packed = weight._kernel_cache["int4pack"]
    assert len(packed.codes) == (2 if name in INT8_SPLIT else 1)
    codes = packed.codes
    weight.matmul(torch.randn(1, IN, dtype=dtype))
    assert weight._kernel_cache["int4pack"].codes is codes  # packed once, reused


@pytest.mark.parametrize("name", ["nf4-dq", "int4-g64", "q4_1"])
def test_a_kept_tile_decoder_follows_its_weights_tensors(name):
    """``kernels`` keeps each weight's tile decoder (and its slices) between calls: the products must still follow
    the weight when its tensors change in place (a state-dict load), are replaced (a buffer assigned), or belong
    to a deep copy that then changes."""
    weight = _weight(name)
    torch.manual_seed(9)
    other = FORMATS[name](torch.randn(OUT, IN) * 0.05)
    x = torch.randn(70, IN)
    b, a = torch.randn(OUT, 4) * 0.1, torch.randn(4, IN) * 0.1

    def check(w, reference):
        expected = x.double() @ (_dense_reference(name, reference) + 0.5 * b.double() @ a.double()).T
        y = kernels.linear(w, x, low_rank=(b, a, 0.5))
        assert (y.double() - expected).abs().max() <= _tolerance(torch.float32, expected)

    check(weight, weight)
    kept = kernels._tile_function(weight)
    assert kernels._tile_function(weight) is kept
    twin = copy.deepcopy(weight)
    twin.load_state_dict(other.state_dict())  # in place: the twin's own tensors
    check(twin, other)
    check(weight, weight)  # the original is untouched and its decoder still its own
    assert kernels._tile_function(weight) is kept
    weight.load_state_dict(other.state_dict())
    check(weight, other)
    name_of_codes = next(iter(weight._buffers))
    setattr(weight, name_of_codes, weight._buffers[name_of_codes].clone())  # a new tensor object: a new decoder
    assert kernels._tile_function(weight) is not kept
    check(weight, other)


def test_a_device_move_drops_what_the_kernels_kept_on_the_weight():
    """A moved layer's weight must not keep its old tensors alive through ``kernels``' per-weight caches."""
    layer = QuantLinear(_weight("nf4-dq"), None, torch.float32)
    layer(torch.randn(3, IN))  # the tiled path keeps the weight's tile decoder
    layer.qweight.matmul(torch.randn(1, IN, dtype=torch.bfloat16))  # NF4 has no int4 pack; keeps nothing more
    assert "_tile_function" in layer.qweight.__dict__
    layer.to("meta")
    assert not set(kernels.KEPT) & set(layer.qweight.__dict__)


def test_workspace_views_are_reused_and_follow_a_grown_buffer():
    small = kernels.workspace(3, 5, torch.float32)
    assert kernels.workspace(3, 5, torch.float32) is small
    assert kernels.workspace(5, 3, torch.float32).shape == (5, 3)
    grown = kernels.workspace(1000, 1000, torch.float32)
    again = kernels.workspace(3, 5, torch.float32)
    assert again.shape == (3, 5) and again.data_ptr() == grown.data_ptr()  # the old buffer's views are let go
    assert kernels.workspace(3, 5, torch.bfloat16).dtype == torch.bfloat16


def test_shapes_the_kernels_cannot_take_fall_back_and_stay_right(small_tiles):
    # out_features 40 is not a multiple of 16 (torch's int4 kernel); NF4 blocks of 64 cross the rows of a
    # (40, 96) weight, so it can't be tiled either and is dequantized whole.
    for weight in (quantize_intk(torch.randn(40, 96), 4, 32),
                   Blockwise4bitWeight.from_dense(torch.randn(40, 96), "nf4", 64, True)):
        dense = weight.dequantize().double()
        for rows in (1, 50):
            x = torch.randn(rows, 96, requires_grad=True)
            y = weight.matmul(x)
            assert torch.allclose(y.double(), x.detach().double() @ dense.T, atol=1e-5)
            y.sum().backward()
            assert torch.allclose(x.grad.double(), dense.sum(0).expand(rows, -1), atol=1e-5)
    assert weight.tile_dequantizer() is None


def test_quant_linear_keeps_leading_dims_and_adds_the_bias(small_tiles):
    weight = _weight("q4_1")
    bias = torch.randn(OUT)
    layer = QuantLinear(weight, bias, torch.float32)
    for tokens in (1, 20):
        x = torch.randn(2, tokens, IN)
        expected = F.linear(x.double(), _dense_reference("q4_1", weight), bias.double())
        assert torch.allclose(layer(x).double(), expected, atol=1e-5)


def test_summary_says_which_path_each_quantized_linear_takes(monkeypatch):
    from loraforge.models import tiny_model
    from loraforge.quant.quantize_model import quantize_model
    from loraforge.quant.summary import quant_summary

    monkeypatch.setattr(kernels, "KERNEL", "torch")  # the native kernel's own description: test_native_kernel.py
    nf4 = quantize_model(tiny_model("tiny-llama"), compute_dtype="fp32")
    assert quant_summary(nf4)["matmul_paths"] == {"tiled dequantize+matmul": 14}
    int4 = quantize_model(tiny_model("tiny-llama"), bits=4, type="int", block_size=32, compute_dtype="bf16")
    assert quant_summary(int4)["matmul_paths"] == {"torch int4 kernel up to 32 tokens, tiled dequantize+matmul above": 14}


@pytest.mark.parametrize("names", [("q4_1", "q4_1", "q4_1"), ("int4-g32", "int4-g32"), ("q8_0", "q8_0")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_fused_pack_multiplies_by_its_weights_stacked(names, dtype):
    """q/k/v-like weights of one input, of different out_features, packed as one: one kernel call per part gives
    each weight's product against its dense reference (gguf-py's dequantization for GGUF blocks)."""
    weights = [_weight(name, out) for name, out in zip(names, (48, 16, 32))]
    packed = kernels.fused_int4pack(weights)
    assert packed is not None and len(packed.codes) == (2 if names[0] in INT8_SPLIT else 1)
    x = torch.randn(3, IN, dtype=dtype)
    dense = torch.cat([_dense_reference(name, w) for name, w in zip(names, weights)])
    expected = x.double() @ dense.T
    y = packed.mm(x)
    assert y.shape == (3, dense.shape[0]) and y.dtype == dtype
    assert (y.double() - expected).abs().max() <= _tolerance(dtype, expected)


def test_weights_the_kernel_takes_differently_are_not_fused():
    assert kernels.fused_int4pack([_weight("q4_1"), _weight("q8_0")]) is None  # 4-bit and 8-bit codes
    assert kernels.fused_int4pack([_weight("int4-g32"), _weight("int4-g64")]) is None  # group sizes
    assert kernels.fused_int4pack([_weight("q4_1"), _weight("nf4-dq")]) is None  # NF4 has no packed kernel
