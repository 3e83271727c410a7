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
from loraforge.train import distributed as loss_module  # TokenLoss, the training forward, calls the loss from here
from loraforge.train import run as run_module


def quiet(*_):
    pass


def adapter_tensors(run_dir):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_end_to_end_writes_every_artifact_and_learns(toy_run):
    from loraforge.adapters import disable_adapters
    from loraforge.adapters.peft_format import load_adapter_weights, read_adapter_dir
    from loraforge.train.evaluate import eval_loss
    from loraforge.train.run import prepare_model

    config = load_config(toy_run(train={"max_steps": 90, "eval_steps": 30}, data={"test_files": "test.jsonl"}))
    result = run_training(config, echo=quiet)
    run_dir = result.run_dir
    assert result.adapter_dir == run_dir / "adapter" and result.steps == 90 and not result.interrupted
    assert (run_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sum(p.stat().st_size for p in (run_dir / "tensorboard").iterdir()) > 0
    saved = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["base_model_name_or_path"]) == (4, 8, "tiny-llama")

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 91))
    assert sum(losses[-10:]) / 10 < sum(losses[:5]) / 5 - 0.2
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [30, 60, 90]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary == result.summary
    assert summary["steps"] == 90 and summary["train_loss"] == losses[-1] and summary["tokens_per_s"] > 0
    assert (summary["eval_loss"], summary["eval_ppl"]) == (evals[-1]["eval_loss"], evals[-1]["eval_ppl"])
    for key in ("test_exact_match_before", "test_exact_match_after"):  # 3 test prompts
        assert summary[key] in (0.0, 1 / 3, 2 / 3, 1.0)

    # The saved adapter is the trained one: loaded into a fresh model, it gives the logged eval loss,
    # which differs from the base model's.
    model, tokenizer, _ = prepare_model(config, torch.device("cpu"))
    data = run_module._build_data(config, tokenizer)
    load_adapter_weights(model, config.adapter.name, read_adapter_dir(run_dir / "adapter")[1], run_dir / "adapter")
    loss_with = eval_loss(model, data.eval, config.train.batch_size, tokenizer.pad_token_id, "cpu")["eval_loss"]
    with disable_adapters(model):
        loss_base = eval_loss(model, data.eval, config.train.batch_size, tokenizer.pad_token_id, "cpu")["eval_loss"]
    assert loss_with == pytest.approx(summary["eval_loss"], abs=1e-5)
    assert abs(loss_base - loss_with) > 0.05


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
    with pytest.raises(TrainingError, match=r"train\.lr is 0\.03 in the run, 0\.005 in the config"):
        run_training(load_config(toy_run(train={"lr": 5e-3, "resume_from_checkpoint": "latest"})), echo=quiet)
    assert all(torch.equal(t, adapter_tensors(first.run_dir)[k]) for k, t in before.items()), "refusal must not touch"
    second = run_training(load_config(toy_run(output={"overwrite_output_dir": True}, train={"lr": 5e-3})), echo=quiet)
    assert not all(torch.equal(t, adapter_tensors(second.run_dir)[k]) for k, t in before.items())


def test_nan_loss_stops_and_keeps_last_good_checkpoint(toy_run, monkeypatch):
    real = loss_module.summed_token_loss
    calls = []

    def poisoned(model, batch):
        calls.append(1)
        loss, n = real(model, batch)
        return (loss * float("nan") if len(calls) > 8 else loss), n  # step 5 (grad_accum 2) diverges

    monkeypatch.setattr(loss_module, "summed_token_loss", poisoned)
    config = load_config(toy_run(train={"save_steps": 2, "save_total_limit": 2}))
    run_dir = Path(config.output.dir)
    with pytest.raises(TrainingError, match=rf"loss is nan at step 5; stopping\. The last good checkpoint \(if any\) "
                                            rf"is in {run_dir / 'checkpoints'}"):
        run_training(config, echo=quiet)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert not (run_dir / "adapter").exists() and not (run_dir / "summary.json").exists()
    last_good = load_file(run_dir / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in last_good.values())
    assert json.loads((run_dir / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())["step"] == 4

    # The last good checkpoint is what the run resumes from, and the result is the clean run's.
    monkeypatch.setattr(loss_module, "summed_token_loss", real)
    resumed = run_training(load_config(toy_run(train={"save_steps": 2, "resume_from_checkpoint": "latest"})),
                           echo=quiet)
    clean = run_training(load_config(toy_run(train={"save_steps": 2}, output={"dir": str(run_dir) + "-clean"})),
                         echo=quiet)
    assert resumed.steps == 8
    final, reference = adapter_tensors(run_dir), adapter_tensors(clean.run_dir)
    assert final.keys() == reference.keys() and all(torch.equal(t, reference[k]) for k, t in final.items())


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
    from loraforge.data import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "output": "yo"}\n{"instruction": \n')
    config = load_config(toy_run(data={"train_files": "bad.jsonl"}))
    with pytest.raises(DataError) as err:
        run_training(config, echo=quiet)
    assert str(err.value) == f"{bad}:2: invalid JSON: Expecting value (column 17)"
    assert not Path(config.output.dir).exists()


@pytest.mark.parametrize("quantization", [None, {"type": "nf4"}], ids=["dense", "qlora"])
def test_bf16_autocast_with_gradient_checkpointing_and_packing_trains(toy_run, quantization):
    config = load_config(toy_run(model={"quantization": quantization},
                                 train={"precision": "bf16", "gradient_checkpointing": True, "max_steps": 30},
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
