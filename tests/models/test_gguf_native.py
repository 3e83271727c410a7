"""Native GGUF loading: the file's blocks kept bit for bit, Q/K rows un-permuted, clear errors on bad files.

The ``slow`` tests load the embedded default model (SmolLM2-135M-Instruct, Q4_1) once per module.
"""

import warnings

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, quants
from gguf_helpers import agreement, llama_cpp_logits, model_on
from torch import nn

from loraforge.adapters import AdapterSpec, adapted_layers, add_adapter, delete_adapter
from loraforge.adapters.qalora import fold_into_group_min
from loraforge.export.gguf_writer import field_value, open_writer, write_gguf
from loraforge.models import tiny_tokenizer
from loraforge.models.gguf_file import GGUFFile
from loraforge.models.gguf_native import GGUFError, gguf_tensor_name, load_gguf_native
from loraforge.quant.base import QuantLinear
from loraforge.quant.gguf_blocks import Q4_1Weight


def reverse_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' LlamaTensorProcessor._reverse_permute_weights, verbatim in numpy."""
    dim = rows.shape[0] // n_head // 2
    return rows.reshape(n_head, dim, 2, *rows.shape[1:]).swapaxes(2, 1).reshape(rows.shape)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A tiny Llama as a Q4_1 GGUF file."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(model_on("q4_1"), tiny_tokenizer(), path)
    return path


