"""``loraforge eval`` end to end: the report files, a run's config, an exported GGUF, and bad input as one
``error:`` line."""

import json

import pytest
import yaml

from loraforge.cli.main import main
from loraforge.eval import EvalOptions, evaluate, general_knowledge, read_eval_data
from loraforge.models import tiny_model

from .conftest import CONVERSATIONS, QUESTIONS, reference_model, save_peft_adapter

PNG = b"\x89PNG\r\n\x1a\n"


def run(capsys, *argv):
    code = main(["eval", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_report_files_hold_what_evaluate_returns(tmp_path, capsys, conversation_file, adapter_dirs, tokenizer):
    out = tmp_path / "report"
    code, stdout, _ = run(capsys, "--model", "tiny-llama", "--adapter", str(adapter_dirs["qv"]), "--adapter",
                          f"wide={adapter_dirs['mlp']}", "--data", str(conversation_file), "--max-new-tokens", "6",
                          "--ignore-case", "--out", str(out))
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "scores.png"]
    assert (out / "scores.png").read_bytes()[:8] == PNG
    report = json.loads((out / "report.json").read_text())
    expected = evaluate(tiny_model("tiny-llama"), tokenizer, read_eval_data(conversation_file),
                        {"qv": adapter_dirs["qv"], "wide": adapter_dirs["mlp"]},
                        EvalOptions(max_new_tokens=6, normalize=report_normalization()),
                        regression=general_knowledge())
    assert report["labels"] == ["base", "qv", "wide"] and report["backend"] == "engine"
    assert report["answers"] == expected.answers
    for label in expected.labels:
        assert report["scores"][label] == pytest.approx(expected.scores[label], rel=1e-6)
        assert report["changes"].get(label, {}) == pytest.approx(expected.changes().get(label, {}), abs=1e-9)
    assert set(report["scores"]["base"]) == {"loss", "perplexity", "exact_match", "contains", "bleu", "rouge1",
                                             "rouge2", "rougeL", "regression"}
    assert report["regression_items"] == len(general_knowledge())
    markdown = (out / "report.md").read_text()
    assert "| score | base | qv | wide | qv vs base | wide vs base |" in markdown
    assert "## Regression set by subject" in markdown and "| geography |" in markdown
    assert "| score | base | qv | wide |" in stdout and f"report written to {out}" in stdout


def report_normalization():
    from loraforge.eval import Normalization

    return Normalization(case=True)


def test_multiple_choice_file_with_mapped_columns(tmp_path, capsys, adapter_dirs):
    rows = [{"q": r["question"], "options": r["choices"], "label": r["answer"], "topic": r.get("subject")}
            for r in QUESTIONS]
    data = tmp_path / "mc.json"
    data.write_text(json.dumps({"rows": rows}))
    out = tmp_path / "mc-report"
    code, _, _ = run(capsys, "--model", "tiny-llama", "--adapter", f"qv={adapter_dirs['qv']}", "--data", str(data),
                     "--columns", "question=q", "--columns", "choices=options", "--columns", "answer=label",
                     "--columns", "subject=topic", "--no-regression", "--out", str(out))
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["subjects"]["qv"]) == {"all", "animals", "colors", "overall"}
    assert report["scores"]["qv"]["multiple_choice"] == report["subjects"]["qv"]["overall"]
    assert report["regression_items"] == 0 and "regression" not in report["scores"]["base"]


