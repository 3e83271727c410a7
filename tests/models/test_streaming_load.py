"""Streaming a safetensors folder into a quantized model: bit-identical to quantizing the dense model, one
layer at a time, tied embeddings kept, vision-language models included."""

import json
import weakref

import pytest
import torch
from references import require
from safetensors import safe_open
from torch import nn

from loraforge.config.schema import ModelConfig, QuantizationConfig
from loraforge.models import quantized_base, streaming_load
from loraforge.models.kind import is_vision_language
from loraforge.models.prepare import _quantize, load_base
from loraforge.models.sources import ModelSourceError, load_model
from loraforge.models.streaming_load import stream_quantized
from loraforge.models.tiny import tiny_model, tiny_tokenizer
from loraforge.models.tiny_vlm import tiny_vlm, tiny_vlm_processor
from loraforge.quant.base import QuantLinear

CPU = torch.device("cpu")
IDS = torch.tensor([[1, 5, 9, 200, 17, 3, 44]])


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))


def save_folder(model, processor, folder, shard="40KB"):
    """``model`` as a sharded HF folder, its linear biases made random first (transformers zeroes them,
    which would hide a lost bias)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.5, generator=generator)
    model.save_pretrained(folder, max_shard_size=shard)
    processor.save_pretrained(folder)
    return folder


def dense_then_quantized(config):
    """Today's path: the whole dense model, then ``quantize_model``."""
    model, _ = load_model(config.source, config.dtype)
    return _quantize(model, config)


def assert_identical(ours, reference):
    ours_state, reference_state = ours.state_dict(), reference.state_dict()
    assert ours_state.keys() == reference_state.keys()
    for name, tensor in reference_state.items():
        assert ours_state[name].dtype == tensor.dtype, name
        assert torch.equal(ours_state[name], tensor), name
    assert [type(m) for m in ours.modules()] == [type(m) for m in reference.modules()]
    assert ours.config.to_dict() == reference.config.to_dict()
    assert ours.generation_config.to_dict() == reference.generation_config.to_dict()
    assert all(not t.is_meta for t in [*ours.parameters(), *ours.buffers()])


@pytest.mark.parametrize("family, dtype, quant, overrides", [
    ("tiny-llama", "float32", {"type": "nf4", "double_quant": True, "block_size": 64}, {}),
    ("tiny-qwen2", "bfloat16", {"type": "int", "bits": 4, "group_size": 32}, {"tie_word_embeddings": True}),
    ("tiny-mistral", "float32", {"type": "fp4", "double_quant": False, "block_size": 32}, {}),
    ("tiny-qwen2", "float16", {"type": "int", "bits": 2, "group_size": 64}, {}),
])
def test_streaming_equals_quantizing_the_dense_model(tmp_path, family, dtype, quant, overrides):
    folder = save_folder(tiny_model(family, **overrides), tiny_tokenizer(), tmp_path / "m")
    assert (folder / "model.safetensors.index.json").is_file(), "the folder must be sharded"
    config = ModelConfig(source=str(folder), dtype=dtype, quantization=QuantizationConfig(**quant, compute_dtype="fp32"))
    reference = dense_then_quantized(config)
    ours, tokenizer = stream_quantized(folder, config, CPU)
    assert_identical(ours, reference)
    assert sum(isinstance(m, QuantLinear) for m in ours.modules()) == 14
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == bool(overrides.get("tie_word_embeddings"))
    with torch.no_grad():
        assert torch.equal(ours(IDS).logits, reference(IDS).logits)
    assert tokenizer("hi")["input_ids"] == tiny_tokenizer()("hi")["input_ids"]


def test_load_base_streams_hf_folders_and_never_builds_the_dense_model(tmp_path, monkeypatch):
    """The dense loader is never called, and each dense weight is gone before the next layer is quantized."""
    folder = save_folder(tiny_model("tiny-llama"), tiny_tokenizer(), tmp_path / "m")
    config = ModelConfig(source=str(folder), quantization=QuantizationConfig(type="nf4", compute_dtype="fp32"))
    reference = dense_then_quantized(config)

    def no_dense_load(*args, **kwargs):
        raise AssertionError("the dense model was loaded")

    monkeypatch.setattr(quantized_base, "load_model", no_dense_load)
    alive = []
    quantize = streaming_load.QUANTIZERS["nf4"]

    def quantize_one(weight, *args):
        if not weight.is_meta:  # the skeleton's layers are quantized on the meta device first
            assert all(ref() is None for ref in alive), "a dense weight outlived its layer's quantization"
            alive.append(weakref.ref(weight))
        return quantize(weight, *args)

    monkeypatch.setitem(streaming_load.QUANTIZERS, "nf4", quantize_one)
    model, _ = load_base(config, CPU)
    assert len(alive) == 14
    assert_identical(model, reference)


