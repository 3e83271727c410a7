"""``loraforge``: one sub-command per job. Each parses its arguments and calls the library."""

from __future__ import annotations

import argparse
import os
import sys

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, ImportError, RuntimeError)
"""Errors whose message is meant for the user: printed as one ``error:`` block, without a traceback.
The library raises subclasses of these (ConfigError, DataError, AdapterError, ModelSourceError, ...)
with messages that name the place and say what would be right."""


class CommandError(ValueError):
    """A bad command-line argument; the message names the flag and what it should be."""


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
            if getattr(err, "abandon_process", False):  # e.g. a lost rank: nothing can be shut down cleanly
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(2)
            return 2
        raise


def _is_library_error(err: BaseException) -> bool:
    module = type(err).__module__ or ""
    return module.startswith("loraforge") or isinstance(err, (FileNotFoundError, ImportError))


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="where the model runs: cpu, cuda or cuda:N (default: cuda if visible, else cpu)")


def _add_quantization(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantization", default="auto", metavar="Q",
                        help="how the base is held (loraforge.serve.base_model): auto (default) keeps a GGUF's "
                             "Q4_0/Q4_1/Q8_0 blocks (the default model's too) where the device has bf16 units, "
                             "else loads dense, and loads other models dense; gguf; "
                             "none = dense fp32; nf4, fp4, int4, int8 quantize on load")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraforge", description="Fine-tune, export and serve LoRA-family adapters.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune from a YAML config")
    train.add_argument("config", help="path to the YAML config (see examples/)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. train.lr=1e-4")
    train.add_argument("--nproc", type=int, metavar="N", help="train on N processes of this machine under torchrun "
                                                              "(one per GPU; needs train.distributed: ddp or fsdp)")
    train.set_defaults(handler=_train)

    convert = commands.add_parser("convert", help="write the loraforge config equivalent to a LLaMA-Factory config")
    convert.add_argument("--from", dest="source_format", required=True, choices=["llamafactory"],
                         help="the tool the config is for")
    convert.add_argument("config", help="path to its YAML config (e.g. LLaMA-Factory's examples/train_lora/*.yaml)")
    convert.add_argument("--out", required=True, help="where to write the loraforge YAML")
    convert.set_defaults(handler=_convert)

    info = commands.add_parser("info", help="model size, trainable parameters and quantized storage for a config")
    info.add_argument("config", help="path to the YAML config")
    info.add_argument("overrides", nargs="*", metavar="key=value")
    _add_device(info)
    info.set_defaults(handler=_info)

    estimate = commands.add_parser("estimate", help="will a config's training run fit in memory? (before loading)")
    estimate.add_argument("config", help="path to the YAML config")
    estimate.add_argument("overrides", nargs="*", metavar="key=value")
    _add_device(estimate)
    estimate.set_defaults(handler=_estimate)

    webui = commands.add_parser("webui", help="the browser UI: train, watch, compare, chat and export")
    webui.add_argument("--host", default="127.0.0.1")
    webui.add_argument("--port", type=int, default=7860)
    webui.add_argument("--runs-dir", default="runs", help="folder the UI starts runs in and lists runs from")
    webui.add_argument("--auth", metavar="USER:PASS", help="require this login")
    webui.add_argument("--api-key", help="require this key as the password of user 'api' "
                                         "(default: $LORAFORGE_API_KEY, if set)")
    webui.set_defaults(handler=_webui)

    export = commands.add_parser("export", help="merge an adapter into HF safetensors or a GGUF file, or write it as "
                                                "a GGUF LoRA (llama.cpp) or an Ollama folder")
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a training run folder: its base model is rebuilt as the run's config says "
                                      "(quantization included) and its adapter/ merged")
    source.add_argument("--model", help="a model source, for --adapter (dense base)")
    export.add_argument("--adapter", help="adapter directory (PEFT format) to merge into --model")
    export.add_argument("--out", required=True, help="output folder (hf, ollama) or .gguf file (gguf, gguf-lora)")
    export.add_argument("--format", choices=["hf", "gguf", "gguf-lora", "ollama"], default="hf",
                        help="gguf-lora: the adapter alone, for llama.cpp --lora; ollama: Modelfile + GGUF LoRA")
    export.add_argument("--gguf-type", default="auto", choices=["auto", "f32", "f16", "q8_0", "q4_1"],
                        help="gguf: auto keeps quantized blocks losslessly (QA-LoRA), F16 elsewhere; "
                             "gguf-lora/ollama: f32, f16 (auto) or q8_0")
    export.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="for hf")
    _add_device(export)
    export.set_defaults(handler=_export)

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server: one base model, many adapters")
    serve.add_argument("--model", default="default", help="model source (default: the embedded SmolLM2-135M)")
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                       help="serve the adapter at PATH as model NAME (repeatable)")
    serve.add_argument("--adapter-dir", help="serve every adapter folder inside DIR; also the only folder "
                                             "/v1/load_lora_adapter may load from")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require this bearer token (default: $LORAFORGE_API_KEY, if set)")
    serve.add_argument("--pool-gb", type=float, default=1.0,
                       help="one memory budget for the KV cache and resident adapter weights, in GiB")
    serve.add_argument("--max-rank", type=int, default=64, help="largest adapter rank accepted")
    serve.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together per step")
    serve.add_argument("--threads", type=int, help="torch CPU threads")
    serve.add_argument("--image-root", help="vision-language models: the only folder chat requests may name local "
                                            "image files in (default: data: URLs only)")
    serve.add_argument("--public-metrics", action="store_true",
                       help="serve GET /metrics without the API key (by default the key guards it too)")
    serve.add_argument("--replicas", type=int, metavar="N", help="run N engine replicas under Ray Serve, routing each adapter's "
                                                    "requests to a replica that holds it (needs ray[serve])")
    serve.add_argument("--adapters-per-replica", type=int, metavar="K",
                       help="with --replicas: adapters one replica keeps loaded, its LRU's size (default 8)")
    _add_quantization(serve)
    _add_device(serve)
    serve.set_defaults(handler=_serve)

    chat = commands.add_parser("chat", help="chat with a model (and an adapter)")
    chat.add_argument("--model", default="default", help="model source (default: the embedded SmolLM2-135M)")
    chat.add_argument("--adapter", help="adapter directory (PEFT format)")
    chat.add_argument("--prompt", help="answer this one prompt and exit (otherwise: interactive)")
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--image", action="append", default=[], metavar="PATH",
                      help="an image for the first prompt (repeatable; vision-language models)")
    _add_quantization(chat)
    _add_device(chat)
    chat.set_defaults(handler=_chat)

    from loraforge.cli.cache import add_cache_parser
    from loraforge.cli.eval import add_eval_parser

    add_eval_parser(commands)
    add_cache_parser(commands)
    return parser


