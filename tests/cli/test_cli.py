"""The command-line front door: chat one-shot, info, and user errors without tracebacks."""

import pytest

from loraforge.adapters import AdapterSpec, add_adapter, save_adapter
from loraforge.cli.main import main
from loraforge.models import tiny_model


def test_chat_one_shot_with_an_adapter(tmp_path, capsys):
    model = tiny_model("tiny-llama")
    spec = AdapterSpec(r=2, init="none")
    add_adapter(model, spec)
    save_adapter(model, tmp_path, spec)
    assert main(["chat", "--model", "tiny-llama", "--adapter", str(tmp_path), "--prompt", "hi",
                 "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_info_reports_quantized_storage(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model: {source: tiny-llama, quantization: {type: nf4, compute_dtype: fp32}}\n")
    assert main(["info", str(config)]) == 0
    out = capsys.readouterr().out
    assert "14 quantized linears (nf4)" in out and "bits/parameter" in out


@pytest.mark.parametrize("argv, message", [
    (["chat", "--model", "tiny-llama", "--adapter", "/nonexistent", "--prompt", "x"], "no such adapter directory"),
    (["train", "/nonexistent.yaml"], "nonexistent.yaml"),
    (["chat", "--model", "/nowhere/model.gguf", "--prompt", "x"], "no such GGUF file"),
])
def test_user_errors_are_one_line_without_traceback(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err
