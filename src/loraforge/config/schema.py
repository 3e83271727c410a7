"""Every YAML key of a loraforge run: its type, its default and what it means, in one place.

A config file has five sections, one dataclass each: ``model``, ``adapter``, ``data``, ``train`` and
``output``. A field's ``metadata["help"]`` is its user-facing description; ``gt``/``ge``/``lt``/``le``
bound numbers. Types, choices, bounds and unknown keys are checked generically by ``validate.build``;
rules that tie several fields of one section together live in that section's ``check()``.

Paths. Relative entries of ``data.train_files``, ``data.eval_files`` and ``data.test_files`` resolve
against the directory of the config file (for ``Config.from_dict``: against ``base_dir``, default the
current directory), so that a config and its data move together. ``output.dir`` and a
``train.resume_from_checkpoint`` path resolve against the current directory, as with any command-line
tool. A validated ``Config`` holds them all as absolute paths.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from .validate import ConfigError, Problem, build

ModelDtype = Literal["float32", "bfloat16", "float16"]
QuantType = Literal["nf4", "fp4", "int", "gguf"]
QuantBits = Literal[2, 3, 4, 8]
GroupSize = Literal[32, 64, 128]
ComputeDtype = Literal["fp32", "bf16", "fp16"]
DataFormat = Literal["alpaca", "sharegpt", "openai"]
ChatTemplate = Literal["auto", "chatml"]
Optimizer = Literal["adamw", "paged_adamw", "adamw_8bit"]
Scheduler = Literal["cosine", "linear", "constant"]
Precision = Literal["fp32", "bf16"]
OnOverflow = Literal["drop", "error"]
Distributed = Literal["none", "ddp", "fsdp"]
CpuAllocator = Literal["fast", "compact"]



def setting(default: Any, help: str, **bounds: float) -> Any:
    """A dataclass field with a help text and optional number bounds (``gt``, ``ge``, ``lt``, ``le``)."""
    metadata = {"help": help, **bounds}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


@dataclass
class QuantizationConfig:
    """How the frozen base weights are stored (QLoRA-style). Fields marked "None = ..." get their
    type-dependent default after construction, so ``block_size`` is set only for nf4/fp4 and
    ``group_size`` only for int."""

    bits: QuantBits = setting(4, "Bits per weight. nf4/fp4 are 4-bit only; int takes 2, 3, 4 or 8.")
    type: QuantType = setting("nf4", "nf4 | fp4 (QLoRA blocks) | int (group-wise asymmetric INTk, as in QA-LoRA) | "
                                     "gguf (keep a .gguf source's own Q4_0/Q4_1/Q8_0 blocks, bit-exact).")
    double_quant: bool | None = setting(None, "nf4/fp4 only: quantize the per-block scales too. None = true.")
    block_size: int | None = setting(None, "nf4/fp4 only: weights per scale. None = 64.", gt=0)
    group_size: GroupSize | None = setting(None, "int only: weights per scale and zero point. None = 64.")
    compute_dtype: ComputeDtype = setting("bf16", "dtype the dequantized weight is multiplied in.")

    def __post_init__(self) -> None:
        if self.type in ("nf4", "fp4"):
            self.double_quant = True if self.double_quant is None else self.double_quant
            self.block_size = 64 if self.block_size is None else self.block_size
        elif self.type == "int":
            self.group_size = 64 if self.group_size is None else self.group_size

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.type in ("nf4", "fp4"):
            if self.bits != 4:
                problems.append(("bits", f"type {self.type} is 4-bit only, got bits {self.bits}; "
                                         "use type: int for 2, 3 or 8 bits"))
            if self.group_size is not None:
                problems.append(("group_size", f"applies to type int only; type {self.type} uses block_size"))
        elif self.type == "gguf":
            for key in ("block_size", "group_size", "double_quant"):
                if getattr(self, key) is not None:
                    problems.append((key, "does not apply to type gguf: the blocks come from the file"))
        elif self.type == "int":
            if self.block_size is not None:
                problems.append(("block_size", "applies to nf4/fp4 only; type int uses group_size"))
            if self.double_quant is not None:
                problems.append(("double_quant", "applies to nf4/fp4 only"))
        return problems


@dataclass
class ModelConfig:
    source: str = setting("default", "'default' (the embedded SmolLM2-135M), a Hugging Face model folder, a .gguf "
                                     "file, or tiny-llama | tiny-qwen2 | tiny-mistral (random, for tests).")
    dtype: ModelDtype = setting("float32", "dtype the frozen base model is held in.")
    quantization: QuantizationConfig | None = setting(None, "Quantize the frozen base (a mapping); null = don't.")
    threads: int | None = setting(None, "torch CPU threads; null = torch's default.", gt=0)


def _method_options(values: dict) -> type | None:
    """The options dataclass of the adapter method in ``values`` (None: it has none, or no such method)."""
    from loraforge.adapters.registry import METHODS

    method = METHODS.get(values.get("method", "lora"))
    return method.options if method is not None else None


@dataclass
class AdapterConfig:
    """The adapter to train, and the one type that describes an adapter everywhere (``AdapterSpec`` in
    ``loraforge.adapters`` is this class). The methods and their options come from
    ``loraforge.adapters.registry``."""

    method: str = setting("lora", "Adapter method, a name of loraforge.adapters.registry.METHODS (lora, dora, "
                                  "qalora, adalora, vera, ...).")
    name: str = setting("default", "Adapter name (the PEFT adapter name, and its name when served).")
    r: int = setting(16, "Rank of the low-rank update (vera: of the shared projections).", gt=0)
    alpha: float = setting(32.0, "Scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with "
                                 "use_rslora).", gt=0)
    dropout: float = setting(0.0, "Dropout on the adapter's input, in [0, 1).", ge=0, lt=1)
    use_rslora: bool = setting(False, "Rank-stabilised scaling alpha / sqrt(r).")
    init: str = setting("kaiming", "Init of A (B starts at zero): kaiming | gaussian | none (both random, for "
                                   "tests) | pissa (A and B from the weight's principal singular vectors; the base "
                                   "keeps the residual) | pissa_niter_N (the same by fast SVD, N iterations).")
    target_modules: str | list[str] = setting("all-linear", "'all-linear' (every linear but the output head), a "
                                                             "list of module names, or a regex on full names.")
    layers_to_transform: list[int] | None = setting(None, "Only adapt these layer indices; null = all.", ge=0)
    vision: bool | str | list[str] = setting(False, "Vision-language models: also adapt the vision tower's linears: "
                                                     "true (all of them), a list of module names, or a regex on full "
                                                     "names (e.g. '.*visual\\.blocks\\.\\d+\\.attn\\.qkv'). "
                                                     "target_modules only reaches the language model; the patch "
                                                     "embedding is never adapted.")
    projector: bool = setting(False, "Vision-language models: also adapt the projector's linears (visual.merger).")
    rank_pattern: dict[str, int] = setting({}, "Per-module rank: {module-name pattern: r}.", gt=0)
    alpha_pattern: dict[str, float] = setting({}, "Per-module alpha: {module-name pattern: alpha}.", gt=0)
    options: Any = field(default=None, metadata={
        "help": "the method's own settings, the fields of its options dataclass (loraforge.adapters.registry "
                "names it: AdaLoraOptions, VeraOptions, ...); null = its defaults; methods without one take none",
        "type_from": _method_options})

    def __post_init__(self) -> None:
        options = _method_options({"method": self.method})
        if self.options is None and options is not None:
            self.options = options()

    def check(self) -> list[tuple[str, str]]:
        from loraforge.adapters.registry import METHODS

        problems = []
        if self.method not in METHODS:
            close = difflib.get_close_matches(self.method, list(METHODS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(("method", f"{self.method!r} is not an adapter method; choose one of "
                                       f"{', '.join(METHODS)}{hint}"))
        else:
            problems += METHODS[self.method].problems(self)
            if self.options is not None and hasattr(self.options, "check"):
                problems += [(f"options.{key}", message) for key, message in self.options.check()]
        if isinstance(self.vision, list) and not self.vision:
            problems.append(("vision", "an empty list adapts nothing; use false, true, names or a regex"))
        elif isinstance(self.vision, str):
            try:
                re.compile(self.vision)
            except re.error as e:
                problems.append(("vision", f"not a valid regex ({e}): {self.vision!r}"))
        if isinstance(self.target_modules, list):
            if not self.target_modules:
                problems.append(("target_modules", "must name at least one module"))
        elif self.target_modules != "all-linear":
            try:
                re.compile(self.target_modules)
            except re.error as e:
                problems.append(("target_modules", f"not a valid regex ({e}): {self.target_modules!r}"))
        return problems

    def rank_and_alpha(self, module_path: str) -> tuple[int, float]:
        """The rank and alpha for one module, after ``rank_pattern`` / ``alpha_pattern`` (a pattern matches
        the end of the module path, as in PEFT)."""
        return (_first_pattern_match(self.rank_pattern, module_path, self.r),
                _first_pattern_match(self.alpha_pattern, module_path, self.alpha))


def _first_pattern_match(patterns: dict, module_path: str, default):
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module_path):
            return value
    return default


@dataclass
class DataConfig:
    train_files: list[str] = setting([], "Training data: files or folders (json, jsonl, csv, parquet). Required "
                                         "for training. Relative paths are relative to the config file.")
    eval_files: list[str] = setting([], "Evaluation data, like train_files. Empty = carve val_size from train.")
    test_files: list[str] = setting([], "Held-out split scored by exact match before and after training.")
    format: DataFormat = setting("alpaca", "Record format: alpaca | sharegpt | openai (messages).")
    columns: dict[str, str] = setting({}, "Rename columns: {canonical field: column name in the files}.")
    val_size: int | float = setting(0.0, "Eval split carved from train when eval_files is empty: a float in [0, 1) "
                                         "is a fraction, an int a number of records.")
    cutoff_len: int = setting(1024, "Truncate each tokenized sample to this many tokens.", gt=0)
    train_on_prompt: bool = setting(False, "Also compute the loss on prompt tokens (default: assistant tokens only).")
    packing: bool = setting(False, "Pack short samples into cutoff_len rows (no attention across samples).")
    system_prompt: str | None = setting(None, "System prompt for samples that have none; null = none.")
    template: ChatTemplate = setting("auto", "auto (the tokenizer's own chat template, ChatML if it has none) | "
                                             "chatml.")
    test_max_new_tokens: int = setting(32, "Generation budget per test_files sample.", gt=0)
    on_overflow: OnOverflow = setting("drop", "Vision-language data: a sample whose image tokens reach past "
                                              "cutoff_len is dropped (counted, first file:line refs printed) | "
                                              "error (the run stops there). Images are never cut.")

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if isinstance(self.val_size, float) and not 0 <= self.val_size < 1:
            problems.append(("val_size", f"a fraction must be in [0, 1), got {self.val_size}; "
                                         "write an int for a number of records"))
        if isinstance(self.val_size, int) and self.val_size < 0:
            problems.append(("val_size", f"must be >= 0, got {self.val_size}"))
        if self.val_size and self.eval_files:
            problems.append(("val_size", "set val_size or eval_files, not both"))
        return problems


@dataclass
class TrainConfig:
    seed: int = setting(42, "Seed for init, data order and dropout.", ge=0)
    epochs: float = setting(1.0, "Passes over the training data (fractions allowed).", gt=0)
    max_steps: int | None = setting(None, "Optimizer steps; overrides epochs when set.", gt=0)
    batch_size: int = setting(4, "Samples per micro-batch.", gt=0)
    grad_accum: int = setting(1, "Micro-batches per optimizer step.", gt=0)
    lr: float = setting(2.0e-4, "Peak learning rate.", gt=0)
    weight_decay: float = setting(0.0, "AdamW weight decay.", ge=0)
    optim: Optimizer = setting("adamw", "adamw | paged_adamw | adamw_8bit.")
    scheduler: Scheduler = setting("cosine", "Learning-rate schedule after warmup: cosine | linear | constant.")
    warmup_steps: int = setting(0, "Linear warmup steps.", ge=0)
    warmup_ratio: float = setting(0.0, "Warmup as a fraction of total steps (use this or warmup_steps).", ge=0, lt=1)
    max_grad_norm: float | None = setting(1.0, "Clip the gradient norm to this; 0 or null = no clipping.", ge=0)
    precision: Precision = setting("fp32", "fp32, or bf16 autocast.")
    gradient_checkpointing: bool = setting(False, "Recompute activations in backward to save memory.")
    cpu_allocator: CpuAllocator = setting("fast", "CPU runs only: fast (glibc's default: freed activations stay in "
                                                  "the heap for reuse) | compact (every block of 128 KiB or more "
                                                  "goes back to the OS when freed, and the heap is trimmed after "
                                                  "each step: a lower peak RSS, slower steps; see BENCHMARKS.md).")
    logging_steps: int = setting(1, "Log metrics every N optimizer steps.", gt=0)
    eval_steps: int | None = setting(None, "Evaluate every N steps; null = only at the end (if there is eval data).",
                                     gt=0)
    save_steps: int | None = setting(None, "Checkpoint every N steps; null = only the final save.", gt=0)
    save_total_limit: int | None = setting(2, "Keep the newest N checkpoints; null = keep all.", gt=0)
    loraplus_lr_ratio: float | None = setting(None, "LoRA+: the B matrices learn at this times train.lr (e.g. 16); "
                                                    "null = one learning rate.", gt=0)
    resume_from_checkpoint: str | None = setting(None, "null | 'latest' (newest checkpoint in output.dir) | path "
                                                       "to a checkpoint folder.")
    distributed: Distributed = setting("none", "Under torchrun (or loraforge train --nproc N): ddp (every process "
                                               "holds the model) | fsdp (FSDP2: base, adapter and optimizer state "
                                               "sharded; a quantized base too) | none (one process). batch_size is "
                                               "then the micro-batch of all processes together, split among them.")
    distributed_timeout: float = setting(600.0, "Seconds a process waits for the others before it stops with an "
                                                "error (a process died or hangs).", gt=0)

    def check(self) -> list[tuple[str, str]]:
        if self.warmup_steps and self.warmup_ratio:
            return [("warmup_ratio", "set warmup_steps or warmup_ratio, not both")]
        return []


@dataclass
class OutputConfig:
    dir: str = setting("runs/default", "Run folder: adapter, checkpoints, logs, resolved config. Relative to the "
                                       "current directory.")
    overwrite_output_dir: bool = setting(False, "Allow replacing a folder that holds a different run.")
    tensorboard: bool = setting(True, "Write TensorBoard event files.")
    plot: bool = setting(True, "Write a loss-curve PNG at the end.")


@dataclass
class Config:
    """A validated run configuration. Build it with ``load_config`` or ``Config.from_dict``."""

    model: ModelConfig = section(ModelConfig, "The base model and how it is held.")
    adapter: AdapterConfig = section(AdapterConfig, "The adapter to train.")
    data: DataConfig = section(DataConfig, "Training, eval and test data.")
    train: TrainConfig = section(TrainConfig, "The training loop.")
    output: OutputConfig = section(OutputConfig, "Where the run writes.")

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>", *, base_dir: str | os.PathLike | None = None,
                  check_files: bool = True) -> Config:
        """Validate plain data (as ``yaml.safe_load`` returns it) into a Config, resolving paths.

        ``base_dir``: what relative data files are relative to (default: the current directory).
        ``check_files``: require a non-empty ``data.train_files`` and that every data file exists.
        Raises ``ConfigError`` listing every problem, each prefixed with ``source``.
        """
        config, problems = build(cls, data)
        problems += _cross_section_problems(config)
        _resolve_paths(config, base_dir or os.curdir)
        if check_files:
            problems += _missing_files(config)
        if problems:
            raise ConfigError(problems, source)
        return config

    def to_dict(self) -> dict[str, Any]:
        """Plain data (dicts, lists, scalars) that ``from_dict`` turns back into an equal Config."""
        return dataclasses.asdict(self)


def _cross_section_problems(config: Config) -> list[Problem]:
    """Rules that tie keys of different sections together."""
    from loraforge.adapters.registry import METHODS

    adapter, quant = config.adapter, config.model.quantization
    problems = []
    needs = METHODS[adapter.method].base_quantization if adapter.method in METHODS else ()
    if needs and (quant is None or quant.type not in needs):
        problems.append(Problem(("adapter", "method"), f"adapter.method: {adapter.method} trains on a quantized base "
                                                       f"of type {' or '.join(needs)}; set model.quantization.type "
                                                       "to one of them"))
    strategy = config.train.distributed
    if strategy != "none" and adapter.method in METHODS and METHODS[adapter.method].training_hook is not None:
        problems.append(Problem(("train", "distributed"), f"train.distributed: {strategy} can't train adapter.method "
                                                          f"{adapter.method}: its training hook (a rank allocator) "
                                                          "reads whole gradients on one process; use "
                                                          "train.distributed: none"))
    if strategy == "fsdp" and config.data.test_files:
        problems.append(Problem(("data", "test_files"), "data.test_files: generation for the exact-match test "
                                                        "needs the whole model on one process, which "
                                                        "train.distributed: fsdp shards; use ddp, or score the "
                                                        "adapter afterwards with loraforge eval"))
    if adapter.init.startswith("pissa") and quant is not None:
        problems.append(Problem(("adapter", "init"), "adapter.init: pissa moves the weight's principal part into the "
                                                     "adapter and leaves the base the residual, which a quantized "
                                                     "base can't hold without re-quantizing; use pissa on a dense "
                                                     "base (model.quantization: null), or init kaiming for QLoRA"))
    return problems


def _resolve_paths(config: Config, base_dir: str | os.PathLike) -> None:
    data = config.data
    for name in ("train_files", "eval_files", "test_files"):
        setattr(data, name, [_absolute(p, base_dir) for p in getattr(data, name)])
    config.output.dir = _absolute(config.output.dir, os.curdir)
    if config.train.resume_from_checkpoint not in (None, "latest"):
        config.train.resume_from_checkpoint = _absolute(config.train.resume_from_checkpoint, os.curdir)


def _absolute(path: str, base_dir: str | os.PathLike) -> str:
    return os.path.abspath(os.path.join(base_dir, os.path.expanduser(path)))


def _missing_files(config: Config) -> list[Problem]:
    problems = []
    if not config.data.train_files:
        problems.append(Problem(("data", "train_files"), "data.train_files: required for training; list the "
                                                        "training data files or folders"))
    for name in ("train_files", "eval_files", "test_files"):
        for i, path in enumerate(getattr(config.data, name)):
            if not os.path.exists(path):
                problems.append(Problem(("data", name, i), f"data.{name}: no such file or folder: {path}"))
    return problems
