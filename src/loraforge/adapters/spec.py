"""What to inject: ``AdapterSpec`` (the config's adapter section, one type for both) and the error type."""

from __future__ import annotations

import dataclasses

from loraforge.config.schema import AdapterConfig
from loraforge.config.validate import build

AdapterSpec = AdapterConfig
"""The adapter method, its hyper-parameters and where it goes; see ``config.schema.AdapterConfig``."""


class AdapterError(ValueError):
    """Bad adapter settings or an adapter that doesn't fit the model; the message says what would be right."""


def check_spec(spec: AdapterSpec) -> None:
    """Validate a spec built in code exactly as a config file's adapter section is validated.

    Raises:
        AdapterError: every problem, one per line, each naming its ``adapter.<key>``.
    """
    data = dataclasses.asdict(spec)
    if data["options"] is None:
        data.pop("options")
    _, problems = build(AdapterConfig, data, ("adapter",))
    if problems:
        raise AdapterError("\n".join(problem.text for problem in problems))
