"""Training runs as background processes, and what their folders say about them.

A run is started as ``loraforge train CONFIG`` in its own session (``start_new_session``), so it outlives
whoever started it: a browser tab, the web server, a terminal. Everything about it is on disk, so any
later process re-attaches by reading folders:

- ``<runs_root>/<name>/``: the run folder ``train.run`` writes (config.yaml, metrics.jsonl, checkpoints/,
  adapter/, summary.json);
- ``<runs_root>/.launches/<name>/``: what the launcher adds: ``config.yaml`` (the config as started),
  ``train.log`` (the process's stdout and stderr, progress bar included) and ``process.json`` (pid, the
  process's start time, to tell a recycled pid apart, and the command).

Stopping sends SIGINT, the trainer's Ctrl-C path: it finishes the step, saves a checkpoint and exits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from loraforge.config import Config, save_config
from loraforge.train.checkpoint import latest_checkpoint
from loraforge.train.runlog import read_metrics
from loraforge.utils.atomic import atomic_file

LAUNCHES = ".launches"
LOG_FILE = "train.log"
PROCESS_FILE = "process.json"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_PROGRESS = re.compile(r"(\d+)/(\d+) \[([\d:]+)<([\d:?]+)")
"""tqdm's ``done/total [elapsed<remaining`` in the log."""


class RunError(ValueError):
    """A run can't be started, stopped or resumed as asked; the message says why and what to do."""


@dataclass(frozen=True)
class Progress:
    step: int
    total: int
    elapsed: str
    eta: str


@dataclass(frozen=True)
class RunInfo:
    """What a run's folders say. ``status``: running | finished | stopped | failed | waiting (a folder
    without a live process, a checkpoint or a final adapter)."""

    name: str
    run_dir: Path
    status: str
    pid: int | None
    started: float | None
    progress: Progress | None
    error: str | None

    @property
    def adapter_dir(self) -> Path | None:
        path = self.run_dir / "adapter"
        return path if (path / "adapter_config.json").is_file() else None

    @property
    def checkpoint(self) -> Path | None:
        return latest_checkpoint(self.run_dir)

    def config(self) -> dict:
        """The run's config as plain data: the resolved one it saved, else the one it was started with."""
        for path in (self.run_dir / "config.yaml", _launch_dir(self.run_dir) / "config.yaml"):
            if path.is_file():
                return yaml.safe_load(path.read_text()) or {}
        return {}

    def metrics(self) -> list[dict]:
        return read_metrics(self.run_dir)

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(_launch_dir(self.run_dir) / LOG_FILE, lines)


def start_run(config: Config, runs_root: str | os.PathLike, name: str, extra_args: tuple[str, ...] = ()) -> RunInfo:
    """Start ``loraforge train`` on ``config`` with ``output.dir = <runs_root>/<name>``, detached.

    Raises:
        RunError: a bad name, or a run of that name that is still running.
    """
    if not NAME.match(name):
        raise RunError(f"run name {name!r}: use letters, digits, '.', '_' or '-' (at most 100), starting with a "
                       "letter or digit")
    run_dir = Path(runs_root).absolute() / name
    existing = run_info(run_dir)
    if existing.status == "running":
        raise RunError(f"run {name!r} is running (pid {existing.pid}); stop it first or choose another name")
    config = dataclasses.replace(config, output=dataclasses.replace(config.output, dir=str(run_dir)))
    launch = _launch_dir(run_dir)
    launch.mkdir(parents=True, exist_ok=True)
    save_config(config, launch / "config.yaml")
    return _spawn(run_dir, [str(launch / "config.yaml"), *extra_args])


def resume_run(run_dir: str | os.PathLike) -> RunInfo:
    """Start the run again from its latest checkpoint, with the config it saved.

    Raises:
        RunError: it is running, or it has no checkpoint to resume from.
    """
    info = run_info(Path(run_dir))
    if info.status == "running":
        raise RunError(f"run {info.name!r} is still running (pid {info.pid})")
    if info.checkpoint is None or not (info.run_dir / "config.yaml").is_file():
        raise RunError(f"run {info.name!r} has no checkpoint to resume from (set train.save_steps, or stop it with "
                       "the stop button, which checkpoints first)")
    return _spawn(info.run_dir, [str(info.run_dir / "config.yaml"), "train.resume_from_checkpoint=latest"])


def stop_run(run_dir: str | os.PathLike) -> RunInfo:
    """Ask a running run to stop as Ctrl-C does: it saves a checkpoint after the current step, then exits.

    Raises:
        RunError: it isn't running.
    """
    info = run_info(Path(run_dir))
    if info.status != "running" or info.pid is None:
        raise RunError(f"run {info.name!r} is not running ({info.status})")
    os.kill(info.pid, signal.SIGINT)
    return info


