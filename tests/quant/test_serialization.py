"""Saving and loading a quantized model through safetensors."""

import json

import pytest
import torch
from safetensors import safe_open

from loraforge.models.tiny import tiny_model
from loraforge.quant.base import QuantLinear
from loraforge.quant.quantize_model import quantize_model
from loraforge.quant.serialization import load_quantized, quantized_state, save_quantized

TOKENS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize(
    "family, options",
    [
        ("tiny-llama", dict(type="nf4", double_quant=True, block_size=64)),
        ("tiny-qwen2", dict(type="fp4", double_quant=False, block_size=32)),
    ],
)
def test_round_trip_gives_identical_logits(tmp_path, family, options):
    model = quantize_model(tiny_model(family), compute_dtype="fp32", **options)
    expected = logits(model)
    save_quantized(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_quantized(tmp_path)
    assert torch.equal(logits(loaded), expected)
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 14
    assert all(t.device.type == "cpu" for t in [*loaded.parameters(), *loaded.buffers()])


def test_file_layout(tmp_path):
    model = quantize_model(tiny_model("tiny-llama"), compute_dtype="fp32")
    save_quantized(model, tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as file:
        layers = json.loads(file.metadata()["loraforge.quantized"])
        names = set(file.keys())
        packed = file.get_tensor("model.layers.0.mlp.up_proj.qweight.packed")
    assert layers["model.layers.0.mlp.up_proj"] == {
        "format": "nf4",
        "shape": [128, 64],
        "block_size": 64,
        "double_quant": True,
        "compute_dtype": "float32",
    }
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.rotary_emb.inv_freq"} <= names
    assert packed.dtype == torch.uint8 and packed.shape == (128 * 64 // 2,)
    assert torch.equal(packed, model.model.layers[0].mlp.up_proj.qweight.packed)


def test_tied_embeddings_are_stored_once_and_tied_again(tmp_path):
    model = quantize_model(tiny_model("tiny-llama", tie_word_embeddings=True), compute_dtype="fp32")
    tensors, metadata = quantized_state(model)
    assert "lm_head.weight" not in tensors
    assert json.loads(metadata["loraforge.tied"]) == {"lm_head.weight": "model.embed_tokens.weight"}
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded), logits(model))


def test_load_into_a_given_model(tmp_path):
    model = quantize_model(tiny_model("tiny-llama"), compute_dtype="fp32")
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path, tiny_model("tiny-llama", seed=1))
    assert torch.equal(logits(loaded), logits(model))


def test_a_checkpoint_for_another_architecture_is_refused(tmp_path):
    save_quantized(quantize_model(tiny_model("tiny-llama"), compute_dtype="fp32"), tmp_path)
    with pytest.raises(ValueError, match=r"does not fit LlamaForCausalLM: missing model.layers.2.input_layernorm"):
        load_quantized(tmp_path, tiny_model("tiny-llama", num_hidden_layers=3))
    with pytest.raises(ValueError, match=r"it has no layers model.layers.1.mlp.down_proj, "):
        load_quantized(tmp_path, tiny_model("tiny-llama", num_hidden_layers=1))
    with pytest.raises(ValueError, match=r"other shapes: lm_head.weight \(259, 64\) \(model: \(300, 64\)\)"):
        load_quantized(tmp_path, tiny_model("tiny-llama", vocab_size=300))


def test_saving_replaces_files_atomically_and_leaves_no_temporaries(tmp_path):
    model = quantize_model(tiny_model("tiny-llama"), compute_dtype="fp32")
    save_quantized(model, tmp_path)
    save_quantized(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    model = quantize_model(tiny_model("tiny-llama"), compute_dtype="fp32")
    save_quantized(model, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def crash(tensors, path, metadata):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("loraforge.quant.serialization.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_without_config_the_model_must_be_given(tmp_path):
    save_quantized(quantize_model(tiny_model("tiny-llama"), compute_dtype="fp32"), tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match="has no config.json; pass the model"):
        load_quantized(tmp_path)
