"""``loraforge estimate CONFIG [key=value ...]``: will this run fit in memory, before loading anything."""

from __future__ import annotations


def estimate(config_path: str, overrides: list[str], device: str | None) -> tuple[str, bool]:
    """The estimate's report for the config, and whether the run fits."""
    from loraforge.config import load_config
    from loraforge.models import resolve_device
    from loraforge.train.memory import estimate_memory

    config = load_config(config_path, overrides, check_files=False)
    result = estimate_memory(config, resolve_device(device))
    return result.report(), result.fits
