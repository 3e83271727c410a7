"""Checkpoints that resume a run exactly, stored without pickle.

A checkpoint folder ``checkpoints/checkpoint-<step>/`` holds:
- the adapter in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``);
- ``optimizer.safetensors``: every tensor of the optimizer state, keyed ``state.<param index>.<name>``;
- ``trainer_state.json``: the optimizer's param groups (LoRA+'s two learning rates included) and
  non-tensor state, the scheduler state, the step, the Python/NumPy RNG states, and ``training_hook``:
  the non-tensor entries of the adapter method's training hook state (AdaLoRA: ``total_step``,
  ``budget``), or null when the method has no hook;
- ``rng.safetensors``: torch's CPU (and CUDA) generator states;
- ``training_hook.safetensors``: the tensor entries of the hook's state (AdaLoRA: the importance EMAs
  and the kept-triplet masks), only when the method has a hook.

A run on several processes (``train.distributed: ddp | fsdp``) writes a sharded checkpoint instead of
``optimizer.safetensors``: ``sharded/``, written by every rank at once through
``torch.distributed.checkpoint`` (DCP) with its safetensors storage (``HuggingFaceStorageWriter``,
``save_distributed``): one ``shard-<rank>-model-00001-of-00001.safetensors`` per rank holding that rank's
pieces of the adapter weights (``adapter.<parameter>``) and of the optimizer state
(``optimizer.<parameter>.<name>``), their offsets in the file's JSON header. DCP's ``HuggingFaceStorageReader``
rebuilds its metadata from those headers alone and reads each rank's slices, so a checkpoint written by
N processes resumes on M (one included, without a process group). DCP's default ``FileSystemWriter`` is
not used: its ``.metadata`` file is a pickle, and loraforge never unpickles a file. Rank 0 also writes
the whole adapter in PEFT's format beside it (for tools, and to check the adapter settings on resume),
``rng.safetensors`` (its own generators) and ``trainer_state.json``.

The data order is a function of (seed, epoch), so the step alone says where to continue. A checkpoint
is built in a staging folder and renamed into place (``loraforge.utils.atomic``), so a crash never
leaves a half checkpoint behind; older checkpoints are deleted only once the new one is in place.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from loraforge.adapters import AdapterError, AdapterSpec
from loraforge.adapters.peft_format import (
    CONFIG_NAME,
    load_adapter_weights,
    peft_config,
    read_adapter_dir,
    spec_from_peft_config,
    write_adapter_files,
)
from loraforge.adapters.registry import TrainingHook
from loraforge.utils.atomic import STAGING_INFIX, atomic_dir

CHECKPOINTS = "checkpoints"
PREFIX = "checkpoint-"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
TRAINER_STATE = "trainer_state.json"
HOOK = "training_hook.safetensors"
SHARDED = "sharded"


class CheckpointError(ValueError):
    """A checkpoint that can't be resumed from: missing, corrupt, or written with other adapter settings."""


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0


def save_checkpoint(run_dir: Path, model: nn.Module, spec: AdapterSpec, adapter_name: str, base_model: str,
                    optimizer: torch.optim.Optimizer, scheduler, state: TrainState, keep: int | None,
                    hook: TrainingHook | None = None) -> Path:
    """Write ``checkpoints/checkpoint-<step>`` as one unit, then keep only the ``keep`` newest (all if None).

    ``hook``: the adapter method's training hook, whose ``state_dict()`` (tensors, and JSON-able values) is
    saved with the rest."""
    root = run_dir / CHECKPOINTS
    final = root / f"{PREFIX}{state.step}"
    tensors, plain = _split_optimizer_state(optimizer.state_dict())
    hook_tensors, hook_plain = _split_hook_state(hook)
    trainer_state = {
        "step": state.step,
        "tokens_seen": state.tokens_seen,
        "optimizer": plain,
        "scheduler": scheduler.state_dict(),
        "python_rng": _jsonable(random.getstate()),
        "numpy_rng": _jsonable(np.random.get_state()),
        "training_hook": hook_plain,
    }
    with atomic_dir(final) as staging:
        write_adapter_files(model, staging, spec, adapter_name, base_model)
        save_file(tensors, staging / OPTIMIZER)
        save_file(_torch_rng_state(), staging / RNG)
        if hook_tensors is not None:
            save_file(hook_tensors, staging / HOOK)
        (staging / TRAINER_STATE).write_text(json.dumps(trainer_state))
    _prune(root, keep, final)
    return final


