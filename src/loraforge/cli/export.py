"""``loraforge export``: rebuild a base model, load an adapter, merge, and write HF safetensors or GGUF."""

from __future__ import annotations

from pathlib import Path

from loraforge.adapters import load_adapter
from loraforge.cli.main import CommandError
from loraforge.config import load_config
from loraforge.export import export_model
from loraforge.models import load_model, resolve_device
from loraforge.models.prepare import load_base
from loraforge.models.sources import default_gguf_path
from loraforge.train.run import CONFIG_FILE


def export(run: str | None, model_source: str | None, adapter: str | None, out: str, format: str, gguf_type: str,
           dtype: str, device: str | None = None) -> str:
    """Merges on ``device`` (default: CUDA when visible) and returns the export report's summary."""
    target = resolve_device(device)
    if run is not None:
        run_dir = Path(run)
        if not (run_dir / CONFIG_FILE).is_file():
            raise CommandError(f"--run {run}: not a training run folder ({CONFIG_FILE} is missing)")
        config = load_config(run_dir / CONFIG_FILE, check_files=False)
        model, tokenizer = load_base(config.model, target)
        # The saved adapter describes itself (AdaLoRA's pruned ranks, PiSSA saved for the original weight).
        load_adapter(model, Path(adapter) if adapter else run_dir / "adapter", config.adapter.name)
        source = config.model.source
    else:
        if adapter is None:
            raise CommandError("--model needs --adapter (or use --run with a training run folder)")
        model, tokenizer = load_model(model_source)
        load_adapter(model, adapter, base_model_name_or_path=model_source)
        model.to(target)
        source = model_source
    metadata_from = default_gguf_path() if source == "default" and format == "gguf" else None
    report = export_model(model, tokenizer, out, format=format, gguf_type=gguf_type, dtype=dtype,
                          metadata_from=metadata_from)
    return report.summary()
