"""The report folder: complete or absent, never half-written; markdown cells that can't break the table."""

import json

import pytest

from loraforge.eval import EvalResult, write_report
from loraforge.eval import report as report_module


def result(exact_base=0.5, exact_adapter=0.75):
    return EvalResult(
        labels=["base", "tuned"],
        scores={"base": {"perplexity": 9.0, "exact_match": exact_base},
                "tuned": {"perplexity": 7.5, "exact_match": exact_adapter}},
        examples=[{"origin": "t.jsonl:3", "prompt": "a | b\nc", "reference": "x", "answers": {"base": "y|z",
                                                                                               "tuned": "x"}}],
        items=4,
    )


def test_markdown_json_and_chart(tmp_path):
    out = write_report(result(), tmp_path / "report", {"model": "tiny-llama"})
    data = json.loads((out / "report.json").read_text())
    assert data["about"] == {"model": "tiny-llama"}
    assert data["changes"] == {"tuned": {"perplexity": -1.5, "exact_match": 0.25}}
    markdown = (out / "report.md").read_text()
    assert "| perplexity | 9.0000 | 7.5000 | -1.5000 (better) |" in markdown
    assert "| exact_match | 0.5000 | 0.7500 | +0.2500 (better) |" in markdown
    assert "| t.jsonl:3 | a \\| b c | x | y\\|z | x |" in markdown  # one row, pipes escaped
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failed_write_leaves_the_previous_report_whole(tmp_path, monkeypatch):
    out = write_report(result(), tmp_path / "report")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_plot(*_):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report_module, "plot_scores", broken_plot)
    with pytest.raises(RuntimeError, match="disk full"):
        write_report(result(0.0, 1.0), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no staging folder left behind
