"""LLaMA-Factory SFT configs: conversion, refusals, and the files it mirrors (dataset_info.json)."""

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from loraforge.config import ConfigError, load_config
from loraforge.config.llamafactory import convert, is_llamafactory, looks_like_llamafactory
from loraforge.data import read_records, to_conversations

# LLaMA-Factory's examples/train_lora/llama3_lora_sft.yaml, with a local tiny model and template chatml.
EXAMPLE = """\
### model
model_name_or_path: tiny-llama
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity,alpaca_en_demo
template: chatml
cutoff_len: 2048
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/llama3-8b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null
"""

DATASET_INFO = {
    "identity": {
        "file_name": "identity.json",
        "columns": {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
                    "history": "history"},
    },
    "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
    "support_chats": {
        "file_name": "support.jsonl",
        "formatting": "sharegpt",
        "columns": {"messages": "dialog", "system": "system"},
        "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "customer", "assistant_tag": "agent",
                 "system_tag": "instructions", "observation_tag": "observation", "function_tag": "function_call"},
    },
    "alpaca_hub": {"hf_hub_url": "llamafactory/alpaca_en"},
}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A LLaMA-Factory checkout's layout: ``data/dataset_info.json`` and its files; the cwd is its root."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text(json.dumps(DATASET_INFO, indent=2))
    identity = [
        {"instruction": "Who are you?", "input": "", "output": "I am Quill.", "system": "Be brief.",
         "history": [["hi", "Hello!"]]},
        {"instruction": "What is your name?", "input": "", "output": "Quill.", "system": None, "history": []},
    ] * 4
    (data / "identity.json").write_text(json.dumps(identity))
    (data / "alpaca_en_demo.json").write_text(json.dumps(
        [{"instruction": f"Say {w}", "input": "loudly", "output": w.upper()} for w in ("cat", "dog", "sun", "owl")]))
    support = [
        {"dialog": [{"speaker": "instructions", "text": "You help with orders."},
                    {"speaker": "customer", "text": "Where is my parcel?"},
                    {"speaker": "agent", "text": "On its way."}]},
        {"system": "Be kind.", "dialog": [{"speaker": "customer", "text": "Thanks"},
                                          {"speaker": "agent", "text": "Any time."}]},
    ]
    (data / "support.jsonl").write_text("".join(json.dumps(r) + "\n" for r in support))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(project: Path, text: str, name: str = "lf.yaml") -> Path:
    path = project / name
    path.write_text(textwrap.dedent(text))
    return path


def test_the_example_converts_key_by_key(project):
    conversion = convert(write(project, EXAMPLE))
    c = conversion.config
    assert c.model.source == "tiny-llama"
    assert (c.adapter.method, c.adapter.r, c.adapter.alpha, c.adapter.target_modules) == ("lora", 8, 16.0, "all-linear")
    assert c.data.train_files == [str(project / "data" / name) for name in ("identity.json", "alpaca_en_demo.json")]
    assert (c.data.format, c.data.columns, c.data.template, c.data.cutoff_len) == ("alpaca", {}, "chatml", 2048)
    t = c.train
    assert (t.batch_size, t.grad_accum, t.lr, t.epochs, t.scheduler, t.warmup_ratio) == (1, 8, 1e-4, 3.0, "cosine", 0.1)
    assert (t.precision, t.logging_steps, t.save_steps, t.resume_from_checkpoint) == ("bf16", 10, 500, None)
    assert t.distributed_timeout == 180000000
    assert c.output.dir == str(project / "saves/llama3-8b/lora/sft")
    assert (c.output.overwrite_output_dir, c.output.plot, c.output.tensorboard) == (True, True, False)
    notes = "\n".join(conversion.notes)
    for key in ("do_train", "trust_remote_code", "overwrite_cache", "preprocessing_num_workers",
                "dataloader_num_workers", "save_only_model"):
        assert key in notes


def test_detection_by_top_level_keys(project):
    assert looks_like_llamafactory(write(project, EXAMPLE))
    assert not is_llamafactory({"model": {"source": "tiny-llama"}, "data": {"train_files": "a.json"}})
    assert not is_llamafactory({"model_name_or_path": "x", "train": {}})


def test_adapter_and_quantization_keys(project):
    base = (EXAMPLE.replace("lora_target: all", "lora_target: q_proj, v_proj")
            .replace("lr_scheduler_type: cosine", "lr_scheduler_type: constant_with_warmup"))
    c = convert(write(project, base + textwrap.dedent("""\
        lora_alpha: 32
        lora_dropout: 0.05
        use_dora: true
        use_rslora: true
        loraplus_lr_ratio: 16.0
        quantization_bit: 4
        quantization_type: fp4
        double_quantization: false
        max_steps: 5
        weight_decay: 0.01
        max_grad_norm: 0.5
        seed: 7
        gradient_checkpointing: true
        """))).config
    assert (c.adapter.method, c.adapter.alpha, c.adapter.dropout, c.adapter.use_rslora) == ("dora", 32.0, 0.05, True)
    assert c.adapter.target_modules == ["q_proj", "v_proj"]
    q = c.model.quantization
    assert (q.type, q.double_quant, q.compute_dtype) == ("fp4", False, "bf16")
    t = c.train
    assert (t.loraplus_lr_ratio, t.max_steps, t.weight_decay, t.max_grad_norm, t.seed) == (16.0, 5, 0.01, 0.5, 7)
    assert (t.gradient_checkpointing, t.scheduler) == (True, "constant")


@pytest.mark.parametrize("extra, init", [("pissa_init: true\npissa_iter: 4\n", "pissa_niter_4"),
                                         ("pissa_init: true\npissa_iter: -1\n", "pissa"),
                                         ("pissa_init: true\n", "pissa_niter_16")])
