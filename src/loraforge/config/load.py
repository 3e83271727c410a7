"""Read a YAML config file with line numbers, apply ``section.key=value`` overrides, and save configs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from loraforge.utils.atomic import atomic_file

from .schema import Config
from .validate import ConfigError, KeyPath, Problem, dotted


def load_config(path: str | os.PathLike, overrides: Sequence[str] = (), *, check_files: bool = True) -> Config:
    """Load, override and validate the config at ``path``.

    ``overrides`` are ``section.key=value`` strings whose value is read as YAML (``train.lr=1e-4``,
    ``data.train_files=[a.json,b.json]``, ``model.quantization.bits=4``, ``model.quantization=null``).
    Relative data files resolve against the config file's folder (see ``schema``). ``check_files`` is
    passed to ``Config.from_dict``.

    Raises ``ConfigError`` with every problem, each located as ``file:line`` or ``override '...'``.
    """
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([Problem((), f"config file not found: {path.absolute()}")]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([Problem((), f"cannot read config file {path}: {e}")]) from None

    data, locations, problems = parse_yaml(text, source)
    if isinstance(data, dict):
        problems += apply_overrides(data, overrides, locations)
    try:
        config = Config.from_dict(data, source, base_dir=path.parent, check_files=check_files)
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError(problems, source, locations)
    return config


def save_config(config: Config, path: str | os.PathLike) -> None:
    """Write ``config`` as YAML, atomically (``utils.atomic.atomic_file``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)
    atomic_file(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def parse_yaml(text: str, source: str) -> tuple[Any, dict[KeyPath, str], list[Problem]]:
    """``yaml.safe_load`` of ``text``, plus ``file:line`` for every key and list item, plus duplicate keys."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else {}
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError([Problem((), f"YAML syntax error: {e.problem or e.context}", where)]) from None
    except yaml.YAMLError as e:
        raise ConfigError([Problem((), f"YAML error: {e}", source)]) from None
    finally:
        loader.dispose()
    locations: dict[KeyPath, str] = {}
    problems: list[Problem] = []
    if node is not None:
        _record_lines(node, (), source, locations, problems)
    return data, locations, problems


def _record_lines(node: yaml.Node, path: KeyPath, source: str, locations: dict, problems: list[Problem]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key_path = path + (key_node.value,)
            where = f"{source}:{key_node.start_mark.line + 1}"
            if key_path in locations:
                problems.append(Problem(key_path, f"{dotted(key_path)}: duplicate key (first at {locations[key_path]})",
                                        where))
            locations[key_path] = where
            _record_lines(value_node, key_path, source, locations, problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            locations[path + (i,)] = f"{source}:{item.start_mark.line + 1}"
            _record_lines(item, path + (i,), source, locations, problems)


def apply_overrides(data: dict, overrides: Sequence[str], locations: dict[KeyPath, str]) -> list[Problem]:
    """Set each ``section.key=value`` in ``data`` and point its location (and its subkeys') at the override."""
    problems = []
    for override in overrides:
        where = f"override {override!r}"
        key, sep, raw = override.partition("=")
        key_path = tuple(part.strip() for part in key.split("."))
        if not sep or not all(key_path):
            problems.append(Problem((), "expected section.key=value, e.g. train.lr=1e-4", where))
            continue
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            problems.append(Problem(key_path, f"cannot read the value as YAML: {getattr(e, 'problem', e)}", where))
            continue
        parent = data
        for i, part in enumerate(key_path[:-1]):
            if parent.get(part) is None:
                parent[part] = {}
                locations[key_path[:i + 1]] = where
            parent = parent[part]
            if not isinstance(parent, dict):
                problems.append(Problem(key_path, f"'{dotted(key_path[:i + 1])}' is not a section", where))
                break
        else:
            parent[key_path[-1]] = value
            for stale in [p for p in locations if p[:len(key_path)] == key_path]:
                del locations[stale]
            locations[key_path] = where
    return problems