def _train(args) -> int:
    from pathlib import Path

    from loraforge.config import load_config, save_config
    from loraforge.config.llamafactory import convert, looks_like_llamafactory
    from loraforge.train import run_training

    if args.nproc is not None:
        if args.nproc < 1:
            raise CommandError(f"--nproc {args.nproc}: give a number of processes, 1 or more")
        if args.nproc > 1:
            from loraforge.cli.launch import train_on_processes

            return train_on_processes(args.nproc, args.config, args.overrides)
    if not looks_like_llamafactory(args.config):
        config = load_config(args.config, args.overrides)
        return 130 if run_training(config).interrupted else 0
    print(f"{args.config}: a LLaMA-Factory config; training its loraforge equivalent")
    conversion = convert(args.config, args.overrides)
    for note in conversion.notes:
        print(f"note: {note}")
    result = run_training(conversion.config)
    written = Path(conversion.config.output.dir) / "loraforge.yaml"
    save_config(conversion.config, written)
    print(f"the equivalent loraforge config is in {written}")
    return 130 if result.interrupted else 0


def _convert(args) -> int:
    from loraforge.config import save_config
    from loraforge.config.llamafactory import convert

    conversion = convert(args.config)
    for note in conversion.notes:
        print(f"note: {note}")
    save_config(conversion.config, args.out)
    print(f"wrote {args.out}")
    return 0


def _info(args) -> int:
    from loraforge.config import load_config
    from loraforge.models import resolve_device
    from loraforge.quant.summary import quant_summary
    from loraforge.train.run import model_summary_line, prepare_model

    config = load_config(args.config, args.overrides, check_files=False)
    model, _, _ = prepare_model(config, resolve_device(args.device))
    print(model_summary_line(config, model))
    for key, value in quant_summary(model).items():
        print(f"  {key}: {value}")
    return 0


def _estimate(args) -> int:
    from loraforge.cli.estimate import estimate

    report, fits = estimate(args.config, args.overrides, args.device)
    print(report)
    return 0 if fits else 1


def _webui(args) -> int:
    from loraforge.cli.webui import webui

    webui(args.host, args.port, args.runs_dir, args.auth, args.api_key)
    return 0


def _export(args) -> int:
    from loraforge.cli.export import export

    print(export(args.run, args.model, args.adapter, args.out, args.format, args.gguf_type, args.dtype,
                 args.device))
    return 0


def _serve(args) -> int:
    from loraforge.serve.api import run_server

    adapters = {}
    for item in args.adapter:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise CommandError(f"--adapter {item!r}: expected NAME=PATH, e.g. --adapter support=runs/quickstart/adapter")
        if name in adapters:
            raise CommandError(f"--adapter: the name {name!r} is given twice")
        adapters[name] = path
    options = {}
    if args.replicas is not None:
        from loraforge.serve.replicas import run_replicas as run_server

        options = {"replicas": args.replicas}
        if args.adapters_per_replica is not None:
            options["adapters_per_replica"] = args.adapters_per_replica
    run_server(args.model, adapters, args.adapter_dir, args.host, args.port, args.api_key,
               int(args.pool_gb * 2**30), device=args.device, metrics_public=args.public_metrics,
               max_rank=args.max_rank, max_num_seqs=args.max_num_seqs, threads=args.threads,
               image_root=args.image_root, quantization=args.quantization, **options)
    return 0


def _chat(args) -> int:
    from loraforge.cli.chat import chat

    chat(args.model, args.adapter, args.prompt, args.system, args.max_new_tokens, args.device, args.image,
         args.quantization)
    return 0


if __name__ == "__main__":
    sys.exit(main())
