"""Multiple-choice files: every format reads to the same questions; bad input names file:line and the fix;
the bundled regression set is valid."""

import csv
import json

import pytest

from loraforge.data import DataError, read_records
from loraforge.eval import general_knowledge, read_eval_data
from loraforge.eval.choices import (
    DEFAULT_SUBJECT,
    accuracy_by_subject,
    picks,
    to_questions,
)

from .conftest import QUESTIONS

EXPECTED = [("animals", 0), ("animals", 1), ("colors", 2), ("colors", 0), (DEFAULT_SUBJECT, 1)]


def write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, ["subject", "question", "choices", "answer"])
            writer.writeheader()
            for r in rows:
                writer.writerow({**r, "choices": json.dumps(r["choices"]), "subject": r.get("subject", "")})
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([{**r, "answer": str(r["answer"]), "subject": r.get("subject")}
                                             for r in rows]), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_format_reads_the_same_questions(tmp_path, suffix):
    questions = read_eval_data(write(tmp_path / f"mc{suffix}", QUESTIONS))
    assert [(q.subject, q.answer) for q in questions] == EXPECTED
    assert questions[2].choices == ("red", "blue", "green", "pink")
    assert questions[0].origin.endswith(("mc.jsonl:1", "mc.json:2", "mc.csv:2", "mc.parquet:row 0"))


def test_columns_map_other_names(tmp_path):
    rows = [{"q": "Which one barks?", "options": ["dog", "cat"], "label": 0, "topic": "pets"}]
    path = write(tmp_path / "mc.jsonl", rows)
    columns = {"question": "q", "choices": "options", "answer": "label", "subject": "topic"}
    [question] = read_eval_data(path, columns=columns)
    assert (question.question, question.choices, question.answer, question.subject) == (
        "Which one barks?", ("dog", "cat"), 0, "pets")


@pytest.mark.parametrize("change, message", [
    ({"answer": 3}, "mc.jsonl:2: answer 3 is out of range; give 0..2 or a letter A..C for its 3 choices"),
    ({"answer": "D"}, "mc.jsonl:2: answer 'D' is out of range; give 0..2 or a letter A..C for its 3 choices"),
    ({"answer": "yes"}, "mc.jsonl:2: answer 'yes' is not a choice index or letter; give 0..2 or a letter A..C"),
    ({"answer": -1}, "mc.jsonl:2: answer -1 is out of range"),
    ({"answer": 1.0}, "mc.jsonl:2: answer 1.0 is not a choice index or letter"),
    ({"choices": []}, "mc.jsonl:2: choices is empty; give at least two choices"),
    ({"choices": ["only"]}, "mc.jsonl:2: choices has only one choice ('only'); give at least two"),
    ({"choices": ["a", " "]}, "mc.jsonl:2: choice 1 is ' '; every choice must be non-empty text"),
    ({"choices": "a, b"}, "mc.jsonl:2: choices 'a, b' is not a list; in a CSV file write it as a JSON list"),
    ({"question": ""}, "mc.jsonl:2: question must be non-empty text"),
])
def test_bad_records_name_file_line_and_what_is_right(tmp_path, change, message):
    rows = [QUESTIONS[0], {**QUESTIONS[0], **change}]
    with pytest.raises(DataError) as err:
        to_questions(read_records(write(tmp_path / "mc.jsonl", rows)))
    assert message in str(err.value)


def test_a_missing_column_is_named_with_what_the_record_has(tmp_path):
    rows = [{k: v for k, v in QUESTIONS[0].items() if k != "answer"}]
    path = tmp_path / "mc.csv"
    path.write_text('question,choices\n"Which?","[""a"", ""b""]"\n')
    with pytest.raises(DataError, match=r"mc.csv:2: missing column 'answer' \(answer\); the record has "
                                        r"\['choices', 'question'\]; map another column to it with columns answer="):
        to_questions(read_records(path))
    with pytest.raises(DataError, match=r"mc.jsonl:1: missing column 'label' \(answer\)"):
        to_questions(read_records(write(tmp_path / "mc.jsonl", rows)), {"answer": "label"})
    with pytest.raises(DataError, match=r"columns: \['answers'\] are not multiple-choice fields"):
        to_questions(read_records(write(tmp_path / "mc.jsonl", rows)), {"answers": "x"})


def test_picks_and_accuracy_by_subject_by_hand():
    questions = read_eval_data_from(QUESTIONS)
    logprobs = [[-1.0, -2.0, -3.0], [-0.5, -0.4], [-1.0, -1.0, -2.0, -9.0], [-3.0, -3.0], [-2.0, -1.0, -1.0]]
    chosen = picks(logprobs)
    assert chosen == [0, 1, 0, 0, 1]  # a tie goes to the first choice
    assert accuracy_by_subject(questions, chosen) == {"all": 1.0, "animals": 1.0, "colors": 0.5, "overall": 0.8}


def read_eval_data_from(rows):
    from loraforge.data.readers import Record

    return to_questions([Record(r, f"mem:{i}") for i, r in enumerate(rows)])


def test_the_bundled_general_set_is_valid_and_balanced():
    questions = general_knowledge()
    assert len(questions) >= 60
    assert len({q.question for q in questions}) == len(questions)
    subjects = {q.subject for q in questions}
    assert len(subjects) >= 5 and DEFAULT_SUBJECT not in subjects
    positions = [q.answer for q in questions]
    assert all(positions.count(k) >= len(questions) // 5 for k in range(4))  # no position bias to exploit
