"""AdaLoRA through ``run_training``: the method's training hook (penalty, rank allocation, ``finish``) runs in
the loop, its state rides in every checkpoint, and a run resumed mid-schedule (or killed) ends bit-identical."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file

from loraforge.adapters import AdapterError, load_adapter
from loraforge.config import load_config
from loraforge.models import load_model, tiny_model
from loraforge.train import CheckpointError, run_training
from loraforge.train import run as run_module
from loraforge.train.evaluate import eval_loss

OPTIONS = {"init_r": 6, "target_r": 2, "tinit": 2, "tfinal": 2}
"""Over 10 steps: warm-up through step 2, the budget shrinks at steps 3-7, is fixed at step 8."""
STEPS = {"max_steps": 10, "save_steps": 2, "save_total_limit": None}
LAYERS = 4  # q_proj and v_proj of tiny-llama's 2 layers


def quiet(*_):
    pass


def adalora(toy_run, folder: Path, options=OPTIONS, **train) -> Path:
    """An AdaLoRA config file writing to ``folder``; ``train`` overrides ``STEPS``."""
    adapter = {"method": "adalora", "target_modules": ["q_proj", "v_proj"], "options": options}
    return toy_run(adapter=adapter, train={**STEPS, **train}, output={"dir": str(folder)})


def files(adapter_dir: Path) -> dict[str, bytes]:
    return {name: (adapter_dir / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}


@pytest.fixture(scope="module")
def reference(module_toy_run, tmp_path_factory):
    """The folder of one uninterrupted run, checkpointed every 2 steps."""
    run = tmp_path_factory.mktemp("reference") / "run"
    run_training(load_config(adalora(module_toy_run, run)), echo=quiet)
    return run


def test_run_trains_prunes_and_saves_the_resolved_schedule(reference):
    saved = json.loads((reference / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["total_step"] == 10, "total_step null = the run's steps"
    assert yaml.safe_load((reference / "config.yaml").read_text())["adapter"]["options"]["total_step"] == 10

    tensors = load_file(reference / "adapter" / "adapter_model.safetensors")
    pattern = saved["rank_pattern"]
    assert len(pattern) == LAYERS and all(len(mask) == OPTIONS["init_r"] for mask in pattern.values())
    assert sum(sum(mask) for mask in pattern.values()) == OPTIONS["target_r"] * LAYERS
    for key, mask in pattern.items():
        kept, prefix = sum(mask), "base_model.model." + key.removesuffix(".lora_E")
        assert tensors[f"{prefix}.lora_A"].shape[0] == kept and tensors[f"{prefix}.lora_E"].shape == (kept, 1)
        assert tensors[f"{prefix}.lora_B"].shape[1] == kept
        assert bool((tensors[f"{prefix}.lora_E"] != 0).all()), "kept triplets are the live ones"

    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 11))
    assert all(r["penalty"] > 0 for r in steps), "the orthogonality penalty is logged beside the task loss"

    # Checkpoints are written before finish(): all init_r rows, and the allocator's state beside them.
    mid = reference / "checkpoints" / "checkpoint-6"
    hook_state = json.loads((mid / "trainer_state.json").read_text())["training_hook"]
    assert hook_state["total_step"] == 10 and OPTIONS["target_r"] * LAYERS < hook_state["budget"] < 6 * LAYERS
    masks = {k: v for k, v in load_file(mid / "training_hook.safetensors").items() if k.startswith("rank_pattern.")}
    assert len(masks) == LAYERS and all(m.dtype == torch.bool for m in masks.values())
    assert all(t.shape[0] == 6 for k, t in load_file(mid / "adapter_model.safetensors").items() if "lora_A" in k)


def test_saved_adapter_loads_in_peft_and_eval_loss_excludes_the_penalty(reference):
    ids = torch.arange(2, 34).reshape(2, 16)
    ours = tiny_model("tiny-llama")
    load_adapter(ours, reference / "adapter")
    theirs = PeftModel.from_pretrained(tiny_model("tiny-llama"), str(reference / "adapter"))
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)

    config = load_config(reference / "config.yaml")
    _, tokenizer = load_model("tiny-llama", "float32")
    data = run_module._build_data(config, tokenizer)
    summary = json.loads((reference / "summary.json").read_text())
    loss = eval_loss(ours, data.eval, config.train.batch_size, tokenizer.pad_token_id, "cpu")["eval_loss"]
    assert loss == pytest.approx(summary["eval_loss"], abs=1e-5)


def _resume_copy(reference: Path, tmp_path: Path, step: int) -> Path:
    """A copy of the reference run, in ``tmp_path``, as a crash after checkpoint-``step`` leaves it."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["output"]["dir"] = str(run)
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    shutil.rmtree(run / "adapter")
    (run / "summary.json").unlink()
    for later in (run / "checkpoints").iterdir():
        if int(later.name.removeprefix("checkpoint-")) > step:
            shutil.rmtree(later)
    return run