@pytest.mark.parametrize("rows, message", [
    ([{**QUESTIONS[0], "answer": 5}], "mc.jsonl:1: answer 5 is out of range; give 0..2 or a letter A..C"),
    ([QUESTIONS[1], {**QUESTIONS[0], "choices": []}], "mc.jsonl:2: choices is empty; give at least two choices"),
    ([{"question": "Which?", "choices": ["a", "b"]}],
     "mc.jsonl:1: missing column 'answer' (answer); the record has ['choices', 'question']"),
])
def test_bad_questions_are_one_error_line(tmp_path, capsys, rows, message):
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = run(capsys, "--model", "tiny-llama", "--data", str(data), "--no-regression",
                       "--out", str(tmp_path / "out"))
    assert code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_an_adapter_for_another_base_is_one_error_line(tmp_path, capsys, conversation_file):
    other = save_peft_adapter(tmp_path / "other", seed=0, model_overrides={"hidden_size": 32, "head_dim": 8}, r=4,
                              target_modules=["q_proj"])
    code, _, err = run(capsys, "--model", "tiny-llama", "--adapter", str(other), "--data", str(conversation_file),
                       "--out", str(tmp_path / "out"))
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error: adapter 'other' (") and "does not fit this base model (tiny-llama)" in err
    assert "q_proj" in err and "has shape" in err


@pytest.mark.parametrize("argv, message", [
    (["--data", "x.jsonl"], "give either a run CONFIG"),
    (["--model", "tiny-llama"], "--data FILE is required with --model"),
    (["--model", "tiny-llama", "--data", "x.jsonl", "--adapter", "a=/x", "--adapter", "a=/y"],
     "--adapter: the name 'a' is given twice"),
    (["--model", "tiny-llama", "--data", "x.jsonl", "--columns", "answer"], "--columns 'answer': expected FIELD=COLUMN"),
])
def test_bad_arguments_name_the_flag(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err


def test_unknown_metric_is_named(capsys, conversation_file):
    code, _, err = run(capsys, "--model", "tiny-llama", "--data", str(conversation_file), "--metrics", "bleu,acc")
    assert code == 2 and "unknown metrics ['acc']; choose from ['perplexity', 'exact_match'" in err


def test_a_run_config_scores_the_run_adapter_as_the_trainer_did(tmp_path, capsys):
    """The trainer's before/after held-out accuracy comes out of ``evaluate``; ``loraforge eval CONFIG`` finds
    the run's adapter and test split and reports the same numbers, generating on the engine."""
    from loraforge.config import load_config
    from loraforge.train import run_training

    rows = [{**r, "output": "YES"} for r in CONVERSATIONS]  # one reply: learnt in a few dozen steps
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump({
        "model": {"source": "tiny-llama", "threads": 1},
        "adapter": {"r": 8, "alpha": 16},
        "data": {"train_files": str(tmp_path / "train.jsonl"), "test_files": str(tmp_path / "test.jsonl"),
                 "cutoff_len": 64, "test_max_new_tokens": 8},
        "train": {"batch_size": 4, "lr": 1e-2, "max_steps": 60, "logging_steps": 10},  # 3e-2 diverged with 1e-7 changes
        "output": {"dir": str(tmp_path / "run"), "tensorboard": False, "plot": False},
    }))
    summary = run_training(load_config(config_path), echo=lambda *_: None).summary
    code, _, _ = run(capsys, str(config_path), "--no-regression")
    assert code == 0
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    assert report["labels"] == ["base", "run"] and report["backend"] == "engine"
    assert report["scores"]["base"]["exact_match"] == summary["test_exact_match_before"]
    assert report["scores"]["run"]["exact_match"] == summary["test_exact_match_after"]
    assert summary["test_exact_match_after"] > summary["test_exact_match_before"]  # it learned something


def test_an_exported_gguf_scores_as_the_merged_model(tmp_path, capsys, adapter_dirs, conversation_file, tokenizer):
    from loraforge.adapters import load_adapter
    from loraforge.export.gguf_writer import write_gguf

    model = tiny_model("tiny-llama")
    load_adapter(model, adapter_dirs["mlp"])
    write_gguf(model, tokenizer, tmp_path / "merged.gguf", "f16")
    expected = evaluate(reference_model(adapter_dirs["mlp"]), tokenizer, read_eval_data(conversation_file),
                        options=EvalOptions(metrics=("perplexity",)))
    for native in ([], ["--native-gguf"]):
        out = tmp_path / f"report{len(native)}"
        code, _, _ = run(capsys, "--model", str(tmp_path / "merged.gguf"), *native, "--data", str(conversation_file),
                         "--metrics", "perplexity,exact_match", "--no-regression", "--out", str(out))
        assert code == 0
        report = json.loads((out / "report.json").read_text())
        assert report["scores"]["base"]["loss"] == pytest.approx(expected.scores["base"]["loss"], rel=2e-3)  # F16
        assert report["backend"] == "engine" and len(report["answers"]["base"]) == len(CONVERSATIONS)
