"""Turn plain data (as parsed from YAML) into a tree of dataclasses, checking each value by its annotation.

Supported annotations: ``bool``, ``int``, ``float``, ``str``, ``Literal[...]``, unions such as
``X | None``, ``list[X]``, ``dict[str, X]`` and nested dataclasses. The rules, so that configs forgive
the usual YAML slips and nothing else:

- an int is accepted where a float is expected; a bool is never accepted as a number;
- a string that spells a number (``1e-4``, which YAML 1.1 reads as a string) is accepted as a float;
- a single item is accepted where a list is expected, and stands for a one-item list;
- an empty section (``adapter:`` with nothing under it) means "all defaults".

Field metadata may bound numbers with ``gt``, ``ge``, ``lt`` and ``le``; a bound applies to the number,
or to each number of a list or mapping. ``metadata["type_from"]`` makes a field's type depend on the
fields before it: a function of their values (a dict) that returns a dataclass, or None when the field
must be left unset (``adapter.options`` takes the options dataclass of ``adapter.method``). A dataclass may define ``check() -> list[tuple[str, str]]`` for
rules that tie several of its fields together; it returns ``(field name, message)`` pairs.

Every problem is collected; nothing raises until the caller decides to (see ``ConfigError``).
"""

from __future__ import annotations

import dataclasses
import difflib
import operator
import types
from collections.abc import Iterator, Mapping
from typing import Any, Literal, NamedTuple, Union, get_args, get_origin, get_type_hints

KeyPath = tuple[str | int, ...]
"""A key path into the config, e.g. ``("train", "lr")`` or ``("data", "train_files", 1)``."""

_BOUNDS = {"gt": (operator.gt, ">"), "ge": (operator.ge, ">="), "lt": (operator.lt, "<"), "le": (operator.le, "<=")}


class Problem(NamedTuple):
    """One thing wrong with a config. ``text`` names the key; ``where`` overrides the looked-up location."""

    path: KeyPath
    text: str
    where: str = ""


class ConfigError(ValueError):
    """An invalid config. The message has one line per problem, each starting with its location.

    ``locations`` maps key paths to ``file:line`` (or ``override '...'``); a problem is placed at its
    own path, else at the nearest enclosing key that has a location, else at ``source``.
    """

    def __init__(self, problems: list[Problem], source: str = "", locations: Mapping[KeyPath, str] | None = None):
        self.problems = list(problems)
        self.source = source
        self.locations = dict(locations or {})
        located = [(p.where or _locate(p.path, self.locations) or source, p.text) for p in self.problems]
        located.sort(key=lambda item: _line_number(item[0], source))
        lines = [f"{where}: {text}" if where else text for where, text in located]
        if len(lines) > 1:
            lines.insert(0, f"{len(lines)} problems in {source or 'config'}:")
        super().__init__("\n".join(lines))


def _locate(path: KeyPath, locations: Mapping[KeyPath, str]) -> str:
    for end in range(len(path), -1, -1):
        if path[:end] in locations:
            return locations[path[:end]]
    return ""


def _line_number(where: str, source: str) -> float:
    """Sort key: problems in the file by line, then the rest (overrides, whole-file) in order found."""
    line = where.removeprefix(f"{source}:")
    return int(line) if line.isdigit() else float("inf")


