"""Turn records into conversations: lists of ``{"role": "system"|"user"|"assistant", "content": str}``.

Formats and their fields (``*`` = required):

- ``alpaca``: ``instruction*``, ``input`` (appended to the instruction after a newline),
  ``output*``, ``system``, ``history`` (a list of ``[user, assistant]`` pairs, earlier turns).
- ``sharegpt``: ``conversations*`` (a list of ``{"from": human|user|gpt|assistant|system,
  "value": str}``), ``system``.
- ``openai``: ``messages*`` (a list of ``{"role": system|user|assistant, "content": str}``).

``columns`` maps a field name to the column that holds it in the file, e.g.
``{"instruction": "question", "output": "answer"}``; unmapped fields use their own name.
A missing or null optional field is absent. For ``sharegpt``, ``columns`` also takes LLaMA-Factory's
tag names, which say how the turns spell their keys and speakers: ``role_tag`` (default ``from``),
``content_tag`` (``value``), ``user_tag``, ``assistant_tag`` and ``system_tag`` (a speaker spelled so
maps to that role, besides the speakers listed above).

Every conversation is checked: an optional system message first, then user and assistant turns
alternating, ending with a non-empty assistant reply.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loraforge.data.readers import DataError, Record

Message = dict[str, str]

FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "sharegpt": ("conversations", "system"),
    "openai": ("messages",),
}

SHAREGPT_TAGS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "system_tag")
"""Keys of ``columns`` that name how sharegpt turns spell things, not record columns."""

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Conversation:
    """A validated conversation and the ``origin`` (``path:line``) of the record it came from."""

    messages: list[Message]
    origin: str


def to_conversations(
    records: Sequence[Record], format: str, columns: Mapping[str, str] | None, system_prompt: str | None
) -> list[Conversation]:
    """Convert records of one ``format`` to conversations.

    ``system_prompt``, when not None, becomes the system message of every conversation whose record
    has none, so it also replaces any default system prompt that the chat template would insert.

    Raises:
        DataError: unknown format; a ``columns`` entry names an unknown field or a column that no
            record has; a record lacks a required field, has a wrongly typed value, an empty
            assistant reply or a wrong role order (the message gives the record's origin).
    """
    columns = dict(columns or {})
    check_columns(records, format, columns)
    convert = _CONVERTERS[format]
    conversations = []
    for record in records:
        fields = _Fields(record, columns)
        messages = convert(fields)
        if system_prompt is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        _check_roles(messages, record.origin)
        conversations.append(Conversation(messages, record.origin))
    return conversations


def check_columns(records: Sequence[Record], format: str, columns: Mapping[str, str]) -> None:
    """Raise a DataError for an unknown format, or a ``columns`` entry that cannot apply to ``records``."""
    if format not in FORMAT_FIELDS:
        raise DataError(f"unknown data format {format!r}; choose one of {sorted(FORMAT_FIELDS)}")
    fields = FORMAT_FIELDS[format] + (SHAREGPT_TAGS if format == "sharegpt" else ())
    for field in columns:
        if field not in fields:
            raise DataError(f"columns: {field!r} is not a field of format {format!r}; its fields are {list(fields)}")
    if not records:
        return
    present = sorted({key for record in records for key in record.fields})
    for field, column in columns.items():
        if field not in SHAREGPT_TAGS and column not in present:
            raise DataError(
                f"columns: {field} is mapped to column {column!r}, but no record has it; columns found: {present}"
            )


class _Fields:
    """Typed access to a record's fields through the column mapping, with errors that name the origin."""

    def __init__(self, record: Record, columns: Mapping[str, str]):
        self.record = record
        self.columns = columns
        self.origin = record.origin

    def column(self, field: str) -> str:
        return self.columns.get(field, field)

    def get(self, field: str, kind: type, required: bool) -> Any:
        column = self.column(field)
        value = self.record.fields.get(column)
        if value is None:
            if required:
                raise DataError(
                    f"{self.origin}: missing required field {column!r}; the record has {sorted(self.record.fields)}"
                    + ("; if the file names it differently, map it with `columns`" if column == field else "")
                )
            return None
        if not isinstance(value, kind):
            raise DataError(
                f"{self.origin}: field {column!r} must be a {kind.__name__}, got {type(value).__name__} {value!r:.60}"
            )
        return value


def _alpaca(fields: _Fields) -> list[Message]:
    messages = []
    system = fields.get("system", str, required=False)
    if system is not None:
        messages.append({"role": "system", "content": system})
    for i, pair in enumerate(fields.get("history", list, required=False) or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            name = fields.column("history")
            raise DataError(f"{fields.origin}: {name}[{i}] must be a [user, assistant] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = fields.get("instruction", str, required=True)
    extra = fields.get("input", str, required=False)
    if extra:
        prompt = f"{prompt}\n{extra}"
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": fields.get("output", str, required=True)})
    return messages


def _sharegpt(fields: _Fields) -> list[Message]:
    name = fields.column("conversations")
    role_key, content_key = fields.columns.get("role_tag", "from"), fields.columns.get("content_tag", "value")
    roles = dict(SHAREGPT_ROLES)
    for role in ("user", "assistant", "system"):
        if f"{role}_tag" in fields.columns:
            roles[fields.columns[f"{role}_tag"]] = role
    messages = []
    for i, turn in enumerate(fields.get("conversations", list, required=True)):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise DataError(f"{fields.origin}: {name}[{i}] must be an object with {role_key!r} and {content_key!r}")
        if turn[role_key] not in roles:
            raise DataError(
                f"{fields.origin}: {name}[{i}]: unknown speaker {turn[role_key]!r}; use one of {list(roles)}"
            )
        messages.append({"role": roles[turn[role_key]], "content": turn[content_key]})
    system = fields.get("system", str, required=False)
    if system is not None:
        if messages and messages[0]["role"] == "system":
            raise DataError(f"{fields.origin}: both a {fields.column('system')!r} field and a system turn; keep one")
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _openai(fields: _Fields) -> list[Message]:
    name = fields.column("messages")
    messages = []
    for i, message in enumerate(fields.get("messages", list, required=True)):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{fields.origin}: {name}[{i}] must be an object with 'role' and 'content'")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


_CONVERTERS: dict[str, Callable[[_Fields], list[Message]]] = {
    "alpaca": _alpaca,
    "sharegpt": _sharegpt,
    "openai": _openai,
}


def _check_roles(messages: list[Message], origin: str) -> None:
    rule = "after an optional system message, user and assistant turns alternate and the last is assistant"
    if not messages:
        raise DataError(f"{origin}: empty conversation")
    start = 1 if messages[0]["role"] == "system" else 0
    for i, message in enumerate(messages):
        if not isinstance(message["content"], str):
            raise DataError(f"{origin}: message {i} content must be a string, got {type(message['content']).__name__}")
        expected = "system" if i < start else ("user", "assistant")[(i - start) % 2]
        if message["role"] != expected:
            raise DataError(f"{origin}: message {i} has role {message['role']!r}, expected {expected!r} ({rule})")
        if expected == "assistant" and not message["content"].strip():
            raise DataError(f"{origin}: message {i} is an empty assistant reply")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{origin}: the last message has role {messages[-1]['role']!r}, expected 'assistant' ({rule})")
