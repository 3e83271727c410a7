"""The native fused dequantizer (``native/dequant.cpp``) against the torch decode it replaces, per layer.

For each of the default model's linear shapes and QLoRA's / QA-LoRA's formats (NF4 + double quant block 64, INT4
group 64, Q4_1), in one process and interleaved round by round: one decode of the whole layer (what training does
twice per layer and step), and a training forward + input-gradient backward of M = 1024 rows against the same
product with a dense weight (``extra``: what the quantized layer adds). The torch decode is the formats' own
fallback, taken by turning the library off (as on a CPU without a compiler). Times are the minimum over
``--reps`` calls and ``--rounds`` rounds.

    python benchmarks/native_dequant.py [--threads 1] [--reps 10] [--rounds 2] [--lock FILE] [--dry-run]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import time

import torch
from report import append_result, markdown_table
from torch import nn

from loraforge.native import DEQUANT
from loraforge.quant import native_dequant
from loraforge.quant.blockwise4bit import Blockwise4bitWeight
from loraforge.quant.intk import quantize_intk

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
"""The default model's (SmolLM2-135M) decoder linears: q/o, k/v, gate/up, down."""
FORMATS = {
    "nf4": lambda w: Blockwise4bitWeight.from_dense(w, "nf4", block_size=64, double_quant=True),
    "int4": lambda w: quantize_intk(w, bits=4, group_size=64),
    "q4_1": lambda w: quantize_intk(w, bits=4, group_size=32).to_q4_1(),
}
ROWS = 1024


def fastest(fn, reps: int) -> float:
    """The fastest of ``reps`` calls, in ms."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def measure(weight, dense: nn.Linear, x: torch.Tensor, grad: torch.Tensor, reps: int) -> list[float]:
    """``[one whole-layer decode, quantized fwd+bwd, dense fwd+bwd]`` in ms (fastest calls)."""
    out_features, in_features = weight.shape
    return [fastest(lambda: weight.tile_dequantizer()(slice(0, out_features), slice(0, in_features), torch.float32),
                    4 * reps),
            fastest(lambda: weight.matmul(x).backward(grad), reps),
            fastest(lambda: dense(x).backward(grad), reps)]


@contextlib.contextmanager
def held(path: str | None):
    if path is None:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lock", help="a file to flock around each round (a machine shared with other timings)")
    parser.add_argument("--dry-run", action="store_true", help="print the table, don't append it to BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if DEQUANT.library() is None:
        raise SystemExit(f"the native dequantizer is not built: {DEQUANT.status()}")
    on, off = DEQUANT._state, {"library": None, "reason": "the torch decode, for comparison"}
    cases = []
    for out_features, in_features in SHAPES:
        dense = nn.Linear(in_features, out_features, bias=False).requires_grad_(False)
        x = torch.randn(ROWS, in_features, requires_grad=True)
        grad = torch.randn(ROWS, out_features)
        for name, quantize in FORMATS.items():
            cases.append((f"{out_features}×{in_features}", name, dense, quantize(dense.weight.data), x, grad))
    best: dict[tuple, list[float]] = {}
    loads = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        with held(args.lock):
            for shape, name, dense, weight, x, grad in cases:
                for decode, state in (("torch", off), ("native", on)):
                    DEQUANT._state = state
                    times = measure(weight, dense, x, grad, args.reps)
                    key = (shape, name, decode)
                    best[key] = [min(a, b) for a, b in zip(best.get(key, times), times)]
            DEQUANT._state = on
        loads.append(os.getloadavg()[0])
    rows = []
    for shape, name, *_ in cases:
        t, n = best[(shape, name, "torch")], best[(shape, name, "native")]
        rows.append([shape, name, f"{t[0]:.3f}", f"{n[0]:.3f}", f"{t[0] / n[0]:.1f}×",
                     f"{t[1] - t[2]:+.2f}", f"{n[1] - n[2]:+.2f}", f"{n[2]:.2f}"])
    append_fn = print if args.dry_run else append_result
    append_fn(
        f"Native dequantizer vs the torch decode, per layer ({args.threads} thread(s), M = {ROWS}, fp32)",
        markdown_table(["layer", "format", "torch decode ms", "native decode ms", "decode speed-up",
                        "fwd+bwd extra over dense ms, torch decode", "same, native decode", "dense fwd+bwd ms"], rows),
        f"- native instruction set: {native_dequant.isa()} (torch's CPU capability: "
        f"{torch.backends.cpu.get_cpu_capability()}); ISA caps set: "
        f"{', '.join(f'{v}={os.environ[v]}' for v in ('ONEDNN_MAX_CPU_ISA', 'MKL_ENABLE_INSTRUCTIONS', 'ATEN_CPU_CAPABILITY') if v in os.environ) or 'none'}.\n"
        f"- decode: the whole layer once, fp32, best of {4 * args.reps} calls × {args.rounds} rounds; fwd+bwd: best of "
        f"{args.reps} × {args.rounds}; extra = quantized − dense, both with the input's gradient only (the noise of a "
        f"difference of two ~best-of times is a few tenths of a ms on a shared machine).\n"
        f"- Load average (1 min) of this shared machine: {' → '.join(f'{v:.2f}' for v in loads)}.",
    )


if __name__ == "__main__":
    main()