@pytest.mark.parametrize("step", [4, 6, 10], ids=["while-shrinking", "while-shrinking-later", "after-the-last-step"])
def test_resume_mid_schedule_ends_with_the_same_adapter(reference, module_toy_run, tmp_path, step):
    run = _resume_copy(reference, tmp_path, step)
    result = run_training(load_config(adalora(module_toy_run, run, resume_from_checkpoint="latest")), echo=quiet)
    assert result.steps == 10
    assert files(run / "adapter") == files(reference / "adapter")


KILLED_AT_STEP_4 = """
import sys, time
from loraforge.config import load_config
from loraforge.train import run as run_module

real = run_module.save_checkpoint

def save_checkpoint(*args, **kwargs):
    path = real(*args, **kwargs)
    if path.name == "checkpoint-4":
        print("paused", flush=True)
        time.sleep(600)
    return path

run_module.save_checkpoint = save_checkpoint
run_module.run_training(load_config(sys.argv[1]), echo=lambda *_: None)
"""


def test_sigkilled_run_resumes_bit_identical(reference, module_toy_run, tmp_path):
    config = adalora(module_toy_run, tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_AT_STEP_4, str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line != "paused\n":
        proc.kill()
        pytest.fail(f"the child never reached checkpoint-4: {line!r} {proc.communicate()[1]}")
    proc.kill()
    proc.wait()
    assert not (tmp_path / "run" / "adapter").exists()
    run_training(load_config(adalora(module_toy_run, tmp_path / "run", resume_from_checkpoint="latest")), echo=quiet)
    assert files(tmp_path / "run" / "adapter") == files(reference / "adapter")


def test_a_run_extended_on_resume_keeps_its_schedule(reference, module_toy_run, tmp_path):
    run = _resume_copy(reference, tmp_path, 10)
    result = run_training(load_config(adalora(module_toy_run, run, max_steps=12, resume_from_checkpoint="latest")),
                          echo=quiet)
    assert result.steps == 12
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert saved["total_step"] == 10 and saved["rank_pattern"] == json.loads(
        (reference / "adapter" / "adapter_config.json").read_text())["rank_pattern"]


def test_checkpoint_without_the_hook_state_is_refused(reference, module_toy_run, tmp_path):
    run = _resume_copy(reference, tmp_path, 6)
    state_file = run / "checkpoints" / "checkpoint-6" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["training_hook"] = None
    state_file.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"holds no training_hook state, which adapter\.method adalora needs"):
        run_training(load_config(adalora(module_toy_run, run, resume_from_checkpoint="latest")), echo=quiet)
    earlier = run / "checkpoints" / "checkpoint-4"
    (earlier / "training_hook.safetensors").unlink()
    with pytest.raises(CheckpointError, match="training_hook.safetensors: not a readable safetensors file"):
        run_training(load_config(adalora(module_toy_run, run, resume_from_checkpoint=str(earlier))), echo=quiet)


def test_schedule_longer_than_the_run_fails_before_writing(module_toy_run, tmp_path):
    with pytest.raises(AdapterError, match=r"tinit \(2\) must be < total_step - tfinal \(4 - 2 = 2\)"):
        run_training(load_config(adalora(module_toy_run, tmp_path / "run", max_steps=4)), echo=quiet)
    assert not (tmp_path / "run").exists()
