"""Read a LLaMA-Factory SFT config (what ``llamafactory-cli train x.yaml`` takes) as a loraforge ``Config``.

A LLaMA-Factory config is one flat mapping of Hugging Face ``TrainingArguments`` and LLaMA-Factory's own
keys; its data are named datasets that ``<dataset_dir>/dataset_info.json`` describes. ``convert`` maps
each key to its loraforge equivalent and names every key it can't map, with the reason, all at once
(``file:line`` of the LLaMA-Factory key). Keys that only tune things loraforge does anyway, or doesn't
need, are accepted and listed in the notes.

Paths resolve as LLaMA-Factory resolves them: ``dataset_dir`` (default ``data``), ``output_dir`` and
``model_name_or_path`` against the current directory. Where a key is absent, LLaMA-Factory's default
is kept when it differs from loraforge's and changes the training (``DEFAULTS``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .load import apply_overrides, parse_yaml
from .schema import Config
from .validate import ALIASES, ConfigError, KeyPath, Problem

MARKERS = ("model_name_or_path", "stage", "finetuning_type")
"""Top-level keys that make a YAML file a LLaMA-Factory config (when it has no loraforge section)."""

DIRECT: dict[str, str] = {
    **{key: ALIASES[key] for key in ("learning_rate", "num_train_epochs", "per_device_train_batch_size",
                                     "gradient_accumulation_steps", "lora_rank", "lora_dropout", "output_dir")},
    **{key: f"train.{key}" for key in ("warmup_ratio", "warmup_steps", "weight_decay", "max_grad_norm",
                                       "gradient_checkpointing", "logging_steps", "save_steps", "save_total_limit",
                                       "seed", "eval_steps", "resume_from_checkpoint", "loraplus_lr_ratio")},
    **{key: f"data.{key}" for key in ("cutoff_len", "val_size", "train_on_prompt", "packing")},
    "default_system": "data.system_prompt",
    "use_rslora": "adapter.use_rslora",
    "overwrite_output_dir": "output.overwrite_output_dir",
    "plot_loss": "output.plot",
    "ddp_timeout": "train.distributed_timeout",
}
"""LLaMA-Factory keys whose value loraforge takes as it is, and the loraforge key they set."""

DEFAULTS: dict[str, tuple[str, Any]] = {
    "learning_rate": ("train.lr", 5.0e-5),
    "num_train_epochs": ("train.epochs", 3.0),
    "per_device_train_batch_size": ("train.batch_size", 8),
    "lr_scheduler_type": ("train.scheduler", "linear"),
    "lora_rank": ("adapter.r", 8),
    "cutoff_len": ("data.cutoff_len", 2048),
}
"""LLaMA-Factory / Hugging Face defaults that differ from loraforge's: the key they stand for, and the
loraforge key and value they set (``lora_alpha`` defaults to twice the rank)."""

USED_WITH: dict[str, str] = {
    "dataset_dir": "dataset",
    "pissa_iter": "pissa_init",
    "quantization_type": "quantization_bit",
    "double_quantization": "quantization_bit",
    "quantization_method": "quantization_bit",
}
"""Keys read by another key's conversion: the key that reads them."""

NO_EFFECT: dict[str, str] = {
    "do_train": "loraforge always trains",
    "trust_remote_code": "loraforge runs no model code from the model folder",
    "preprocessing_num_workers": "data are prepared in-process",
    "dataloader_num_workers": "batches are built in-process",
    "overwrite_cache": "loraforge keeps no tokenized-data cache",
    "save_only_model": "checkpoints always hold the optimizer state, for exact resume",
    "do_eval": "loraforge evaluates whenever there is eval data",
    "per_device_eval_batch_size": "evaluation uses train.batch_size",
    "logging_strategy": "logging is every train.logging_steps steps",
    "logging_dir": "logs are written into output.dir",
    "flash_attn": "the attention kernel is picked by torch",
    "pissa_convert": "a PiSSA adapter is always saved converted to apply to the original weight",
    "disable_tqdm": "loraforge prints one progress line per logging step",
    "run_name": "the run is named by output.dir",
}
"""Keys accepted without effect, and why they aren't needed."""

