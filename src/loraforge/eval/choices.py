"""Multiple-choice questions (MMLU-style local files) and their scoring by log-likelihood.

A record has ``question`` (text), ``choices`` (a list of at least two texts; in a CSV file, a JSON list
such as ``["Paris", "Rome"]``), ``answer`` (the right choice: its 0-based index, or its letter ``A``,
``B``, ...) and optionally ``subject`` (per-subject accuracy; default ``all``). ``columns`` maps these
field names to the file's own column names, as ``data.columns`` does for conversations.

Each choice is scored as the continuation ``" " + choice`` of the prompt
``"Question: {question}\\nAnswer:"``: the sum of its tokens' log-probabilities. The model picks the
choice with the highest sum (the first one on a tie).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from loraforge.data.readers import DataError, Record
from loraforge.data.tokenize import IGNORE_INDEX, Sample

CHOICE_FIELDS = ("question", "choices", "answer", "subject")
REQUIRED_FIELDS = CHOICE_FIELDS[:3]
DEFAULT_SUBJECT = "all"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class ChoiceQuestion:
    question: str
    choices: tuple[str, ...]
    answer: int
    """Index of the right choice."""
    subject: str
    origin: str
    """``path:line`` of the record."""


def looks_like_choices(records: Sequence[Record], columns: Mapping[str, str] | None) -> bool:
    """Whether ``records`` are multiple-choice questions: their first record has the ``choices`` column."""
    return bool(records) and (dict(columns or {}).get("choices", "choices") in records[0].fields)


def to_questions(records: Sequence[Record], columns: Mapping[str, str] | None = None) -> list[ChoiceQuestion]:
    """Validate multiple-choice records (see the module docstring).

    Raises:
        DataError: ``columns`` names an unknown field; a record lacks a required column, has empty or
            too few choices, or an answer that names no choice (each with its ``path:line``).
    """
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(CHOICE_FIELDS))
    if unknown:
        raise DataError(f"columns: {unknown} are not multiple-choice fields; they are {list(CHOICE_FIELDS)}")
    if not records:
        raise DataError("no multiple-choice records: the file is empty")
    return [_question(record, columns) for record in records]


def _question(record: Record, columns: dict[str, str]) -> ChoiceQuestion:
    origin, fields = record.origin, record.fields
    for field in REQUIRED_FIELDS:
        column = columns.get(field, field)
        if fields.get(column) is None:
            hint = f"; map another column to it with columns {field}=<column>" if column == field else ""
            raise DataError(f"{origin}: missing column {column!r} ({field}); the record has {sorted(fields)}{hint}")
    question = fields[columns.get("question", "question")]
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{origin}: question must be non-empty text, got {question!r}")
    choices = _choices(fields[columns.get("choices", "choices")], origin)
    answer = _answer(fields[columns.get("answer", "answer")], choices, origin)
    subject = fields.get(columns.get("subject", "subject"))
    return ChoiceQuestion(question, choices, answer, str(subject) if subject not in (None, "") else DEFAULT_SUBJECT,
                          origin)


def _choices(value, origin: str) -> tuple[str, ...]:
    if isinstance(value, str):  # CSV holds every value as text: a JSON list
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{origin}: choices {value!r} is not a list; in a CSV file write it as a JSON list, "
                            'e.g. ["Paris", "Rome", "Madrid"]') from None
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{origin}: choices must be a list of texts, got {type(value).__name__}")
    if not value:
        raise DataError(f"{origin}: choices is empty; give at least two choices")
    if len(value) < 2:
        raise DataError(f"{origin}: choices has only one choice ({value[0]!r}); give at least two")
    if len(value) > len(LETTERS):
        raise DataError(f"{origin}: choices has {len(value)} choices; at most {len(LETTERS)} are supported")
    bad = [i for i, c in enumerate(value) if not isinstance(c, str) or not c.strip()]
    if bad:
        raise DataError(f"{origin}: choice {bad[0]} is {value[bad[0]]!r}; every choice must be non-empty text")
    return tuple(value)


def _answer(value, choices: tuple[str, ...], origin: str) -> int:
    n = len(choices)
    right = f"0..{n - 1} or a letter A..{LETTERS[n - 1]} for its {n} choices"
    text = value.strip() if isinstance(value, str) else None
    if text is not None and text.lstrip("-").isdigit():
        index = int(text)
    elif text is not None and len(text) == 1 and text.upper() in LETTERS:
        index = LETTERS.index(text.upper())
    elif isinstance(value, int) and not isinstance(value, bool):
        index = value
    else:
        raise DataError(f"{origin}: answer {value!r} is not a choice index or letter; give {right}")
    if not 0 <= index < n:
        raise DataError(f"{origin}: answer {value!r} is out of range; give {right}")
    return index


def prompt_text(question: ChoiceQuestion) -> str:
    return f"Question: {question.question.strip()}\nAnswer:"


def choice_samples(tokenizer, questions: Sequence[ChoiceQuestion]) -> list[list[Sample]]:
    """Per question, one sample per choice: prompt then ``" " + choice``, labels on the choice's tokens only.

    The prompt is tokenized with the tokenizer's special tokens (a BOS where it adds one), the
    continuation without, each on its own, so every choice follows the very same prompt tokens.
    """
    out = []
    for question in questions:
        context = list(tokenizer(prompt_text(question))["input_ids"])
        samples = []
        for choice in question.choices:
            continuation = list(tokenizer(" " + choice.strip(), add_special_tokens=False)["input_ids"])
            samples.append(Sample(context + continuation, [IGNORE_INDEX] * len(context) + continuation))
        out.append(samples)
    return out


def picks(logprobs: Sequence[Sequence[float]]) -> list[int]:
    """Per question, the index of the choice with the highest log-likelihood (the first on a tie)."""
    return [max(range(len(scores)), key=lambda i: (scores[i], -i)) for scores in logprobs]


def accuracy_by_subject(questions: Sequence[ChoiceQuestion], chosen: Sequence[int]) -> dict[str, float]:
    """Accuracy per subject (sorted by name), then ``overall`` over every question."""
    hits: dict[str, list[bool]] = {}
    for question, pick in zip(questions, chosen, strict=True):
        hits.setdefault(question.subject, []).append(pick == question.answer)
    scores = {subject: sum(h) / len(h) for subject, h in sorted(hits.items())}
    scores["overall"] = sum(q.answer == p for q, p in zip(questions, chosen)) / max(len(questions), 1)
    return scores
