"""The command-line front door: chat one-shot, info, and user errors without tracebacks."""

import warnings

import pytest

from loraforge.adapters import AdapterSpec, add_adapter, save_adapter
from loraforge.cli.main import main
from loraforge.models import tiny_model


def test_chat_one_shot_answers_with_the_adapter_as_peft_does(tmp_path, capsys):
    """The one-shot answer is PEFT's greedy answer on the same adapter, and differs from the base's."""
    import torch
    from peft import PeftModel

    from loraforge.data.tokenize import prompt_ids
    from loraforge.models import tiny_tokenizer

    model = tiny_model("tiny-llama")
    spec = AdapterSpec(r=4, init="none")
    add_adapter(model, spec)
    save_adapter(model, tmp_path, spec)
    tokenizer = tiny_tokenizer()
    ids = torch.tensor([prompt_ids(tokenizer, [{"role": "user", "content": "hi"}], "auto")])
    peft_model = PeftModel.from_pretrained(tiny_model("tiny-llama"), tmp_path).eval()
    with torch.no_grad():
        out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=8, min_new_tokens=8, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

    def answer(*adapter):
        assert main(["chat", "--model", "tiny-llama", *adapter, "--prompt", "hi", "--max-new-tokens", "8",
                     "--device", "cpu"]) == 0
        return capsys.readouterr().out.strip()

    assert answer("--adapter", str(tmp_path)) == expected
    assert answer() != expected


def test_info_reports_quantized_storage(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model: {source: tiny-llama, quantization: {type: nf4, compute_dtype: fp32}}\n")
    assert main(["info", str(config)]) == 0
    out = capsys.readouterr().out
    assert "14 quantized linears (nf4)" in out and "bits/parameter" in out
    assert "computing in float32" in out and "compute_dtypes: {'float32': 14}" in out and "bf16 asked" not in out


@pytest.mark.parametrize("bf16_units, path", [(True, "computing in bfloat16"), (False, "the fp32 path runs")])
def test_info_says_which_compute_path_runs_for_bf16(bf16_units, path, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("loraforge.quant.quantize_model.bf16_supported", lambda device: bf16_units)
    config = tmp_path / "c.yaml"
    config.write_text("model: {source: tiny-llama, quantization: {type: nf4, compute_dtype: bf16}}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's own warning is tested in tests/quant
        assert main(["info", str(config)]) == 0
    assert path in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["chat", "--model", "tiny-llama", "--adapter", "/nonexistent", "--prompt", "x"], "no such adapter directory"),
    (["train", "/nonexistent.yaml"], "nonexistent.yaml"),
    (["chat", "--model", "/nowhere/model.gguf", "--prompt", "x"], "no such GGUF file"),
])
def test_user_errors_are_one_line_without_traceback(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err


def test_a_model_transformers_cannot_load_is_an_error_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": "wide"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert main(["chat", "--model", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path}: transformers could not load it") and "Traceback" not in err


