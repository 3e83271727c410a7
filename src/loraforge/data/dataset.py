"""Build the train, eval and test splits from the ``data`` section of the config.

The arguments of ``build_datasets`` are the keys of that section; their defaults live in the
config schema, not here.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from loraforge.data.collate import pack
from loraforge.data.formats import Conversation, Message, to_conversations
from loraforge.data.readers import DataError, read_records
from loraforge.data.tokenize import Sample, SplitReport, tokenize_conversations

Files = str | Path | Sequence[str | Path] | None


@dataclass
class DataReport:
    """Counts per split; ``str()`` gives the lines to print before training."""

    train: SplitReport
    eval: SplitReport | None
    test: int
    cutoff_len: int
    train_rows: int
    eval_rows: int

    def __str__(self) -> str:
        lines = [self._line("train", self.train, self.train_rows)]
        if self.eval is not None:
            lines.append(self._line("eval", self.eval, self.eval_rows))
        if self.test:
            lines.append(f"test: {self.test} prompts for generation")
        return "\n".join(lines)

    def _line(self, name: str, report: SplitReport, rows: int) -> str:
        line = (
            f"{name}: {report.kept} samples, {report.tokens} tokens ({report.label_tokens} with loss); "
            f"{report.truncated} of {report.samples} truncated to cutoff_len={self.cutoff_len}, "
            f"{report.dropped} dropped"
        )
        if rows != report.kept:
            line += f"; packed into {rows} rows"
        return line


class Datasets(NamedTuple):
    """``train`` and ``eval`` are tokenized samples; ``test`` holds (prompt messages, reference reply)
    pairs for generation."""

    train: list[Sample]
    eval: list[Sample]
    test: list[tuple[list[Message], str]]
    report: DataReport


def build_datasets(
    tokenizer: Any,
    *,
    train_files: Files,
    eval_files: Files,
    test_files: Files,
    format: str,
    columns: Mapping[str, str] | None,
    val_size: float | int,
    cutoff_len: int,
    train_on_prompt: bool,
    packing: bool,
    system_prompt: str | None,
    template: str,
    seed: int,
) -> Datasets:
    """Read, convert, split and tokenize the dataset files.

    The eval split comes either from ``eval_files`` or from ``val_size`` train records, chosen by a
    shuffle with ``seed``: a float in [0, 1) is a fraction (at least one record), an int a count. The
    train split keeps file order; ``batches`` shuffles it per epoch. With ``packing``, train and
    eval samples are packed into rows of at most ``cutoff_len`` tokens.

    Raises:
        DataError: any problem with the files or records (with file:line), both or an invalid
            ``val_size``, or a train split (or a requested eval split) that ends up empty.
    """
    if not train_files:
        raise DataError("data.train_files is empty; give at least one dataset file or folder")
    _check_val_size(val_size, bool(eval_files))

    def conversations(files: Files) -> list[Conversation]:
        return to_conversations(read_records(files), format, columns, system_prompt) if files else []

    train_conv = conversations(train_files)
    if not train_conv:
        raise DataError(f"the train split is empty: no records in {train_files}")
    eval_conv = conversations(eval_files)
    if val_size:
        train_conv, eval_conv = _split(train_conv, val_size, seed)
    test = [(c.messages[:-1], c.messages[-1]["content"]) for c in conversations(test_files)]

    train, train_report = tokenize_conversations(tokenizer, train_conv, template, cutoff_len, train_on_prompt)
    _check_not_empty("train", train_report, train_files, cutoff_len)
    eval_samples, eval_report = tokenize_conversations(tokenizer, eval_conv, template, cutoff_len, train_on_prompt)
    if eval_conv:
        _check_not_empty("eval", eval_report, eval_files or train_files, cutoff_len)
    if packing:
        train, eval_samples = pack(train, cutoff_len), pack(eval_samples, cutoff_len)
    report = DataReport(
        train=train_report,
        eval=eval_report if eval_conv else None,
        test=len(test),
        cutoff_len=cutoff_len,
        train_rows=len(train),
        eval_rows=len(eval_samples),
    )
    return Datasets(train, eval_samples, test, report)


def _check_val_size(val_size: float | int, has_eval_files: bool) -> None:
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise DataError(f"data.val_size must be a fraction in [0, 1) or a record count, got {val_size!r}")
    if isinstance(val_size, float) and not 0 <= val_size < 1:
        raise DataError(f"data.val_size {val_size} as a fraction must be in [0, 1); give an int for a record count")
    if val_size < 0:
        raise DataError(f"data.val_size must not be negative, got {val_size}")
    if val_size and has_eval_files:
        raise DataError("set either data.val_size or data.eval_files, not both")


def _split(conversations: list[Conversation], val_size: float | int, seed: int) -> tuple[list, list]:
    n = len(conversations)
    n_eval = max(1, round(val_size * n)) if isinstance(val_size, float) else val_size
    if n_eval >= n:
        raise DataError(f"data.val_size={val_size} takes {n_eval} of {n} records for eval and leaves none to train on")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held_out = set(order[:n_eval])
    train = [c for i, c in enumerate(conversations) if i not in held_out]
    return train, [conversations[i] for i in order[:n_eval]]


def _check_not_empty(name: str, report: SplitReport, files: Files, cutoff_len: int) -> None:
    if report.kept:
        return
    if report.samples == 0:
        raise DataError(f"the {name} split is empty: no records in {files}")
    raise DataError(
        f"the {name} split is empty: all {report.samples} samples were dropped because cutoff_len={cutoff_len} "
        "leaves none of their assistant tokens; raise data.cutoff_len or shorten the prompts"
    )
