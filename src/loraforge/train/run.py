"""The fine-tuning recipe: ``setup → train → finish``, driven by one validated ``Config``.

Run folder layout (``output.dir``):
- ``config.yaml``: the resolved config; a folder holding a different run is refused;
- ``adapter/``: the final adapter, PEFT format;
- ``checkpoints/checkpoint-<step>/``: resumable checkpoints (see ``checkpoint.py``);
- ``metrics.jsonl``, ``tensorboard/``, ``loss_curve.png``, ``summary.json``.

An adapter method may add to the loop through its registry entry's ``training_hook`` (AdaLoRA's rank
allocator); the loop never learns which method it is. The hook's ``loss()`` (a penalty) is added to
every optimizer step's loss, but is not part of the logged ``loss`` (logged as ``penalty`` beside it) nor
of ``eval_loss``, which stay the task's cross-entropy, comparable across methods. Its state is saved in
every checkpoint, and its ``finish()`` runs once, after the last step and before the final adapter save.
With LoRA+ (``train.loraplus_lr_ratio``) the logged ``lr`` is the base rate (A's); B's is that times the ratio.

Under torchrun (``train.distributed: ddp | fsdp``, see ``distributed.py``) every rank runs this recipe on
its share of each micro-batch; rank 0 alone checks and writes the run folder, logs and writes the adapter,
while evaluation is split over the ranks and summed. Checkpoints are sharded (``checkpoint.py``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from loraforge.adapters import add_adapter, mark_only_adapters_trainable, save_adapter
from loraforge.adapters.registry import TrainingHook, method
from loraforge.config import Config, save_config
from loraforge.data import build_datasets
from loraforge.data.collate import batches, collate
from loraforge.data.vision import build_vision_datasets, check_vision_data_options, collate_vision
from loraforge.models.kind import is_vision_language
from loraforge.models.prepare import load_base
from loraforge.train.checkpoint import (
    CheckpointError,
    TrainState,
    find_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_sharded_checkpoint,
)
from loraforge.train.distributed import (
    LostRanksError,
    World,
    init_world,
    is_lost_peer,
    total_grad_norm,
)
from loraforge.train.evaluate import eval_loss
from loraforge.train.optim import build_optimizer, parameter_groups
from loraforge.train.runlog import RunLog, peak_memory_bytes, plot_loss_curve
from loraforge.train.schedule import lr_multiplier, warmup_steps
from loraforge.utils.atomic import atomic_file
from loraforge.utils.memory import release_free_memory, return_large_blocks_on_free

CONFIG_FILE = "config.yaml"
RUN_KEYS_FREE_TO_CHANGE = {("train", "resume_from_checkpoint"), ("output", "overwrite_output_dir"),
                           ("train", "max_steps"), ("train", "epochs"), ("train", "save_steps"),
                           ("train", "eval_steps"), ("train", "logging_steps"), ("train", "save_total_limit"),
                           ("train", "distributed_timeout"), ("train", "cpu_allocator")}


class TrainingError(RuntimeError):
    """The run can't go on (diverged loss, a folder holding another run); the message says what to do."""


@dataclass
class RunResult:
    run_dir: Path
    adapter_dir: Path | None
    steps: int
    interrupted: bool = False
    summary: dict = field(default_factory=dict)


def run_training(config: Config, echo=print) -> RunResult:
    """Fine-tune per ``config``; prints progress and results through ``echo`` (rank 0's only, under torchrun)."""
    if config.model.threads:
        torch.set_num_threads(config.model.threads)
    world = init_world(config.train.distributed, config.train.distributed_timeout)
    lost = False
    try:
        with _lost_ranks_as_error(world, config):
            return _run(config, world, echo if world.is_main else _quiet)
    except LostRanksError:
        lost = True  # the group is left as it is (see LostRanksError)
        raise
    finally:
        if not lost:
            world.close()


@contextmanager
def _lost_ranks_as_error(world: World, config: Config):
    """A collective that fails because another rank died or hung becomes one clear error on each survivor.

    Raises:
        LostRanksError: naming the last complete checkpoint to resume from.
    """
    try:
        yield
    except RuntimeError as err:
        if not world.grouped or not is_lost_peer(err):
            raise
        latest = latest_checkpoint(Path(config.output.dir))
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LostRanksError(
            f"rank {world.rank} of {world.size}: lost the other ranks (one died, or did not answer within "
            f"train.distributed_timeout={config.train.distributed_timeout:g} s: {first_line}). "
            + (f"The last complete checkpoint is {latest}; resume with train.resume_from_checkpoint=latest, on any "
               "number of processes" if latest else "No checkpoint was written yet: start the run again")) from None


