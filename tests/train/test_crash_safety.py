"""Nothing is lost on a crash: a checkpoint or an adapter folder is replaced as one unit.

Failure injection fails each write step in turn (each file, each fsync, the renames, the clean-up)
and checks that a reader then finds the old state or the new one, complete. The SIGKILL tests do
the same with a real process killed in the middle of a save, and resume from what it left.
"""

import copy
import functools
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loraforge.adapters.peft_format as peft_format
import loraforge.train.checkpoint as checkpoint
from loraforge.adapters import AdapterSpec, adapter_state_dict, add_adapter, load_adapter, save_adapter
from loraforge.adapters import mark_only_adapters_trainable
from loraforge.config import load_config
from loraforge.models import tiny_model
from loraforge.train import run_training
from loraforge.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from loraforge.utils import atomic

WRITE_STEPS = [(peft_format, "save_file"), (checkpoint, "save_file"), (Path, "write_text"), (os, "fsync"),
               (os, "rename"), (atomic, "_exchange"), (shutil, "rmtree")]


class Fault(Exception):
    """The injected failure."""


def fail_each_write_in_turn(monkeypatch, save, check) -> list[str]:
    """Call ``save`` with its n-th write step failing, for n = 1, 2, ... until a call has fewer steps;
    ``check()`` after each failure. Returns the steps that failed, in order."""
    failed = []
    while True:
        calls: list[str] = []
        with monkeypatch.context() as patch:
            for owner, name in WRITE_STEPS:
                patch.setattr(owner, name, _failing(getattr(owner, name), f"{owner.__name__}.{name}",
                                                    len(failed) + 1, calls))
            try:
                save()
            except Fault as fault:
                failed.append(str(fault))
            else:
                return failed
        check()


def _failing(real, label: str, n: int, calls: list[str]):
    def step(*args, **kwargs):
        calls.append(label)
        if len(calls) == n:
            raise Fault(label)
        return real(*args, **kwargs)

    return step


@functools.cache
def _base():
    return tiny_model("tiny-llama")


def base_model():
    """A fresh tiny-llama (a copy: building one is slow)."""
    return copy.deepcopy(_base())


def adapted(r: int, seed: int):
    """tiny-llama with a LoRA adapter of rank ``r`` whose A and B are random (so it changes the outputs)."""
    model = base_model()
    spec = AdapterSpec(r=r, alpha=2 * r)
    torch.manual_seed(seed)
    add_adapter(model, spec)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adapters." in name:
                param.normal_(std=0.2)
    mark_only_adapters_trainable(model)
    return model, spec


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.arange(40).reshape(2, 20)


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "rename-aside"])
def test_failed_adapter_save_leaves_the_old_adapter_or_the_new_one_whole(tmp_path, monkeypatch, exchange):
    if not exchange:  # as on macOS or a file system without RENAME_EXCHANGE
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    old, old_spec = adapted(r=2, seed=1)
    new, new_spec = adapted(r=4, seed=2)
    expected = {2: logits(old, IDS), 4: logits(new, IDS)}
    target = tmp_path / "adapter"
    save_adapter(old, target, old_spec)
    (target / "README.md").write_text("notes")

    def check():
        fresh = base_model()
        spec = load_adapter(fresh, target)  # r=2 config beside r=4 weights (or the reverse) fails here
        assert torch.equal(logits(fresh, IDS), expected[spec.r])
        assert visible(target) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
        assert (target / "README.md").read_text() == "notes"
        assert all(atomic.STAGING_INFIX in name for name in leftovers(tmp_path))

    failed = fail_each_write_in_turn(monkeypatch, lambda: save_adapter(new, target, new_spec), check)
    check()
    assert load_adapter(base_model(), target).r == 4
    steps = {"loraforge.adapters.peft_format.save_file", "Path.write_text", "os.fsync",
             "loraforge.utils.atomic._exchange", "shutil.rmtree"} | ({"os.rename"} if not exchange else set())
    assert steps <= set(failed), failed


