"""Forward latency of the default model: base vs merged LoRA vs unmerged LoRA, in one run.

LoRA's promise: once merged, the adapter adds no inference latency (ratio ≈ 1.00). The three
variants run interleaved, round after round, on the same model object (merge/unmerge in place), and
the median per variant is compared, so machine noise hits all three alike.

    python benchmarks/lora_latency.py [--rounds 15] [--batch 1] [--seq 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from loraforge.adapters import AdapterSpec, add_adapter, disable_adapters, merge_adapters, unmerge_adapters
from loraforge.models import load_model
from report import append_result, markdown_table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    model, _ = load_model(args.model)
    torch.manual_seed(0)
    add_adapter(model, AdapterSpec(r=args.rank, init="none", target_modules="all-linear"))
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))

    def forward() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model(ids, use_cache=False)
        return time.perf_counter() - start

    def base() -> float:
        with disable_adapters(model):
            return forward()

    def merged() -> float:
        merge_adapters(model)
        try:
            return forward()
        finally:
            unmerge_adapters(model)

    variants = {"base": base, "merged LoRA": merged, "unmerged LoRA": forward}
    for run in variants.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, run in variants.items():
            times[name].append(run())
    base_ms = statistics.median(times["base"]) * 1e3
    rows = []
    for name, samples in times.items():
        median_ms = statistics.median(samples) * 1e3
        spread = (statistics.quantiles(samples, n=4)[2] - statistics.quantiles(samples, n=4)[0]) * 1e3
        rows.append([name, f"{median_ms:.1f}", f"{spread:.1f}", f"{median_ms / base_ms:.3f}"])
    table = markdown_table(["variant", "median ms", "IQR ms", "ratio to base"], rows)
    append_result(
        f"LoRA forward latency ({args.model}, r={args.rank} all-linear, batch {args.batch}×{args.seq}, "
        f"{args.rounds} interleaved rounds)",
        table,
        "Merged LoRA is the base model's matmuls with different numbers: its ratio should sit within the IQR of 1.00.",
    )


if __name__ == "__main__":
    main()
