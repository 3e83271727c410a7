"""GGUF Q4_0/Q4_1/Q8_0 block codecs against gguf-py's reference (``gguf.quants``), bit for bit."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from loraforge.quant.base import QuantizedWeight, QuantLinear
from loraforge.quant.gguf_blocks import BLOCK_FORMATS, QUANTIZERS, pack_nibbles, unpack_nibbles

FORMATS = sorted(BLOCK_FORMATS)


def _gguf_type(fmt: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[fmt.upper()]


def _awkward_weight() -> torch.Tensor:
    """Random rows plus blocks that stress the edge cases: zeros, constants, negative extremes, ties."""
    torch.manual_seed(0)
    w = torch.randn(24, 128) * 0.02
    w[0, :32] = 0.0
    w[1, :32] = 0.7
    w[2, :32] = -torch.rand(32)
    w[3, :32] = torch.linspace(-1, 1, 32)
    w[4, :32] = torch.tensor([0.5, -0.5] * 16)
    w[5, :32] = torch.arange(32) / 2.0 - 8.0
    w[6] *= 1e4
    w[7] *= 1e-6
    return w


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_matches_gguf_reference_bytes(fmt):
    w = _awkward_weight()
    ours = QUANTIZERS[fmt](w).to_gguf_bytes().numpy()
    ref = quants.quantize(w.numpy(), _gguf_type(fmt))
    assert ours.shape == ref.shape
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_matches_gguf_reference_on_random_blocks(fmt):
    cls = BLOCK_FORMATS[fmt]
    rng = np.random.default_rng(1)
    out, n_blocks = 8, 3
    raw = rng.integers(0, 256, size=(out, n_blocks, cls.type_size), dtype=np.uint8)
    scales = rng.normal(size=(out, n_blocks, 2 if fmt != "q4_1" else 4)).astype(np.float16).view(np.uint8)
    raw[..., : scales.shape[-1]] = scales
    raw = raw.reshape(out, -1)
    weight = cls.from_gguf_bytes(torch.from_numpy(raw), (out, n_blocks * 32))
    ref = quants.dequantize(raw, _gguf_type(fmt))
    assert np.array_equal(weight.dequantize().numpy(), ref)
    assert np.array_equal(weight.to_gguf_bytes().numpy(), raw)


@pytest.mark.parametrize("fmt", FORMATS)
def test_weight_meets_protocol_and_quant_linear_runs(fmt):
    w = _awkward_weight()[8:]
    qw = QUANTIZERS[fmt](w)
    assert isinstance(qw, QuantizedWeight)
    assert qw.shape == (16, 128)
    assert qw.nbytes == 16 * 4 * BLOCK_FORMATS[fmt].type_size
    layer = QuantLinear(qw, torch.zeros(16), torch.float32)
    x = torch.randn(2, 3, 128)
    torch.testing.assert_close(layer(x), x @ qw.dequantize().T)
    again = type(qw).from_tensors(qw.tensors())
    assert torch.equal(again.to_gguf_bytes(), qw.to_gguf_bytes())


def test_nibble_order_low_is_first_half():
    q = torch.arange(32, dtype=torch.uint8) % 16
    packed = pack_nibbles(q)
    assert packed[0] == (0 | (0 << 4)) and packed[1] == (1 | (1 << 4))
    q2 = torch.tensor([3] * 16 + [12] * 16, dtype=torch.uint8)
    assert (pack_nibbles(q2) == (3 | (12 << 4))).all()
    assert torch.equal(unpack_nibbles(pack_nibbles(q2)), q2)


@pytest.mark.parametrize("fmt", FORMATS)
def test_bad_shapes_are_refused_clearly(fmt):
    with pytest.raises(ValueError, match="multiple of 32"):
        QUANTIZERS[fmt](torch.randn(4, 40))
    with pytest.raises(ValueError, match="needs .* bytes"):
        BLOCK_FORMATS[fmt].from_gguf_bytes(torch.zeros(10, dtype=torch.uint8), (4, 32))