def test_pissa(project, extra, init):
    assert convert(write(project, EXAMPLE + extra)).config.adapter.init == init


def test_sharegpt_with_custom_tags_reads_its_file(project):
    text = EXAMPLE.replace("dataset: identity,alpaca_en_demo", "dataset: support_chats")
    conversion = convert(write(project, text))
    data = conversion.config.data
    assert data.format == "sharegpt"
    assert data.columns == {"conversations": "dialog", "role_tag": "speaker", "content_tag": "text",
                            "user_tag": "customer", "assistant_tag": "agent", "system_tag": "instructions"}
    assert any("observation_tag" in note for note in conversion.notes)
    conversations = to_conversations(read_records(data.train_files), data.format, data.columns, None)
    assert [m["role"] for m in conversations[0].messages] == ["system", "user", "assistant"]
    assert conversations[1].messages == [{"role": "system", "content": "Be kind."},
                                         {"role": "user", "content": "Thanks"},
                                         {"role": "assistant", "content": "Any time."}]


def test_alpaca_system_and_history_columns_become_turns(project):
    data = convert(write(project, EXAMPLE.replace("identity,alpaca_en_demo", "identity"))).config.data
    first = to_conversations(read_records(data.train_files), data.format, data.columns, None)[0].messages
    assert [m["content"] for m in first] == ["Be brief.", "hi", "Hello!", "Who are you?", "I am Quill."]


def test_every_refusal_at_once_with_file_line(project):
    text = (EXAMPLE.replace("stage: sft", "stage: dpo").replace("finetuning_type: lora", "finetuning_type: full")
            .replace("dataset: identity,alpaca_en_demo", "dataset: identity,alpaca_hub")
            .replace("template: chatml", "template: llama3") + "fp16: true\nneftune_noise_alpha: 5\n")
    path = write(project, text)
    with pytest.raises(ConfigError) as info:
        convert(path)
    message = str(info.value)
    lines = text.splitlines()

    def line_of(key):
        return f"{path}:{next(i for i, line in enumerate(lines, 1) if line.startswith(key + ':'))}: {key}: "

    assert message.startswith("6 problems in ")
    assert line_of("stage") + "'dpo': loraforge trains supervised fine-tuning only (stage: sft)" in message
    assert line_of("finetuning_type") + "'full': loraforge trains adapters only (finetuning_type: lora)" in message
    assert line_of("dataset") + "dataset 'alpaca_hub'" in message
    assert "is on a hub (hf_hub_url: llamafactory/alpaca_en); loraforge reads local files only" in message
    assert line_of("template") + "'llama3': loraforge renders ChatML or the tokenizer's own chat template" in message
    assert "templates it maps: chatml, qwen, default, empty" in message
    assert line_of("fp16") + "mixed precision is fp32 or bf16 here" in message
    assert line_of("neftune_noise_alpha") + "not a LLaMA-Factory key that loraforge knows" in message
    assert line_of("bf16") not in message


def test_max_samples_is_named_as_unsupported(project):
    with pytest.raises(ConfigError) as info:
        convert(write(project, EXAMPLE + "max_samples: 1000\n"))
    assert "max_samples: loraforge has no sample cap" in str(info.value)


def test_hub_model_and_missing_dataset_are_refused(project):
    text = EXAMPLE.replace("tiny-llama", "meta-llama/Meta-Llama-3-8B-Instruct").replace("alpaca_en_demo", "alpaca_en")
    with pytest.raises(ConfigError) as info:
        convert(write(project, text))
    message = str(info.value)
    assert "model_name_or_path: 'meta-llama/Meta-Llama-3-8B-Instruct' is no local folder" in message
    assert "huggingface-cli download meta-llama/Meta-Llama-3-8B-Instruct" in message
    assert "no dataset 'alpaca_en' in data/dataset_info.json; did you mean 'alpaca_en_demo'?" in message


def test_a_value_our_schema_refuses_names_the_llamafactory_key(project):
    path = write(project, EXAMPLE.replace("learning_rate: 1.0e-4", "learning_rate: -1"))
    with pytest.raises(ConfigError) as info:
        convert(path)
    line = EXAMPLE.splitlines().index("learning_rate: 1.0e-4") + 1
    assert str(info.value) == f"{path}:{line}: learning_rate: as train.lr: must be > 0, got -1.0"


def test_mixed_formats_are_refused(project):
    with pytest.raises(ConfigError) as info:
        convert(write(project, EXAMPLE.replace("identity,alpaca_en_demo", "identity,support_chats")))
    assert "loraforge reads all data files with one format and column mapping" in str(info.value)


def test_stages_and_types_are_refused(project):
    for old, new, text in [("stage: sft", "stage: pt", "'pt': loraforge trains supervised fine-tuning only"),
                           ("finetuning_type: lora", "finetuning_type: freeze", "'freeze': loraforge trains adapters"),
                           ("finetuning_type: lora", "finetuning_type: oft", "'oft': loraforge trains adapters")]:
        with pytest.raises(ConfigError) as info:
            convert(write(project, EXAMPLE.replace(old, new)))
        assert text in str(info.value)


def test_overrides_use_llamafactory_names(project):
    c = convert(write(project, EXAMPLE), ["learning_rate=3e-4", "bf16=false"]).config
    assert (c.train.lr, c.train.precision) == (3e-4, "fp32")


def test_the_converted_config_round_trips_through_yaml(project, tmp_path):
    from loraforge.config import save_config

    config = convert(write(project, EXAMPLE)).config
    save_config(config, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == config
    assert yaml.safe_load((tmp_path / "out.yaml").read_text())["adapter"]["target_modules"] == "all-linear"
