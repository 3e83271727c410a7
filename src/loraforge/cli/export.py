"""``loraforge export``: rebuild a base model and its adapter, then write merged HF safetensors or GGUF, a GGUF
LoRA adapter for llama.cpp, or an Ollama folder (Modelfile + GGUF LoRA)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from loraforge.adapters import load_adapter, read_adapter_dir
from loraforge.cli.main import CommandError
from loraforge.config import load_config
from loraforge.data.template import resolve_template
from loraforge.export import export_model
from loraforge.export.gguf_lora import write_gguf_lora
from loraforge.export.gguf_writer import write_gguf
from loraforge.export.ollama import (
    ADAPTER_FILE,
    BASE_FILE,
    MODELFILE,
    chat_parts,
    modelfile,
    reference_path,
)
from loraforge.models import load_model, resolve_device
from loraforge.models.prepare import load_base
from loraforge.models.sources import default_gguf_path
from loraforge.train.run import CONFIG_FILE
from loraforge.utils.atomic import atomic_dir

ADAPTER_FORMATS = ("gguf-lora", "ollama")
"""Formats that write the adapter beside the base instead of merging it."""


def export(run: str | None, model_source: str | None, adapter: str | None, out: str, format: str, gguf_type: str,
           dtype: str, device: str | None = None) -> str:
    """Builds on ``device`` (default: CUDA when visible) and returns the export report's summary."""
    target = resolve_device(device)
    base = _base(run, model_source, adapter, target)
    model, tokenizer, adapter_dir, source = base.model, base.tokenizer, base.adapter_dir, base.source
    if format in ADAPTER_FORMATS:
        lora_type = "f16" if gguf_type == "auto" else gguf_type
        config, tensors = read_adapter_dir(adapter_dir)
        if format == "gguf-lora":
            return write_gguf_lora(model, config, tensors, adapter_dir, out, lora_type).summary()
        template = resolve_template(tokenizer, base.template)
        return _ollama(model, tokenizer, config, tensors, adapter_dir, source, template, Path(out), lora_type)
    # The saved adapter describes itself (AdaLoRA's pruned ranks, PiSSA saved for the original weight).
    load_adapter(model, adapter_dir, base.adapter_name, base_model_name_or_path=None if run else source)
    metadata_from = default_gguf_path() if source == "default" and format == "gguf" else None
    report = export_model(model, tokenizer, out, format=format, gguf_type=gguf_type, dtype=dtype,
                          metadata_from=metadata_from)
    return report.summary()


class _Base(NamedTuple):
    model: nn.Module
    tokenizer: Any
    adapter_dir: Path
    source: str
    adapter_name: str
    template: str
    """The ``data.template`` setting the adapter was trained with."""


def _base(run: str | None, model_source: str | None, adapter: str | None, target) -> _Base:
    """The base model (without the adapter) and what the export needs to know, for ``--run`` or ``--model``."""
    if run is not None:
        run_dir = Path(run)
        if not (run_dir / CONFIG_FILE).is_file():
            raise CommandError(f"--run {run}: not a training run folder ({CONFIG_FILE} is missing)")
        config = load_config(run_dir / CONFIG_FILE, check_files=False)
        model, tokenizer = load_base(config.model, target)
        return _Base(model, tokenizer, Path(adapter) if adapter else run_dir / "adapter", config.model.source,
                     config.adapter.name, config.data.template)
    if adapter is None:
        raise CommandError("--model needs --adapter (or use --run with a training run folder)")
    model, tokenizer = load_model(model_source)
    return _Base(model.to(target), tokenizer, Path(adapter), model_source, "default", "auto")


def _ollama(model, tokenizer, config, tensors, adapter_dir: Path, source: str, template: str, out: Path,
            lora_type: str) -> str:
    """Write ``out/`` with the Modelfile, the GGUF LoRA and, when the base is no GGUF file yet, the base."""
    parts = chat_parts(tokenizer, template)
    base_file = _base_gguf_file(source)
    with atomic_dir(out) as staging:
        report = write_gguf_lora(model, config, tensors, adapter_dir, staging / ADAPTER_FILE, lora_type)
        if base_file is None:
            write_gguf(model, tokenizer, staging / BASE_FILE)
        base = reference_path(base_file, out) if base_file else f"./{BASE_FILE}"
        (staging / MODELFILE).write_text(modelfile(base, f"./{ADAPTER_FILE}", parts, tokenizer.eos_token))
        lines = report.summary().replace(str(staging), str(out)).splitlines()
    lines.append(f"wrote {out / MODELFILE} (FROM {base}); create the model with: "
                 f"ollama create {out.name} -f {out / MODELFILE}")
    return "\n".join(lines)


def _base_gguf_file(source: str) -> Path | None:
    """The GGUF file the base model came from, if it came from one."""
    if source == "default":
        return default_gguf_path()
    path = Path(source).expanduser()
    return path.resolve() if path.suffix == ".gguf" and path.is_file() else None
