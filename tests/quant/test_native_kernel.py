"""native/lowbit.cpp: our int8-activation low-bit kernel, every instruction set this CPU runs, against llama.cpp's own
block dot products (libggml-cpu from llama-cpp-python) and against references in torch.

Two torch references: (1) the same arithmetic spelled out in float64 torch (activation quantized per 32-block as
llama.cpp's Q8_1/Q8_0 do, integer block dot products with the stored codes), which every path must match up to
fp32 summation order; (2) the plain dequantized weight times the unquantized input, which the kernel must match
within the bound the activation rounding allows. In CI (``CI=true``) a kernel that doesn't build fails these tests.
"""

import ctypes
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from native_threads import worker_share
from references import require, require_built

from loraforge.native import LOWBIT
from loraforge.quant import kernels
from loraforge.quant.base import QuantLinear
from loraforge.quant.gguf_blocks import QUANTIZERS, Q4_1Weight, pack_nibbles
from loraforge.quant.intk import pack_codes, quantize_intk

FORMATS = {
    **{name: QUANTIZERS[name] for name in ("q4_0", "q4_1", "q8_0")},
    "int4-g32": lambda w: quantize_intk(w, 4, 32),
    "int4-g64": lambda w: quantize_intk(w, 4, 64),
    "int4-g128": lambda w: quantize_intk(w, 4, 128),
    "int8-g32": lambda w: quantize_intk(w, 8, 32),
    "int8-g128": lambda w: quantize_intk(w, 8, 128),
}
SHAPES = [(37, 128), (5, 256), (130, 384), (21, 1664)]
"""out_features not a multiple of anything; in_features multiples of 32 (and of 128 for INTk g128), with and without
a partial last chunk of 4 blocks, and over several stretches of 16 blocks (the VNNI kernel's unit) with a partial
last one (1664 = 3·16·32 + 4·32). Rows of codes over 512 bytes (K = 1664) take the kernel's one-row tiles, the
shorter ones its 4-row (M = 1) and 2-row tiles, with one-row tiles for the remainder."""


@pytest.fixture(scope="module")
def lib():
    return require_built(LOWBIT)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)  # every test's inputs are fixed, whatever ran before it


@pytest.fixture
def native_kernel(monkeypatch, lib):
    monkeypatch.setattr(kernels, "KERNEL", "native")


def _weight(name: str, out: int, in_features: int, seed: int = 0):
    torch.manual_seed(seed)
    return FORMATS[name](torch.randn(out, in_features) * 0.05)


def _quantized_input(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """llama.cpp's activation quantization in torch: per 32-block ``d = amax/127`` (kept as fp16), codes
    ``round(x·127/amax)`` (half to even), ``s = fp16(d·Σq)`` with the unrounded ``d``. Returns codes (M, K),
    fp16-rounded d (M, K/32) and s (M, K/32), all float."""
    blocks = x.float().reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1)
    d = amax / 127
    inverse = torch.full_like(amax, 127) / amax  # a true division: ``127 / tensor`` is 127·(1/amax) in torch, rounded twice
    q = torch.round(blocks * torch.where(amax > 0, inverse, torch.zeros_like(amax))[..., None])
    return q.reshape(x.shape), d.half().float(), (d * q.sum(-1)).half().float()


