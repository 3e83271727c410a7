import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loraforge.data.readers import DataError, read_records


def test_jsonl_records_and_origins(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    records = read_records(path)
    assert [r.fields for r in records] == [{"a": 1}, {"a": 2}]
    assert [r.origin for r in records] == [f"{path}:1", f"{path}:3"]


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == f"{path}:2: invalid JSON: Expecting value (column 7)"


def test_jsonl_record_must_be_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=rf"{path}:2: a record must be a JSON object, got list"):
        read_records(path)


def test_json_list_origin_is_line_where_record_starts(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"a": 1}, {"a": [1, 2]}, {"a": 3}], indent=2))
    records = read_records(path)
    assert [r.fields["a"] for r in records] == [1, [1, 2], 3]
    lines = path.read_text().splitlines()
    for record in records:
        line = int(record.origin.rsplit(":", 1)[1])
        assert lines[line - 1].strip() == "{"


def test_json_object_holding_one_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"name": "x", "meta": {"n": [1]},\n "data": [\n {"a": 1},\n {"a": 2}]}')
    records = read_records(path)
    assert [(r.fields, r.origin) for r in records] == [({"a": 1}, f"{path}:3"), ({"a": 2}, f"{path}:4")]


def test_json_object_with_two_lists_is_an_error(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"x": [], "y": []}')
    with pytest.raises(DataError, match="exactly one list of records"):
        read_records(path)


def test_json_syntax_error_has_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n {"a": 1},\n {"a": }\n]')
    with pytest.raises(DataError, match=rf"{path}:3: invalid JSON"):
        read_records(path)


def test_json_lines_in_a_json_file_gets_a_hint(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"a": 1}\n{"a": 2}\n')
    with pytest.raises(DataError, match=r":2: invalid JSON: Extra data.*rename the file to \.jsonl"):
        read_records(path)


def test_json_record_must_be_object(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n {"a": 1},\n "oops"\n]')
    with pytest.raises(DataError, match=rf"{path}:3: a record must be a JSON object, got str"):
        read_records(path)


def test_csv_rows_and_origins_with_multiline_value(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('q,a\nhi,"two\nlines"\nyo,ok\n', encoding="utf-8")
    records = read_records(path)
    assert [r.fields for r in records] == [{"q": "hi", "a": "two\nlines"}, {"q": "yo", "a": "ok"}]
    assert [r.origin for r in records] == [f"{path}:2", f"{path}:4"]


def test_csv_wrong_number_of_values(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("q,a\nhi,yo\nonly\n")
    with pytest.raises(DataError, match=rf"{path}:3: expected 2 values"):
        read_records(path)


def test_parquet_rows(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"q": ["a", "b"], "n": [1, 2]}), path)
    records = read_records(path)
    assert [r.fields for r in records] == [{"q": "a", "n": 1}, {"q": "b", "n": 2}]
    assert [r.origin for r in records] == [f"{path}:row 0", f"{path}:row 1"]


def test_folder_reads_supported_files_sorted(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"k": "b"}\n')
    (tmp_path / "a.csv").write_text("k\na\n")
    (tmp_path / "notes.txt").write_text("ignored")
    assert [r.fields["k"] for r in read_records(tmp_path)] == ["a", "b"]


def test_several_paths_keep_order(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"k": 1}\n')
    (tmp_path / "b.jsonl").write_text('{"k": 2}\n')
    assert [r.fields["k"] for r in read_records([tmp_path / "b.jsonl", str(tmp_path / "a.jsonl")])] == [2, 1]


def test_missing_file_names_path_and_supported_types(tmp_path):
    with pytest.raises(DataError, match=r"not found: .*nope\.jsonl \(supported: \.json, \.jsonl, \.csv, \.parquet"):
        read_records(tmp_path / "nope.jsonl")


def test_unsupported_extension(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("x")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        read_records(path)


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="folder holds no dataset file"):
        read_records(tmp_path)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_utf8_byte_order_mark_is_accepted(tmp_path, suffix):
    text = {".json": '[{"q": "é"}]', ".jsonl": '{"q": "é"}\n', ".csv": "q\né\n"}[suffix]
    path = tmp_path / f"d{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    records = read_records(path)
    assert [(r.fields, r.origin) for r in records] == [({"q": "é"}, f"{path}:{1 if suffix != '.csv' else 2}")]


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_invalid_utf8_names_line_and_byte_offset(tmp_path, suffix):
    rows = {".json": [b'[{"q": "a"},', b'{"q": "b\xe9"}]'], ".jsonl": [b'{"q": "a"}', b'{"q": "b\xe9"}'],
            ".csv": [b"q", b"a", b"b\xe9"]}[suffix]
    path = tmp_path / f"d{suffix}"
    data = b"\xef\xbb\xbf" + b"\n".join(rows) + b"\n"
    path.write_bytes(data)
    line, offset = len(rows), data.index(b"\xe9")
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == (f"{path}:{line}: not valid UTF-8: byte 0xe9 at byte offset {offset} "
                               "(invalid continuation byte); save the file as UTF-8")


def test_json_single_object_names_its_line_and_says_to_wrap_it(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('\n\n{"instruction": "hi",\n "output": "yo"}\n')
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == (f"{path}:3: expected a list of records, [{{...}}, {{...}}], or an object holding "
                              "exactly one list of records; this object holds no list (if it is a single record, "
                              "wrap it in [ ])")


def test_json_scalar_and_empty_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('\n"hello"\n')
    with pytest.raises(DataError, match=rf"{path}:2: expected a list of records.*; got a JSON str$"):
        read_records(path)
    path.write_text("\n \n")
    with pytest.raises(DataError, match=rf"^{path}: empty file; expected a list of records"):
        read_records(path)


@pytest.mark.parametrize("content, problem", [("", "empty CSV file"), ("\nq,a\n", "blank first line")])
def test_csv_without_header(tmp_path, content, problem):
    path = tmp_path / "d.csv"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == (f"{path}:1: {problem}; expected a header row naming the columns, "
                              "e.g. instruction,output")


@pytest.mark.parametrize("row, count", [("hi,yo,extra", 3), ("only", 1)])
def test_ragged_csv_row_names_the_line_where_it_starts(tmp_path, row, count):
    path = tmp_path / "d.csv"
    path.write_text(f'q,a\nhi,"two\nlines"\n{row}\n')
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == f"{path}:4: expected 2 values as in the header ['q', 'a'], got {count}"


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_corrupt_parquet_names_the_file(tmp_path, damage):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"q": ["a"] * 50}), path)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"PAR1" + b"x" * 40}[damage])
    with pytest.raises(DataError, match=rf"^{path}: not a readable Parquet file; is it truncated or corrupt\? \(.+\)$"):
        read_records(path)


def test_csv_field_over_the_size_limit_names_the_line(tmp_path):
    import csv

    path = tmp_path / "d.csv"
    huge = "x" * (csv.field_size_limit() + 1)
    path.write_text(f"{huge}\n")
    with pytest.raises(DataError, match=rf"^{path}:1: malformed CSV header: field larger than field limit"):
        read_records(path)
    path.write_text(f"q\nok\n{huge}\n")
    with pytest.raises(DataError, match=rf"^{path}:3: malformed CSV: field larger than field limit"):
        read_records(path)