def _quiet(*_) -> None:
    pass


def _run(config: Config, world: World, echo) -> RunResult:
    run_dir = Path(config.output.dir)
    world.check_same("configs", json.dumps(config.to_dict(), sort_keys=True))
    if config.train.resume_from_checkpoint is not None:
        config = _with_options_the_run_chose(config, run_dir / CONFIG_FILE)
    world.on_main(lambda: _check_run_dir(config, run_dir))
    _seed_everything(config.train.seed)

    device = world.device
    if device.type == "cpu" and config.train.cpu_allocator == "compact":
        return_large_blocks_on_free()  # RSS then follows the live tensors
    model, tokenizer, spec = prepare_model(config, device)
    if config.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    echo(model_summary_line(config, model))

    data = _build_data(config, tokenizer, model)
    echo(str(data.report))
    world.check_same("data", json.dumps([[len(s.input_ids) for s in part] for part in (data.train, data.eval)]))
    steps_per_epoch = math.ceil(math.ceil(len(data.train) / config.train.batch_size) / config.train.grad_accum)
    total_steps = config.train.max_steps or max(1, math.ceil(config.train.epochs * steps_per_epoch))
    hook = _training_hook(model, config, total_steps)
    config = _with_options_the_hook_chose(config, hook)
    spec = config.adapter
    # only now that model, data and hook are known to work
    resume_from = world.on_main(lambda: _prepare_run_dir(config, run_dir))
    resume_from = None if resume_from is None else Path(resume_from)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch_of = batch_builder(model, tokenizer, pad_id)
    trainer = world.wrap(model)  # FSDP2 shards the parameters in place: the optimizer comes after
    sharding = world.shard_summary(model)
    if sharding:
        echo(sharding)

    groups = parameter_groups(model, config.train.lr, config.train.weight_decay, config.train.loraplus_lr_ratio)
    optimizer = build_optimizer(config.train.optim, groups, device)
    warmup = warmup_steps(config.train.warmup_steps, config.train.warmup_ratio, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(config.train.scheduler, warmup, total_steps))

    summary: dict = {}
    state = TrainState()
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, spec, config.adapter.name, optimizer, scheduler, hook)
        echo(f"resumed from {resume_from} at step {state.step}")
    elif data.test:
        summary["test_exact_match_before"] = _test_accuracy(model, tokenizer, data.test, config, echo, None)

    loop = _Loop(config, world, model, trainer, optimizer, scheduler, hook, data, batch_of, spec, run_dir,
                 total_steps, state)
    interrupted = loop.run(echo)
    summary.update(loop.summary())
    if interrupted:
        echo(f"interrupted: checkpoint saved at step {state.step}; resume with train.resume_from_checkpoint=latest")
        return RunResult(run_dir, None, state.step, interrupted=True, summary=summary)

    if hook is not None:
        hook.finish()
    adapter_dir = run_dir / "adapter"
    with world.whole_adapter(model):
        if world.is_main:
            save_adapter(model, adapter_dir, spec, config.adapter.name, config.model.source)
    if data.test:
        summary["test_exact_match_after"] = _test_accuracy(model, tokenizer, data.test, config, echo,
                                                           config.adapter.name)
    if world.is_main:
        _finish(run_dir, config, summary, echo)
    world.barrier()
    return RunResult(run_dir, adapter_dir, state.step, summary=summary)


def prepare_model(config: Config, device: torch.device):
    """The base model as ``config.model`` says (``models.prepare.load_base``), the adapter added and the
    rest frozen. Returns ``(model, tokenizer, spec)``."""
    model, tokenizer = load_base(config.model, device)
    add_adapter(model, config.adapter, config.adapter.name)
    mark_only_adapters_trainable(model)
    return model, tokenizer, config.adapter


def _training_hook(model: nn.Module, config: Config, total_steps: int) -> TrainingHook | None:
    """The adapter method's part of the training loop (see the registry), or None when it has none.

    Raises:
        AdapterError: the method's options don't fit this run (AdaLoRA: a schedule longer than the run).
    """
    build = method(config.adapter.method).training_hook
    return None if build is None else build(model, config.adapter.name, config.adapter.options, total_steps)


