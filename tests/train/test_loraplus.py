"""LoRA+ (``train.loraplus_lr_ratio``): B's learning rate is ratio × A's at every step, the groups are PEFT's,
and a run with it resumes bit-exactly."""

import json
import re
import shutil

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, VeraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer
from safetensors.torch import load_file

from loraforge.adapters import AdapterSpec, add_adapter, mark_only_adapters_trainable
from loraforge.config import load_config
from loraforge.models import tiny_model
from loraforge.train import run_training
from loraforge.train.optim import build_optimizer, parameter_groups
from loraforge.train.schedule import lr_multiplier

TARGETS = ["q_proj", "v_proj", "down_proj"]


def quiet(*_):
    pass


def ours(method: str):
    model = tiny_model("tiny-llama")
    add_adapter(model, AdapterSpec(method=method, r=4, target_modules=TARGETS))
    mark_only_adapters_trainable(model)
    return model


def peft(method: str):
    if method == "adalora":
        config = AdaLoraConfig(init_r=12, target_r=8, total_step=10, target_modules=TARGETS, task_type="CAUSAL_LM")
    elif method == "vera":
        config = VeraConfig(r=4, target_modules=TARGETS, task_type="CAUSAL_LM")
    else:
        config = LoraConfig(r=4, target_modules=TARGETS, use_dora=method == "dora", task_type="CAUSAL_LM")
    return get_peft_model(tiny_model("tiny-llama"), config)


def common_name(name: str) -> str:
    """``model.layers.0.mlp.down_proj.lora_B`` from ours (``...down_proj.adapters.default.lora_B``) or PEFT's
    (``base_model.model.model.layers.0.mlp.down_proj.lora_B.default.weight``)."""
    name = name.removeprefix("base_model.model.").replace(".adapters.default.", ".")
    return re.sub(r"\.default(\.weight)?$", "", name)


def lr_and_decay(model, optimizer) -> dict[str, tuple[float, float]]:
    names = {id(p): common_name(n) for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


B_GROUP = {"lora": ("lora_B",), "dora": ("lora_B", "lora_magnitude_vector"), "adalora": ("lora_B",),
           "vera": ("vera_lambda_b", "vera_lambda_d")}
"""What PEFT's LoRA+ puts in B's group: lora_B, and every 1-D parameter."""


@pytest.mark.parametrize("method", B_GROUP)
def test_groups_match_peft_create_loraplus_optimizer(method):
    lr, ratio, decay = 1e-4, 16.0, 0.1
    model = ours(method)
    optimizer = build_optimizer("adamw", parameter_groups(model, lr, decay, ratio), torch.device("cpu"))
    reference_model = peft(method)
    reference = create_loraplus_optimizer(reference_model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                          loraplus_weight_decay=decay)
    got, expected = lr_and_decay(model, optimizer), lr_and_decay(reference_model, reference)
    assert got == expected
    b = {name for name, (rate, _) in got.items() if rate == lr * ratio}
    assert b == {name for name in got if name.endswith(B_GROUP[method])}
    assert [g["name"] for g in optimizer.param_groups] == (["B"] if method == "vera" else ["A", "B"])


def test_without_loraplus_there_is_one_group():
    model = ours("lora")
    groups = parameter_groups(model, 1e-3, 0.01, None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(groups) == 1 and groups[0]["params"] == trainable
    assert (groups[0]["name"], groups[0]["lr"], groups[0]["weight_decay"]) == ("all", 1e-3, 0.01)


def test_schedule_scales_both_groups():
    lr, ratio = 2e-3, 16.0
    optimizer = build_optimizer("adamw", parameter_groups(ours("lora"), lr, 0.0, ratio), torch.device("cpu"))
    factor = lr_multiplier("cosine", warmup_steps=3, total_steps=12)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    for step in range(13):
        a, b = (g["lr"] for g in optimizer.param_groups)
        assert a == pytest.approx(lr * factor(step), rel=1e-12, abs=1e-15)
        assert b == pytest.approx(ratio * a, rel=1e-12, abs=1e-15)
        optimizer.step()
        scheduler.step()


def _run(toy_run, tmp_path, folder: str, ratio: float | None, **train):
    config = load_config(toy_run(train={**train, "loraplus_lr_ratio": ratio}, output={"dir": str(tmp_path / folder)}))
    return run_training(config, echo=quiet)


def _adapter(result) -> dict[str, torch.Tensor]:
    return load_file(result.run_dir / "adapter" / "adapter_model.safetensors")


def test_ratio_multiplies_the_first_update_of_b_and_changes_the_run(toy_run, tmp_path):
    """B starts at zero, so Adam's first step moves it by exactly lr (× ratio) times the same direction,
    while A (zero gradient through B = 0) stays put."""
    first = {"max_steps": 1, "scheduler": "constant"}
    plain, plus = _adapter(_run(toy_run, tmp_path, "plain", None, **first)), \
        _adapter(_run(toy_run, tmp_path, "plus", 16.0, **first))
    assert plain.keys() == plus.keys()
    for key in plain:
        if "lora_B" in key:
            assert plain[key].abs().sum() > 0
            torch.testing.assert_close(plus[key], 16 * plain[key], rtol=1e-6, atol=0)
        else:
            assert torch.equal(plus[key], plain[key])

    longer = {"max_steps": 6}
    plain, plus = _adapter(_run(toy_run, tmp_path, "plain6", None, **longer)), \
        _adapter(_run(toy_run, tmp_path, "plus6", 16.0, **longer))
    assert all(not torch.equal(plain[k], plus[k]) for k in plain)


def test_resume_with_loraplus_is_bit_exact(toy_run, tmp_path):
    steps = {"max_steps": 8, "save_steps": 4, "save_total_limit": None}
    whole = _run(toy_run, tmp_path, "run", 16.0, **steps)
    expected = _adapter(whole)
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-4"
    groups = json.loads((checkpoint / "trainer_state.json").read_text())["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["A", "B"] and groups[1]["lr"] == pytest.approx(16 * groups[0]["lr"])
    assert groups[1]["initial_lr"] == 16 * groups[0]["initial_lr"]
    shutil.rmtree(tmp_path / "run" / "adapter")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "checkpoint-8")

    resumed = _run(toy_run, tmp_path, "run", 16.0, **steps, resume_from_checkpoint=str(checkpoint))
    final = _adapter(resumed)
    assert resumed.steps == 8 and final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in expected)