def find_checkpoint(run_dir: Path, resume: str) -> Path:
    """The checkpoint that ``train.resume_from_checkpoint`` names: ``"latest"`` (in ``run_dir``) or a path.

    Raises:
        CheckpointError: there is no checkpoint, or the path is not a checkpoint folder.
    """
    if resume == "latest":
        found = latest_checkpoint(run_dir)
        if found is None:
            raise CheckpointError(
                f"train.resume_from_checkpoint=latest: {run_dir / CHECKPOINTS} holds no checkpoint (the run stopped "
                "before its first save; train.save_steps sets how often it saves); start the run again with "
                "output.overwrite_output_dir=true instead of resuming")
        return found
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"train.resume_from_checkpoint={resume}: no such checkpoint folder; {_listing(run_dir)}")
    if not (path / TRAINER_STATE).is_file():
        raise CheckpointError(f"train.resume_from_checkpoint={resume}: not a checkpoint ({TRAINER_STATE} is missing); "
                              f"{_listing(run_dir)}")
    return path


def _listing(run_dir: Path) -> str:
    found = [p.name for p in _checkpoints(run_dir / CHECKPOINTS)]
    if not found:
        return f"{run_dir / CHECKPOINTS} holds none"
    return f"{run_dir / CHECKPOINTS} holds {', '.join(found)} (or use latest)"


def load_checkpoint(path: Path, model: nn.Module, spec: AdapterSpec, adapter_name: str,
                    optimizer: torch.optim.Optimizer, scheduler, hook: TrainingHook | None = None) -> TrainState:
    """Restore adapter weights, optimizer, scheduler, RNG and training-hook states from ``path``.

    Every file is read and checked before anything is changed (the hook checks its state first).

    Raises:
        CheckpointError: the checkpoint was written with other adapter settings (the message lists each
            key with both values), without the hook's state, or a file is missing, truncated or corrupt.
        AdapterFormatError: the adapter files are missing or unreadable.
    """
    adapter_config, adapter_tensors = read_adapter_dir(path)
    _check_same_adapter(path, adapter_config, spec, model, adapter_name)
    saved = _read_trainer_state(path / TRAINER_STATE)
    if (path / SHARDED).is_dir():
        rng = _read_tensors(path / RNG)
        _load_sharded(path / SHARDED, model, optimizer, saved["optimizer"])
        return _restore_loop_state(saved, scheduler, rng)
    optimizer_tensors = _read_tensors(path / OPTIMIZER)
    rng = _read_tensors(path / RNG)
    if hook is not None:
        if not isinstance(saved.get("training_hook"), dict):
            raise CheckpointError(f"{path / TRAINER_STATE}: holds no training_hook state, which adapter.method "
                                  f"{spec.method} needs to resume; it was written by another method or an older "
                                  f"loraforge. {_EARLIER}")
        try:
            hook.load_state_dict({**saved["training_hook"], **_read_tensors(path / HOOK)})
        except AdapterError as err:
            raise CheckpointError(f"can't resume from {path}: {err}") from None
    load_adapter_weights(model, adapter_name, adapter_tensors, path)
    optimizer.load_state_dict(_join_optimizer_state(optimizer_tensors, saved["optimizer"]))
    return _restore_loop_state(saved, scheduler, rng)


def _restore_loop_state(saved: dict, scheduler, rng: dict[str, torch.Tensor]) -> TrainState:
    scheduler.load_state_dict(saved["scheduler"])
    _set_torch_rng_state(rng)
    random.setstate(_tuples(saved["python_rng"]))
    np.random.set_state(tuple(np.array(v, dtype=np.uint32) if i == 1 else v for i, v in enumerate(saved["numpy_rng"])))
    return TrainState(step=saved["step"], tokens_seen=saved["tokens_seen"])


def save_sharded_checkpoint(world, run_dir: Path, model: nn.Module, spec: AdapterSpec, adapter_name: str,
                            base_model: str, optimizer: torch.optim.Optimizer, scheduler, state: TrainState,
                            keep: int | None) -> Path:
    """``save_checkpoint`` for a run on several processes (``world``: ``train.distributed.World``); every
    rank must call it. Rank 0 stages the folder, every rank writes its shard into it through DCP, and
    rank 0 renames it into place once all have written, so a rank lost mid-save leaves the previous
    checkpoint as the latest."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    root = run_dir / CHECKPOINTS
    final = root / f"{PREFIX}{state.step}"
    tensors, plain = _sharded_state(model, optimizer)
    trainer_state = {"step": state.step, "tokens_seen": state.tokens_seen, "optimizer": plain,
                     "scheduler": scheduler.state_dict(), "python_rng": _jsonable(random.getstate()),
                     "numpy_rng": _jsonable(np.random.get_state()), "training_hook": None,
                     "world_size": world.size, "distributed": world.strategy}
    with atomic_dir(final) if world.is_main else nullcontext() as staging:
        if world.is_main:
            (staging / SHARDED).mkdir()
        staging = Path(world.broadcast_text(str(staging) if world.is_main else None))
        with _one_process_is_fine():
            dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(staging / SHARDED), save_distributed=True))
        with world.whole_adapter(model):
            if world.is_main:
                write_adapter_files(model, staging, spec, adapter_name, base_model)
        if world.is_main:
            save_file(_torch_rng_state(), staging / RNG)
            (staging / TRAINER_STATE).write_text(json.dumps(trainer_state))
    if world.is_main:
        _prune(root, keep, final)
    world.barrier()
    return final


@contextmanager
def _one_process_is_fine():
    """Silence DCP's warning that it runs without a process group: a one-process resume is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors DCP saves or loads in place (the trainable parameters, as DTensor shards under FSDP2,
    and the optimizer state by parameter name), and the optimizer's non-tensor state for the JSON.
    ``get_optimizer_state_dict`` gives a fresh optimizer zero state to load into."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    tensors = {f"adapter.{name}": p for name, p in model.named_parameters() if p.requires_grad}
    optim = get_optimizer_state_dict(model, optimizer)
    plain: dict = {}
    for name, entries in optim["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{name}.{key}"] = value
            else:
                plain.setdefault(name, {})[key] = value
    return tensors, {"param_groups": optim["param_groups"], "state": plain}


