"""In-process A/B of a quantized layer's backward on the default model's shapes (NF4 + double quant, LoRA r=16,
1024 tokens, fp32): the input gradient ``g (W + s·b a)`` and the adapter's ``g b`` as two products
(``kernels.input_grad``, then ``g @ b``) against one GEMM over ``[W + s·b a | b]`` (``kernels.input_grad_and_rank``,
what training runs). Cases alternate within each rep; min and median per shape, and the per-transformer-layer sum
of medians (q, k, v, o, gate, up, down).

    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 \\
        python benchmarks/qlora_input_grad_ab.py --threads 2 --reps 40

It prints, it doesn't append: BENCHMARKS.md quotes its runs by hand with the machine's CPU flags.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from loraforge.quant import kernels
from loraforge.quant.quantize_model import quantize_model

SHAPES = {"q/o": ((576, 576), 2), "k/v": ((192, 576), 2), "gate/up": ((1536, 576), 2), "down": ((576, 1536), 1)}
"""The default model's (SmolLM2-135M's) linears as ``(out, in)``, and how many of each a transformer layer has."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads")
    generator = torch.Generator().manual_seed(0)
    per_layer = {"two products": 0.0, "one GEMM": 0.0}
    for name, ((out, inn), count) in SHAPES.items():
        holder = nn.Sequential(nn.Linear(inn, out, bias=False))
        quantize_model(holder, bits=4, type="nf4", double_quant=True, block_size=64, compute_dtype="fp32")
        weight = holder[0].qweight
        grad = torch.randn(args.tokens, out, generator=generator)
        low_rank = (torch.randn(out, 16, generator=generator) * 0.01, torch.randn(16, inn, generator=generator) * 0.01, 2.0)
        cases = {"two products": lambda: (kernels.input_grad(weight, grad, low_rank), grad @ low_rank[0]),
                 "one GEMM": lambda: kernels.input_grad_and_rank(weight, grad, low_rank)}
        times = {case: [] for case in cases}
        for rep in range(args.reps):
            for case, run in cases.items():
                start = time.perf_counter()
                run()
                times[case].append((time.perf_counter() - start) * 1e3)
        for case, t in times.items():
            per_layer[case] += count * statistics.median(t)
        print(f"{name:8s} {out}x{inn}: " + "  ".join(
            f"{case} {min(t):.3f} / {statistics.median(t):.3f} ms" for case, t in times.items()), flush=True)
    before, after = per_layer.values()
    print(f"per transformer layer (sum of medians): two products {before:.2f} ms, one GEMM {after:.2f} ms, "
          f"ratio {after / before:.3f}")


if __name__ == "__main__":
    main()
