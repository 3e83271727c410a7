"""Whether a native library's ``at::parallel_for`` really splits its work over torch's threads.

No result shows it (each row is computed alone either way), only where the CPU time is spent: a library built
without OpenMP runs every row on the calling thread. So the check runs calls with two torch threads and reads
each OS thread's CPU time (``/proc/self/task/*/stat``) before and after.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds() -> dict[int, float]:
    """CPU seconds (user + system) of each thread of this process, by thread id."""
    seconds = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        seconds[int(task.name)] = (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
    return seconds


def worker_share(call: Callable[[], object], seconds: float = 0.6) -> float:
    """The other threads' share of the CPU time spent while ``call`` runs, repeated for about ``seconds``, with
    two torch threads: ~0.5 where the work is split, ~0 where it all runs on the calling thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        call()  # warm: the library loaded, torch's pool started
        time.sleep(0.05)  # the pool's threads stop spinning
        me = threading.get_native_id()
        before, start = _cpu_seconds(), time.perf_counter()
        while time.perf_counter() - start < seconds:
            call()
        after = _cpu_seconds()
    finally:
        torch.set_num_threads(threads)
    spent = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    total = sum(spent.values())
    return (total - spent.get(me, 0.0)) / total if total else 0.0
