"""Scaling from 1 to 2 training processes (torch.distributed on CPU, gloo): DDP and FSDP2 against one process.

Every variant is ``loraforge train`` on the same config (the default model, LoRA all-linear, the quickstart
data, one global micro-batch per step), run one after the other in this invocation:

- ``1 process, 1 thread``: the baseline each rank of a 2-process run is;
- ``1 process, 2 threads``: what one process makes of both cores;
- ``ddp`` / ``fsdp``: ``loraforge train --nproc 2``, 1 thread per process.

Scaling efficiency = tokens/s of 2 processes / (2 x tokens/s of 1 process at 1 thread). tokens/s is rank 0's
``summary.json`` (all ranks' tokens over rank 0's training time, first step included). The final losses
must agree (same global batches), which the table shows.

    flock /work/helpers/bench.lock python benchmarks/distributed_train.py [--steps 6] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from report import append_result, markdown_table

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "quickstart_train.jsonl"


def run(folder: Path, name: str, args, threads: int, strategy: str, nproc: int) -> dict:
    config = {
        "model": {"source": args.model, "threads": threads},
        "adapter": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
        "data": {"train_files": [str(DATA)], "cutoff_len": args.cutoff},
        "train": {"seed": 0, "max_steps": args.steps, "batch_size": args.batch, "lr": 1e-4,
                  "scheduler": "constant", "distributed": strategy},
        "output": {"dir": str(folder / name), "tensorboard": False, "plot": False},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "loraforge.cli.main", "train", str(path)]
    if nproc > 1:
        command[4:4] = ["--nproc", str(nproc)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    summary = json.loads((folder / name / "summary.json").read_text())
    return {"tokens_per_s": summary["tokens_per_s"], "loss": summary["train_loss"],
            "peak_gb": summary["peak_memory_bytes"] / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8, help="global micro-batch (each of 2 ranks takes half)")
    parser.add_argument("--cutoff", type=int, default=256)
    args = parser.parse_args()
    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    variants = [("1 process, 1 thread", 1, "none", 1), ("1 process, 2 threads", 2, "none", 1),
                ("ddp, 2 processes x 1 thread", 1, "ddp", 2), ("fsdp, 2 processes x 1 thread", 1, "fsdp", 2)]
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        results = {label: run(Path(tmp), f"v{i}", args, threads, strategy, nproc)
                   for i, (label, threads, strategy, nproc) in enumerate(variants)}
    base = results["1 process, 1 thread"]["tokens_per_s"]
    rows = []
    for label, _, _, nproc in variants:
        r = results[label]
        efficiency = f"{r['tokens_per_s'] / (2 * base):.2f}" if nproc > 1 else "-"
        rows.append([label, f"{r['tokens_per_s']:.0f}", f"{r['tokens_per_s'] / base:.2f}", efficiency,
                     f"{r['peak_gb']:.2f}", f"{r['loss']:.4f}"])
    append_result(
        f"Distributed training on CPU: 1 vs 2 processes ({args.model}, LoRA r=16 all-linear, global batch "
        f"{args.batch}, cutoff {args.cutoff}, {args.steps} steps)",
        markdown_table(["variant", "tokens/s", "speed-up vs 1x1", "scaling efficiency", "rank-0 peak RSS GB",
                        "final loss"], rows),
        f"Load while measuring (`uptime` before the first run): {uptime}. Scaling efficiency = 2-process tokens/s / "
        "(2 x the 1-process 1-thread tokens/s); tokens/s includes the first step. On 2 shared cores, 2 processes "
        "compete with the other jobs on this machine and with each other's gloo traffic (the all-reduce / "
        "all-gather / reduce-scatter go through loopback TCP, on the same cores that compute); this measures the "
        "overhead of the distributed path, not the GPU scaling it is for. FSDP's rank-0 memory is lower because "
        "it holds half of the frozen base weights between layers.")


if __name__ == "__main__":
    main()
