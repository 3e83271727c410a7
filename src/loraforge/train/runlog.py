"""Run logging: metrics as JSONL and TensorBoard events, a progress bar, and a loss-curve PNG."""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from loraforge.utils.atomic import atomic_file

METRICS = "metrics.jsonl"


class RunLog:
    """Appends metric records to ``metrics.jsonl`` (and TensorBoard) and drives the progress bar.

    On resume, records after ``start_step`` (written after the checkpoint by the interrupted run) are
    dropped, so the log reads as one uninterrupted run.
    """

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, tensorboard: bool):
        self.path = run_dir / METRICS
        self._truncate_after(start_step)
        self.file = self.path.open("a")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        file=sys.stderr)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= step]
        atomic_file(self.path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)

    def progress(self, steps: int, loss: float, lr: float, tokens_per_s: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
        self.bar.update(steps)

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def _step_of(line: str) -> float:
    """The step of a metrics line; infinity for a blank line or one torn by a crash mid-write, so it is dropped."""
    try:
        return json.loads(line)["step"]
    except ValueError:
        return math.inf


def plot_loss_curve(run_dir: Path) -> Path | None:
    """``loss_curve.png`` from ``metrics.jsonl``: train loss per step, eval loss where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    target = run_dir / "loss_curve.png"
    atomic_file(target, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)
    return target


def peak_memory_bytes(device: torch.device) -> int:
    """Peak device memory for CUDA, else the process's peak resident set size.

    On Linux that is ``VmHWM`` of /proc/self/status: ``ru_maxrss`` survives ``exec``, so a run started
    by a big process (a web server holding a model) would report its parent's peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