def model_summary_line(config: Config, model: nn.Module) -> str:
    """One line: parameters, trainable share, adapter, and the quantized linears' storage when quantized."""
    from loraforge.quant.summary import quant_summary

    info = quant_summary(model)
    line = (f"model {config.model.source}: {info['params'] / 1e6:.1f}M parameters, "
            f"{info['trainable_params'] / 1e6:.2f}M trainable ({100 * info['trainable_params'] / info['params']:.2f}%) "
            f"in {config.adapter.method} r={method(config.adapter.method).layer_rank(config.adapter, '')}; "
            f"{info['total_bytes'] / 2**20:.0f} MiB in memory")
    if info["quantized_layers"]:
        line += (f"; {info['quantized_layers']} quantized linears ({', '.join(info['formats'])}) at "
                 f"{info['bits_per_param']:.3f} bits/parameter, computing in {', '.join(info['compute_dtypes'])}")
        if config.model.quantization and config.model.quantization.compute_dtype == "bf16" and "bfloat16" not in info["compute_dtypes"]:
            line += " (bf16 asked for, but this device has no bf16 units: the fp32 path runs)"
    return line


def _with_options_the_hook_chose(config: Config, hook: TrainingHook | None) -> Config:
    """``config`` with each null field of ``adapter.options`` that the hook holds a value for under the same
    name (AdaLoRA's ``total_step``: the run's optimizer steps) set to that value, so that ``config.yaml``,
    the checkpoints and the adapter file all say what the run used."""
    options = config.adapter.options
    if hook is None or not dataclasses.is_dataclass(options):
        return config
    chosen = {f.name: getattr(hook, f.name) for f in dataclasses.fields(options)
              if getattr(options, f.name) is None and getattr(hook, f.name, None) is not None}
    return _with_options(config, chosen)


def _with_options_the_run_chose(config: Config, saved: Path) -> Config:
    """For a resume: ``config`` with each null field of ``adapter.options`` set as in the run's ``saved``
    config.yaml, where the run chose it (:func:`_with_options_the_hook_chose`). A resumed run, even one
    extended by ``train.max_steps``, thus keeps the schedule it started with."""
    import yaml

    options = config.adapter.options
    if not saved.is_file() or not dataclasses.is_dataclass(options):
        return config
    before = (yaml.safe_load(saved.read_text()).get("adapter") or {}).get("options") or {}
    chosen = {f.name: before[f.name] for f in dataclasses.fields(options)
              if getattr(options, f.name) is None and before.get(f.name) is not None}
    return _with_options(config, chosen)


def _with_options(config: Config, values: dict) -> Config:
    if not values:
        return config
    options = dataclasses.replace(config.adapter.options, **values)
    return dataclasses.replace(config, adapter=dataclasses.replace(config.adapter, options=options))


def batch_builder(model: nn.Module, tokenizer, pad_id: int):
    """``samples -> batch`` for ``model``'s kind: ``collate`` with ``pad_id`` for a causal LM, and
    ``collate_vision`` (image-token types and pixels too) for a vision-language model, whose ``tokenizer``
    is its ``VisionProcessor``."""
    if is_vision_language(model):
        return partial(collate_vision, processor=tokenizer)
    return partial(collate, pad_id=pad_id)


def _build_data(config: Config, tokenizer, model: nn.Module | None = None):
    """The datasets for ``model``'s kind (None: a causal LM's)."""
    d = config.data
    if model is not None and is_vision_language(model):
        check_vision_data_options(d.packing, d.test_files)
        return build_vision_datasets(
            tokenizer, train_files=d.train_files, eval_files=d.eval_files, format=d.format, columns=d.columns,
            val_size=d.val_size, cutoff_len=d.cutoff_len, train_on_prompt=d.train_on_prompt,
            system_prompt=d.system_prompt, template=d.template, on_overflow=d.on_overflow, seed=config.train.seed)
    return build_datasets(
        tokenizer, train_files=d.train_files, eval_files=d.eval_files, test_files=d.test_files, format=d.format,
        columns=d.columns, val_size=d.val_size, cutoff_len=d.cutoff_len, train_on_prompt=d.train_on_prompt,
        packing=d.packing, system_prompt=d.system_prompt, template=d.template, seed=config.train.seed,
    )


