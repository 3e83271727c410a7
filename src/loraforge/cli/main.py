"""``loraforge``: one sub-command per job. Each parses its arguments and calls the library."""

from __future__ import annotations

import argparse
import sys

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, ImportError, RuntimeError)
"""Errors whose message is meant for the user: printed as one ``error:`` block, without a traceback.
The library raises subclasses of these (ConfigError, DataError, AdapterError, ModelSourceError, ...)
with messages that name the place and say what would be right."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if _is_library_error(err):
            print(f"error: {err}", file=sys.stderr)
            return 2
        raise


def _is_library_error(err: BaseException) -> bool:
    module = type(err).__module__ or ""
    return module.startswith("loraforge") or isinstance(err, (FileNotFoundError, ImportError))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraforge", description="Fine-tune, export and serve LoRA-family adapters.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune from a YAML config")
    train.add_argument("config", help="path to the YAML config (see examples/)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. train.lr=1e-4")
    train.set_defaults(handler=_train)

    info = commands.add_parser("info", help="model size, trainable parameters and quantized storage for a config")
    info.add_argument("config", help="path to the YAML config")
    info.add_argument("overrides", nargs="*", metavar="key=value")
    info.set_defaults(handler=_info)

    export = commands.add_parser("export", help="merge an adapter and write HF safetensors or a GGUF file")
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a training run folder: its base model is rebuilt as the run's config says "
                                      "(quantization included) and its adapter/ merged")
    source.add_argument("--model", help="a model source, for --adapter (dense base)")
    export.add_argument("--adapter", help="adapter directory (PEFT format) to merge into --model")
    export.add_argument("--out", required=True, help="output folder (hf) or .gguf file (gguf)")
    export.add_argument("--format", choices=["hf", "gguf"], default="hf")
    export.add_argument("--gguf-type", default="auto", choices=["auto", "f16", "q8_0", "q4_1"],
                        help="auto: keep quantized blocks losslessly (QA-LoRA), F16 elsewhere")
    export.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="for hf")
    export.set_defaults(handler=_export)

    chat = commands.add_parser("chat", help="chat with a model (and an adapter)")
    chat.add_argument("--model", default="default", help="model source (default: the embedded SmolLM2-135M)")
    chat.add_argument("--adapter", help="adapter directory (PEFT format)")
    chat.add_argument("--prompt", help="answer this one prompt and exit (otherwise: interactive)")
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.set_defaults(handler=_chat)
    return parser


def _train(args) -> int:
    from loraforge.config import load_config
    from loraforge.train import run_training

    config = load_config(args.config, args.overrides)
    result = run_training(config)
    return 130 if result.interrupted else 0


def _info(args) -> int:
    import torch

    from loraforge.config import load_config
    from loraforge.quant.summary import quant_summary
    from loraforge.train.run import model_summary_line, prepare_model

    config = load_config(args.config, args.overrides, check_files=False)
    model, _, _ = prepare_model(config, torch.device("cpu"))
    print(model_summary_line(config, model))
    for key, value in quant_summary(model).items():
        print(f"  {key}: {value}")
    return 0


def _export(args) -> int:
    from loraforge.cli.export import export

    print(export(args.run, args.model, args.adapter, args.out, args.format, args.gguf_type, args.dtype))
    return 0


def _chat(args) -> int:
    from loraforge.cli.chat import chat

    chat(args.model, args.adapter, args.prompt, args.system, args.max_new_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