UNSUPPORTED: dict[str, str] = {
    "max_samples": "loraforge has no sample cap; trim the dataset file to its first N records instead",
    "fp16": "mixed precision is fp32 or bf16 here; use bf16: true, or leave both off for fp32",
    "pure_bf16": "the adapter trains in fp32 under bf16 autocast; use bf16: true",
    "deepspeed": "loraforge runs DDP/FSDP2 through torchrun, not DeepSpeed",
    "neat_packing": "packing is data.packing (packing: true), which never attends across samples already",
    "mask_history": "the loss covers every assistant turn",
    "additional_target": "only adapters train; extra fully trained modules are not supported",
    "adapter_name_or_path": "training on top of an existing adapter is not supported; start a new one",
    "use_unsloth": "Unsloth kernels are not used",
    "rope_scaling": "RoPE scaling is not configurable",
    "do_predict": "put held-out data in data.test_files (exact match before and after training)",
    "predict_with_generate": "put held-out data in data.test_files (exact match before and after training)",
    "tokenized_path": "data are tokenized at the start of every run",
    "streaming": "datasets are read whole",
    "deepspeed_config": "loraforge runs DDP/FSDP2 through torchrun, not DeepSpeed",
}
"""LLaMA-Factory keys that loraforge can't honour, and what to do instead."""

TEMPLATES: dict[str, str] = {"chatml": "chatml", "qwen": "chatml", "default": "auto", "empty": "auto"}
"""LLaMA-Factory template -> data.template. ``default``/``empty`` take the tokenizer's own chat template."""

SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant", "constant_with_warmup": "constant"}
OPTIMIZERS = {"adamw_torch": "adamw", "adamw_hf": "adamw", "adamw_torch_fused": "adamw",
              "paged_adamw_32bit": "paged_adamw", "adamw_bnb_8bit": "adamw_8bit", "adamw_8bit": "adamw_8bit"}

ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
                  "history": "history"}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": "system"}
TAG_DEFAULTS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "system_tag": "system"}
"""LLaMA-Factory's dataset_info.json tags (with their defaults) that data.columns takes for sharegpt."""
HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")


@dataclass
class Conversion:
    """A converted config and the notes for the user (keys accepted without effect, mapping choices)."""

    config: Config
    notes: list[str]


def is_llamafactory(data: Any) -> bool:
    """Whether parsed YAML is a LLaMA-Factory config: a marker key and no loraforge section."""
    sections = {f.name for f in dataclasses.fields(Config)}
    return isinstance(data, dict) and not sections & set(data) and any(key in data for key in MARKERS)