def test_a_missing_runtime_package_names_the_fix(monkeypatch, capsys):
    """transformers 5.24 raises this when accelerate is missing and a GGUF (the default model) is loaded."""
    import transformers

    from loraforge.models import sources

    def refuse(*args, **kwargs):
        raise ValueError("accelerate is required when loading a GGUF file")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(sources, "gguf_architecture", lambda path: "llama")
    assert main(["chat", "--model", "/some/where/model.gguf", "--quantization", "none", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "accelerate is required" in err and "bash scripts/setup.sh" in err and "Traceback" not in err


@pytest.mark.parametrize("device, message", [
    ("mps", "only cpu and cuda are supported"),
    ("gpu:0", "is not a device name"),
    ("cuda:99", "CUDA device(s) visible"),
])
def test_bad_device_is_an_error_line(device, message, capsys):
    assert main(["chat", "--model", "tiny-llama", "--prompt", "x", "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device") and message in err


def test_export_a_qalora_run_to_gguf_and_hf(tmp_path, capsys):
    """train (QA-LoRA on INT4) -> export --run: the GGUF holds Q4_1 blocks; the HF folder loads and matches."""
    import json

    import gguf
    import torch

    from loraforge.adapters.peft_format import load_adapter_weights, read_adapter_dir
    from loraforge.config import load_config
    from loraforge.models import load_model
    from loraforge.models.gguf_native import load_gguf_native
    from loraforge.quant.base import QuantLinear
    from loraforge.train.run import prepare_model

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
    assert "wrote" in capsys.readouterr().out

    # Both exports compute what the run's quantized base plus its unmerged adapter computes.
    config = load_config(tmp_path / "run" / "config.yaml", check_files=False)
    unmerged, _, _ = prepare_model(config, torch.device("cpu"))
    load_adapter_weights(unmerged, config.adapter.name, read_adapter_dir(tmp_path / "run" / "adapter")[1],
                         tmp_path / "run" / "adapter")
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = unmerged(tokens).logits
        hf_model, gguf_model = load_model(str(tmp_path / "hf"))[0], load_gguf_native(tmp_path / "m.gguf")[0]
        hf, gguf_logits = hf_model(tokens).logits, gguf_model(tokens).logits
    # The HF folder holds the merged weights in fp32: only summation order differs.
    assert (hf - reference).abs().max() < 1e-4
    # The GGUF holds the merged decoder as Q4_1 blocks whose d and m are fp16: each weight is the HF
    # folder's up to fp16 rounding of d·q and m (2**-11 relative each, both within the group's range).
    for name, layer in gguf_model.named_modules():
        if isinstance(layer, QuantLinear):
            merged = hf_model.get_submodule(name).weight
            assert (layer.dequantize(torch.float32) - merged).abs().max() <= 2**-10 * merged.abs().max(), name
    # The embedding and head are re-quantized to Q8_0, and a tiny random model amplifies such errors
    # across layers: the logits keep their shape rather than their digits.
    assert torch.corrcoef(torch.stack([gguf_logits.flatten(), reference.flatten()]))[0, 1] > 0.99


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


def test_train_override_with_a_familiar_name_suggests_ours(tmp_path, capsys):
    (tmp_path / "train.json").write_text("[]")
    config = tmp_path / "cfg.yaml"
    config.write_text("data:\n  train_files: train.json\n")
    assert main(["train", str(config), "train.learning_rate=1e-4"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'train.learning_rate'; did you mean 'train.lr'?" in err and "Traceback" not in err


LLAMAFACTORY_SFT = """\
model_name_or_path: tiny-llama
trust_remote_code: true
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 4
lora_target: all
dataset: identity,alpaca_en_demo
template: chatml
cutoff_len: 64
preprocessing_num_workers: 16
output_dir: saves/tiny/lora/sft
logging_steps: 1
save_steps: 500
plot_loss: true
overwrite_output_dir: true
report_to: none
per_device_train_batch_size: 2
gradient_accumulation_steps: 2
learning_rate: 1.0e-3
num_train_epochs: 3.0
max_steps: 2
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: false
ddp_timeout: 180000000
resume_from_checkpoint: null
"""


@pytest.fixture
def llamafactory_project(tmp_path, monkeypatch):
    """A LLaMA-Factory-style folder (``data/dataset_info.json``, an alpaca set with system and history
    columns) holding the SFT config ``lf.yaml``; the current directory is its root."""
    import json

    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text(json.dumps({
        "identity": {"file_name": "identity.json", "columns": {"prompt": "instruction", "query": "input",
                                                               "response": "output", "system": "system",
                                                               "history": "history"}},
        "alpaca_en_demo": {"file_name": "alpaca_en_demo.json", "formatting": "alpaca"},
    }))
    (data / "identity.json").write_text(json.dumps(
        [{"instruction": "Who are you?", "input": "", "output": "Quill.", "system": "Be brief.",
          "history": [["hi", "Hello!"]]}] * 4))
    (data / "alpaca_en_demo.json").write_text(json.dumps(
        [{"instruction": f"Say {w}", "input": "", "output": w.upper()} for w in ("cat", "dog", "sun", "owl")]))
    (tmp_path / "lf.yaml").write_text(LLAMAFACTORY_SFT)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_train_runs_a_llamafactory_config_and_writes_its_loraforge_equivalent(llamafactory_project, capsys):
    import json

    from loraforge.config import load_config
    from loraforge.config.llamafactory import convert

    assert main(["train", "lf.yaml"]) == 0
    out = capsys.readouterr().out
    run = llamafactory_project / "saves/tiny/lora/sft"
    assert "a LLaMA-Factory config" in out and "do_train" in out and f"{run / 'loraforge.yaml'}" in out
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(s.get("step", 0) for s in steps) == 2
    assert (run / "adapter" / "adapter_config.json").exists()
    written = load_config(run / "loraforge.yaml")
    assert written == convert("lf.yaml").config
    assert (written.train.max_steps, written.adapter.r, written.adapter.alpha) == (2, 4, 8.0)


def test_convert_writes_the_loraforge_config(llamafactory_project, capsys):
    from loraforge.config import load_config
    from loraforge.config.llamafactory import convert

    assert main(["convert", "--from", "llamafactory", "lf.yaml", "--out", "moved/loraforge.yaml"]) == 0
    assert "note: accepted without effect: trust_remote_code" in capsys.readouterr().out
    assert load_config("moved/loraforge.yaml") == convert("lf.yaml").config


def test_convert_reports_every_refusal(llamafactory_project, capsys):
    (llamafactory_project / "lf.yaml").write_text(
        LLAMAFACTORY_SFT.replace("stage: sft", "stage: dpo").replace("finetuning_type: lora", "finetuning_type: full"))
    assert main(["convert", "--from", "llamafactory", "lf.yaml", "--out", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 2 problems in lf.yaml:\nlf.yaml:3: stage: 'dpo'")
    assert "lf.yaml:5: finetuning_type: 'full'" in err
    assert not (llamafactory_project / "x.yaml").exists()
