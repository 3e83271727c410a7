"""quantize_model on a tiny Llama: what gets quantized, how close the logits stay, the accounting, bad input."""

import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from loraforge.models.tiny import tiny_model
from loraforge.quant import quantize_model as quantize_module
from loraforge.quant.base import QuantLinear
from loraforge.quant.quantize_model import bf16_supported, quantize_model
from loraforge.quant.summary import quant_summary

ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")
"""Environment variables that cap the instruction sets torch uses (how a smaller CPU is emulated)."""

TOKENS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def test_decoder_linears_are_quantized_and_embedding_and_head_stay_dense():
    model = tiny_model("tiny-llama")
    reference = logits(model)
    quantize_model(model, type="nf4", double_quant=True, block_size=64, compute_dtype=torch.float32)
    quantized = {name for name, module in model.named_modules() if isinstance(module, QuantLinear)}
    assert len(quantized) == 2 * 7
    assert all(".layers." in name for name in quantized)
    assert [name for name, module in model.named_modules() if isinstance(module, nn.Linear)] == ["lm_head"]
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    assert model.model.embed_tokens.weight.dtype == torch.float32
    out = logits(model)
    assert torch.corrcoef(torch.stack([out.flatten(), reference.flatten()]))[0, 1] > 0.99
    assert (out - reference).abs().max() < 0.25 * reference.abs().max()


def test_bf16_compute_runs_in_bf16(monkeypatch):
    monkeypatch.setattr(quantize_module, "bf16_supported", lambda device: True)
    model = tiny_model("tiny-qwen2")  # q/k/v carry biases
    reference = logits(model)
    quantize_model(model, type="fp4", block_size=32, compute_dtype="bf16")
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.compute_dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    out = logits(model)
    assert out.dtype == torch.float32
    assert torch.corrcoef(torch.stack([out.flatten(), reference.flatten()]))[0, 1] > 0.98


def test_bf16_without_hardware_support_falls_back_to_fp32_with_a_warning(monkeypatch):
    monkeypatch.setattr(quantize_module, "bf16_supported", lambda device: False)
    model = tiny_model("tiny-llama")
    with pytest.warns(UserWarning, match="bf16 is not supported in hardware.*fp32"):
        quantize_model(model, compute_dtype=torch.bfloat16)
    assert model.model.layers[1].mlp.down_proj.compute_dtype == torch.float32


def test_bf16_probe_agrees_with_the_kernels_cpu_flags():
    """The probe against Linux's own list of CPU features: AVX512-BF16 or AMX-BF16 on x86, bf16 on ARM."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags |= set(value.split())
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    expected = bool(flags & {"avx512_bf16", "amx_bf16"}) if x86 else "bf16" in flags
    if any(os.environ.get(name) for name in ISA_LIMITS):  # torch may be capped below the units (see the next test)
        assert expected or not bf16_supported(torch.device("cpu")), sorted(flags)
    else:
        assert bf16_supported(torch.device("cpu")) is expected, sorted(flags)


def test_bf16_probe_is_false_where_torch_is_capped_below_the_bf16_units():
    """A CPU without bf16 units emulated on one with them (ATen kernels and oneDNN capped at AVX2): the CPU's own
    flags still list the units, but torch can't use them, so bf16 compute must fall back to fp32."""
    probe = "import torch; from loraforge.quant.quantize_model import bf16_supported; print(bf16_supported(torch.device('cpu')))"
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2", ATEN_CPU_CAPABILITY="avx2")
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_fp32_compute_does_not_warn_and_computes_in_fp32():
    model = tiny_model("tiny-llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_model(model, compute_dtype="fp32")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and {layer.compute_dtype for layer in layers} == {torch.float32}
    layer = model.model.layers[0].mlp.up_proj
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ layer.dequantize(torch.float32).T, atol=1e-5)


