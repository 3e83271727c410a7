"""The native low-bit kernel on cold weights: one decode token's matmuls over the default model's Q4_1 GGUF.

The serving engine's single-stream decode runs, per layer, q/k/v (one fused call), o, gate/up (one fused call)
and down, then the Q8_0 head, each on one input row. Its ~92 MiB of weights don't fit this CPU's caches, so in
the real sequence every call reads its weights from DRAM; a microbenchmark that repeats one call reads them from
cache. This script times, with 1 thread, in one process:

- ``cold``: the whole sequence in decode order (30 layers, then the head), the kernel calls exactly as the engine
  makes them (``serve.ModelRunner``'s ``FusedKernel``s and the head's ``NativeGroup``), each call timed; the
  median and the best over ``--rounds`` passes, per kind of call (the best is the least disturbed by the other
  processes of a shared machine);
- ``hot``: each kind's first call repeated back to back (weights in cache);
- the GB/s of each (the weights' stored bytes: codes, scales, mins, over the time), against a plain memory-read
  probe in the same run (``torch.sum`` of a 256 MiB int64 buffer, best of 5: what one core reads from DRAM).

    flock /work/helpers/bench.lock python benchmarks/native_decode_stream.py [--rounds 30] [--isa avx512_vnni]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from report import append_result, markdown_table
from serve_slora import load_average

from loraforge.native import LOWBIT
from loraforge.quant import kernels
from loraforge.serve.base_model import load_serving_base
from loraforge.serve.runner import ModelRunner

PROBE_BYTES = 256 << 20


def read_bandwidth() -> float:
    """GB/s of one thread summing a 256 MiB buffer (best of 5)."""
    buf = torch.ones(PROBE_BYTES // 8, dtype=torch.int64)
    best = float("inf")
    for _ in range(6):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return PROBE_BYTES / best / 1e9


def decode_calls(model, isa: str) -> list[tuple[str, int, object]]:
    """``(kind, weight bytes, call)`` of one decode token's native-kernel calls, in the engine's order."""
    runner = ModelRunner(model)
    lib = LOWBIT.library()
    calls = []

    def add(kind, group, in_features):
        x = torch.randn(1, in_features, dtype=torch.bfloat16)
        nbytes = sum(t.numel() * t.element_size() for tensors in group.tensors for t in tensors)
        calls.append((kind, nbytes, lambda: lib.mm(x, *group.tensors, *group.layout, isa)))

    for i in range(runner.num_layers):
        for kind, fused in (("q/k/v", runner.fused_qkv[i]), ("o", runner.fused_o[i]),
                            ("gate/up", runner.fused_gate_up[i]), ("down", runner.fused_down[i])):
            add(kind, fused.packed.native, fused.modules[0].in_features)
    head = model.lm_head
    add("head (Q8_0)", kernels._native_group(head.qweight), head.in_features)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--hot-repeats", type=int, default=200)
    parser.add_argument("--isa", default="", help="instruction set (default: the fastest this CPU runs)")
    parser.add_argument("--no-record", action="store_true", help="print only; don't append to BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = load_average()
    model, _ = load_serving_base("default", "auto")
    calls = decode_calls(model, args.isa)
    kinds = list(dict.fromkeys(kind for kind, _, _ in calls))
    probe = [read_bandwidth()]
    cold = {kind: [] for kind in kinds}
    totals = []
    for _ in range(args.rounds):
        per_kind = dict.fromkeys(kinds, 0.0)
        start_all = time.perf_counter()
        for kind, _, call in calls:
            start = time.perf_counter()
            call()
            per_kind[kind] += time.perf_counter() - start
        totals.append(time.perf_counter() - start_all)
        for kind in kinds:
            cold[kind].append(per_kind[kind])
    probe.append(read_bandwidth())
    hot = {}
    for kind in kinds:
        call = next(c for k, _, c in calls if k == kind)
        call()
        times = []
        for _ in range(args.hot_repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        hot[kind] = statistics.median(times)
    probe.append(read_bandwidth())
    bandwidth = max(probe)
    rows = []
    for kind in kinds:
        nbytes = sum(b for k, b, _ in calls if k == kind)
        count = sum(1 for k, _, _ in calls if k == kind)
        t_cold, t_best, t_hot = statistics.median(cold[kind]), min(cold[kind]), hot[kind] * count
        rows.append([kind, count, f"{nbytes / 2**20:.1f}", f"{t_cold * 1e3:.3f}", f"{nbytes / t_cold / 1e9:.1f}",
                     f"{t_best * 1e3:.3f}", f"{nbytes / t_best / 1e9:.1f}", f"{t_hot * 1e3:.3f}",
                     f"{nbytes / t_hot / 1e9:.1f}", f"{nbytes / t_best / 1e9 / bandwidth:.2f}"])
    total_bytes = sum(b for _, b, _ in calls)
    t_total, t_best = statistics.median(totals), min(totals)
    rows.append(["all (one token)", len(calls), f"{total_bytes / 2**20:.1f}", f"{t_total * 1e3:.3f}",
                 f"{total_bytes / t_total / 1e9:.1f}", f"{t_best * 1e3:.3f}", f"{total_bytes / t_best / 1e9:.1f}", "", "",
                 f"{total_bytes / t_best / 1e9 / bandwidth:.2f}"])
    lib = LOWBIT.library()
    table = markdown_table(["calls", "count", "MiB", "cold ms (median)", "GB/s", "cold ms (best)", "GB/s", "hot ms",
                            "hot GB/s", "cold best / read probe"], rows)
    notes = (f"Kernel {LOWBIT.status()}, ISA {args.isa or lib.available_isas()[0]}; bf16 input rows of 1 token; median "
             f"and best of {args.rounds} passes of the whole sequence (cold) and median of {args.hot_repeats} repeats of one call (hot, "
             f"times the count). Read probe (torch.sum of 256 MiB int64, 1 thread, best of 5, three times): "
             f"{', '.join(f'{p:.1f}' for p in probe)} GB/s. Load average (1 min) before: {load_before}; after: "
             f"{load_average()}.")
    if args.no_record:
        print(table, "\n", notes)
    else:
        append_result("Native low-bit kernel on cold weights: one decode token (default model Q4_1, 1 thread)", table,
                      notes)


if __name__ == "__main__":
    main()
