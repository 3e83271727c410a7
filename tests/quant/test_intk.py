"""Group-wise asymmetric INTk: packing, round-to-nearest, errors, and the exact map onto Q4_1."""

import pytest
import torch

from loraforge.quant.base import QuantizedWeight, QuantLinear
from loraforge.quant.gguf_blocks import Q4_1Weight, pack_nibbles
from loraforge.quant.intk import IntKWeight, pack_codes, quantize_intk, unpack_codes


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_roundtrip(bits):
    q = torch.randint(0, 2**bits, (3, 5, 64), dtype=torch.uint8)
    packed = pack_codes(q, bits)
    assert packed.shape == (3, 5, 64 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), q)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_round_to_nearest_error_is_at_most_half_a_step(bits, group_size):
    torch.manual_seed(bits * group_size)
    w = torch.randn(16, 256)
    qw = quantize_intk(w, bits, group_size)
    assert isinstance(qw, QuantizedWeight) and qw.shape == (16, 256) and qw.format == f"int{bits}"
    assert qw.nbytes == 16 * 256 * bits // 8 + 2 * 2 * 16 * (256 // group_size)
    step = qw.scale.float().repeat_interleave(group_size, dim=1)
    err = (qw.dequantize() - w).abs()
    # half a step, plus the fp16 rounding of min and of the top of the range
    slack = 1e-3 * w.abs().amax()
    assert (err <= step / 2 + slack).all()
    codes = qw.unpacked_codes()
    assert int(codes.max()) <= 2**bits - 1


def test_constant_group_is_exact_with_zero_scale():
    w = torch.full((2, 64), 0.25)
    qw = quantize_intk(w, 4, 32)
    assert (qw.scale == 0).all()
    assert torch.equal(qw.dequantize(), w)


def test_group_size_not_dividing_in_features_names_the_layer():
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj: group_size 64 does not divide in_features 96"):
        quantize_intk(torch.randn(4, 96), 4, 64, name="model.layers.0.mlp.down_proj")


@pytest.mark.parametrize("bad", [dict(bits=5), dict(group_size=16)])
def test_unsupported_choices_are_refused(bad):
    with pytest.raises(ValueError, match="must be one of"):
        quantize_intk(torch.randn(4, 64), **{"bits": 4, "group_size": 32, **bad})


def test_int4_group32_is_q4_1_bit_for_bit():
    torch.manual_seed(0)
    qw = quantize_intk(torch.randn(8, 96), 4, 32)
    as_q4_1 = Q4_1Weight(d=qw.scale, m=qw.min, qs=pack_nibbles(qw.unpacked_codes().reshape(8, 3, 32)))
    assert torch.equal(as_q4_1.dequantize(), qw.dequantize())


def test_safetensors_roundtrip_and_quant_linear(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    qw = quantize_intk(torch.randn(8, 64), 3, 32)
    save_file(qw.tensors(), tmp_path / "w.safetensors")
    again = IntKWeight.from_tensors(load_file(tmp_path / "w.safetensors"), qw.meta)
    assert torch.equal(again.dequantize(), qw.dequantize())
    layer = QuantLinear(again, None, torch.float32)
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), x @ qw.dequantize().T)