def _load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, plain: dict) -> None:
    """Read this rank's slices of a sharded checkpoint into ``model`` and ``optimizer`` (any world size).

    Raises:
        CheckpointError: the folder lacks a tensor this run has, or holds one of another shape.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    tensors, _ = _sharded_state(model, optimizer)
    reader = HuggingFaceStorageReader(str(folder))
    try:
        saved = reader.read_metadata().state_dict_metadata
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{folder}: not a readable sharded checkpoint ({err}). {_EARLIER}") from None
    missing = sorted(set(tensors) - set(saved))
    wrong = [f"{key} is {list(saved[key].size)} in the checkpoint, {list(t.shape)} in this run"
             for key, t in tensors.items() if key in saved and list(saved[key].size) != list(t.shape)]
    if missing or wrong:
        raise CheckpointError(f"{folder}: does not fit this run: " + "; ".join(
            ([f"missing {', '.join(missing[:5])}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")]
             if missing else []) + wrong) + f". {_EARLIER}")
    with _one_process_is_fine():
        dcp.load(tensors, storage_reader=reader)
    state: dict[str, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            name, _, entry = key[len("optimizer."):].rpartition(".")
            state.setdefault(name, {})[entry] = value
    for name, entries in plain["state"].items():
        state.setdefault(name, {}).update(entries)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in plain["param_groups"]]
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups})


def _check_same_adapter(path: Path, saved: dict, spec: AdapterSpec, model: nn.Module, name: str) -> None:
    """Compare through PEFT's config on both sides, so that ``all-linear`` equals the modules it expands to."""
    then = spec_from_peft_config(saved, str(path / CONFIG_NAME))
    now = spec_from_peft_config(peft_config(spec, model, name, None))
    differences = [f"adapter.{f.name} is {getattr(then, f.name)!r} in the checkpoint, {getattr(spec, f.name)!r} in "
                   "the config" for f in fields(AdapterSpec) if getattr(then, f.name) != getattr(now, f.name)]
    if differences:
        raise CheckpointError(f"can't resume from {path}: {'; '.join(differences)}. Resume with the settings it was "
                              "written with, or start a new output.dir")


def _read_trainer_state(file: Path) -> dict:
    try:
        saved = json.loads(file.read_bytes())
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{file}: not readable ({err}); is it truncated or corrupt? {_EARLIER}") from None
    keys = ("step", "tokens_seen", "optimizer", "scheduler", "python_rng", "numpy_rng")
    if not isinstance(saved, dict) or not all(key in saved for key in keys):
        raise CheckpointError(f"{file}: not a loraforge trainer state (an object with keys {list(keys)}). {_EARLIER}")
    return saved


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file}: not a readable safetensors file ({err}); is it truncated or corrupt? "
                              f"{_EARLIER}") from None


_EARLIER = "Resume from an earlier checkpoint: train.resume_from_checkpoint=<its folder>"


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = _checkpoints(run_dir / CHECKPOINTS)
    return found[-1] if found else None


def _checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def _prune(root: Path, keep: int | None, newest: Path) -> None:
    """Delete leftovers of interrupted writes, then all checkpoints but ``newest`` and the ``keep - 1`` next.

    A checkpoint is renamed to a staging name before it is deleted, so a crash mid-delete never leaves
    a partial checkpoint under a checkpoint's name.
    """
    for stale in root.glob(f".{PREFIX}*{STAGING_INFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep is None:
        return
    others = [p for p in _checkpoints(root) if p != newest]
    for old in others[: max(0, len(others) - (keep - 1))]:
        doomed = root / f".{old.name}{STAGING_INFIX}deleted"
        os.rename(old, doomed)
        shutil.rmtree(doomed)


def _split_hook_state(hook: TrainingHook | None) -> tuple[dict[str, torch.Tensor] | None, dict | None]:
    """The hook's state as (tensors for ``training_hook.safetensors``, the rest for the JSON), or (None, None)."""
    if hook is None:
        return None, None
    state = hook.state_dict()
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items() if torch.is_tensor(v)}
    return tensors, {k: v for k, v in state.items() if not torch.is_tensor(v)}


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
