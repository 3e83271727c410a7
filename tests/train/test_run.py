"""The training recipe end to end on tiny-llama: files, resume, interruption and bad input."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraforge.config import load_config
from loraforge.train import TrainingError, run_training
from loraforge.train import run as run_module


def quiet(*_):
    pass


def adapter_tensors(run_dir):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_end_to_end_writes_every_artifact_and_learns(toy_run):
    config = load_config(toy_run(train={"max_steps": 90, "eval_steps": 30}, data={"test_files": "test.jsonl"}))
    result = run_training(config, echo=quiet)
    run_dir = result.run_dir
    for name in ["config.yaml", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "metrics.jsonl", "loss_curve.png", "summary.json"]:
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tensorboard").iterdir())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 90 and sum(losses[-10:]) / 10 < sum(losses[:5]) / 5 - 0.2
    assert [r["step"] for r in records if "eval_loss" in r] == [30, 60, 90]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 90 and summary["tokens_per_s"] > 0 and "test_exact_match_after" in summary


def test_loss_matches_hf_loss_on_labelled_positions(toy_run):
    """Our head-only-where-labelled loss equals transformers' own loss for the same batch."""
    from loraforge.data.collate import collate
    from loraforge.data.tokenize import Sample
    from loraforge.models import tiny_model
    from loraforge.train.loss import summed_token_loss

    model = tiny_model("tiny-llama")
    samples = [Sample([5, 6, 7, 8, 9], [-100, -100, 7, 8, 9]), Sample([1, 2, 3], [-100, 2, 3])]
    batch = collate(samples, pad_id=256)
    loss_sum, count = summed_token_loss(model, batch)
    reference = model(**batch).loss
    assert count == 5
    assert torch.allclose(loss_sum / count, reference, atol=1e-6)


def test_refuses_a_folder_holding_another_run(toy_run):
    first = run_training(load_config(toy_run()), echo=quiet)
    before = adapter_tensors(first.run_dir)
    with pytest.raises(TrainingError, match="already holds a run"):
        run_training(load_config(toy_run(train={"lr": 5e-3})), echo=quiet)
    with pytest.raises(TrainingError, match="different settings for train.lr"):
        run_training(load_config(toy_run(train={"lr": 5e-3, "resume_from_checkpoint": "latest"})), echo=quiet)
    assert all(torch.equal(t, adapter_tensors(first.run_dir)[k]) for k, t in before.items()), "refusal must not touch"
    second = run_training(load_config(toy_run(output={"overwrite_output_dir": True}, train={"lr": 5e-3})), echo=quiet)
    assert not all(torch.equal(t, adapter_tensors(second.run_dir)[k]) for k, t in before.items())


def test_nan_loss_stops_and_keeps_last_good_checkpoint(toy_run, monkeypatch):
    real = run_module.summed_token_loss
    calls = []

    def poisoned(model, batch):
        calls.append(1)
        loss, n = real(model, batch)
        return (loss * float("nan") if len(calls) > 8 else loss), n  # step 5 (grad_accum 2) diverges

    monkeypatch.setattr(run_module, "summed_token_loss", poisoned)
    config = load_config(toy_run(train={"save_steps": 2}))
    with pytest.raises(TrainingError, match="loss is nan at step 5"):
        run_training(config, echo=quiet)
    checkpoints = sorted(p.name for p in (Path(config.output.dir) / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]


def _train_cli(config_path, *overrides):
    return subprocess.Popen([sys.executable, "-m", "loraforge.cli.main", "train", str(config_path), *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("how", ["sigkill", "ctrl-c"])
def test_killed_and_resumed_run_ends_with_the_same_adapter(toy_run, tmp_path, how):
    steps = {"max_steps": 60, "save_steps": 3, "save_total_limit": 2}
    reference_cfg = toy_run(train=steps, output={"dir": str(tmp_path / "reference")})
    assert _train_cli(reference_cfg).wait() == 0
    reference = adapter_tensors(tmp_path / "reference")

    config = toy_run(train=steps, output={"dir": str(tmp_path / "killed")})
    proc = _train_cli(config)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 120
    while not (checkpoints.is_dir() and any(p.name.startswith("checkpoint-") for p in checkpoints.iterdir())):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    if how == "sigkill":
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    else:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "interrupted: checkpoint saved" in out
    assert not (tmp_path / "killed" / "adapter").exists(), "the run must have been stopped before its end"

    resumed = _train_cli(config, "train.resume_from_checkpoint=latest")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resumed from" in out
    final = adapter_tensors(tmp_path / "killed")
    assert final.keys() == reference.keys()
    for key in reference:
        assert torch.equal(final[key], reference[key]), key
    steps_logged = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
                    if "loss" in json.loads(line)]
    assert steps_logged == list(range(1, 61)), "the metrics log must read as one uninterrupted run"


def test_cli_reports_config_errors_without_traceback(toy_run):
    path = toy_run()
    proc = subprocess.run([sys.executable, "-m", "loraforge.cli.main", "train", str(path), "train.lrr=1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "did you mean 'train.lr'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_qlora_run_trains_on_a_4bit_base(toy_run, method):
    """QLoRA through the user path: quantize on load, train the adapter, base stays NF4."""
    quant = {"bits": 4, "type": "nf4", "double_quant": True, "block_size": 64, "compute_dtype": "fp32"}
    config = load_config(toy_run(model={"quantization": quant}, adapter={"method": method},
                                 train={"max_steps": 40}))
    result = run_training(config, echo=quiet)
    losses = [json.loads(line)["loss"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert sum(losses[-10:]) / 10 < sum(losses[:5]) / 5 - 0.1
    saved = json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())
    assert saved["use_dora"] == (method == "dora")


def test_qlora_model_has_quantized_frozen_linears(toy_run):
    from loraforge.adapters import adapted_layers
    from loraforge.quant.base import QuantLinear
    from loraforge.train.run import prepare_model

    quant = {"bits": 4, "type": "nf4", "compute_dtype": "fp32"}
    config = load_config(toy_run(model={"quantization": quant}))
    model, _, _ = prepare_model(config, torch.device("cpu"))
    layers = adapted_layers(model)
    assert layers and all(isinstance(layer.base_layer, QuantLinear) for layer in layers.values())
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".adapters." not in n)


def test_bad_data_leaves_no_half_made_run_folder(toy_run, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"instruction": "hi", "output": "yo"}\n{"instruction": \n')
    config = load_config(toy_run(data={"train_files": "bad.jsonl"}))
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        run_training(config, echo=quiet)
    assert not Path(config.output.dir).exists()


def test_bf16_autocast_with_gradient_checkpointing_and_packing_trains(toy_run):
    config = load_config(toy_run(train={"precision": "bf16", "gradient_checkpointing": True, "max_steps": 30},
                                 data={"packing": True}))
    result = run_training(config, echo=quiet)
    losses = [json.loads(line)["loss"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert all(math.isfinite(x) for x in losses) and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_schedules_warm_up_then_decay():
    from loraforge.train.schedule import lr_multiplier

    cosine = lr_multiplier("cosine", warmup_steps=4, total_steps=14)
    assert [round(cosine(s), 3) for s in (0, 3, 4, 9, 14)] == [0.2, 0.8, 1.0, 0.5, 0.0]
    linear = lr_multiplier("linear", warmup_steps=0, total_steps=10)
    assert [linear(s) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    assert lr_multiplier("constant", 2, 10)(7) == 1.0
