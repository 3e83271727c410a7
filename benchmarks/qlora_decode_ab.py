"""In-process A/B of one training step: LoRA, QLoRA (NF4 + double quant), QA-LoRA INT4 g64 and QA-LoRA Q4_1 on the
default model, the quantized ones with the native decode (``native/dequant.cpp``) and with the torch decode (the
library switched off), every case once per rep, the order rotated each rep; min and median over reps, as ratios to
LoRA. One process and interleaved steps: steadier than ``qlora_vs_lora.py``'s separate processes on a shared machine.

    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 \\
        python benchmarks/qlora_decode_ab.py --threads 2 --reps 5 [--lock FILE]

(helper dequant's diagnostic, kept: BENCHMARKS.md quotes its results; it prints, it doesn't append.)
"""

from __future__ import annotations

import argparse
import fcntl
import statistics
import time
from contextlib import contextmanager, nullcontext

import torch

from loraforge.adapters import AdapterSpec, add_adapter, mark_only_adapters_trainable
from loraforge.models import load_model
from loraforge.native import DEQUANT
from loraforge.quant import native_dequant
from loraforge.quant.base import QuantLinear
from loraforge.quant.quantize_model import quantize_model
from loraforge.train.loss import summed_token_loss

KINDS = ("lora", "qlora", "int4", "q4_1")


def build(kind: str):
    torch.manual_seed(0)
    model = load_model("default")[0]
    method = "lora"
    if kind == "qlora":
        quantize_model(model, bits=4, type="nf4", double_quant=True, block_size=64, compute_dtype="fp32")
    elif kind in ("int4", "q4_1"):
        quantize_model(model, bits=4, type="int", block_size=64 if kind == "int4" else 32, compute_dtype="fp32")
        method = "qalora"
        if kind == "q4_1":
            for module in model.modules():
                if isinstance(module, QuantLinear):
                    module.qweight = module.qweight.to_q4_1()
    add_adapter(model, AdapterSpec(method=method, r=16, alpha=32))
    mark_only_adapters_trainable(model)
    model.train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def step(model, optimizer, seed: int) -> None:
    ids = torch.randint(0, 49152, (4, 256), generator=torch.Generator().manual_seed(seed))
    total, count = summed_token_loss(model, {"input_ids": ids, "labels": ids})
    (total / count).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@contextmanager
def locked(path: str):
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--lock", help="a file to flock around the build and each rep (a machine shared with other timings)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    native = dict(DEQUANT._state) if DEQUANT.library() is not None else None
    if native is None:
        raise SystemExit("the native dequantizer is not built: nothing to compare")
    print(f"torch capability {torch.backends.cpu.get_cpu_capability()}, native decode {native_dequant.isa()}")
    with locked(args.lock) if args.lock else nullcontext():
        runs = {kind: build(kind) for kind in KINDS}
        for model, optimizer in runs.values():
            step(model, optimizer, 0)
    cases = [(kind, mode) for kind in KINDS for mode in (("native", "torch") if kind != "lora" else ("-",))]
    times: dict[tuple[str, str], list[float]] = {case: [] for case in cases}
    for rep in range(args.reps):
        with locked(args.lock) if args.lock else nullcontext():
            for kind, mode in cases[rep % len(cases):] + cases[:rep % len(cases)]:
                DEQUANT._state = {"library": None, "reason": "A/B"} if mode == "torch" else native
                start = time.perf_counter()
                step(*runs[kind], rep + 1)
                times[kind, mode].append(time.perf_counter() - start)
            DEQUANT._state = native
        print(f"rep {rep}: " + ", ".join(f"{k}/{m} {t[-1]:.2f}" for (k, m), t in times.items()), flush=True)
    lora = times["lora", "-"]
    for (kind, mode), t in times.items():
        print(f"{kind:5s} {mode:6s} min {min(t):.3f} s  median {statistics.median(t):.3f} s  "
              f"min/LoRA {min(t) / min(lora):.3f}  median/LoRA {statistics.median(t) / statistics.median(lora):.3f}")


if __name__ == "__main__":
    main()