def dotted(path: KeyPath) -> str:
    """``("data", "train_files", 1)`` -> ``"data.train_files[1]"``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def build(cls: type, data: Any, path: KeyPath = ()) -> tuple[Any, list[Problem]]:
    """Build dataclass ``cls`` from ``data``, found at key ``path`` of a config; returns the instance and
    every problem found.

    Where a value is wrong, the field keeps its default, so the instance is always complete.
    """
    problems: list[Problem] = []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        sections = ", ".join(f.name for f in dataclasses.fields(cls))
        problems.append(Problem(path, f"expected a mapping of sections ({sections}), got {_show(data)}"))
        return cls(), problems
    return _build(cls, data, path, _Context(cls, problems)), problems


class _Context(NamedTuple):
    root: type
    problems: list[Problem]


class _Mismatch(Exception):
    def __init__(self, path: KeyPath, tp: Any, value: Any):
        super().__init__(path)
        self.path, self.tp, self.value = path, tp, value

    def problem(self) -> Problem:
        text = f"{dotted(self.path)}: expected {_describe(self.tp)}, got {_show(self.value)}"
        choices = [c for c in get_args(self.tp) if isinstance(c, str)] if get_origin(self.tp) is Literal else []
        if isinstance(self.value, str) and (close := difflib.get_close_matches(self.value, choices, n=1)):
            text += f"; did you mean '{close[0]}'?"
        return Problem(self.path, text)


def _build(cls: type, data: dict, path: KeyPath, ctx: _Context) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = get_type_hints(cls)
    for key in data:
        if key not in fields:
            ctx.problems.append(Problem(path + (key,), _unknown_key(path, key, list(fields), ctx.root)))
    values = {}
    for name, f in fields.items():
        if name not in data:
            continue
        tp = hints[name]
        if "type_from" in f.metadata:
            tp = f.metadata["type_from"](values)
            if tp is None:
                if data[name] not in (None, {}):
                    ctx.problems.append(Problem(path + (name,), f"{dotted(path + (name,))}: takes no value here "
                                                                f"({f.metadata['help']})"))
                continue
        try:
            value = _convert(data[name], tp, path + (name,), ctx)
        except _Mismatch as mismatch:
            ctx.problems.append(mismatch.problem())
            continue
        if _check_bounds(value, f.metadata, path + (name,), ctx):
            values[name] = value
    instance = cls(**values)
    checks = instance.check() if hasattr(instance, "check") else []
    for name, message in checks:
        ctx.problems.append(Problem(path + (name,), f"{dotted(path + (name,))}: {message}"))
    return instance


def _convert(value: Any, tp: Any, path: KeyPath, ctx: _Context) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise _Mismatch(path, tp, value)
        return _build(tp, value, path, ctx)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        deeper = None  # a member whose shape matched but whose inside did not: its message is more precise
        for member in args:
            if member is type(None):
                continue
            try:
                return _convert(value, member, path, ctx)
            except _Mismatch as mismatch:
                deeper = deeper or (mismatch if mismatch.path != path else None)
        raise deeper or _Mismatch(path, tp, value)
    if origin is Literal:
        if any(value == choice and type(value) is type(choice) for choice in args):
            return value
        raise _Mismatch(path, tp, value)
    if origin is list:
        if isinstance(value, list):
            return [_convert(item, args[0], path + (i,), ctx) for i, item in enumerate(value)]
        try:
            return [_convert(value, args[0], path, ctx)]
        except _Mismatch:
            raise _Mismatch(path, tp, value) from None
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise _Mismatch(path, tp, value)
        return {k: _convert(v, args[1], path + (k,), ctx) for k, v in value.items()}
    return _convert_scalar(value, tp, path)


def _convert_scalar(value: Any, tp: type, path: KeyPath) -> Any:
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, str):
        return value
    raise _Mismatch(path, tp, value)


def _check_bounds(value: Any, metadata: Mapping, path: KeyPath, ctx: _Context) -> bool:
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else None
    numbers = [(path + (k,), v) for k, v in items] if items is not None else [(path, value)]
    ok = True
    for key, bound in metadata.items():
        if key not in _BOUNDS:
            continue
        compare, symbol = _BOUNDS[key]
        for where, number in numbers:
            if isinstance(number, (int, float)) and not isinstance(number, bool) and not compare(number, bound):
                ctx.problems.append(Problem(where, f"{dotted(where)}: must be {symbol} {bound}, got {number}"))
                ok = False
    return ok


ALIASES: dict[str, str] = {
    "learning_rate": "train.lr",
    "num_train_epochs": "train.epochs",
    "num_epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size",
    "micro_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "lr_scheduler_type": "train.scheduler",
    "lr_scheduler": "train.scheduler",
    "optimizer": "train.optim",
    "lora_rank": "adapter.r",
    "lora_r": "adapter.r",
    "lora_alpha": "adapter.alpha",
    "lora_dropout": "adapter.dropout",
    "lora_target": "adapter.target_modules",
    "lora_target_modules": "adapter.target_modules",
    "model_name_or_path": "model.source",
    "base_model": "model.source",
    "sequence_len": "data.cutoff_len",
    "max_seq_length": "data.cutoff_len",
    "output_dir": "output.dir",
}
"""Hugging Face / LLaMA-Factory / Axolotl spellings of our keys: foreign name -> our dotted key. They are
suggested in the unknown-key message, never accepted."""


def _unknown_key(path: KeyPath, key: Any, siblings: list[str], root: type) -> str:
    what = "section" if not path else "key"
    text = f"unknown {what} '{dotted(path + (key,))}'"
    if str(key) in ALIASES:
        return f"{text}; did you mean '{ALIASES[key]}'?"
    candidates = {**ALIASES, **{name: dotted(path + (name,)) for name in siblings}}
    close = difflib.get_close_matches(str(key), list(candidates), n=1)
    if close:
        return f"{text}; did you mean '{candidates[close[0]]}'?"
    # Not a typo of a sibling: perhaps the right key in the wrong section.
    elsewhere = {p[-1]: p for p in reversed(list(_key_paths(root)))}
    close = difflib.get_close_matches(str(key), list(elsewhere), n=1)
    if close:
        return f"{text}; did you mean '{dotted(elsewhere[close[0]])}'?"
    return f"{text}; expected one of {', '.join(siblings)}"


def _key_paths(cls: type, prefix: KeyPath = ()) -> Iterator[KeyPath]:
    for name, tp in get_type_hints(cls).items():
        yield prefix + (name,)
        for member in (tp, *get_args(tp)):
            if dataclasses.is_dataclass(member):
                yield from _key_paths(member, prefix + (name,))


def _describe(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        members = [a for a in args if a is not type(None) and not (a is int and float in args)]
        text = " or ".join(_describe(a) for a in members)
        return text + " or null" if type(None) in args else text
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin is list:
        return f"a list of {_plural(args[0])}"
    if origin is dict:
        return f"a mapping of names to {_plural(args[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _plural(tp: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings"}.get(tp) or f"values ({_describe(tp)})"


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
