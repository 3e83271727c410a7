"""The Watch and Runs tabs: everything they show is read from the run folders (``train.runs``), so a
reloaded page or a restarted server shows the same runs, running or not."""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr
import matplotlib.pyplot as plt

from loraforge.train.runs import (
    RunError,
    config_diff,
    list_runs,
    resume_run,
    run_info,
    stop_run,
)
from loraforge.webui.charts import compare_figure, run_figure

REFRESH_SECONDS = 2.0


def run_names(runs_root: Path) -> list[str]:
    return [r.name for r in list_runs(runs_root)]


def status_line(runs_root: Path, name: str | None) -> str:
    if not name:
        return "No run yet: start one in the Train tab."
    info = run_info(runs_root / name)
    parts = [f"**{info.name}**: {info.status}"]
    if info.pid:
        parts.append(f"pid {info.pid}")
    if info.progress:
        p = info.progress
        parts.append(f"step {p.step}/{p.total} ({100 * p.step // max(p.total, 1)}%), elapsed {p.elapsed}, "
                     f"ETA {p.eta}")
    if info.checkpoint:
        parts.append(f"checkpoint: {info.checkpoint.name}")
    if info.adapter_dir:
        parts.append(f"adapter: `{info.adapter_dir}`")
    line = " · ".join(parts)
    if info.error:
        line += f"\n\n⚠ {info.error}"
    return line


class WatchTab:
    def __init__(self, runs_root: Path):
        self.runs_root = runs_root

    def build(self) -> None:
        with gr.Row():
            self.run = gr.Dropdown([], label="Run", elem_id="watch-run", scale=3)
            refresh = gr.Button("Refresh list", scale=1)
            stop = gr.Button("Stop (checkpoint first)", variant="stop", elem_id="stop", scale=1)
            resume = gr.Button("Resume", elem_id="resume", scale=1)
        status = gr.Markdown(elem_id="watch-status")
        with gr.Row():
            smoothing = gr.Slider(0, 0.99, value=0.6, step=0.01, label="Loss smoothing", elem_id="smoothing")
            log_scale = gr.Checkbox(False, label="Log-scale loss", elem_id="log-scale")
        chart = gr.Plot(show_label=False, elem_id="watch-chart", format="png")
        chart_caption = gr.Markdown(elem_id="watch-chart-caption")
        log = gr.Textbox(label="Log (tail)", lines=12, max_lines=12, interactive=False, elem_id="watch-log",
                         elem_classes=["mono"])
        timer = gr.Timer(REFRESH_SECONDS)

        outputs = [status, chart, chart_caption, log]
        timer.tick(self._update, [self.run, smoothing, log_scale], outputs, show_progress="hidden")
        for trigger in (self.run.change, smoothing.release, log_scale.change):
            trigger(self._update, [self.run, smoothing, log_scale], outputs)
        refresh.click(self._choices, self.run, self.run)
        stop.click(self._stop, self.run, status)
        resume.click(self._resume, self.run, status)

    def _choices(self, current: str | None = None):
        names = run_names(self.runs_root)
        return gr.update(choices=names, value=current if current in names else (names[0] if names else None))

    def _update(self, name: str | None, smoothing: float, log_scale: bool):
        if not name:
            return status_line(self.runs_root, None), None, "", ""
        info = run_info(self.runs_root / name)
        records = info.metrics()
        figure = run_figure(records, smoothing, log_scale)
        plt.close(figure)
        losses = [r for r in records if "loss" in r]
        caption = (f"{len(losses)} loss points, last at step {losses[-1]['step']}: {losses[-1]['loss']:.4f}"
                   if losses else "no loss logged yet")
        return status_line(self.runs_root, name), figure, caption, info.log_tail()

    def _stop(self, name: str | None):
        try:
            stop_run(self.runs_root / (name or ""))
        except RunError as err:
            return f"⚠ {err}"
        return f"Stopping **{name}**: it saves a checkpoint after the current step."

    def _resume(self, name: str | None):
        try:
            info = resume_run(self.runs_root / (name or ""))
        except RunError as err:
            return f"⚠ {err}"
        return f"Resumed **{info.name}** (pid {info.pid})."


class RunsTab:
    def __init__(self, runs_root: Path):
        self.runs_root = runs_root

    def build(self) -> None:
        table = gr.Dataframe(headers=["run", "status", "steps", "last loss", "eval loss", "adapter"],
                             interactive=False, label="Runs", elem_id="runs-table")
        refresh = gr.Button("Refresh")
        with gr.Row():
            self.a = gr.Dropdown([], label="Run A", elem_id="compare-a")
            self.b = gr.Dropdown([], label="Run B", elem_id="compare-b")
        diff = gr.HTML(elem_id="config-diff")
        chart = gr.Plot(show_label=False, elem_id="compare-chart", format="png")
        refresh.click(self._table, None, table)
        self.table = table
        for trigger in (self.a.change, self.b.change):
            trigger(self._compare, [self.a, self.b], [diff, chart])

    def _table(self):
        rows = []
        for info in list_runs(self.runs_root):
            records = info.metrics()
            losses = [r["loss"] for r in records if "loss" in r]
            evals = [r["eval_loss"] for r in records if "eval_loss" in r]
            rows.append([info.name, info.status, max((r["step"] for r in records), default=0),
                         f"{losses[-1]:.4f}" if losses else "", f"{evals[-1]:.4f}" if evals else "",
                         "yes" if info.adapter_dir else ""])
        return rows

    def _compare(self, a: str | None, b: str | None):
        names = [n for n in (a, b) if n]
        if not names:
            return "", None
        infos = [run_info(self.runs_root / n) for n in names]
        figure = compare_figure({i.name: i.metrics() for i in infos}, 0.6, False)
        plt.close(figure)
        if len(infos) < 2:
            return "<p>Pick a second run to compare configs.</p>", figure
        return diff_table(infos[0].name, infos[0].config(), infos[1].name, infos[1].config()), figure


def diff_table(name_a: str, a: dict, name_b: str, b: dict) -> str:
    """An HTML table of both configs, differing keys first and highlighted."""
    rows = config_diff(a, b)
    differing = [row for row in rows if row[1] != row[2]]
    same = [row for row in rows if row[1] == row[2]]

    def table(rows, cls: str) -> str:
        head = f"<tr><th>key</th><th>{html.escape(name_a)}</th><th>{html.escape(name_b)}</th></tr>"
        body = "".join(f"<tr class='{cls}'><td>{html.escape(key)}</td><td>{html.escape(repr(u))}</td>"
                       f"<td>{html.escape(repr(v))}</td></tr>" for key, u, v in rows)
        return f"<table class='config-diff'>{head}{body}</table>"

    return (f"<p>{len(differing)} of {len(rows)} keys differ.</p>{table(differing, 'differs')}"
            f"<details><summary>{len(same)} identical keys</summary>{table(same, 'same')}</details>")
