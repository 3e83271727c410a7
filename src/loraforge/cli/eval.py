"""``loraforge eval``: score the base model and adapters side by side, and write the report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraforge.cli.main import CommandError


@dataclass
class EvalArgs:
    config: str | None
    overrides: list[str]
    model: str | None
    adapters: list[str]
    data: list[str]
    format: str | None
    columns: list[str]
    metrics: str | None
    max_new_tokens: int | None
    batch_size: int | None
    backend: str | None
    pool_gb: float | None
    ignore_case: bool
    ignore_punctuation: bool
    no_strip: bool
    regression: bool
    regression_data: str | None
    out: str | None
    examples: int | None
    native_gguf: bool
    device: str | None


def run_eval(args: EvalArgs, echo=print) -> Path:
    """Load the model as the config or ``--model`` says, evaluate, print the scores, write the report."""
    from loraforge.data import read_records
    from loraforge.eval import (
        EvalOptions,
        Normalization,
        evaluate,
        general_knowledge,
        read_eval_data,
        write_report,
    )
    from loraforge.eval.choices import to_questions
    from loraforge.eval.report import score_table
    from loraforge.models import resolve_device

    if args.overrides and args.config is None:
        raise CommandError(f"key=value overrides {args.overrides} apply to a run CONFIG; give one, or drop them")
    if (args.config is None) == (args.model is None):
        raise CommandError("give either a run CONFIG (its model, quantization, data and adapter) or --model, not both")
    adapters = _adapters(args.adapters)
    data_settings: dict = {"format": args.format, "columns": _columns(args.columns), "system_prompt": None}
    options: dict = {}
    config = None
    if args.config is not None:
        from loraforge.config import load_config

        config = load_config(args.config, args.overrides, check_files=False)
        d = config.data
        data_files = args.data or _as_list(d.test_files) or _as_list(d.eval_files)
        if not data_files:
            raise CommandError(f"{args.config}: data.test_files and data.eval_files are empty; give --data FILE")
        if not args.data:
            data_settings = {"format": d.format, "columns": d.columns, "system_prompt": d.system_prompt}
        options.update(template=d.template, cutoff_len=d.cutoff_len, max_new_tokens=d.test_max_new_tokens)
        run_adapter = Path(config.output.dir) / "adapter"
        if not adapters and run_adapter.is_dir():
            adapters = {Path(config.output.dir).name: str(run_adapter)}
        source = config.model.source
        out = Path(args.out) if args.out else Path(config.output.dir) / "eval"
    else:
        if not args.data:
            raise CommandError("--data FILE is required with --model")
        data_files, source, out = args.data, args.model, Path(args.out or "eval-report")
    options.update({name: getattr(args, name) for name in ("max_new_tokens", "batch_size", "backend", "examples")
                    if getattr(args, name) is not None})
    if args.pool_gb is not None:
        options["pool_bytes"] = int(args.pool_gb * 2**30)
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip()) if args.metrics else None
    normalize = Normalization(strip=not args.no_strip, case=args.ignore_case, punctuation=args.ignore_punctuation)
    eval_options = EvalOptions(metrics=metrics, normalize=normalize, **options)
    data = read_eval_data(data_files, **data_settings)  # bad options and data fail before the model loads
    regression = None
    if args.regression:
        regression = to_questions(read_records(args.regression_data)) if args.regression_data else general_knowledge()
    model, tokenizer = _load(config, args, resolve_device(args.device))
    echo(f"evaluating {source} and {len(adapters)} adapter(s) on {len(data)} items"
         + (f" (+{len(regression)} regression questions)" if regression else ""))
    result = evaluate(model, tokenizer, data, adapters, eval_options, regression=regression, model_source=source)
    about = {"model": source, "adapters": adapters or "none", "data": ", ".join(map(str, data_files)),
             "regression set": (args.regression_data or "bundled general knowledge") if regression else "off"}
    write_report(result, out, about)
    echo(score_table(result))
    echo(f"report written to {out}/ (report.md, report.json, scores.png)")
    return out


def _load(config, args: EvalArgs, device):
    """The base model and tokenizer: as the run's ``model`` section says (quantization included), or ``--model``."""
    import torch

    if config is not None:
        from loraforge.models.prepare import load_base

        if config.model.threads:
            torch.set_num_threads(config.model.threads)
        return load_base(config.model, device)
    from loraforge.models import load_model

    model, tokenizer = load_model(args.model, native_gguf=args.native_gguf)
    return model.to(device), tokenizer