def test_summary_counts_bits_bytes_and_trainable_parameters():
    model = tiny_model("tiny-llama")
    dense_params = sum(p.numel() for p in model.parameters())
    quantize_model(model, compute_dtype="fp32")
    summary = quant_summary(model)
    linears = 2 * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3)
    assert summary["quantized_layers"] == 14 and summary["formats"] == {"nf4": 14}
    assert summary["quantized_params"] == linears
    assert summary["params"] == dense_params
    # Per layer: n/2 code bytes + n/64 absmax codes + 4 bytes per 256 blocks + a 4-byte offset.
    layer_sizes = [4096, 2048, 2048, 4096, 8192, 8192, 8192]
    expected_bytes = 2 * sum(n // 2 + n // 64 + 4 * -(-(n // 64) // 256) + 4 for n in layer_sizes)
    assert summary["quantized_bytes"] == expected_bytes
    assert summary["bits_per_param"] == pytest.approx(8 * expected_bytes / linears)
    assert 4.127 < summary["bits_per_param"] < 4.15  # small layers pay a little more for the offset
    dense_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert summary["total_bytes"] == dense_bytes
    assert summary["trainable_params"] == sum(p.numel() for p in model.parameters())


def test_summary_of_a_dense_model():
    summary = quant_summary(tiny_model("tiny-llama"))
    assert summary["quantized_layers"] == 0 and summary["bits_per_param"] is None


def test_block_size_that_does_not_divide_a_layer_names_it_and_changes_nothing():
    model = tiny_model("tiny-llama")
    with pytest.raises(ValueError) as error:
        quantize_model(model, block_size=4096)
    message = str(error.value)
    assert "block_size 4096 does not divide" in message
    assert "model.layers.0.self_attn.k_proj (weight (32, 64), 2048 elements)" in message
    assert "model.layers.1.self_attn.v_proj" in message
    assert "block_size 2048 divides every layer" in message
    assert not any(isinstance(module, QuantLinear) for module in model.modules())


def test_nf4_with_three_bits_suggests_type_int():
    message = r"type 'nf4' is 4-bit only, got bits=3; for 2-, 3- or 8-bit weights use type: int"
    with pytest.raises(ValueError, match=message):
        quantize_model(tiny_model("tiny-llama"), bits=3, type="nf4")


def test_unknown_type_lists_the_supported_ones():
    with pytest.raises(ValueError, match=r"unknown quantization type 'nf5'; supported: fp4, int, nf4"):
        quantize_model(tiny_model("tiny-llama"), type="nf5")


def test_every_bad_setting_is_reported_at_once():
    with pytest.raises(ValueError) as error:
        quantize_model(tiny_model("tiny-llama"), bits=8, type="fp4", block_size=48, compute_dtype="int8")
    message = str(error.value)
    assert "4-bit only" in message and "block_size must be one of 32, 64" in message and "compute_dtype" in message


def test_int_type_groups_along_in_features_and_names_misfits():
    from loraforge.quant.intk import IntKWeight

    model = quantize_model(tiny_model("tiny-llama"), bits=3, type="int", block_size=32, compute_dtype="fp32")
    assert all(isinstance(m.qweight, IntKWeight) for m in model.modules() if isinstance(m, QuantLinear))
    with pytest.raises(ValueError, match=r"group_size 128 does not divide the in_features of: .*q_proj.*group_size 64"):
        quantize_model(tiny_model("tiny-llama"), bits=4, type="int", block_size=128)


def _file_mappings(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's memory mappings of ``path`` (Linux /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and Path(fields[5]) == path:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/self/maps")
def test_quantizing_a_memory_mapped_checkpoint_leaves_no_tensor_in_the_file(tmp_path):
    """transformers maps safetensors files; a dense tensor left pointing into the mapping keeps every page of
    the file read while quantizing resident. After quantize_model no tensor of the model points into it."""
    from transformers import AutoModelForCausalLM

    tiny_model("tiny-llama").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    checkpoint = (tmp_path / "model.safetensors").resolve()
    tensors = [*model.parameters(), *model.buffers()]
    inside = lambda ranges: [t for t in tensors if any(lo <= t.data_ptr() < hi for lo, hi in ranges)]  # noqa: E731
    assert inside(_file_mappings(checkpoint)), "the loader no longer maps the file: this test checks nothing"
    quantize_model(model, compute_dtype="fp32")
    tensors = [*model.parameters(), *model.buffers()]
    assert not inside(_file_mappings(checkpoint))
    if model.config.tie_word_embeddings:
        assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
