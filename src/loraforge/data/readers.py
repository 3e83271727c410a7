"""Read dataset files into records that remember where they came from.

Supported: ``.json`` (a top-level list of objects, or an object holding exactly one such list),
``.jsonl``, ``.csv`` (header row, every value a string) and ``.parquet``, or a folder of them
(read in sorted name order, not recursively; other files in the folder are ignored). Text files are
UTF-8; a leading byte-order mark, as Windows tools write, is ignored.

Every record carries its origin, so that later errors can point at it: ``path:line`` for JSON
(the line where the object starts), JSON Lines and CSV (the line where the data row starts), and
``path:row N`` for Parquet (N counts from 0, as ``pandas.DataFrame.iloc`` does).
"""

from __future__ import annotations

import bisect
import codecs
import csv
import io
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet")


class DataError(ValueError):
    """A dataset problem the user can fix; the message says where (file:line) and what is wrong."""


@dataclass(frozen=True)
class Record:
    """One row of a dataset file: its fields as read, and ``origin`` (``path:line`` or ``path:row N``)."""

    fields: dict[str, Any]
    origin: str


def read_records(paths: str | Path | Sequence[str | Path]) -> list[Record]:
    """Read every record of one path or several, in order; a folder expands to its supported files.

    Raises:
        DataError: a path does not exist, has an unsupported extension, a folder holds no supported
            file, or a line/record is malformed (the message gives ``file:line``).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    records: list[Record] = []
    for path in paths:
        for file in _expand(Path(path)):
            records.extend(_READERS[file.suffix.lower()](file))
    return records


def _expand(path: Path) -> list[Path]:
    supported = ", ".join(SUPPORTED_EXTENSIONS)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUPPORTED_EXTENSIONS)
        if not files:
            raise DataError(f"{path}: folder holds no dataset file (supported: {supported})")
        return files
    if not path.exists():
        raise DataError(f"dataset file not found: {path} (supported: {supported}, or a folder of them)")
    if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (supported: {supported}, or a folder of them)")
    return [path]


def _read_jsonl(path: Path) -> Iterator[Record]:
    for line_no, line in enumerate(io.StringIO(_read_text(path), newline=None), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line.rstrip("\n"))  # with the newline, an error at the end reads "column 1"
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_no}: invalid JSON: {e.msg} (column {e.colno})") from None
        yield Record(_as_object(value, f"{path}:{line_no}"), f"{path}:{line_no}")


def _read_json(path: Path) -> Iterator[Record]:
    text = _read_text(path)
    if not text.strip():
        raise DataError(f"{path}: empty file; expected a list of records, [{{...}}, {{...}}]")
    newlines = [i for i, ch in enumerate(text) if ch == "\n"]

    def line_of(pos: int) -> int:
        return bisect.bisect_left(newlines, pos) + 1

    try:
        items = _top_level_items(text, path, line_of)
    except json.JSONDecodeError as e:
        hint = ""
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            hint = "; this looks like JSON Lines (one object per line): rename the file to .jsonl"
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno}){hint}") from None
    for value, pos in items:
        origin = f"{path}:{line_of(pos)}"
        yield Record(_as_object(value, origin), origin)


def _read_text(path: Path) -> str:
    """The file as text: UTF-8, without the byte-order mark that Windows tools write at the start.

    Raises:
        DataError: the file is not valid UTF-8 (the message gives the line and the byte offset).
    """
    data = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return str(memoryview(data)[bom:], "utf-8")
    except UnicodeDecodeError as e:
        offset = bom + e.start
        line = data.count(b"\n", 0, offset) + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8: byte 0x{data[offset]:02x} at byte offset {offset} ({e.reason}); "
            "save the file as UTF-8"
        ) from None


def _top_level_items(text: str, path: Path, line_of: Callable[[int], int]) -> list[tuple[Any, int]]:
    """The records of a JSON document with the character offset where each starts.

    The document is a list of records, or an object with exactly one list-valued key.
    """
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    expected = "expected a list of records, [{...}, {...}], or an object holding exactly one list of records"
    if text.startswith("[", pos):
        items, end = _scan_array(decoder, text, pos)
        _check_end(text, end)
        return items
    if text.startswith("{", pos):
        lists, end = _scan_object_lists(decoder, text, pos)
        _check_end(text, end)
        if len(lists) > 1:
            raise DataError(f"{path}:{line_of(pos)}: {expected}; this object has list-valued keys {sorted(lists)}")
        if not lists:
            raise DataError(f"{path}:{line_of(pos)}: {expected}; this object holds no list (if it is a single "
                            "record, wrap it in [ ])")
        return next(iter(lists.values()))
    value = decoder.decode(text)  # raises a JSONDecodeError with a position for garbage input
    raise DataError(f"{path}:{line_of(pos)}: {expected}; got a JSON {type(value).__name__}")


def _check_end(text: str, end: int) -> None:
    if _skip_ws(text, end) != len(text):
        raise json.JSONDecodeError("Extra data", text, _skip_ws(text, end))


def _scan_array(decoder: json.JSONDecoder, text: str, pos: int) -> tuple[list[tuple[Any, int]], int]:
    """Decode the array starting at ``text[pos] == '['``; return its items with their offsets, and the end."""
    items: list[tuple[Any, int]] = []
    pos = _skip_ws(text, pos + 1)
    if text.startswith("]", pos):
        return items, pos + 1
    while True:
        value, end = decoder.raw_decode(text, pos)
        items.append((value, pos))
        pos = _skip_ws(text, end)
        if text.startswith(",", pos):
            pos = _skip_ws(text, pos + 1)
        elif text.startswith("]", pos):
            return items, pos + 1
        else:
            raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)


def _scan_object_lists(decoder: json.JSONDecoder, text: str, pos: int) -> tuple[dict[str, list], int]:
    """Decode the object at ``text[pos] == '{'``; return its list-valued keys (items with offsets), and the end."""
    lists: dict[str, list[tuple[Any, int]]] = {}
    pos = _skip_ws(text, pos + 1)
    if text.startswith("}", pos):
        return lists, pos + 1
    while True:
        key, pos = decoder.raw_decode(text, pos)
        if not isinstance(key, str):
            raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, pos)
        pos = _skip_ws(text, pos)
        if not text.startswith(":", pos):
            raise json.JSONDecodeError("Expecting ':' delimiter", text, pos)
        pos = _skip_ws(text, pos + 1)
        if text.startswith("[", pos):
            lists[key], pos = _scan_array(decoder, text, pos)
        else:
            _, pos = decoder.raw_decode(text, pos)
        pos = _skip_ws(text, pos)
        if text.startswith(",", pos):
            pos = _skip_ws(text, pos + 1)
        elif text.startswith("}", pos):
            return lists, pos + 1
        else:
            raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _as_object(value: Any, origin: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"{origin}: a record must be a JSON object, got {type(value).__name__}")
    return value


def _read_csv(path: Path) -> Iterator[Record]:
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise DataError(f"{path}:1: malformed CSV header: {e}") from None
    if not header:
        problem = "empty CSV file" if header is None else "blank first line"
        raise DataError(f"{path}:1: {problem}; expected a header row naming the columns, e.g. instruction,output")
    while True:
        start = reader.line_num + 1  # a quoted value may span lines; report where the row starts
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{path}:{start}: malformed CSV: {e}") from None
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(f"{path}:{start}: expected {len(header)} values as in the header {header}, got {len(row)}")
        yield Record(dict(zip(header, row)), f"{path}:{start}")


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file; is it truncated or corrupt? ({e})") from None
    for i, row in enumerate(rows):
        yield Record(row, f"{path}:row {i}")


_READERS = {".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}