def looks_like_llamafactory(path: str | os.PathLike) -> bool:
    """``is_llamafactory`` of the YAML file at ``path``; False when it can't be read (``load_config`` says why)."""
    try:
        return is_llamafactory(yaml.safe_load(Path(path).read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False


def convert(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Conversion:
    """Read the LLaMA-Factory config at ``path`` as a loraforge Config.

    ``overrides`` are ``key=value`` strings in LLaMA-Factory's key names (``learning_rate=1e-4``), as
    ``llamafactory-cli train`` takes them.

    Raises ``ConfigError`` with every problem, each naming the LLaMA-Factory key at its ``file:line``.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([Problem((), f"cannot read config file {path}: {e}")]) from None
    data, locations, problems = parse_yaml(text, source)
    if not isinstance(data, dict):
        raise ConfigError([Problem((), "expected a mapping of LLaMA-Factory keys")], source)
    problems += apply_overrides(data, overrides, locations)
    converter = _Converter(data)
    converter.run()
    problems += converter.problems
    try:
        config = Config.from_dict(converter.out, source, base_dir=os.curdir)
    except ConfigError as e:
        failed = {p.path for p in problems}
        problems += [p for p in map(converter.in_llamafactory_terms, e.problems) if p.path not in failed]
        config = None
    if problems:
        raise ConfigError(problems, source, locations)
    return Conversion(config, converter.notes())


class _Converter:
    """Walks the LLaMA-Factory keys once, filling ``out`` (loraforge's plain data) and ``problems``."""

    def __init__(self, data: dict):
        self.data = data
        self.out: dict[str, dict] = {}
        self.origin: dict[KeyPath, str] = {}
        self.problems: list[Problem] = []
        self.accepted: list[tuple[str, str]] = []
        self.remarks: list[str] = []

    def run(self) -> None:
        for key, value in self.data.items():
            if key in DIRECT:
                self.set(key, DIRECT[key], value)
            elif key in _HANDLERS:
                _HANDLERS[key](self, key, value)
            elif key in NO_EFFECT:
                self.accepted.append((key, NO_EFFECT[key]))
            elif key in USED_WITH:
                if USED_WITH[key] not in self.data:
                    self.remarks.append(f"{key} has no effect without {USED_WITH[key]}")
            elif key in UNSUPPORTED:
                self.fail(key, UNSUPPORTED[key])
            else:
                close = difflib.get_close_matches(str(key), [*DIRECT, *_HANDLERS, *NO_EFFECT], n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                self.fail(key, f"not a LLaMA-Factory key that loraforge knows; it has no equivalent here{hint}")
        for key, (target, value) in DEFAULTS.items():
            if key not in self.data:
                self.set(key, target, value)
        if "lora_alpha" not in self.data:
            rank = self.data.get("lora_rank", DEFAULTS["lora_rank"][1])
            self.set("lora_alpha", "adapter.alpha", 2 * rank if isinstance(rank, int) else rank)
        for key in ("model_name_or_path", "dataset"):
            if key not in self.data:
                self.fail(key, "required")
        if "template" not in self.data:
            self.remarks.append("no template given: data.template auto (the tokenizer's own chat template)")

    def set(self, key: str, target: str, value: Any) -> None:
        section, name = target.split(".")
        self.out.setdefault(section, {})[name] = value
        self.origin[(section, name)] = key

    def fail(self, key: str, text: str) -> None:
        self.problems.append(Problem((key,), f"{key}: {text}"))

    def in_llamafactory_terms(self, problem: Problem) -> Problem:
        """A problem with the converted config, placed at (and naming) the LLaMA-Factory key it came from."""
        for end in range(len(problem.path), 0, -1):
            key = self.origin.get(problem.path[:end])
            if key is not None:
                return Problem((key,), f"{key}: as {problem.text}")
        return problem

    def notes(self) -> list[str]:
        lines = [f"accepted without effect: {'; '.join(f'{k} ({why})' for k, why in self.accepted)}"]
        return (lines if self.accepted else []) + self.remarks


def _one_of(table: dict[str, str], what: str, target: str) -> Callable[[_Converter, str, Any], None]:
    def handle(conv: _Converter, key: str, value: Any) -> None:
        if value not in table:
            conv.fail(key, f"{value!r} is not a {what} loraforge has; choose one of {', '.join(table)}")
        else:
            conv.set(key, target, table[value])
    return handle


def _model(conv: _Converter, key: str, value: Any) -> None:
    if isinstance(value, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", value) and not Path(value).expanduser().exists():
        conv.fail(key, f"{value!r} is no local folder, and loraforge loads no model from a hub; download it first "
                       f"(huggingface-cli download {value} --local-dir models/{value.split('/')[-1]}) and give "
                       "that folder, or a .gguf file")
    conv.set(key, "model.source", value)


def _max_steps(conv: _Converter, key: str, value: Any) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
        conv.accepted.append((key, f"{value} means no step limit, as in Hugging Face"))
    else:
        conv.set(key, "train.max_steps", value)


def _stage(conv: _Converter, key: str, value: Any) -> None:
    if value != "sft":
        conv.fail(key, f"{value!r}: loraforge trains supervised fine-tuning only (stage: sft); pre-training, reward "
                       "modelling, PPO, DPO and KTO are not supported")


def _finetuning_type(conv: _Converter, key: str, value: Any) -> None:
    if value != "lora":
        conv.fail(key, f"{value!r}: loraforge trains adapters only (finetuning_type: lora); full, freeze and oft "
                       "fine-tuning are not supported")


def _lora_alpha(conv: _Converter, key: str, value: Any) -> None:
    conv.set(key, "adapter.alpha", value)


def _lora_target(conv: _Converter, key: str, value: Any) -> None:
    if isinstance(value, str):
        names = [name.strip() for name in value.split(",") if name.strip()]
        value = "all-linear" if names == ["all"] else names
    conv.set(key, "adapter.target_modules", value)


def _use_dora(conv: _Converter, key: str, value: Any) -> None:
    if value is True:
        conv.set(key, "adapter.method", "dora")


def _pissa_init(conv: _Converter, key: str, value: Any) -> None:
    if value is True:
        iterations = conv.data.get("pissa_iter", 16)
        conv.set(key, "adapter.init", "pissa" if iterations == -1 else f"pissa_niter_{iterations}")


def _quantization_bit(conv: _Converter, key: str, value: Any) -> None:
    if value is None:
        return
    if value != 4:
        conv.fail(key, f"{value}: loraforge's QLoRA is 4-bit (nf4 or fp4); use quantization_bit: 4")
    method = conv.data.get("quantization_method", "bitsandbytes")
    if method != "bitsandbytes":
        conv.fail("quantization_method", f"{method!r}: only bitsandbytes' NF4/FP4 layout is reproduced here")
    quant_type = conv.data.get("quantization_type", "nf4")
    if quant_type not in ("nf4", "fp4"):
        conv.fail("quantization_type", f"{quant_type!r}: choose nf4 or fp4")
    conv.set(key, "model.quantization", {"type": quant_type, "double_quant": conv.data.get("double_quantization", True),
                                         "compute_dtype": "bf16" if conv.data.get("bf16") is True else "fp32"})


def _bf16(conv: _Converter, key: str, value: Any) -> None:
    if value is True:
        conv.set(key, "train.precision", "bf16")


def _report_to(conv: _Converter, key: str, value: Any) -> None:
    targets = [value] if isinstance(value, str) or value is None else list(value)
    others = [t for t in targets if t not in ("none", "tensorboard", None)]
    if others:
        conv.fail(key, f"{', '.join(map(str, others))}: loraforge logs to TensorBoard (report_to: tensorboard) and "
                       "metrics.jsonl only; use tensorboard or none")
    conv.set(key, "output.tensorboard", "tensorboard" in targets)


def _strategy(allowed: tuple[str, ...], why: str) -> Callable[[_Converter, str, Any], None]:
    def handle(conv: _Converter, key: str, value: Any) -> None:
        if value in allowed:
            conv.accepted.append((key, why))
        else:
            conv.fail(key, f"{value!r}: {why}; use {' or '.join(allowed)}")
    return handle


def _template(conv: _Converter, key: str, value: Any) -> None:
    if value not in TEMPLATES:
        conv.fail(key, f"{value!r}: loraforge renders ChatML or the tokenizer's own chat template; LLaMA-Factory "
                       f"templates it maps: {', '.join(TEMPLATES)} (a model whose tokenizer carries its chat template "
                       "trains with template: default)")
        return
    conv.set(key, "data.template", TEMPLATES[value])
    if value in ("default", "empty"):
        conv.remarks.append(f"template: {value} -> data.template auto (the tokenizer's own chat template, ChatML if "
                            "it has none), not LLaMA-Factory's plain-text rendering")


def _dataset(conv: _Converter, key: str, value: Any) -> None:
    target = "data.train_files" if key == "dataset" else "data.eval_files"
    conv.set(key, target, [])
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        conv.fail(key, "expected dataset names of dataset_info.json, comma-separated")
        return
    folder = Path(conv.data.get("dataset_dir", "data"))
    info_file = folder / "dataset_info.json"
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        conv.fail(key, f"no dataset_info.json in dataset_dir {str(folder)!r} ({folder.absolute()}); LLaMA-Factory "
                       "resolves dataset_dir (default 'data') against the current directory")
        return
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        conv.fail(key, f"cannot read {info_file}: {e}")
        return
    files, readers = [], {}
    for name in names:
        entry = _dataset_entry(conv, key, name, info, info_file)
        if entry is not None:
            files.append(str(folder / entry[0]))
            readers[name] = entry[1:]
    conv.set(key, target, files)
    previous = conv.out["data"].get("format"), conv.out["data"].get("columns")
    for name, (fmt, columns) in readers.items():
        if previous[0] is not None and (fmt, columns) != previous:
            conv.fail(key, f"dataset {name!r} ({fmt}, columns {columns}) is read differently from the others "
                           f"({previous[0]}, columns {previous[1]}); loraforge reads all data files with one format "
                           "and column mapping: convert them to one, or train on one")
            return
        previous = fmt, columns
        conv.set(key, "data.format", fmt)
        conv.set(key, "data.columns", columns)


def _dataset_entry(conv: _Converter, key: str, name: str, info: Any, info_file: Path
                   ) -> tuple[str, str, dict[str, str]] | None:
    """(file_name, data.format, data.columns) of dataset ``name``, or None after reporting why not."""
    if not isinstance(info, dict) or name not in info or not isinstance(info[name], dict):
        known = list(info) if isinstance(info, dict) else []
        close = difflib.get_close_matches(name, known, n=1)
        conv.fail(key, f"no dataset {name!r} in {info_file}" + (f"; did you mean '{close[0]}'?" if close else
                                                                  f"; it has {', '.join(known) or 'none'}"))
        return None
    entry = info[name]
    where = f"dataset {name!r} ({info_file})"
    hub = [k for k in HUB_KEYS if k in entry]
    if hub:
        conv.fail(key, f"{where} is on a hub ({hub[0]}: {entry[hub[0]]}); loraforge reads local files only: "
                       "download it and give its file_name")
        return None
    if "file_name" not in entry:
        conv.fail(key, f"{where} has no file_name")
        return None
    if entry.get("ranking"):
        conv.fail(key, f"{where} is preference data (ranking: true); loraforge trains SFT only")
        return None
    for field in ("num_samples", "subset", "folder"):
        if field in entry:
            conv.fail(key, f"{where}: {field} is not supported; loraforge reads the whole file")
    fmt = entry.get("formatting", "alpaca")
    known = {"alpaca": ALPACA_COLUMNS, "sharegpt": SHAREGPT_COLUMNS}
    if fmt not in known:
        conv.fail(key, f"{where}: formatting {fmt!r} is not supported; use alpaca or sharegpt")
        return None
    columns: dict[str, str] = {}
    for theirs, column in (entry.get("columns") or {}).items():
        ours = known[fmt].get(theirs)
        if ours is None:
            conv.fail(key, f"{where}: column {theirs!r} is not supported for {fmt} (loraforge trains on text "
                           f"conversations: {', '.join(known[fmt])})")
        elif column != ours:
            columns[ours] = column
    for tag, value in (entry.get("tags") or {}).items():
        if fmt == "sharegpt" and tag in TAG_DEFAULTS:
            if value != TAG_DEFAULTS[tag]:
                columns[tag] = value
        elif fmt == "sharegpt" and tag in ("observation_tag", "function_tag"):
            conv.remarks.append(f"{where}: {tag} {value!r}: tool turns are not supported; a record holding one is "
                                "refused when read")
        else:
            conv.fail(key, f"{where}: tag {tag!r} is not supported for {fmt}")
    return entry["file_name"], fmt, columns


def _unfrozen(target: str) -> Callable[[_Converter, str, Any], None]:
    """``freeze_vision_tower`` / ``freeze_multi_modal_projector``: with LoRA, LLaMA-Factory adapts that part
    when it is not frozen, which is loraforge's ``adapter.vision`` / ``adapter.projector``."""
    def handle(conv: _Converter, key: str, value: Any) -> None:
        if not isinstance(value, bool):
            conv.fail(key, f"expected true or false, got {value!r}")
        else:
            conv.set(key, target, not value)

    return handle


_HANDLERS: dict[str, Callable[[_Converter, str, Any], None]] = {
    "model_name_or_path": _model,
    "stage": _stage,
    "max_steps": _max_steps,
    "finetuning_type": _finetuning_type,
    "lora_alpha": _lora_alpha,
    "lora_target": _lora_target,
    "use_dora": _use_dora,
    "pissa_init": _pissa_init,
    "quantization_bit": _quantization_bit,
    "bf16": _bf16,
    "report_to": _report_to,
    "lr_scheduler_type": _one_of(SCHEDULERS, "learning-rate schedule", "train.scheduler"),
    "optim": _one_of(OPTIMIZERS, "optimizer", "train.optim"),
    "template": _template,
    "dataset": _dataset,
    "eval_dataset": _dataset,
    "eval_strategy": _strategy(("steps", "no"), "loraforge evaluates every train.eval_steps steps (eval_steps)"),
    "evaluation_strategy": _strategy(("steps", "no"), "loraforge evaluates every train.eval_steps steps (eval_steps)"),
    "save_strategy": _strategy(("steps",), "loraforge checkpoints every train.save_steps steps (save_steps)"),
    "freeze_vision_tower": _unfrozen("adapter.vision"),
    "freeze_multi_modal_projector": _unfrozen("adapter.projector"),
}