def test_nf4_bytes_are_bitsandbytes_of_the_file_weights(tmp_path):
    bnb = require("bitsandbytes")
    folder = save_folder(tiny_model("tiny-llama"), tiny_tokenizer(), tmp_path / "m", shard="2GB")
    config = ModelConfig(source=str(folder), quantization=QuantizationConfig(type="nf4", compute_dtype="fp32"))
    model, _ = stream_quantized(folder, config, CPU)
    with safe_open(folder / "model.safetensors", framework="pt") as file:
        weight = file.get_tensor("model.layers.1.self_attn.o_proj.weight")
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = model.model.layers[1].self_attn.o_proj.qweight
    assert torch.equal(ours.packed, packed.flatten())
    assert torch.equal(ours.absmax_codes, state.absmax)
    assert torch.equal(ours.nested_absmax, state.state2.absmax)
    assert torch.equal(ours.absmax_offset, state.offset)


def test_vision_language_model_streams_its_language_model_only(tmp_path):
    """A Qwen2.5-VL folder in the Hub's key layout (``model.layers.*``, ``visual.*``) lands in transformers 5's
    modules (``model.language_model.*``, ``model.visual.*``); the vision tower stays dense."""
    folder = save_folder(tiny_vlm(), tiny_vlm_processor(), tmp_path / "vlm")
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.mlp.up_proj.weight" in index and "visual.blocks.0.attn.qkv.weight" in index
    config = ModelConfig(source=str(folder), quantization=QuantizationConfig(type="nf4", compute_dtype="fp32"))
    reference = dense_then_quantized(config)
    model, processor = stream_quantized(folder, config, CPU)
    assert is_vision_language(model) and processor.image_token_id == tiny_vlm_processor().image_token_id
    assert_identical(model, reference)
    quantized = [name for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert quantized and all(name.startswith("model.language_model.") for name in quantized)
    assert isinstance(model.model.visual.blocks[0].attn.qkv, nn.Linear)


def test_a_missing_tensor_is_named(tmp_path):
    folder = save_folder(tiny_model("tiny-llama"), tiny_tokenizer(), tmp_path / "m", shard="2GB")
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"], tensors["model.norm.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = ModelConfig(source=str(folder), quantization=QuantizationConfig(type="nf4", compute_dtype="fp32"))
    with pytest.raises(ModelSourceError, match=r"no weights for model.layers.1.mlp.up_proj, model.norm.weight"):
        stream_quantized(folder, config, CPU)


def test_bad_settings_fail_before_any_tensor_is_read(tmp_path, monkeypatch):
    folder = save_folder(tiny_model("tiny-llama"), tiny_tokenizer(), tmp_path / "m")
    monkeypatch.setattr(streaming_load, "QUANTIZERS", {})  # reading a layer would raise KeyError
    config = ModelConfig(source=str(folder), quantization=QuantizationConfig(type="nf4", block_size=4096))
    with pytest.raises(ValueError, match="block_size 4096 does not divide the element count"):
        stream_quantized(folder, config, CPU)


def test_a_checkpoint_that_needs_a_conversion_is_loaded_dense_with_the_reason(tmp_path, monkeypatch):
    """transformers converts some checkpoints' tensors (fused experts, split qkv) on load; those go the dense
    way, still identical, and the warning names the tensor."""
    from transformers import conversion_mapping
    from transformers.core_model_loading import Chunk, WeightConverter

    folder = save_folder(tiny_model("tiny-llama"), tiny_tokenizer(), tmp_path / "m")
    config = ModelConfig(source=str(folder), quantization=QuantizationConfig(type="nf4", compute_dtype="fp32"))
    reference = dense_then_quantized(config)
    split = WeightConverter(source_patterns="mlp.gate_up_proj.weight",
                            target_patterns=["mlp.gate_proj.weight", "mlp.up_proj.weight"], operations=[Chunk(dim=0)])
    monkeypatch.setattr(conversion_mapping, "get_model_conversion_mapping", lambda model: [split])
    monkeypatch.setattr(streaming_load, "_shards", lambda folder: [_fused_checkpoint(folder, tmp_path)])
    with pytest.warns(UserWarning, match=r"loaded dense, then quantized: .*gate_up_proj.weight needs transformers' conv"):
        model, _ = load_base(config, CPU)
    assert_identical(model, reference)


def _fused_checkpoint(folder, tmp_path):
    from safetensors.torch import save_file

    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(folder / index["model.layers.0.mlp.gate_proj.weight"], framework="pt") as file:
        gate = file.get_tensor("model.layers.0.mlp.gate_proj.weight")
    path = tmp_path / "fused.safetensors"
    save_file({"model.layers.0.mlp.gate_up_proj.weight": torch.cat([gate, gate])}, path)
    return path


def test_a_gguf_source_with_nf4_is_dequantized_then_quantized_and_cached(tmp_path, monkeypatch):
    from loraforge.export.gguf_writer import write_gguf

    path = tmp_path / "tiny.gguf"
    write_gguf(tiny_model("tiny-llama"), tiny_tokenizer(), path)
    config = ModelConfig(source=str(path), quantization=QuantizationConfig(type="nf4", compute_dtype="fp32"))
    reference = dense_then_quantized(config)
    first, _ = load_base(config, CPU)
    assert_identical(first, reference)
    monkeypatch.setattr(quantized_base, "load_model", None)  # the second load must come from the cache
    second, tokenizer = load_base(config, CPU)
    assert_identical(second, reference)
    assert tokenizer("hello")["input_ids"] == load_model(str(path))[1]("hello")["input_ids"]