def _fields(weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """``(value codes (out, in) with w = d·v + m, d per block, m per block or None, blocks per group)``."""
    if weight.format in ("q4_0", "q4_1", "q8_0"):
        codes = weight.codes().double() - (8 if weight.format == "q4_0" else 0)
        return codes, weight.d.double(), weight.m.double() if weight.format == "q4_1" else None, 1
    groups = weight.group_size // 32
    return (weight.unpacked_codes().double(), weight.scale.double().repeat_interleave(groups, 1),
            weight.min.double().repeat_interleave(groups, 1), groups)


def _integer_reference(weight, x: torch.Tensor) -> torch.Tensor:
    """``y`` as the kernel defines it, in float64: Σ_b d_w·d_a·Σ v·q_a + Σ_g m_g·s_g."""
    v, d_w, m_w, groups = _fields(weight)
    q, d_a, s = _quantized_input(x)
    n, k = v.shape
    dots = torch.einsum("mbi,nbi->mnb", q.double().reshape(-1, k // 32, 32), v.reshape(n, -1, 32))
    y = (dots * d_w[None] * d_a.double()[:, None]).sum(-1)
    if m_w is not None:
        s_group = s.double().reshape(s.shape[0], -1, groups).sum(-1)
        y += s_group @ m_w[:, ::groups].T
    return y


def _call(lib, weights, x: torch.Tensor, isa: str = "") -> torch.Tensor:
    group = kernels.NativeGroup(tuple(weights), kernels._native_layout(weights[0]))
    return lib.mm(x, *group.tensors, *group.layout, isa)


def test_the_activation_is_quantized_as_llama_cpp_does(lib):
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(4)) * torch.tensor([1.0, 1e-3, 50.0]).repeat_interleave(32)
    x[2, 32:64] = 0  # an all-zero block: d = 0, codes 0
    x[3, :4] = torch.tensor([0.5, -0.5, 1.5, 2.5]) * (x[3, :32].abs().max() / 127)  # ties round to even
    q, d, s = lib.quantize_rows(x)
    expected_q, expected_d, expected_s = _quantized_input(x)
    assert torch.equal(q.float(), expected_q) and torch.equal(d, expected_d) and torch.equal(s, expected_s)
    assert q.abs().max() == 127 and (q[2, 32:64] == 0).all()


GGML_DOTS = {"q4_0": ("quantize_row_q8_0", 34, "ggml_vec_dot_q4_0_q8_0"),
             "q4_1": ("quantize_row_q8_1", 36, "ggml_vec_dot_q4_1_q8_1"),
             "q8_0": ("quantize_row_q8_0", 34, "ggml_vec_dot_q8_0_q8_0")}
"""GGUF format -> ggml's activation quantizer, its block bytes, and ggml's block dot product (libggml-cpu)."""


@pytest.mark.parametrize("name", sorted(GGML_DOTS))
def test_each_output_is_llama_cpps_own_dot_product(lib, name):
    """llama.cpp's CPU library (from llama-cpp-python) quantizes the input row and takes each weight row's dot
    product with it; the native kernel gives the same numbers, up to fp32 summation order."""
    llama_cpp = require("llama_cpp")
    ggml = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so"))
    ggml.ggml_cpu_init()
    quantize_name, block_bytes, dot_name = GGML_DOTS[name]
    weight = _weight(name, 24, 576)
    rows = np.ascontiguousarray(weight.to_gguf_bytes().numpy())
    x = torch.randn(2, 576, generator=torch.Generator().manual_seed(1))
    expected = torch.empty(2, 24)
    for m in range(2):
        row = np.ascontiguousarray(x[m].numpy())
        quantized = (ctypes.c_uint8 * (576 // 32 * block_bytes))()
        getattr(ggml, quantize_name)(ctypes.c_void_p(row.ctypes.data), quantized, ctypes.c_int64(576))
        for n in range(24):
            out = ctypes.c_float()
            getattr(ggml, dot_name)(ctypes.c_int(576), ctypes.byref(out), ctypes.c_size_t(0), ctypes.c_void_p(rows[n].ctypes.data),
                                    ctypes.c_size_t(0), quantized, ctypes.c_size_t(0), ctypes.c_int(1))
            expected[m, n] = out.value
    for isa in lib.available_isas():
        y = lib.mm(x, *_tensors(weight), *kernels._native_layout(weight), isa)
        torch.testing.assert_close(y, expected, rtol=0, atol=2e-6 * expected.abs().max().item())


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize(("out", "in_features"), SHAPES)
def test_every_instruction_set_computes_the_integer_reference(lib, name, out, in_features):
    weight = _weight(name, out, in_features)
    for rows in range(1, 9):
        x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
        expected = _integer_reference(weight, x)
        scale = _integer_reference(_abs_weight(weight), x.abs()).clamp_min(1e-6)  # Σ|terms|: the fp32 summation scale
        for isa in lib.available_isas():
            y = lib.mm(x, *_tensors(weight), *kernels._native_layout(weight), isa)
            assert y.shape == (rows, out) and y.dtype == torch.float32
            assert ((y.double() - expected).abs() / scale).max() < 1e-5, (isa, rows)


def _tensors(weight):
    return [[t] for t in kernels._native_tensors(weight)]


def _abs_weight(weight):
    """A stand-in whose fields give Σ|terms| in ``_integer_reference``: |v|, |d|, |m|."""
    v, d, m, groups = _fields(weight)

    class Abs:
        format = "abs"
        group_size = 32 * groups

        def unpacked_codes(self):
            return v.abs()

    stand_in = Abs()
    stand_in.scale, stand_in.min = d.abs()[:, ::groups], (torch.zeros_like(d) if m is None else m.abs())[:, ::groups]
    return stand_in


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_product_is_within_the_activation_rounding_of_the_dense_one(lib, name, dtype):
    """|y − x·Wᵀ| ≤ Σ_b d_b·(½ + 127·2⁻¹¹)·Σ_i|w_i| + |m_b|·d_b·32·127·2⁻¹⁰: each input is off by at most half a step
    of its block (plus the fp16 rounding of the step), and ``s`` by its fp16 rounding."""
    weight = _weight(name, 37, 256)
    x = torch.randn(3, 256, dtype=dtype)
    y = lib.mm(x, *_tensors(weight), *kernels._native_layout(weight), "")
    assert y.dtype == dtype
    dense = weight.dequantize().double()
    expected = x.double() @ dense.T
    d_a = x.float().reshape(3, -1, 32).abs().amax(-1).double() / 127  # (M, blocks)
    abs_w = dense.abs().reshape(37, -1, 32).sum(-1)  # (N, blocks)
    _, _, m_w, _ = _fields(weight)
    bound = d_a @ abs_w.T * (0.5 + 127 / 2048)
    if m_w is not None:
        bound += d_a @ m_w.abs().T * (32 * 127 / 1024)
    rounding = 8e-3 * expected.abs() if dtype == torch.bfloat16 else 0  # the output's own rounding to bf16
    error = (y.double() - expected).abs()
    assert (error <= bound + rounding + 1e-6).all()
    assert error.max() > 0  # the activation really is quantized: this is not the exact path


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "int4-g32", "q8_0", "int8-g32"])
def test_each_input_element_meets_its_own_weight_column(lib, name):
    """One-hot inputs: row k of the result is column k of the weight (x = e_k quantizes to 127 with d = fp16(1/127),
    and s = fp16(127/127) = 1), so a swapped nibble order, a wrong INTk pair order or a misplaced block moves a
    column and fails."""
    weight = _weight(name, 40, 64)
    v, d, m, _ = _fields(weight)
    scale = float(torch.tensor(1 / 127).half()) * 127
    mins = torch.zeros_like(v) if m is None else m.repeat_interleave(32, 1)
    expected = (v * d.repeat_interleave(32, 1) * scale + mins).T
    assert torch.allclose(weight.dequantize().double(), v * d.repeat_interleave(32, 1) + mins, atol=1e-6)
    for isa in lib.available_isas():
        y = lib.mm(torch.eye(64), *_tensors(weight), *kernels._native_layout(weight), isa)
        torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-7)


def test_nibbles_are_read_in_gguf_and_intk_order(lib):
    """A block whose first 16 elements are 15 and last 16 are 0 in GGUF order (low nibbles first) and INTk order
    (pairs): against x = 1 on the first 16 elements, swapped orders would give 0 or half of it."""
    codes = torch.cat([torch.full((1, 16), 15), torch.zeros(1, 16)], dim=1)
    gguf = Q4_1Weight(d=torch.ones(1, 1, dtype=torch.float16), m=torch.zeros(1, 1, dtype=torch.float16),
                      qs=pack_nibbles(codes.reshape(1, 1, 32)))
    from loraforge.quant.intk import IntKWeight

    intk = IntKWeight(pack_codes(codes, 4), torch.ones(1, 1, dtype=torch.float16), torch.zeros(1, 1, dtype=torch.float16),
                      4, 32)
    x = torch.cat([torch.ones(1, 16), torch.zeros(1, 16)], dim=1)
    for weight in (gguf, intk):
        for isa in lib.available_isas():
            y = lib.mm(x, *_tensors(weight), *kernels._native_layout(weight), isa)
            assert y.item() == pytest.approx(15 * 16 * float(torch.tensor(1 / 127).half()) * 127, rel=1e-6)


@pytest.mark.parametrize("names", [("q4_1", "q4_1", "q4_1"), ("int4-g64", "int4-g64"), ("q8_0", "q8_0")])
def test_stacked_weights_give_each_ones_product_side_by_side(lib, names):
    """q/k/v-like weights of one input in one call: exactly the results of one call per weight (sizes that leave
    partial row tiles, one and three input rows)."""
    weights = [_weight(name, out, 128, seed) for seed, (name, out) in enumerate(zip(names, (46, 17, 40)))]
    for rows in (1, 3):
        x = torch.randn(rows, 128)
        fused = _call(lib, weights, x)
        alone = torch.cat([_call(lib, [w], x) for w in weights], dim=1)
        assert torch.equal(fused, alone)
    fused_kernel = kernels.fused_kernel(weights, torch.bfloat16)
    x16 = x.bfloat16()
    assert torch.equal(fused_kernel.mm(x16), _call(lib, weights, x16)) and fused_kernel.packed is None  # no copy made


def test_a_prepared_group_checks_its_weights_once_and_its_input_on_each_call(lib):
    weight = _weight("q4_1", 24, 256)
    group = lib.Group(*_tensors(weight), *kernels._native_layout(weight))
    x = torch.randn(2, 256)
    assert torch.equal(group.mm(x, ""), lib.mm(x, *_tensors(weight), *kernels._native_layout(weight), ""))
    with pytest.raises(RuntimeError, match=r"x must be \(M, 256\)"):
        group.mm(torch.randn(2, 128), "")
    codes, scales, mins = _tensors(weight)
    with pytest.raises(RuntimeError, match="scales must be contiguous fp16"):
        lib.Group(codes, [scales[0].float()], mins, *kernels._native_layout(weight))


@pytest.mark.usefixtures("native_kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_takes_the_native_kernel_and_training_the_exact_path(dtype, monkeypatch):
    """bf16 takes it by default; fp32 (the exact dtype) only when ``NATIVE_MAX_ROWS`` says so."""
    weight = _weight("q4_1", 48, 128)
    with torch.no_grad():
        x = torch.randn(2, 128)
        assert torch.equal(QuantLinear(weight, None, torch.float32)(x), kernels.linear(weight, x))  # fp32: exact
    monkeypatch.setitem(kernels.NATIVE_MAX_ROWS, (4, torch.float32), 64)
    layer = QuantLinear(weight, None, dtype)
    x = torch.randn(2, 128, dtype=dtype)
    native_y = kernels.NativeGroup((weight,), kernels._native_layout(weight)).mm(x)
    exact_y = kernels.linear(weight, x)
    with torch.no_grad():
        assert torch.equal(layer(x), native_y)
    assert torch.equal(layer(x.requires_grad_()), exact_y)  # autograd recording: training's forward stays exact
    bits_rows = kernels.NATIVE_MAX_ROWS[(4, dtype)]
    with torch.no_grad():
        many = torch.randn(bits_rows + 1, 128, dtype=dtype)
        assert torch.equal(layer(many), kernels.linear(weight, many))  # above the threshold: torch's paths


def test_the_torch_setting_keeps_products_exact(monkeypatch, lib):
    weight = _weight("q4_1", 48, 128)
    x = torch.randn(1, 128)
    monkeypatch.setattr(kernels, "KERNEL", "torch")
    with torch.no_grad():
        assert torch.equal(QuantLinear(weight, None, torch.float32)(x), kernels.linear(weight, x))
    assert kernels.describe(weight, torch.float32) == "tiled dequantize+matmul"
    monkeypatch.setattr(kernels, "KERNEL", None)
    monkeypatch.setenv(kernels.KERNEL_SETTING, "fast")
    with pytest.raises(ValueError, match="LORAFORGE_QUANT_KERNEL='fast' is not one of native, torch"):
        kernels.kernel_choice()


@pytest.mark.usefixtures("native_kernel")
def test_describe_names_the_native_kernel_and_its_instruction_set(lib):
    isa = lib.available_isas()[0]
    assert kernels.describe(_weight("q4_1", 48, 128), torch.bfloat16) == (
        f"native int8-activation kernel ({isa}) up to 32 tokens, tiled dequantize+matmul above")
    assert kernels.describe(_weight("q8_0", 48, 128), torch.bfloat16) == (
        f"native int8-activation kernel ({isa}) up to 16 tokens, tiled dequantize+matmul above")
    assert kernels.describe(_weight("q8_0", 48, 128), torch.float32) == "tiled dequantize+matmul"


def test_a_missing_compiler_falls_back_with_one_warning_that_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(LOWBIT, "_state", {})
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.warns(RuntimeWarning, match=r"no C\+\+ compiler.*install a C\+\+ compiler.*ninja") as caught:
        assert LOWBIT.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert LOWBIT.library() is None  # warned once
    assert len(caught) == 1 and LOWBIT.status().startswith("unavailable (no C++ compiler")
    monkeypatch.setattr(kernels, "KERNEL", "native")
    weight = _weight("q4_1", 48, 128)
    assert kernels.describe(weight, torch.bfloat16) == (
        "torch int4 kernel up to 32 tokens, tiled dequantize+matmul above (native kernel not built: see the warning)")
    with torch.no_grad():
        x = torch.randn(1, 128)
        assert torch.equal(QuantLinear(weight, None, torch.float32)(x), kernels.linear(weight, x))
    assert not list(tmp_path.glob("kernels/loraforge_lowbit_*/*.so"))  # nothing half-built left under the final name


def test_rows_split_over_threads_give_the_same_numbers(lib):
    """at::parallel_for splits the output rows over torch's threads (the other threads do about half the work);
    each row's sum is computed alone, so the result doesn't depend on the thread count."""
    weight = _weight("q4_1", 4096, 1024)
    x = torch.randn(3, 1024)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lib.mm(x, *_tensors(weight), *kernels._native_layout(weight), "")
        torch.set_num_threads(2)
        two = lib.mm(x, *_tensors(weight), *kernels._native_layout(weight), "")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert worker_share(lambda: lib.mm(x, *_tensors(weight), *kernels._native_layout(weight), "")) > 0.25


@pytest.mark.usefixtures("native_kernel")
def test_storage_held_as_parameters_is_left_to_torchs_paths():
    """FSDP2 re-registers the packed tensors as (sharded) parameters (``train.distributed``); the native kernel,
    which reads plain buffers, declines them and the product stays right."""
    from loraforge.train.distributed import quantized_storage_as_parameters

    weight = _weight("q4_1", 48, 128)
    layer = QuantLinear(weight, None, torch.bfloat16)
    assert kernels.native_max_rows(weight, torch.bfloat16) == 32
    assert quantized_storage_as_parameters(torch.nn.Sequential(layer)) == 3
    assert kernels.native_max_rows(weight, torch.bfloat16) == 0
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(layer(x), kernels.linear(weight, x))