def _trainer(seed: int):
    model, spec = adapted(r=2, seed=seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    return model, spec, optimizer, scheduler


def _train_step(model, optimizer, scheduler):
    model(IDS, labels=IDS).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def _snapshot(model, optimizer, step: int) -> dict:
    state = {f"adapter.{k}": v.clone() for k, v in adapter_state_dict(model).items()}
    for index, entries in optimizer.state_dict()["state"].items():
        state.update({f"optimizer.{index}.{k}": torch.as_tensor(v).clone() for k, v in entries.items()})
    return {**state, "step": torch.tensor(step)}


def test_failed_checkpoint_save_keeps_the_last_good_one_even_with_save_total_limit_1(tmp_path, monkeypatch):
    model, spec, optimizer, scheduler = _trainer(seed=1)
    _train_step(model, optimizer, scheduler)
    save_checkpoint(tmp_path, model, spec, "default", "tiny-llama", optimizer, scheduler, TrainState(1, 40), keep=1)
    expected = {"checkpoint-1": _snapshot(model, optimizer, 1)}
    _train_step(model, optimizer, scheduler)
    expected["checkpoint-2"] = _snapshot(model, optimizer, 2)
    root = tmp_path / "checkpoints"

    def check():
        names = visible(root)
        assert names in (["checkpoint-1"], ["checkpoint-1", "checkpoint-2"], ["checkpoint-2"])
        for name in names:
            fresh, _, fresh_optimizer, fresh_scheduler = _trainer(seed=3)
            state = load_checkpoint(root / name, fresh, spec, "default", fresh_optimizer, fresh_scheduler)
            restored = _snapshot(fresh, fresh_optimizer, state.step)
            assert restored.keys() == expected[name].keys()
            assert all(torch.equal(restored[k], v) for k, v in expected[name].items()), name
        assert all(atomic.STAGING_INFIX in name for name in leftovers(root))

    save = lambda: save_checkpoint(tmp_path, model, spec, "default", "tiny-llama", optimizer, scheduler,  # noqa: E731
                                   TrainState(2, 80), keep=1)
    failed = fail_each_write_in_turn(monkeypatch, save, check)
    check()
    assert visible(root) == ["checkpoint-2"] and leftovers(root) == [], "the next save clears what a failure left"
    steps = {"loraforge.adapters.peft_format.save_file", "Path.write_text", "loraforge.train.checkpoint.save_file",
             "os.fsync", "os.rename", "shutil.rmtree"}
    assert steps <= set(failed), failed


KILL_ADAPTER_SAVE = """
import sys, time
import loraforge.adapters.peft_format as peft_format
from loraforge.adapters import load_adapter, save_adapter
from loraforge.models import tiny_model
from loraforge.utils import atomic

source, target, point = sys.argv[1:]
model = tiny_model("tiny-llama")
spec = load_adapter(model, source)

def pause():
    print("paused", flush=True)
    time.sleep(600)

def pausing(real, before):
    def step(*args, **kwargs):
        if before:
            pause()
        real(*args, **kwargs)
        pause()
    return step

if point == "between-files":
    peft_format.save_file = pausing(peft_format.save_file, before=False)
else:
    atomic._move_into_place = pausing(atomic._move_into_place, before=False)
save_adapter(model, target, spec)
"""


def _killed_when_paused(args: list[str]) -> None:
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line != "paused\n":
        proc.kill()
        pytest.fail(f"the child never reached its pause: {line!r} {proc.communicate()[1]}")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def _adapter_files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}


@pytest.mark.parametrize("point, survivor", [("between-files", "old"), ("after-swap", "new")])
def test_adapter_save_killed_midway_leaves_one_whole_adapter(tmp_path, point, survivor):
    old, old_spec = adapted(r=2, seed=1)
    new, new_spec = adapted(r=4, seed=2)
    target, source = tmp_path / "adapter", tmp_path / "new"
    save_adapter(old, target, old_spec)
    save_adapter(new, source, new_spec)
    reloaded = base_model()  # the child saves what it loaded from ``source``: save the same here
    save_adapter(reloaded, tmp_path / "expected", load_adapter(reloaded, source))
    files = {"old": _adapter_files(target), "new": _adapter_files(tmp_path / "expected")}
    _killed_when_paused(["-c", KILL_ADAPTER_SAVE, str(source), str(target), point])
    assert _adapter_files(target) == files[survivor]
    assert all(atomic.STAGING_INFIX in name for name in leftovers(tmp_path)) and leftovers(tmp_path)
    save_adapter(old, target, old_spec)
    assert _adapter_files(target) == files["old"]


KILL_TRAINING = """
import sys, time
import loraforge.train.checkpoint as checkpoint
from loraforge.config import load_config
from loraforge.train import run_training

real, calls = checkpoint.save_file, []

def save_file(*args, **kwargs):
    real(*args, **kwargs)
    calls.append(args[1])
    if len(calls) == 3:  # checkpoint-2 wrote 2 files; checkpoint-4 has written its optimizer state
        print("paused", flush=True)
        time.sleep(600)

checkpoint.save_file = save_file
run_training(load_config(sys.argv[1]), echo=lambda *_: None)
"""


def test_run_killed_while_saving_a_checkpoint_resumes_from_the_previous_one(toy_run, tmp_path):
    steps = {"max_steps": 8, "save_steps": 2, "save_total_limit": 1}
    reference = run_training(load_config(toy_run(train=steps, output={"dir": str(tmp_path / "reference")})),
                             echo=lambda *_: None)
    config = toy_run(train=steps)
    _killed_when_paused(["-c", KILL_TRAINING, str(config)])
    root = tmp_path / "run" / "checkpoints"
    assert visible(root) == ["checkpoint-2"] and leftovers(root), "checkpoint-4 was half written, in staging"

    resumed = run_training(load_config(toy_run(train={**steps, "resume_from_checkpoint": "latest"})),
                           echo=lambda *_: None)
    assert resumed.steps == 8
    final = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    expected = load_file(reference.run_dir / "adapter" / "adapter_model.safetensors")
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in expected)
    assert visible(root) == ["checkpoint-8"] and leftovers(root) == []