def rewrite(src, dst, arch=None, replace=None):
    """Copy a GGUF file, optionally under another architecture name or with tensors replaced
    (``replace``: name -> (numpy array, GGMLQuantizationType))."""
    reader = GGUFFile(src)
    arch = arch or reader.fields["general.architecture"].contents()
    writer = open_writer(dst, arch)
    for key, field in reader.fields.items():
        if key == "general.architecture":
            continue
        writer.add_key_value(key.replace("llama.", f"{arch}."), *field_value(field))
    for tensor in reader.tensors:
        data, kind = (replace or {}).get(tensor.name, (np.asarray(tensor.data), tensor.tensor_type))
        writer.add_tensor(tensor.name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_loads_q4_1_blocks_unchanged(tiny_gguf):
    model, tokenizer = load_gguf_native(tiny_gguf)
    by_name = {t.name: t for t in GGUFReader(tiny_gguf).tensors}
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and isinstance(q.qweight, Q4_1Weight)
    raw = reverse_permute(np.asarray(by_name["blk.0.attn_q.weight"].data), model.config.num_attention_heads)
    assert np.array_equal(q.qweight.to_gguf_bytes().numpy(), raw)
    assert model.loraforge_gguf_path == str(tiny_gguf)
    assert tokenizer.eos_token == "<|im_end|>"


def test_other_block_types_are_dequantized_with_a_warning_naming_the_type(tiny_gguf, tmp_path):
    dense = np.random.default_rng(0).normal(size=(128, 64)).astype(np.float32)
    q5 = quants.quantize(dense, GGMLQuantizationType.Q5_0)
    path = rewrite(tiny_gguf, tmp_path / "q5.gguf", replace={"blk.0.ffn_up.weight": (q5, GGMLQuantizationType.Q5_0)})
    with pytest.warns(UserWarning, match=r"type Q5_0 .*blk\.0\.ffn_up\.weight.*dequantized"):
        model, _ = load_gguf_native(path)
    up = model.model.layers[0].mlp.up_proj
    assert type(up) is nn.Linear
    assert np.array_equal(up.weight.detach().numpy(), quants.dequantize(q5, GGMLQuantizationType.Q5_0))


def test_a_type_nothing_can_dequantize_is_a_clear_error(tiny_gguf, tmp_path):
    raw = np.zeros((128, 2 * 40), np.uint8)  # ffn_up (128, 64) as two Q8_1 blocks of 40 bytes per row
    path = rewrite(tiny_gguf, tmp_path / "q8_1.gguf", replace={"blk.0.ffn_up.weight": (raw, GGMLQuantizationType.Q8_1)})
    with pytest.raises(GGUFError) as caught:
        load_gguf_native(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: tensor blk.0.ffn_up.weight has type Q8_1")
    assert "Q4_0, Q4_1, Q8_0, F32, F16, BF16" in message and "model.quantization.type" in message


def test_unsupported_architecture_is_named(tiny_gguf, tmp_path):
    path = rewrite(tiny_gguf, tmp_path / "phi.gguf", arch="phi3")
    with pytest.raises(GGUFError, match="architecture 'phi3' is not supported"):
        load_gguf_native(path)


@pytest.mark.parametrize("cut", ["empty", "magic", "header", "metadata", "tensor_data", "garbage"])
def test_truncated_or_corrupt_files_raise_a_clear_error(tiny_gguf, tmp_path, cut):
    data = tiny_gguf.read_bytes()
    reader = GGUFReader(tiny_gguf)
    broken = {
        "empty": b"",
        "magic": data[:3],
        "header": data[:20],
        "metadata": data[: reader.tensors[0].data_offset // 2],
        "tensor_data": data[:-100],
        "garbage": b"GGUF" + bytes(range(256)) * 8,
    }[cut]
    path = tmp_path / "broken.gguf"
    path.write_bytes(broken)
    with pytest.raises(GGUFError, match="truncated or corrupt"):
        load_gguf_native(path)


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError, match="no such GGUF file"):
        load_gguf_native(tmp_path / "nope.gguf")


# --- the embedded default model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_native():
    from loraforge.models.sources import default_gguf_path

    path = default_gguf_path()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every tensor of the default model is a native type
        model, tokenizer = load_gguf_native(path)
    return path, model, tokenizer


@pytest.mark.slow
def test_default_model_uses_the_files_blocks_bit_for_bit(default_native):
    path, model, _ = default_native
    config = model.config
    tensors = GGUFReader(path).tensors
    checked = 0
    for tensor in tensors:
        raw = np.asarray(tensor.data)
        module_path = tensor.name.rsplit(".", 1)[0]
        if tensor.tensor_type.name != "Q4_1":
            continue
        if ".attn_q." in tensor.name:
            raw = reverse_permute(raw, config.num_attention_heads)
        elif ".attn_k." in tensor.name:
            raw = reverse_permute(raw, config.num_key_value_heads)
        layer = next(m for p, m in model.named_modules() if gguf_tensor_name(p) == module_path + ".weight")
        assert np.array_equal(layer.qweight.to_gguf_bytes().numpy(), raw), tensor.name
        checked += 1
    assert checked == 210
    embd = next(t for t in tensors if t.name == "token_embd.weight")
    expected = quants.dequantize(np.asarray(embd.data), GGMLQuantizationType.Q8_0)
    assert np.array_equal(model.model.embed_tokens.weight.detach().numpy(), expected)


@pytest.mark.slow
def test_default_model_logits_equal_transformers_gguf_loader(default_native):
    from loraforge.models import load_model

    _, native, tokenizer = default_native
    reference, _ = load_model("default")
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours, theirs = native(ids).logits, reference(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
    assert tokenizer.decode(ours[0, -1].argmax()) == tokenizer.decode(theirs[0, -1].argmax())


@pytest.mark.slow
def test_default_model_exports_back_byte_for_byte_and_with_qalora_folded(default_native, tmp_path):
    path, model, _ = default_native
    write_gguf(model, None, tmp_path / "same.gguf")
    source = {t.name: t for t in GGUFReader(path).tensors}
    written = GGUFReader(tmp_path / "same.gguf")
    for tensor in written.tensors:
        original = source[tensor.name]
        assert tensor.tensor_type == original.tensor_type, tensor.name
        assert np.array_equal(np.asarray(tensor.data), np.asarray(original.data)), tensor.name
    assert len(written.tensors) == len(source)
    assert written.fields["tokenizer.ggml.pre"].contents() == "smollm"

    torch.manual_seed(0)
    spec = AdapterSpec(method="qalora", r=4, alpha=4, init="none", target_modules=["down_proj"], layers_to_transform=[0, 29])
    add_adapter(model, spec, "probe")
    try:
        write_gguf(model, None, tmp_path / "qalora.gguf")
        out = {t.name: np.asarray(t.data) for t in GGUFReader(tmp_path / "qalora.gguf").tensors}
        for index in (0, 29):
            layer = model.model.layers[index].mlp.down_proj
            folded = fold_into_group_min(layer.base_layer.qweight, layer.adapters["probe"].group_delta().detach())
            assert np.array_equal(out[f"blk.{index}.ffn_down.weight"], folded.to_gguf_bytes().numpy())
            assert not np.array_equal(out[f"blk.{index}.ffn_down.weight"], np.asarray(source[f"blk.{index}.ffn_down.weight"].data))
        assert np.array_equal(out["blk.1.ffn_down.weight"], np.asarray(source["blk.1.ffn_down.weight"].data))
    finally:
        delete_adapter(model, "probe")


CORR_BOUND, MAX_DIFF_BOUND = 0.998, 1.5
"""llama.cpp vs loraforge on the default model's last-position logits, when both hold the same blocks.

llama.cpp rounds the input of each quantized matmul to 8 bits per block of 32 (Q8_1 for the Q4_1 layers,
Q8_0 for the head): an RMS error of (max/127)/√12 ≈ 0.57% of the block's RMS when its max is 2.5× its RMS.
121 such roundings per token (4 per layer × 30, and the head) add in quadrature to √121 · 0.57% ≈ 6.3% of
the logits' spread, so 1 − corr ≤ ½ · 0.063² ≈ 0.002. The spread (std) of this prompt's last logits is 3.3:
6.3% of it is 0.21, and the largest of 49152 such deviations ≈ 4.8σ ≈ 1.0, with room for tails heavier than
Gaussian → 1.5. Measured: corr 0.9993, max |Δ| 0.74 (original file) and 0.79 (QA-LoRA export).
"""


@pytest.mark.slow
def test_llama_cpp_agrees_on_the_exported_qalora_model(default_native, tmp_path):
    """llama.cpp on the original file and on our exported QA-LoRA file agrees with loraforge on the same
    blocks within the bounds above; a file without the adapter folded in would not."""
    from loraforge.data.tokenize import prompt_ids

    path, model, tokenizer = default_native
    ids = prompt_ids(tokenizer, [{"role": "user", "content": "Name three primary colours."}], "auto")
    with torch.no_grad():
        base_ours = model(torch.tensor([ids])).logits[0, -1]
    base_corr, base_diff = agreement(llama_cpp_logits(path, ids)[-1], base_ours)

    torch.manual_seed(0)
    add_adapter(model, AdapterSpec(method="qalora", r=8, alpha=8, init="none"), "probe")
    try:
        with torch.no_grad():
            # A fine-tune's size of change (max logit shift ~2). Unscaled random B scrambles the model
            # (correlation 0.5 with the base), a regime where llama.cpp's 8-bit activations amplify the
            # larger min terms and no fine-tune lives.
            for layer in adapted_layers(model).values():
                layer.adapters["probe"].lora_B.mul_(0.1)
            tuned_ours = model(torch.tensor([ids])).logits[0, -1]
        write_gguf(model, None, tmp_path / "qalora.gguf")
        corr, diff = agreement(llama_cpp_logits(tmp_path / "qalora.gguf", ids)[-1], tuned_ours)
    finally:
        delete_adapter(model, "probe")
    shift_corr, shift = agreement(tuned_ours, base_ours)
    assert shift_corr < CORR_BOUND and shift > MAX_DIFF_BOUND, "the probe adapter must change more than the bounds"
    assert base_corr >= CORR_BOUND and base_diff <= MAX_DIFF_BOUND, (base_corr, base_diff)
    assert corr >= CORR_BOUND and diff <= MAX_DIFF_BOUND, (corr, diff)
