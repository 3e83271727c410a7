import json

import pytest

from loraforge.data.dataset import build_datasets
from loraforge.data.readers import DataError
from loraforge.models.tiny import tiny_tokenizer

OPTIONS = dict(
    eval_files=None,
    test_files=None,
    format="alpaca",
    columns=None,
    val_size=0.0,
    cutoff_len=256,
    train_on_prompt=False,
    packing=False,
    system_prompt=None,
    template="auto",
    seed=0,
)


def build(train_files, **overrides):
    return build_datasets(tiny_tokenizer(), train_files=train_files, **{**OPTIONS, **overrides})


def write_jsonl(path, n, start=0):
    lines = [json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(start, start + n)]
    path.write_text("".join(lines))
    return path


def instructions(samples):
    tokenizer = tiny_tokenizer()
    return [tokenizer.decode(s.input_ids).split("\n")[1].removesuffix("<|im_end|>") for s in samples]


def test_build_train_only(tmp_path):
    train, eval_samples, test, report = build(write_jsonl(tmp_path / "t.jsonl", 5))
    assert instructions(train) == [f"q{i}" for i in range(5)]
    assert eval_samples == [] and test == []
    assert report.eval is None
    assert str(report).startswith("train: 5 samples, ")
    assert "0 of 5 truncated to cutoff_len=256, 0 dropped" in str(report)


def test_val_size_fraction_is_deterministic_and_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", 20)
    first = build(path, val_size=0.25, seed=7)
    again = build(path, val_size=0.25, seed=7)
    other = build(path, val_size=0.25, seed=8)
    assert first.eval == again.eval and first.train == again.train
    assert instructions(first.eval) != instructions(other.eval)
    assert len(first.eval) == 5 and len(first.train) == 15
    assert sorted(instructions(first.train) + instructions(first.eval)) == sorted(f"q{i}" for i in range(20))
    assert str(first.report).splitlines()[1].startswith("eval: 5 samples")


def test_val_size_count_and_minimum_of_one(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", 10)
    assert len(build(path, val_size=3).eval) == 3
    assert len(build(path, val_size=0.01).eval) == 1


@pytest.mark.parametrize(
    "val_size, message",
    [(10, "takes 10 of 10 records"), (1.5, r"must be in \[0, 1\)"), (-1, "must not be negative"), (True, "got True")],
)
def test_bad_val_size(tmp_path, val_size, message):
    with pytest.raises(DataError, match=message):
        build(write_jsonl(tmp_path / "t.jsonl", 10), val_size=val_size)


def test_eval_and_test_files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", 4)
    evals = write_jsonl(tmp_path / "eval.jsonl", 2, start=100)
    tests = write_jsonl(tmp_path / "test.jsonl", 2, start=200)
    data = build(train, eval_files=[evals], test_files=str(tests), system_prompt="Be brief.")
    texts = [tiny_tokenizer().decode(s.input_ids) for s in data.eval]
    assert [t.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nq10") for t in texts] == [True] * 2
    assert data.test == [
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q200"}], "a200"),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q201"}], "a201"),
    ]
    assert "test: 2 prompts" in str(data.report)


def test_val_size_and_eval_files_together(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", 4)
    with pytest.raises(DataError, match="either data.val_size or data.eval_files"):
        build(path, val_size=0.5, eval_files=path)


def test_empty_dataset_is_an_error(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="the train split is empty: no records"):
        build(path)


def test_all_samples_dropped_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"all 3 samples were dropped because cutoff_len=10"):
        build(write_jsonl(tmp_path / "t.jsonl", 3), cutoff_len=10)


def test_record_errors_keep_file_and_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: missing required field 'output'"):
        build(path)


def test_columns_and_folder(tmp_path):
    (tmp_path / "a.csv").write_text("question,answer\nq0,a0\n")
    (tmp_path / "b.jsonl").write_text('{"question": "q1", "answer": "a1"}\n')
    train, *_ = build(tmp_path, columns={"instruction": "question", "output": "answer"})
    assert instructions(train) == ["q0", "q1"]


def test_packing(tmp_path):
    data = build(write_jsonl(tmp_path / "t.jsonl", 12), packing=True, cutoff_len=64, val_size=4)
    assert all(s.position_ids is not None and len(s.input_ids) <= 64 for s in data.train + data.eval)
    assert sum(s.position_ids.count(0) for s in data.train) == 8
    assert len(data.train) < 8
    assert f"packed into {len(data.train)} rows" in str(data.report)
