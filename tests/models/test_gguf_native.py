"""Native GGUF loading: the file's blocks kept bit for bit, Q/K rows un-permuted, clear errors on bad files.

The ``slow`` tests load the embedded default model (SmolLM2-135M-Instruct, Q4_1) once per module.
"""

import importlib.util
import warnings

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants
from torch import nn

from loraforge.adapters import AdapterSpec, adapted_layers, add_adapter, delete_adapter
from loraforge.adapters.qalora import fold_into_group_min
from loraforge.export.gguf_writer import write_gguf
from loraforge.models import tiny_model, tiny_tokenizer
from loraforge.models.gguf_native import GGUFError, gguf_tensor_name, load_gguf_native
from loraforge.quant.base import QuantLinear
from loraforge.quant.gguf_blocks import Q4_1Weight, quantize_q4_1


def reverse_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' LlamaTensorProcessor._reverse_permute_weights, verbatim in numpy."""
    dim = rows.shape[0] // n_head // 2
    return rows.reshape(n_head, dim, 2, *rows.shape[1:]).swapaxes(2, 1).reshape(rows.shape)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A tiny Llama as a Q4_1 GGUF file."""
    model = tiny_model("tiny-llama")
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and module is not model.get_output_embeddings():
            model.set_submodule(path, QuantLinear(quantize_q4_1(module.weight), None, torch.float32))
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(model, tiny_tokenizer(), path)
    return path


def rewrite(src, dst, arch=None, replace=None):
    """Copy a GGUF file, optionally under another architecture name or with tensors replaced
    (``replace``: name -> (numpy array, GGMLQuantizationType))."""
    reader = GGUFReader(src)
    arch = arch or reader.fields["general.architecture"].contents()
    writer = GGUFWriter(dst, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        writer.add_key_value(key.replace("llama.", f"{arch}."), field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None)
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


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed (optional test extra; it builds from source in ~13 min on 2 cores)",
)
def test_llama_cpp_agrees_on_the_exported_qalora_model(default_native, tmp_path):
    """llama.cpp on our exported QA-LoRA file must agree with loraforge at least as well as it agrees with
    transformers on the original file (measured here: correlation 0.9989, max |Δ| 1.15; llama.cpp
    quantizes activations inside its Q4_1 matmul, so bit equality is not expected)."""
    from llama_cpp import Llama

    from loraforge.data.tokenize import prompt_ids

    path, model, tokenizer = default_native
    ids = prompt_ids(tokenizer, [{"role": "user", "content": "Name three primary colours."}], "auto")

    def llama_cpp_logits(gguf_path):
        llm = Llama(model_path=str(gguf_path), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
        llm.eval(ids)
        return torch.tensor(np.asarray(llm.scores[len(ids) - 1]), dtype=torch.float32)

    def agreement(a, b):
        return torch.corrcoef(torch.stack([a, b]))[0, 1].item(), (a - b).abs().max().item()

    with torch.no_grad():
        base_ours = model(torch.tensor([ids])).logits[0, -1]
    base_corr, base_diff = agreement(llama_cpp_logits(path), base_ours)

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
        assert agreement(tuned_ours, base_ours)[1] > 1.0, "the probe adapter must change the logits"
        write_gguf(model, None, tmp_path / "qalora.gguf")
        corr, diff = agreement(llama_cpp_logits(tmp_path / "qalora.gguf"), tuned_ours)
    finally:
        delete_adapter(model, "probe")
    assert corr >= min(0.9989, base_corr) - 1e-3
    assert diff <= max(1.15, base_diff) * 1.5
