"""Checkpoints that resume a run exactly, stored without pickle.

A checkpoint folder ``checkpoints/checkpoint-<step>/`` holds:
- the adapter in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``);
- ``optimizer.safetensors``: every tensor of the optimizer state, keyed ``state.<param index>.<name>``;
- ``trainer_state.json``: the optimizer's param groups and non-tensor state, the scheduler state, the
  step, and the Python/NumPy RNG states;
- ``rng.safetensors``: torch's CPU (and CUDA) generator states.

The data order is a function of (seed, epoch), so the step alone says where to continue. Folders
are written under a temporary name and renamed, so a crash never leaves a half checkpoint behind.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from loraforge.adapters import AdapterSpec, save_adapter
from loraforge.adapters.peft_format import load_adapter_weights, read_adapter_dir

CHECKPOINTS = "checkpoints"
PREFIX = "checkpoint-"


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0


def save_checkpoint(run_dir: Path, model: nn.Module, spec: AdapterSpec, adapter_name: str, base_model: str,
                    optimizer: torch.optim.Optimizer, scheduler, state: TrainState, keep: int | None) -> Path:
    root = run_dir / CHECKPOINTS
    final = root / f"{PREFIX}{state.step}"
    staging = root / f".{PREFIX}{state.step}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_adapter(model, staging, spec, adapter_name, base_model)
    tensors, plain = _split_optimizer_state(optimizer.state_dict())
    save_file(tensors, staging / "optimizer.safetensors")
    save_file(_torch_rng_state(), staging / "rng.safetensors")
    trainer_state = {
        "step": state.step,
        "tokens_seen": state.tokens_seen,
        "optimizer": plain,
        "scheduler": scheduler.state_dict(),
        "python_rng": _jsonable(random.getstate()),
        "numpy_rng": _jsonable(np.random.get_state()),
    }
    (staging / "trainer_state.json").write_text(json.dumps(trainer_state))
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    _prune(root, keep)
    return final


def load_checkpoint(path: Path, model: nn.Module, adapter_name: str, optimizer: torch.optim.Optimizer,
                    scheduler) -> TrainState:
    """Restore adapter weights, optimizer, scheduler and RNG states from ``path``."""
    _, adapter_tensors = read_adapter_dir(path)
    load_adapter_weights(model, adapter_name, adapter_tensors, path)
    saved = json.loads((path / "trainer_state.json").read_text())
    optimizer.load_state_dict(_join_optimizer_state(load_file(path / "optimizer.safetensors"), saved["optimizer"]))
    scheduler.load_state_dict(saved["scheduler"])
    _set_torch_rng_state(load_file(path / "rng.safetensors"))
    random.setstate(_tuples(saved["python_rng"]))
    np.random.set_state(tuple(np.array(v, dtype=np.uint32) if i == 1 else v for i, v in enumerate(saved["numpy_rng"])))
    return TrainState(step=saved["step"], tokens_seen=saved["tokens_seen"])


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = _checkpoints(run_dir / CHECKPOINTS)
    return found[-1] if found else None


def _checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def _prune(root: Path, keep: int | None) -> None:
    if keep is None:
        return
    for old in _checkpoints(root)[:-keep]:
        shutil.rmtree(old)


def _split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, plain_state = {}, {}
    for index, entries in state_dict["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                plain_state.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": plain_state}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, entries in plain["state"].items():
        state.setdefault(int(index), {}).update(entries)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in plain["param_groups"]]
    return {"state": state, "param_groups": groups}


def _torch_rng_state() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda.{i}"] = s
    return states


def _set_torch_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    cuda = [states[k] for k in sorted(states) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