def _adapters(items: list[str]) -> dict[str, str]:
    """``--adapter [NAME=]PATH`` values: the name defaults to the folder's name (its run's, for ``adapter/``)."""
    adapters: dict[str, str] = {}
    for item in items:
        name, sep, path = item.rpartition("=")
        if not sep:
            folder = Path(item)
            name, path = (folder.resolve().parent.name if folder.name == "adapter" else folder.name), item
        if not name or not path:
            raise CommandError(f"--adapter {item!r}: expected PATH or NAME=PATH, e.g. --adapter runs/quickstart/adapter")
        if name in adapters:
            raise CommandError(f"--adapter: the name {name!r} is given twice; name them with NAME=PATH")
        adapters[name] = path
    return adapters


def _columns(items: list[str]) -> dict[str, str]:
    columns = {}
    for item in items:
        field, sep, column = item.partition("=")
        if not sep or not field or not column:
            raise CommandError(f"--columns {item!r}: expected FIELD=COLUMN, e.g. --columns answer=label")
        columns[field] = column
    return columns


def _as_list(files) -> list[str]:
    if not files:
        return []
    return [str(files)] if isinstance(files, (str, Path)) else [str(f) for f in files]


def add_eval_parser(commands) -> None:
    """Register ``loraforge eval`` on the sub-command parsers ``commands``. Unset options take
    ``loraforge.eval.EvalOptions``' defaults (the parser imports no torch)."""
    ev = commands.add_parser("eval", help="score the base model and adapters side by side: perplexity, exact/contains "
                                          "match, multiple choice, BLEU/ROUGE, and a regression check")
    ev.add_argument("config", nargs="?", help="a run's YAML config: its model (quantization included), test data and "
                                              "trained adapter")
    ev.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, as for train")
    ev.add_argument("--model", help="a model source instead of a config: 'default', an HF folder, a .gguf file")
    ev.add_argument("--native-gguf", action="store_true", help="with a .gguf --model: keep its quantized blocks")
    ev.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH", dest="adapters",
                    help="a PEFT adapter folder to score against the base (repeatable)")
    ev.add_argument("--data", action="append", default=[], metavar="FILE",
                    help="conversations (alpaca/sharegpt/openai) or multiple-choice questions (question, choices, "
                         "answer, subject); json, jsonl, csv or parquet (repeatable)")
    ev.add_argument("--format", choices=["alpaca", "sharegpt", "openai"],
                    help="conversation format (default: guessed from the records' fields)")
    ev.add_argument("--columns", action="append", default=[], metavar="FIELD=COLUMN",
                    help="the file's column holding FIELD, e.g. --columns answer=label (repeatable)")
    ev.add_argument("--metrics", help="comma-separated: perplexity, exact_match, contains, bleu, rouge, "
                                      "multiple_choice (default: all that fit the data)")
    ev.add_argument("--max-new-tokens", type=int, help="greedy answer length (default: the config's "
                                                       "data.test_max_new_tokens, else EvalOptions')")
    ev.add_argument("--batch-size", type=int, help="log-likelihood rows per batch, sequences decoded together")
    ev.add_argument("--backend", help="engine (default): every model's answers in one serving-engine batch; "
                                      "transformers: generate, one model after another")
    ev.add_argument("--pool-gb", type=float, help="the engine's memory budget for KV cache and adapter weights, GiB")
    ev.add_argument("--ignore-case", action="store_true", help="exact/contains match: ignore letter case")
    ev.add_argument("--ignore-punctuation", action="store_true", help="exact/contains match: ignore punctuation")
    ev.add_argument("--no-strip", action="store_true", help="exact/contains match: keep whitespace as is")
    ev.add_argument("--no-regression", dest="regression", action="store_false",
                    help="skip the regression check on a general multiple-choice set")
    ev.add_argument("--regression-data", metavar="FILE",
                    help="multiple-choice questions for the regression check (default: the bundled general set)")
    ev.add_argument("--examples", type=int, help="most items in the report where the answers differ")
    ev.add_argument("--out", help="report folder (default: <output.dir>/eval with a config, else eval-report)")
    ev.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if visible, else cpu)")
    ev.set_defaults(handler=_handle)


def _handle(args) -> int:
    run_eval(EvalArgs(**{name: getattr(args, name) for name in EvalArgs.__annotations__}))
    return 0
