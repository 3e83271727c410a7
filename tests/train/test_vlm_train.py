"""Training a vision-language model: the loss goes through the multimodal forward, the run trains, resumes,
and takes a quantized (NF4) language model."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from vlm_helpers import shapes_batch, shapes_dataset

from loraforge.adapters import AdapterSpec, add_adapter, mark_only_adapters_trainable
from loraforge.config import Config
from loraforge.models.tiny_vlm import tiny_vlm
from loraforge.quant.base import QuantLinear
from loraforge.train import run_training
from loraforge.train.loss import summed_token_loss
from loraforge.train.run import prepare_model


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    return shapes_batch(tmp_path_factory.mktemp("d"))


def test_the_loss_is_the_models_own_multimodal_loss_and_reaches_the_vision_adapters(batch):
    model = tiny_vlm()
    add_adapter(model, AdapterSpec(r=4, init="none", vision=True, projector=True))
    mark_only_adapters_trainable(model)
    total, count = summed_token_loss(model, batch)
    reference = model(**batch).loss  # transformers: shifted labels, mean over labelled tokens
    torch.testing.assert_close(total / count, reference)
    (total / count).backward()
    for path in ("model.visual.blocks.0.attn.qkv", "model.visual.merger.mlp.0"):
        grad = model.get_submodule(path).adapters["default"].lora_A.grad
        assert grad is not None and grad.abs().sum() > 0, path


def config_for(tmp_path, **sections) -> Config:
    shapes_dataset(tmp_path)
    data = {"model": {"source": "tiny-qwen2.5-vl", "threads": 1},
            "adapter": {"r": 4, "alpha": 8, "vision": ["qkv"], "projector": True},
            "data": {"format": "openai", "train_files": ["train.jsonl"], "val_size": 2, "cutoff_len": 256},
            "train": {"batch_size": 2, "lr": 1e-2, "max_steps": 4, "save_steps": 2},
            "output": {"dir": str(tmp_path / "run"), "tensorboard": False, "plot": False}}
    for section, values in sections.items():
        data[section].update(values)
    return Config.from_dict(data, base_dir=tmp_path)


def test_a_run_trains_evaluates_and_resumes_to_the_same_adapter(tmp_path):
    result = run_training(config_for(tmp_path), echo=quiet)
    assert result.steps == 4 and "eval_loss" in result.summary
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert any(".visual.blocks." in key for key in saved) and any(".visual.merger." in key for key in saved)
    run_dir = tmp_path / "run"
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-4")
    shutil.rmtree(run_dir / "adapter")
    run_training(config_for(tmp_path, train={"resume_from_checkpoint": "latest"}), echo=quiet)
    again = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert again.keys() == saved.keys()
    for key in saved:
        torch.testing.assert_close(again[key], saved[key])


def test_qlora_quantizes_the_language_model_and_leaves_the_vision_tower_dense(tmp_path):
    config = config_for(tmp_path, model={"quantization": {"type": "nf4", "compute_dtype": "fp32"}},
                        train={"max_steps": 2, "save_steps": None})
    model, _, _ = prepare_model(config, torch.device("cpu"))
    bases = {path: type(m.base_layer) for path, m in model.named_modules() if type(m).__name__ == "AdaptedLinear"}
    assert all(kind is QuantLinear for path, kind in bases.items() if ".language_model." in path)
    assert all(kind is torch.nn.Linear for path, kind in bases.items() if ".visual." in path)
    result = run_training(config, echo=quiet)
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.summary["train_loss"]))


def test_packing_and_test_files_are_refused_for_a_vision_language_run(tmp_path):
    from loraforge.data import DataError

    (tmp_path / "t.jsonl").write_text("")
    config = config_for(tmp_path, data={"packing": True, "test_files": ["t.jsonl"]})
    with pytest.raises(DataError, match="data.packing: .* data.test_files: "):
        run_training(config, echo=quiet)
