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


def test_export_a_qalora_run_to_gguf_and_hf(tmp_path, capsys):
    """train (QA-LoRA on INT4) -> export --run: the GGUF holds Q4_1 blocks; the HF folder loads and matches."""
    import json

    import gguf
    import torch

    from loraforge.models import load_model

    rows = [{"instruction": f"say {w}", "output": w.upper()} for w in ["cat", "dog", "sun", "sky"]]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "c.yaml").write_text(
        "model: {source: tiny-llama, threads: 1, quantization: {type: int, bits: 4, group_size: 32, compute_dtype: fp32}}\n"
        "adapter: {method: qalora, r: 4}\n"
        "data: {train_files: train.jsonl, cutoff_len: 64}\n"
        f"train: {{max_steps: 5, batch_size: 2, lr: 0.05}}\noutput: {{dir: {tmp_path / 'run'}}}\n")
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    assert main(["export", "--run", str(tmp_path / "run"), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_1" and types["blk.1.ffn_down.weight"] == "Q4_1"
    assert main(["export", "--run", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    merged, _ = load_model(str(tmp_path / "hf"))
    assert merged(torch.tensor([[1, 2, 3]])).logits.isfinite().all()
    assert "wrote" in capsys.readouterr().out


def test_serve_rejects_a_malformed_adapter_flag(capsys):
    assert main(["serve", "--model", "tiny-llama", "--adapter", "no-equals-sign"]) == 2
    assert "expected NAME=PATH" in capsys.readouterr().err


def test_serve_answers_the_openai_client(tmp_path):
    """`loraforge serve` in a subprocess, asked through the official openai client for the base and an adapter."""
    import socket
    import subprocess
    import sys
    import time

    from openai import OpenAI

    model = tiny_model("tiny-llama")
    spec = AdapterSpec(r=4, init="none")
    add_adapter(model, spec)
    save_adapter(model, tmp_path / "a", spec)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "loraforge.cli.main", "serve", "--model", "tiny-llama",
                             "--adapter", f"mine={tmp_path / 'a'}", "--port", str(port), "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=30)
        deadline = time.time() + 60
        while True:
            try:
                models = {m.id for m in client.models.list().data}
                break
            except Exception:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
                time.sleep(0.2)
        assert models == {"tiny-llama", "mine"}
        answers = [client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=6, temperature=0).choices[0].message.content
                   for name in ("tiny-llama", "mine")]
        assert answers[0] != answers[1], "the adapter must change the answer"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