def _test_accuracy(model, tokenizer, test, config: Config, echo, adapter: str | None) -> float:
    """Held-out exact match (``loraforge.eval.evaluate``) of the base (``adapter`` None) or of the adapter on
    the model; generated by transformers, as the trained adapter lives only on this model."""
    from loraforge.data.formats import Conversation
    from loraforge.eval import BASE_LABEL, EvalOptions, InModel, evaluate

    conversations = [Conversation([*messages, {"role": "assistant", "content": reply}], f"data.test_files #{i}")
                     for i, (messages, reply) in enumerate(test)]
    options = EvalOptions(metrics=("exact_match",), template=config.data.template, backend="transformers",
                          max_new_tokens=config.data.test_max_new_tokens, batch_size=32, examples=0)
    label = BASE_LABEL if adapter is None else "trained"
    adapters = {} if adapter is None else {label: InModel(adapter)}
    accuracy = evaluate(model, tokenizer, conversations, adapters, options,
                        include_base=adapter is None).scores[label]["exact_match"]
    when = "before training" if adapter is None else "after training"
    echo(f"held-out exact match {when}: {accuracy:.1%} ({round(accuracy * len(test))}/{len(test)})")
    return accuracy


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check_run_dir(config: Config, run_dir: Path) -> Path | None:
    """Check ``run_dir`` against the config, changing nothing; returns the checkpoint to resume from.

    A folder that holds a run is refused unless resuming it (with the same config, except keys that
    only extend or log the run) or ``overwrite_output_dir`` is set.
    """
    if config.train.resume_from_checkpoint is not None:
        return _checkpoint_to_resume(config, run_dir)
    if run_dir.exists() and any(run_dir.iterdir()) and not config.output.overwrite_output_dir:
        raise TrainingError(f"output.dir {run_dir} already holds a run; choose another output.dir, resume it with "
                            "train.resume_from_checkpoint=latest, or set output.overwrite_output_dir=true to replace it")
    return None


def _checkpoint_to_resume(config: Config, run_dir: Path) -> Path:
    """The checkpoint that ``train.resume_from_checkpoint`` names, in a run written with the same settings.

    Raises:
        TrainingError: ``run_dir`` holds no run, or its settings differ (each key with both values).
        CheckpointError: there is no such checkpoint.
    """
    resume, saved = config.train.resume_from_checkpoint, run_dir / CONFIG_FILE
    if not saved.exists():
        state = "does not exist" if not run_dir.exists() else f"holds no run ({CONFIG_FILE} is missing)"
        raise TrainingError(f"train.resume_from_checkpoint={resume}: output.dir {run_dir} {state}, so there is "
                            "nothing to resume; set output.dir to the run's folder, or drop resume_from_checkpoint "
                            "to start a new run")
    try:
        checkpoint, missing = find_checkpoint(run_dir, resume), None
    except CheckpointError as err:
        checkpoint, missing = None, err
    changed = _changed_settings(config, saved, "the checkpoint" if checkpoint else "the run")
    if changed:
        raise TrainingError(f"can't resume from {checkpoint or run_dir}: it was written with other settings (see "
                            f"{saved}): {'; '.join(changed)}. Resume with the same settings, or start a new output.dir")
    if missing is not None:
        raise missing
    return checkpoint


def _prepare_run_dir(config: Config, run_dir: Path) -> Path | None:
    """``_check_run_dir``, then make the folder: cleared when overwriting, with the resolved config saved."""
    checkpoint = _check_run_dir(config, run_dir)
    if checkpoint is not None:
        return checkpoint
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    save_config(config, run_dir / CONFIG_FILE)
    return None


def _changed_settings(config: Config, saved: Path, where: str) -> list[str]:
    """``"<key> is <saved value> in <where>, <value> in the config"`` for each changed key that may not change."""
    import yaml

    before = yaml.safe_load(saved.read_text())
    return [f"{section}.{key} is {before.get(section, {}).get(key)!r} in {where}, {value!r} in the config"
            for section, values in config.to_dict().items() for key, value in values.items()
            if (section, key) not in RUN_KEYS_FREE_TO_CHANGE and before.get(section, {}).get(key) != value]