def list_runs(runs_root: str | os.PathLike) -> list[RunInfo]:
    """Every run under ``runs_root`` (folders with a saved config, or launched by ``start_run``), newest first."""
    root = Path(runs_root).absolute()
    names = set()
    for base in (root, root / LAUNCHES):
        if base.is_dir():
            names |= {p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")
                      and ((p / "config.yaml").is_file() or (p / PROCESS_FILE).is_file())}
    runs = [run_info(root / name) for name in names]
    return sorted(runs, key=lambda r: r.started or _mtime(r.run_dir), reverse=True)


def run_info(run_dir: Path) -> RunInfo:
    run_dir = Path(run_dir).absolute()
    launch = _launch_dir(run_dir)
    process = _read_json(launch / PROCESS_FILE)
    pid = process.get("pid")
    alive = pid is not None and _alive(pid, process.get("proc_start"))
    log = launch / LOG_FILE
    text = log.read_text(errors="replace").rpartition("\n$ loraforge train ")[2] if log.is_file() else ""
    if alive:
        status = "running"
    elif (run_dir / "summary.json").is_file() and (run_dir / "adapter").is_dir():
        status = "finished"
    elif pid is not None and "\nerror: " in text:
        status = "failed"
    elif latest_checkpoint(run_dir) is not None:
        status = "stopped"
    elif pid is not None:
        status = "failed"
    else:
        status = "waiting"
    return RunInfo(run_dir.name, run_dir, status, pid if alive else None, process.get("started"), _progress(text),
                   _error(text) if status == "failed" else None)


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log, with a progress bar's carriage-return redraws collapsed to the last."""
    if not path.is_file():
        return ""
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - 64 * 1024))
        text = f.read().decode(errors="replace")
    kept = [line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r") for line in text.split("\n")]
    return "\n".join(kept[-lines:])


def smoothed(values: list[float], weight: float) -> list[float]:
    """Exponential moving average (TensorBoard's smoothing, debiased): ``weight`` 0 = raw, 0.99 = very smooth."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i) if weight < 1 else value)
    return out


def config_diff(a: dict, b: dict) -> list[tuple[str, object, object]]:
    """``(dotted key, value in a, value in b)`` for every leaf key of two configs, in order."""
    rows: list[tuple[str, object, object]] = []

    def walk(x, y, prefix):
        keys = list(dict.fromkeys([*(x or {}), *(y or {})]))
        for key in keys:
            u, v = (x or {}).get(key), (y or {}).get(key)
            if isinstance(u, dict) or isinstance(v, dict):
                walk(u if isinstance(u, dict) else {}, v if isinstance(v, dict) else {}, f"{prefix}{key}.")
            else:
                rows.append((f"{prefix}{key}", u, v))

    walk(a, b, "")
    return rows


def _spawn(run_dir: Path, args: list[str]) -> RunInfo:
    launch = _launch_dir(run_dir)
    launch.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "loraforge.cli.main", "train", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with (launch / LOG_FILE).open("ab") as log:
        log.write(f"\n$ loraforge train {' '.join(args)}\n".encode())
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, env=env)
    _REAPED[process.pid] = process
    record = {"pid": process.pid, "proc_start": _proc_start(process.pid), "started": time.time(), "command": command}
    atomic_file(launch / PROCESS_FILE, lambda tmp: Path(tmp).write_text(json.dumps(record)))
    return run_info(run_dir)


_REAPED: dict[int, subprocess.Popen] = {}
"""Children this process started: polled so that a finished one doesn't linger as a zombie."""


def _alive(pid: int, proc_start: int | None) -> bool:
    child = _REAPED.get(pid)
    if child is not None and child.poll() is not None:
        return False
    stat = _stat_fields(pid)
    if stat is None or stat[0] == "Z":
        return False
    return proc_start is None or int(stat[19]) == proc_start


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), or None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _proc_start(pid: int) -> int | None:
    stat = _stat_fields(pid)
    return int(stat[19]) if stat else None


def _progress(log_text: str) -> Progress | None:
    found = _PROGRESS.findall(log_text[-4096:])
    if not found:
        return None
    step, total, elapsed, eta = found[-1]
    return Progress(int(step), int(total), elapsed, eta)


def _error(log_text: str) -> str | None:
    lines = log_text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("error: "):
            return "\n".join([line.removeprefix("error: "), *lines[i + 1:]]).strip()
    tail = [line for line in lines if line.strip()][-3:]
    return "\n".join(tail) or None


def _launch_dir(run_dir: Path) -> Path:
    return run_dir.parent / LAUNCHES / run_dir.name


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
