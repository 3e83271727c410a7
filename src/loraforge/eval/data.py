"""What ``evaluate`` scores: conversations (any format ``data`` reads) or multiple-choice questions,
read from local files, and the bundled general-knowledge set of the regression check."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from loraforge.data.formats import FORMAT_FIELDS, Conversation, to_conversations
from loraforge.data.readers import DataError, read_records
from loraforge.eval.choices import ChoiceQuestion, looks_like_choices, to_questions

GENERAL_KNOWLEDGE = Path(__file__).with_name("general_knowledge.jsonl")
"""The bundled regression set: short general-knowledge questions with four choices, in subjects."""

EvalData = list[Conversation] | list[ChoiceQuestion]


def read_eval_data(paths: str | Path | Sequence[str | Path], format: str | None = None,
                   columns: Mapping[str, str] | None = None, system_prompt: str | None = None) -> EvalData:
    """Multiple-choice questions when the records have a ``choices`` column (see ``eval.choices``),
    else conversations of ``format``; ``format=None`` picks it from the first record's fields
    (``messages``: openai, ``conversations``: sharegpt, otherwise alpaca).

    Raises:
        DataError: unreadable files, or records that don't fit (with ``path:line``).
    """
    records = read_records(paths)
    if not records:
        raise DataError(f"no records in {paths}; an evaluation set needs at least one")
    if looks_like_choices(records, columns) and format is None:
        return to_questions(records, columns)
    if format is None:
        fields = records[0].fields
        format = next((name for name, keys in FORMAT_FIELDS.items() if keys[0] in fields
                       and name != "alpaca"), "alpaca")
    return to_conversations(records, format, columns, system_prompt)


def general_knowledge() -> list[ChoiceQuestion]:
    """The bundled general-knowledge questions (``GENERAL_KNOWLEDGE``)."""
    return to_questions(read_records(GENERAL_KNOWLEDGE))
