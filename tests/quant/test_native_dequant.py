"""The native fused dequantizer (``native/dequant.cpp``): bit-identical to the torch decode of every format, in
every instruction set this CPU runs, on odd shapes and tile slices; NF4/FP4 equal to bitsandbytes' decode; and
training's tiled path running it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from native_threads import worker_share
from references import require, require_built

from loraforge import native
from loraforge.native import DECODE_OPS, DEQUANT, LOWBIT
from loraforge.quant import native_dequant
from loraforge.quant.blockwise4bit import Blockwise4bitWeight
from loraforge.quant.double_quant import double_dequantize, double_quantize
from loraforge.quant.gguf_blocks import QUANTIZERS, Q8_0Weight
from loraforge.quant.intk import quantize_intk

DTYPES = [torch.float32, torch.bfloat16]
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


@pytest.fixture
def lib():
    return require_built(DEQUANT)


def torch_decode(monkeypatch):
    """Make the formats take their torch decode (as on a CPU where the library can't be built)."""
    monkeypatch.setattr(DEQUANT, "_state", {"library": None, "reason": "turned off by the test"})


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(INT_VIEW[tensor.dtype])


def weight_under_test(name: str, dense: torch.Tensor):
    """``name``: ``nf4-64-dq``, ``fp4-128``, ``int3-32``, ``q4_1``, ..."""
    fmt, *rest = name.split("-")
    if fmt in ("nf4", "fp4"):
        return Blockwise4bitWeight.from_dense(dense, fmt, int(rest[0]), double_quant=rest[1:] == ["dq"])
    if fmt.startswith("int"):
        return quantize_intk(dense, int(fmt[3:]), int(rest[0]))
    return QUANTIZERS[fmt](dense)


FORMATS = ["nf4-64-dq", "nf4-32", "nf4-128-dq", "fp4-64-dq", "fp4-128", "int2-32", "int3-64", "int4-32", "int4-64",
           "int4-128", "int8-32", "int8-128", "q4_0", "q4_1", "q8_0"]


def special_weight(rows: int, cols: int) -> torch.Tensor:
    """Random rows with a zero group, a constant group, signed zeros, tiny and large values mixed in."""
    generator = torch.Generator().manual_seed(rows * cols)
    dense = torch.randn(rows, cols, generator=generator) * 0.05
    dense[1, :128] = 0.0
    dense[2, :128] = 0.25
    dense[3, ::7] = -0.0
    dense[4, ::5] = 1e-30
    dense[5, ::3] *= 1e4
    return dense


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", FORMATS)
def test_native_tiles_equal_the_torch_decode_bit_for_bit(lib, monkeypatch, name, dtype):
    weight = weight_under_test(name, special_weight(37, 384))
    align = weight.tile_columns
    windows = [(slice(0, 37), slice(0, 384)), (slice(3, 30), slice(align, 384 - align)), (slice(36, 37), slice(0, align))]
    with monkeypatch.context() as off:
        torch_decode(off)
        tile = weight.tile_dequantizer()
        expected = [tile(rows, cols, dtype) for rows, cols in windows]
        expected_whole = weight.dequantize(dtype)
    assert DEQUANT.library() is lib
    for isa in lib.available_isas():
        monkeypatch.setattr(native_dequant, "isa", lambda isa=isa: isa)
        tile = weight.tile_dequantizer()
        for (rows, cols), want in zip(windows, expected):
            got = tile(rows, cols, dtype)
            assert got.dtype == dtype and got.shape == want.shape
            assert torch.equal(bits(got), bits(want)), f"{name} {dtype} {isa}: tile {rows}, {cols} differs"
        assert torch.equal(bits(weight.dequantize(dtype)), bits(expected_whole)), f"{name} {dtype} {isa}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rounding_ties_and_sums_equal_torch(lib, monkeypatch, dtype):
    """fp16 scales times int8 codes have up to 19 significant bits: many products fall exactly halfway between two
    bf16 values (round to even); INT8's ``scale·q + min`` is rounded twice in fp32, never fused."""
    generator = torch.Generator().manual_seed(1)
    d = (torch.rand(64, 32, generator=generator) * 2 + 0.5).half()
    qs = torch.randint(-128, 128, (64, 32, 32), generator=generator, dtype=torch.int8)
    q8 = Q8_0Weight(d=d, qs=qs)
    int8 = quantize_intk(torch.randn(64, 1024, generator=generator), 8, 32)
    products = d.float()[..., None] * qs.float()
    ties = (products.view(torch.int32) & 0xFFFF) == 0x8000
    assert ties.sum() > 100  # the test exercises round-half-to-even
    with monkeypatch.context() as off:
        torch_decode(off)
        expected = [q8.dequantize(dtype), int8.dequantize(dtype)]
    for isa in lib.available_isas():
        monkeypatch.setattr(native_dequant, "isa", lambda isa=isa: isa)
        assert torch.equal(bits(q8.dequantize(dtype)), bits(expected[0])), isa
        assert torch.equal(bits(int8.dequantize(dtype)), bits(expected[1])), isa


def test_double_quantized_absmax_equals_the_torch_decode(lib, monkeypatch):
    generator = torch.Generator().manual_seed(2)
    for n in (1, 255, 256, 257, 5184):
        absmax = torch.rand(n, generator=generator) * 0.1
        absmax[: n // 3] = 0.0
        codes, nested, offset = double_quantize(absmax)
        native = double_dequantize(codes, nested, offset)
        with monkeypatch.context() as off:
            torch_decode(off)
            expected = double_dequantize(codes, nested, offset)
        assert torch.equal(bits(native), bits(expected)), n


def test_rows_are_decoded_by_torchs_threads(lib):
    """The decode splits a tile's rows over torch's threads (training decodes every layer twice a step), and the
    double-quantized absmax its values."""
    weight = weight_under_test("nf4-64-dq", torch.randn(2048, 2048))
    assert worker_share(lambda: weight.dequantize(torch.float32)) > 0.25
    codes, nested, offset = double_quantize(torch.rand(1 << 22))
    assert worker_share(lambda: double_dequantize(codes, nested, offset)) > 0.25


def test_the_libraries_share_torchs_one_openmp_runtime(lib):
    """All three libraries are linked against the runtime torch loaded (a bundled, possibly renamed libgomp), so the
    process holds one OpenMP runtime: one thread pool, the one ``torch.set_num_threads`` sizes."""
    for library in (LOWBIT, DECODE_OPS):
        require_built(library)
    runtime = native.torch_openmp_runtime()
    assert runtime is not None and os.path.isfile(runtime)
    maps = Path("/proc/self/maps").read_text().splitlines()
    loaded = {line.split(maxsplit=5)[-1] for line in maps if line.count(" ") >= 5}
    assert [p for p in loaded if native._OPENMP_RUNTIME.match(os.path.basename(p))] == [runtime]
    for name in ("libgomp.so.1", "libgomp-a34b3233.so.1", "libiomp5.so", "libomp.so"):
        assert native._OPENMP_RUNTIME.match(name), name
    for name in ("libgompx.so", "libtorch_cpu.so", "libomp.so.txt"):
        assert not native._OPENMP_RUNTIME.match(name), name


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_native_nf4_equals_bitsandbytes(lib, monkeypatch, quant_type, double_quant):
    """On bitsandbytes-quantized weights, in every instruction set: the whole weight, and a tile equals its slice.
    NF4 bit for bit; FP4 by value, as bitsandbytes' CPU decode writes +0 for the code of -0 (ours, like the torch
    decode, -0)."""
    bnbF = require("bitsandbytes").functional
    same = (lambda a, b: torch.equal(bits(a), bits(b))) if quant_type == "nf4" else torch.equal
    generator = torch.Generator().manual_seed(3)
    for rows, cols, block_size in [(37, 384, 64), (96, 256, 128), (5, 4096, 4096)]:
        dense = torch.randn(rows, cols, generator=generator) * 0.02
        packed, state = bnbF.quantize_4bit(dense, blocksize=block_size, quant_type=quant_type,
                                           compress_statistics=double_quant)
        if double_quant:
            tensors = {"packed": packed.flatten(), "absmax_codes": state.absmax, "nested_absmax": state.state2.absmax,
                       "absmax_offset": state.offset}
        else:
            tensors = {"packed": packed.flatten(), "absmax": state.absmax}
        ours = Blockwise4bitWeight.from_tensors(tensors, {"format": quant_type, "shape": [rows, cols],
                                                          "block_size": block_size, "double_quant": double_quant})
        expected = bnbF.dequantize_4bit(packed, state)
        for isa in lib.available_isas():
            monkeypatch.setattr(native_dequant, "isa", lambda isa=isa: isa)
            assert same(ours.dequantize(), expected), (rows, cols, isa)
            tile = ours.tile_dequantizer()(slice(1, rows), slice(block_size, cols), torch.float32)
            assert same(tile, expected[1:, block_size:].contiguous()), (rows, cols, isa)


def test_training_runs_the_native_decode_forward_and_backward(lib, monkeypatch):
    """A quantized layer's forward and input gradient under autograd decode natively, once each, and equal the
    torch decode's results exactly."""
    generator = torch.Generator().manual_seed(4)
    weight = weight_under_test("nf4-64-dq", torch.randn(96, 192, generator=generator))
    x = torch.randn(300, 192, generator=generator, requires_grad=True)
    grad = torch.randn(300, 96, generator=generator)
    calls = []
    decode = native_dequant.decode
    monkeypatch.setattr(native_dequant, "decode", lambda *a, **k: calls.append(a[0].shape) or decode(*a, **k))
    y = weight.matmul(x)
    y.backward(grad)
    assert calls == [(96, 96), (96, 96)]
    native_y, native_grad = y.detach(), x.grad
    with monkeypatch.context() as off:
        torch_decode(off)
        x.grad = None
        y = weight.matmul(x)
        y.backward(grad)
    assert torch.equal(native_y, y.detach()) and torch.equal(native_grad, x.grad)


@pytest.mark.parametrize(("capability", "expected"), [("avx2", "avx2"), ("default", "scalar")])
def test_instruction_set_follows_torchs_cpu_capability(lib, capability, expected):
    """``ATEN_CPU_CAPABILITY`` caps torch's kernels; the decode follows, so an emulated AVX2 machine decodes with AVX2
    (a CPU without AVX2, or not x86, decodes portably)."""
    if expected not in lib.available_isas():
        expected = "scalar"
    probe = "from loraforge.quant import native_dequant; print(native_dequant.isa())"
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == expected


def test_bad_tiles_are_refused_with_a_clear_error(lib):
    codes = torch.zeros(4, 16, dtype=torch.uint8)
    scale = torch.ones(4, 1, dtype=torch.float16)
    no_min, none = torch.empty(0, dtype=torch.float16), torch.empty(0)
    with pytest.raises(RuntimeError, match="codes must be bytes"):
        lib.decode(codes, scale, no_min, none, 5, 32, 0, torch.empty(4, 32), "", none, none, 0.0, none, none, none, 0)
    with pytest.raises(RuntimeError, match="out must be a 2-D float32 or bfloat16"):
        lib.decode(codes, scale, no_min, none, 1, 32, 0, torch.empty(4, 32, dtype=torch.float16), "", none, none, 0.0, none, none, none, 0)
    with pytest.raises(RuntimeError, match="not available on this CPU"):
        lib.decode(codes, scale, no_min, none, 1, 32, 0, torch.empty(4, 32), "neon", none, none, 0.0, none, none, none, 0)
    for out, b, a in [(torch.empty(4, 32, dtype=torch.bfloat16), torch.ones(4, 2), torch.ones(2, 32)),
                      (torch.empty(4, 32), torch.ones(4, 2), torch.ones(3, 32)),
                      (torch.empty(4, 32), torch.ones(4, 2), torch.ones(32, 2).t())]:
        with pytest.raises(RuntimeError, match=r"a fold needs an fp32 out, fp32 b \(4, r\) and a \(r, 32\)"):
            lib.decode(codes, scale, no_min, none, 1, 32, 0, out, "", b, a, 1.0, none, none, none, 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_tile_decode_reads_a_double_quantized_absmax_as_it_goes(lib, monkeypatch, dtype):
    """A double-quantized NF4 weight's tile decodes its absmax codes itself, each with the nested scale of its index
    in the whole weight (tiles starting in the second and third nested block of 256, rows of very different
    magnitudes so that every nested scale differs), bit for bit as the torch decode of the decoded absmax; no
    separate absmax decode runs."""
    generator = torch.Generator().manual_seed(11)
    magnitudes = 10.0 ** torch.linspace(-4, 1, 70)[:, None]
    weight = weight_under_test("nf4-64-dq", torch.randn(70, 576, generator=generator) * magnitudes)
    assert weight.nested_absmax.unique().numel() == 3  # 630 blocks: three nested scales
    windows = [(slice(0, 70), slice(0, 576)), (slice(29, 70), slice(64, 512)), (slice(57, 58), slice(512, 576))]
    with monkeypatch.context() as off:
        torch_decode(off)
        tile = weight.tile_dequantizer()
        expected = [tile(rows, cols, dtype) for rows, cols in windows]
    separate = []
    monkeypatch.setattr(weight, "block_absmax", lambda: separate.append(1))
    for isa in lib.available_isas():
        monkeypatch.setattr(native_dequant, "isa", lambda isa=isa: isa)
        tile = weight.tile_dequantizer()
        for (rows, cols), want in zip(windows, expected):
            assert torch.equal(bits(tile(rows, cols, dtype)), bits(want)), f"{dtype} {isa}: tile {rows}, {cols}"
    assert not separate


def test_bad_double_quantized_scales_are_refused_with_a_clear_error(lib):
    codes = torch.zeros(4, 16, dtype=torch.uint8)
    scale = torch.zeros(4, 1, dtype=torch.uint8)
    no_min, none, out = torch.empty(0, dtype=torch.float16), torch.empty(0), torch.empty(4, 32)
    table, offset, dmap = torch.zeros(16), torch.zeros(()), torch.zeros(256)
    for nested, origin in [(torch.ones(1), 253), (torch.ones(1, dtype=torch.float16), 0), (torch.ones(1), -1)]:
        with pytest.raises(RuntimeError, match="double-quantized scale codes need dense rows, an origin >= 0"):
            lib.decode(codes, scale, no_min, table, 0, 32, 0, out, "", none, none, 0.0, nested, offset, dmap, origin)
    with pytest.raises(RuntimeError, match="one fp32 offset and the 256-value fp32 map"):
        lib.decode(codes, scale, no_min, table, 0, 32, 0, out, "", none, none, 0.0, torch.ones(1), offset, torch.zeros(255), 0)


@pytest.mark.parametrize("name", ["nf4-64-dq", "int4-32", "q4_1"])
def test_a_fold_adds_the_low_rank_update_to_each_decoded_row(lib, monkeypatch, name):
    """``fold=(b, a, s)`` gives the tile plus ``s·b a`` (fp64 reference) on every instruction set, the same bits with
    AVX2 and AVX512 (both sum the r terms by fused multiply-adds in k order), on strided slices of b and a; torch's
    decode adds the same update."""
    generator = torch.Generator().manual_seed(7)
    weight = weight_under_test(name, torch.randn(37, 384, generator=generator) * 0.05)
    b_full, a_full = torch.randn(40, 16, generator=generator), torch.randn(16, 448, generator=generator)
    rows, cols = slice(3, 40), slice(64, 448)
    fold = (b_full[rows], a_full[:, cols], 0.37)  # b's rows and a's columns strided, as kernels slices them
    plain = weight.tile_dequantizer()(slice(0, 37), slice(0, 384), torch.float32)
    reference = plain.double() + 0.37 * (fold[0].double() @ fold[1].double())
    results = {}
    for isa in lib.available_isas():
        monkeypatch.setattr(native_dequant, "isa", lambda isa=isa: isa)
        results[isa] = weight.tile_dequantizer()(slice(0, 37), slice(0, 384), torch.float32, fold=fold)
        torch.testing.assert_close(results[isa].double(), reference, rtol=1e-6, atol=1e-6)
    first = results[lib.available_isas()[0]]
    simd = [got for isa, got in results.items() if isa != "scalar"]
    assert all(torch.equal(simd[0], got) for got in simd), list(results)
    with monkeypatch.context() as off:  # torch's decode adds the same update (by its own GEMM)
        torch_decode(off)
        torch.testing.assert_close(weight.tile_dequantizer()(slice(0, 37), slice(0, 384), torch.float32, fold=fold),
                                   first, rtol=1e-6, atol=1e-6)
