"""Matplotlib figures of runs' metrics.jsonl for the Watch and Runs tabs."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FormatStrFormatter, ScalarFormatter

from loraforge.train.runs import smoothed

PANELS = (("loss", "train loss"), ("eval_loss", "eval loss"), ("lr", "learning rate"), ("grad_norm", "grad norm"),
          ("tokens_per_s", "tokens/s"))
"""metrics.jsonl keys drawn, with their titles; a key the run never logged gets an empty panel saying so."""


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def run_figure(records: list[dict], smoothing: float, log_scale: bool):
    """One panel per ``PANELS`` entry; the train loss raw (faint) and smoothed."""
    fig, axes = plt.subplots(1, len(PANELS), figsize=(16, 3.2), constrained_layout=True)
    for ax, (key, title) in zip(axes, PANELS):
        steps, values = series(records, key)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if not steps:
            ax.text(0.5, 0.5, "not logged yet", ha="center", va="center", transform=ax.transAxes, color="gray")
            continue
        if key == "loss":
            ax.plot(steps, values, color="tab:blue", alpha=0.3, lw=1)
            ax.plot(steps, smoothed(values, smoothing), color="tab:blue", lw=2)
            if log_scale:
                ax.set_yscale("log")
                ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
            ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
        else:
            ax.plot(steps, values, "o-" if len(steps) < 20 else "-", ms=3, color="tab:orange")
            low, high = min(values), max(values)
            if high - low <= 1e-3 * max(abs(low), abs(high)):  # flat (an lr over 1e5 steps): no 1e-9 ticks
                pad = 0.05 * max(abs(low), abs(high)) or 1.0
                ax.set_ylim(low - pad, high + pad)
            plain = ScalarFormatter(useOffset=False, useMathText=True)
            plain.set_powerlimits((-3, 4))  # 1e-4 reads as 1 with x10^-4 above the axis, never as an offset
            ax.yaxis.set_major_formatter(plain)
        ax.set_xlabel("step", fontsize=8)
    return fig


def compare_figure(runs: dict[str, list[dict]], smoothing: float, log_scale: bool):
    """Train (solid) and eval (dashed) loss of several runs on one chart."""
    fig, ax = plt.subplots(figsize=(9, 3.8), constrained_layout=True)
    for i, (name, records) in enumerate(runs.items()):
        color = f"C{i}"
        steps, values = series(records, "loss")
        if steps:
            ax.plot(steps, smoothed(values, smoothing), color=color, lw=2, label=f"{name} train")
        steps, values = series(records, "eval_loss")
        if steps:
            ax.plot(steps, values, "o--", color=color, ms=4, label=f"{name} eval")
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    return fig
