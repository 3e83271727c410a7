"""The server takes a GGUF LoRA file (made for llama.cpp / Ollama) as it is: hot-loaded through
``POST /v1/load_lora_adapter``, it serves what the PEFT folder it was exported from serves."""

import openai
import pytest
import torch

from loraforge.adapters.peft_format import AdapterFormatError, read_adapter_dir
from loraforge.export.gguf_lora import write_gguf_lora
from loraforge.export.gguf_writer import write_gguf
from loraforge.models import tiny_model, tiny_tokenizer
from loraforge.serve import Engine, Request
from loraforge.serve.api import create_app

from .helpers import ServerThread, greedy, http, step_logits

BASE = "tiny-llama"


def gguf_lora(adapter_dir, path, gguf_type="f32"):
    config, tensors = read_adapter_dir(adapter_dir)
    write_gguf_lora(tiny_model(BASE), config, tensors, adapter_dir, path, gguf_type)
    return path


@pytest.mark.parametrize("adapter", ["r8", "r16", "r64"])
def test_a_gguf_lora_serves_what_its_peft_folder_serves(adapter, adapter_dirs, tokenizer, tmp_path):
    """r16 is rsLoRA (the file's alpha is alpha·√r), r64 has rank and alpha patterns (scales folded into lora_b);
    q/k rows come back from llama.cpp's order."""
    engine = Engine(tiny_model(BASE), tokenizer, adapters={"peft": adapter_dirs[adapter]}, pool_bytes=1 << 23)
    engine.register_adapter("gguf", gguf_lora(adapter_dirs[adapter], tmp_path / "a.gguf"))
    ids = tokenizer.encode("A file for devices, served as it is")
    peft, gguf, base = step_logits(engine, [(ids, "peft"), (ids, "gguf"), (ids, None)])
    torch.testing.assert_close(gguf, peft, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(gguf, base, atol=1e-2)
    outputs = engine.generate([Request(ids, greedy(max_tokens=8), adapter=name) for name in ("peft", "gguf")])
    assert outputs[0].token_ids == outputs[1].token_ids


def test_hot_load_a_gguf_lora_over_http(adapter_dirs, tokenizer, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    gguf_lora(adapter_dirs["r16"], root / "device.gguf", "f16")
    engine = Engine(tiny_model(BASE), tokenizer, adapters={"peft": adapter_dirs["r16"]}, pool_bytes=1 << 23)
    with ServerThread(create_app(engine, BASE, adapter_root=root)) as server:
        status, text = http("POST", server.url + "/v1/load_lora_adapter", {"lora_name": "device", "lora_path": "device.gguf"})
        assert status == 200, text
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        texts = [client.completions.create(model=name, prompt="Hello", max_tokens=8, temperature=0).choices[0].text
                 for name in ("peft", "device")]
        assert texts[0] == texts[1]  # F16 tensors: equal greedy text, not bit-equal logits


def test_files_that_are_no_gguf_lora_for_this_base_are_refused(adapter_dirs, tokenizer, tmp_path):
    engine = Engine(tiny_model(BASE), tokenizer, pool_bytes=1 << 23)
    write_gguf(tiny_model(BASE), tiny_tokenizer(), tmp_path / "model.gguf", "f16")
    with pytest.raises(AdapterFormatError, match="not a GGUF LoRA adapter"):
        engine.register_adapter("x", tmp_path / "model.gguf")
    (tmp_path / "cut.gguf").write_bytes(gguf_lora(adapter_dirs["r8"], tmp_path / "a.gguf").read_bytes()[:5000])
    with pytest.raises(AdapterFormatError, match="truncated or corrupt"):
        engine.register_adapter("x", tmp_path / "cut.gguf")
    with pytest.raises(AdapterFormatError, match="architecture 'llama'.*'qwen2'"):
        Engine(tiny_model("tiny-qwen2"), tokenizer, pool_bytes=1 << 23).register_adapter("x", tmp_path / "a.gguf")
    assert list(engine.store.adapters) == []
