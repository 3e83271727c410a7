"""Merged HF safetensors export: any adapter over a dense or quantized base, written atomically."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from loraforge.adapters import AdapterSpec, add_adapter
from loraforge.export.merge import merged_state_dict, save_merged_hf
from loraforge.models import tiny_model, tiny_tokenizer
from loraforge.quant.base import QuantLinear
from loraforge.quant.gguf_blocks import quantize_q4_1
from loraforge.quant.intk import quantize_intk


def quantized(model, quantizer):
    head = model.get_output_embeddings()
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and module is not head:
            model.set_submodule(path, QuantLinear(quantizer(module.weight), module.bias, torch.float32))
    return model


CASES = {
    "lora-dense": (None, "lora"),
    "dora-dense": (None, "dora"),
    "lora-q4_1": (quantize_q4_1, "lora"),
    "dora-int4": (lambda w: quantize_intk(w, 4, 32), "dora"),
    "qalora-q4_1": (quantize_q4_1, "qalora"),
    "qalora-int3-g64": (lambda w: quantize_intk(w, 3, 64), "qalora"),
}


def adapted(case, family="tiny-llama", **overrides):
    quantizer, method = CASES[case]
    model = tiny_model(family, **overrides)
    if quantizer is not None:
        quantized(model, quantizer)
    torch.manual_seed(0)
    add_adapter(model, AdapterSpec(method=method, r=4, alpha=8, init="none"))
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def ids():
    return torch.randint(0, 250, (2, 7), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_state_dict_reproduces_the_adapter_model(case, ids):
    model = adapted(case, "tiny-qwen2" if case == "lora-dense" else "tiny-llama")
    plain = tiny_model("tiny-qwen2" if case == "lora-dense" else "tiny-llama", seed=5)
    missing, unexpected = plain.load_state_dict(merged_state_dict(model), strict=True)
    assert not missing and not unexpected
    torch.testing.assert_close(logits(plain, ids), logits(model, ids), rtol=1e-4, atol=1e-5)


def test_save_merged_hf_directory_loads_in_transformers(ids, tmp_path):
    model = adapted("qalora-q4_1", tie_word_embeddings=True)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "stale.txt").write_text("replaced")
    save_merged_hf(model, tiny_tokenizer(), out)
    assert {"model.safetensors", "config.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"], "no temporary directory is left behind"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=1e-4, atol=1e-5)


def test_failed_export_leaves_the_old_directory(tmp_path, monkeypatch):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("old")

    class Broken:
        def save_pretrained(self, directory):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_merged_hf(adapted("lora-dense"), Broken(), out)
    assert (out / "keep.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_unknown_dtype_is_refused(tmp_path):
    with pytest.raises(ValueError, match="export dtype 'int8'"):
        save_merged_hf(adapted("lora-dense"), None, tmp_path / "x", dtype="int8")


def test_export_model_front_door(tmp_path):
    from loraforge.export import export_model

    model = adapted("qalora-q4_1")
    hf = export_model(model, tiny_tokenizer(), tmp_path / "hf", format="hf", dtype="float16")
    assert "float16" in hf.summary() and (tmp_path / "hf" / "model.safetensors").is_file()
    gguf = export_model(model, tiny_tokenizer(), tmp_path / "m.gguf", format="gguf")
    assert "14 Q4_1" in gguf.summary() and {t.name for t in gguf.requantized} == {"token_embd.weight", "output.weight"}
    with pytest.raises(ValueError, match="export format 'onnx'"):
        export_model(model, tiny_tokenizer(), tmp_path / "x", format="onnx")