class _Loop:
    """The optimisation loop: micro-batches from a stream that is a pure function of (seed, step), each
    split over the ranks of ``world`` (``World.share``); ``trainer`` is ``world.wrap(model)``."""

    def __init__(self, config: Config, world: World, model, trainer, optimizer, scheduler, hook: TrainingHook | None,
                 data, batch_of, spec, run_dir, total_steps, state: TrainState):
        self.config, self.world, self.model, self.trainer = config, world, model, trainer
        self.optimizer, self.scheduler, self.hook = optimizer, scheduler, hook
        self.data, self.batch_of, self.device, self.spec = data, batch_of, world.device, spec
        self.run_dir, self.total_steps, self.state = run_dir, total_steps, state
        self.train_seconds = 0.0
        self.tokens_this_run = 0
        self.last_loss = float("nan")
        self.last_eval: dict = {}
        self.last_grad_norm = float("nan")

    def micro_batches(self, step: int) -> list[list[int]]:
        """The sample indices of the ``grad_accum`` micro-batches of optimizer step ``step`` (all ranks')."""
        per_epoch = math.ceil(len(self.data.train) / self.config.train.batch_size)
        out = []
        for k in range(step * self.config.train.grad_accum, (step + 1) * self.config.train.grad_accum):
            epoch, index = divmod(k, per_epoch)
            out.append(self._epoch_batches(epoch)[index])
        return out

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if getattr(self, "_cached_epoch", None) != epoch:
            self._cached_epoch = epoch
            self._cached = batches(self.data.train, self.config.train.batch_size, self.config.train.seed, epoch)
        return self._cached

    def run(self, echo) -> bool:
        """Train to ``total_steps``; returns True when stopped by Ctrl-C (after saving a checkpoint)."""
        cfg = self.config.train
        self.trainer.train()
        log = RunLog(self.run_dir, self.total_steps, self.state.step, self.config.output.tensorboard) \
            if self.world.is_main else None
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.precision == "bf16"
                    else nullcontext())
        try:
            with _sigint_as_flag() as stop_requested:
                while self.state.step < self.total_steps:
                    started = time.perf_counter()
                    loss, penalty, tokens = self._step(autocast)
                    self.train_seconds += time.perf_counter() - started
                    self.tokens_this_run += tokens
                    self.state.step += 1
                    self.state.tokens_seen += tokens
                    self._after_step(log, loss, penalty, tokens)
                    if self.world.any(stop_requested()):
                        self._save()
                        return True
        finally:
            if log is not None:
                log.close()
        return False

    def _step(self, autocast) -> tuple[float, float | None, int]:
        """One optimizer step; returns (task loss, the hook's penalty or None, tokens), summed over the ranks.

        Each rank runs its share of every micro-batch, and a rank whose share is empty runs the micro-batch's
        first sample at weight 0, so that all take part in the gradient reduction. The loss is divided by
        the label count of the whole step, over all ranks, and multiplied by the world size because DDP and
        FSDP average the ranks' gradients: their sum is then the one-process gradient.
        """
        cfg, world = self.config.train, self.world
        indices = self.micro_batches(self.state.step)
        tokens = sum(len(self.data.train[i].input_ids) for idx in indices for i in idx)
        micro = [(self.batch_of([self.data.train[i] for i in (world.share(idx) or idx[:1])]),
                  1.0 if world.share(idx) else 0.0) for idx in indices]
        local_labels = sum(int((b["labels"][:, 1:] != -100).sum()) for b, weight in micro if weight)
        label_count = world.sum(local_labels)[0]
        total, penalty_total = 0.0, 0.0
        for k, (batch, weight) in enumerate(micro):
            batch = {key: v.to(self.device) for key, v in batch.items()}
            with world.gradient_sync(self.trainer, k == len(micro) - 1), autocast:
                loss_sum, _ = self.trainer(batch)
                loss = loss_sum * weight / max(label_count, 1)
                # the penalty counts once per optimizer step: a share of it on each micro-batch
                penalty = self.hook.loss() / len(micro) if self.hook is not None else None
                objective = loss if penalty is None else loss + penalty
                if not world.grouped and not torch.isfinite(objective):
                    raise self._diverged(objective.item())
                (objective * world.size).backward()
            total += loss.item()
            penalty_total += 0.0 if penalty is None else penalty.item()
        total, = world.sum(total)
        if not math.isfinite(total):
            raise self._diverged(total)
        params = [p for p in self.model.parameters() if p.requires_grad]
        # the norm before clipping is logged as grad_norm; no max_grad_norm = measure only
        self.last_grad_norm = total_grad_norm(params, cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        if self.hook is not None:
            self.hook.after_optimizer_step(self.state.step)  # reads this step's gradients
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cpu" and self.config.train.cpu_allocator == "compact":
            # the step's freed small blocks too. Not with `fast`: the next step would fault every page back in
            # (~10% of a default-model step, BENCHMARKS.md), and the peak no longer creeps without it now
            # that quantized layers leave no dense copy (kernels.py tiles)
            release_free_memory()
        return total, None if self.hook is None else penalty_total, tokens

    def _diverged(self, loss: float) -> TrainingError:
        return TrainingError(
            f"loss is {loss} at step {self.state.step + 1}; stopping. The last good checkpoint "
            f"(if any) is in {self.run_dir / 'checkpoints'}. Lower train.lr or check the data.")

    def _after_step(self, log: RunLog | None, loss: float, penalty: float | None, tokens: int) -> None:
        cfg, step = self.config.train, self.state.step
        self.last_loss = loss
        tokens_per_s = self.tokens_this_run / max(self.train_seconds, 1e-9)
        lr = self.scheduler.get_last_lr()[0]
        if log is not None:
            log.progress(1, loss, lr, tokens_per_s)
        if log is not None and (step % cfg.logging_steps == 0 or step == self.total_steps):
            extra = {} if penalty is None else {"penalty": penalty}
            log.log(step, {"loss": loss, **extra, "lr": lr, "grad_norm": self.last_grad_norm,
                           "tokens_per_s": tokens_per_s, "tokens_seen": self.state.tokens_seen})
        if self.data.eval and (step == self.total_steps or (cfg.eval_steps and step % cfg.eval_steps == 0)):
            self.last_eval = eval_loss(self.model, self.data.eval, cfg.batch_size, None, self.device,
                                       self.batch_of, loss_of=self.trainer, world=self.world)
            if log is not None:
                log.log(step, self.last_eval)
        if cfg.save_steps and step % cfg.save_steps == 0:
            self._save()

    def _save(self) -> None:
        if self.config.train.distributed == "none":
            save_checkpoint(self.run_dir, self.model, self.spec, self.config.adapter.name, self.config.model.source,
                            self.optimizer, self.scheduler, self.state, self.config.train.save_total_limit, self.hook)
        else:
            save_sharded_checkpoint(self.world, self.run_dir, self.model, self.spec, self.config.adapter.name,
                                    self.config.model.source, self.optimizer, self.scheduler, self.state,
                                    self.config.train.save_total_limit)

    def summary(self) -> dict:
        return {
            "steps": self.state.step,
            "train_loss": self.last_loss,
            "tokens_per_s": self.tokens_this_run / max(self.train_seconds, 1e-9),
            "train_seconds": self.train_seconds,
            "peak_memory_bytes": peak_memory_bytes(self.device),
            **self.last_eval,
        }


@contextmanager
def _sigint_as_flag():
    """Ctrl-C sets a flag that the loop checks between steps (so a checkpoint is never half-updated);
    a second Ctrl-C interrupts at once."""
    pressed = []

    def handler(signum, frame):
        if pressed:
            raise KeyboardInterrupt
        pressed.append(True)

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave Ctrl-C alone
        yield lambda: False
        return
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, previous)


def _finish(run_dir: Path, config: Config, summary: dict, echo) -> None:
    if config.output.plot:
        plot_loss_curve(run_dir)
    atomic_file(run_dir / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    lines = [f"steps {summary['steps']}", f"train loss {summary['train_loss']:.4f}",
             f"{summary['tokens_per_s']:.1f} tokens/s", f"peak memory {summary['peak_memory_bytes'] / 2**30:.2f} GiB"]
    if "eval_loss" in summary:
        lines.append(f"eval loss {summary['eval_loss']:.4f} (ppl {summary['eval_ppl']:.2f})")
    if "test_exact_match_after" in summary:
        before = summary.get("test_exact_match_before")
        lines.append(f"held-out exact match {'' if before is None else f'{before:.1%} -> '}"
                     f"{summary['test_exact_match_after']:.1%}")
    echo("done: " + "; ".join(lines) + f"\nadapter saved to {run_dir / 'adapter'}")
