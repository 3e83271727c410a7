"""GGUF export: lossless Q4_1 for QA-LoRA, re-quantization reports, Q/K permutation, metadata, atomicity."""

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from gguf_helpers import model_on

from loraforge.adapters import merge_adapters
from loraforge.export.gguf_writer import GGUFExportError, write_gguf
from loraforge.export.merge import merged_quantized_weight
from loraforge.models import tiny_tokenizer
from loraforge.models.gguf_native import gguf_tensor_name, load_gguf_native
from loraforge.quant.base import QuantLinear
from loraforge.quant.gguf_blocks import Q4_0Weight, Q8_0Weight


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def llama_cpp_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim in numpy."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


@pytest.fixture
def ids():
    return torch.randint(0, 250, (2, 9), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("base", ["q4_1", "q4_0", "int4-g32", "int2-g64"])
@pytest.mark.parametrize("gguf_type", ["auto", "q4_1"])
def test_qalora_exports_as_q4_1_blocks_byte_for_byte(base, gguf_type, ids, tmp_path):
    model = model_on(base, "qalora")
    merge_adapters(model)
    merged_logits = logits(model, ids)
    report = write_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf", gguf_type)
    assert not report.requantized, report.summary()
    written = {t.name: t for t in GGUFReader(tmp_path / "m.gguf").tensors}
    config = model.config
    for path, layer in model.named_modules():
        if not hasattr(layer, "base_layer"):
            continue
        name = gguf_tensor_name(path)
        merged = layer.base_layer.qweight
        expected = merged.to_q4_1() if hasattr(merged, "to_q4_1") else merged
        raw = expected.to_gguf_bytes().numpy()
        if ".attn_q." in name:
            raw = llama_cpp_permute(raw, config.num_attention_heads)
        elif ".attn_k." in name:
            raw = llama_cpp_permute(raw, config.num_key_value_heads)
        assert written[name].tensor_type.name == "Q4_1"
        assert np.array_equal(np.asarray(written[name].data), raw), name
    # read back natively: the same bytes, so the same logits as the merged model, bit for bit
    reloaded, _ = load_gguf_native(tmp_path / "m.gguf")
    assert torch.equal(logits(reloaded, ids), merged_logits)


def test_unmerged_qalora_is_folded_on_export_without_touching_the_model(ids, tmp_path):
    model = model_on("q4_1", "qalora")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    write_gguf(model, tiny_tokenizer(), tmp_path / "a.gguf")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    merge_adapters(model)
    write_gguf(model, tiny_tokenizer(), tmp_path / "b.gguf")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


@pytest.mark.parametrize("base", ["q4_0", "q8_0"])
def test_untouched_block_layers_keep_their_type_and_bytes(base, tmp_path):
    model = model_on(base)
    write_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf")
    reloaded, _ = load_gguf_native(tmp_path / "m.gguf")
    cls = {"q4_0": Q4_0Weight, "q8_0": Q8_0Weight}[base]
    for path, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            again = reloaded.get_submodule(path).qweight
            assert isinstance(again, cls)
            assert torch.equal(again.to_gguf_bytes(), layer.qweight.to_gguf_bytes())


@pytest.mark.parametrize(
    ("gguf_type", "linear_type"), [("auto", "F16"), ("f16", "F16"), ("q8_0", "Q8_0"), ("q4_1", "Q4_1")]
)
def test_lora_over_q4_1_is_requantized_and_the_error_reported(gguf_type, linear_type, ids, tmp_path):
    model = model_on("q4_1", "lora")
    report = write_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf", gguf_type)
    linears = [t for t in report.tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    assert {t.type for t in linears} == {linear_type}
    assert all(not t.lossless and t.max_abs_error > 0 and 0 < t.rel_rms_error < 0.2 for t in linears)
    assert "re-quantized; worst relative RMS error" in report.summary()
    reloaded, _ = load_gguf_native(tmp_path / "m.gguf")
    tolerance = {"F16": 1e-2, "Q8_0": 5e-2, "Q4_1": 0.5}[linear_type]
    assert (logits(reloaded, ids) - logits(model, ids)).abs().max() < tolerance


def test_f16_export_permutes_q_and_k_like_llama_cpp(tmp_path):
    model = model_on(None)
    write_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf", "f16")
    written = {t.name: np.asarray(t.data) for t in GGUFReader(tmp_path / "m.gguf").tensors}
    attn = model.model.layers[1].self_attn
    q = attn.q_proj.weight.detach().half().numpy()
    k = attn.k_proj.weight.detach().half().numpy()
    assert np.array_equal(written["blk.1.attn_q.weight"], llama_cpp_permute(q, 4))
    assert np.array_equal(written["blk.1.attn_k.weight"], llama_cpp_permute(k, 2))
    assert np.array_equal(written["blk.1.attn_v.weight"], attn.v_proj.weight.detach().half().numpy())


def test_qwen2_is_not_permuted_and_keeps_its_biases(ids, tmp_path):
    model = model_on("q4_1", "qalora", family="tiny-qwen2")
    write_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf")
    reader = GGUFReader(tmp_path / "m.gguf")
    names = {t.name for t in reader.tensors}
    assert "blk.0.attn_q.bias" in names and reader.fields["general.architecture"].contents() == "qwen2"
    q = model.model.layers[0].self_attn.q_proj
    raw = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight").data
    assert np.array_equal(np.asarray(raw), merged_quantized_weight(q).to_gguf_bytes().numpy())
    reloaded, _ = load_gguf_native(tmp_path / "m.gguf")
    merge_adapters(model)
    assert torch.equal(logits(reloaded, ids), logits(model, ids))


def test_metadata_and_tokenizer(tmp_path):
    model = model_on("q4_1")
    tokenizer = tiny_tokenizer()
    write_gguf(model, tokenizer, tmp_path / "m.gguf")
    fields = GGUFReader(tmp_path / "m.gguf").fields
    value = lambda key: fields[key].contents()  # noqa: E731
    assert value("general.architecture") == "llama"
    assert value("general.file_type") == 3  # MOSTLY_Q4_1
    assert value("llama.block_count") == 2 and value("llama.attention.head_count_kv") == 2
    assert value("llama.embedding_length") == 64 and value("llama.rope.dimension_count") == 16
    assert len(value("tokenizer.ggml.tokens")) == model.config.vocab_size
    assert value("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert value("tokenizer.chat_template") == tokenizer.chat_template
    _, again = load_gguf_native(tmp_path / "m.gguf")
    text = "Hi <|im_start|>user\nwörld<|im_end|>"
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    import loraforge.export.gguf_writer as writer

    target = tmp_path / "m.gguf"
    target.write_bytes(b"old")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(writer, "open_writer", broken)
    with pytest.raises(OSError, match="disk full"):
        write_gguf(model_on("q4_1"), tiny_tokenizer(), target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_bad_requests_are_refused(tmp_path):
    with pytest.raises(GGUFExportError, match="gguf_type 'q5_k'"):
        write_gguf(model_on(None), tiny_tokenizer(), tmp_path / "m.gguf", "q5_k")
    with pytest.raises(GGUFExportError, match="needs a tokenizer"):
        write_gguf(model_on(None), None, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())
