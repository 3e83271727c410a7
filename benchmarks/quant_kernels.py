"""Low-bit matmul kernels (quant/kernels.py) against the dequantize-then-matmul path they replace.

For each format, weight shape, compute dtype and number of input rows M (tokens), the median time of:
- ``dense``: ``F.linear`` on the dense weight in that dtype (what LoRA on an unquantized base pays);
- ``dequantize+mm``: the whole layer dequantized, then ``F.linear`` (the path before quant/kernels.py);
- ``native``: our int8-activation kernel (``native/lowbit.cpp``; INT4/INT8, Q4_0, Q4_1, Q8_0), llama.cpp's numerics;
- ``int4 kernel``: torch's ``_weight_int4pack_mm_for_cpu`` (formats that map: INT4, Q4_0, Q4_1; Q8_0 as two parts);
- ``tiled``: dequantize-and-matmul a tile at a time (``kernels._tiled_forward``);
- ``used``: what ``QuantizedWeight.matmul`` dispatches to (the path named in the last column);
and the backward's input gradient ``grad @ W``: whole-layer dequantize vs tiled.

Shapes: the default model's (576×1536 MLP, 1536×576, its fused q/k/v 960×576 and gate/up 3072×576, its Q8_0
head 49152×576) and a 1.1B Llama's (5632×2048, 2048×5632). ``NATIVE_MAX_ROWS`` and ``INT4PACK_MAX_ROWS`` in
``quant/kernels.py`` are the crossovers this measures (``--threads 1``, as single-stream serving runs).

    python benchmarks/quant_kernels.py [--rows 1,4,32,512] [--formats int4,q4_1,nf4,q8_0] [--dtypes fp32,bf16]
        [--shapes 1536x576,576x1536] [--threads 1] [--no-backward]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from report import append_result, markdown_table

from loraforge.native import LOWBIT
from loraforge.quant import kernels
from loraforge.quant.blockwise4bit import Blockwise4bitWeight
from loraforge.quant.gguf_blocks import QUANTIZERS
from loraforge.quant.intk import quantize_intk

SHAPES = "1536x576,576x1536,5632x2048,2048x5632"
FORMATS = {
    "int4": lambda w: quantize_intk(w, 4, 64),
    "q4_1": QUANTIZERS["q4_1"],
    "nf4": lambda w: Blockwise4bitWeight.from_dense(w, "nf4", 64, True),
    "q8_0": QUANTIZERS["q8_0"],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure(weight, dense: torch.Tensor, x: torch.Tensor, grad: torch.Tensor, packed, repeats: int,
            backward: bool) -> dict:
    """Median ms of each path for one weight, dtype and input (see the module docstring)."""
    dtype = x.dtype
    with torch.no_grad():
        t = {
            "dense": median_ms(lambda: F.linear(x, dense), repeats),
            "old": median_ms(lambda: F.linear(x, weight.dequantize(dtype)), repeats),
            "tiled": median_ms(lambda: kernels._tiled_forward(weight, x), repeats),
            "used": median_ms(lambda: weight.matmul(x), repeats),
        }
        if backward:
            t["old_bwd"] = median_ms(lambda: grad @ weight.dequantize(dtype), repeats)
            t["tiled_bwd"] = median_ms(lambda: kernels.input_grad(weight, grad), repeats)
        if packed is not None:
            t["int4"] = median_ms(lambda: packed.mm(x), repeats)
        group = kernels._native_group(weight) if LOWBIT.library() is not None else None
        if group is not None:
            t["native"] = median_ms(lambda: group.mm(x), repeats)
    return t


def path_used(weight, m: int, dtype: torch.dtype) -> str:
    if m <= kernels.native_max_rows(weight, dtype):
        return "native"
    return "int4 kernel" if m <= kernels.int4pack_max_rows(weight, dtype) else "tiled"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1,4,32,512")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", default=SHAPES, help="out×in of each weight, e.g. 960x576,49152x576")
    parser.add_argument("--no-backward", action="store_true", help="skip the input-gradient columns")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows_out = []
    for out_features, in_features in (map(int, shape.split("x")) for shape in args.shapes.split(",")):
        torch.manual_seed(0)
        dense32 = torch.randn(out_features, in_features) * 0.02
        for name in args.formats.split(","):
            weight = FORMATS[name](dense32)
            for dtype_name in args.dtypes.split(","):
                dtype = DTYPES[dtype_name]
                dense = dense32.to(dtype)
                for m in (int(r) for r in args.rows.split(",")):
                    x = torch.randn(m, in_features, dtype=dtype)
                    grad = torch.randn(m, out_features, dtype=dtype)
                    packed = kernels.fused_int4pack([weight])
                    t = measure(weight, dense, x, grad, packed, args.repeats, not args.no_backward)
                    ms = {key: "–" if key not in t else f"{t[key]:.3f}" for key in ("int4", "native", "old_bwd", "tiled_bwd")}
                    rows_out.append([name, f"{out_features}×{in_features}", dtype_name, m, f"{t['dense']:.3f}",
                                     f"{t['old']:.3f}", ms["native"], ms["int4"], f"{t['tiled']:.3f}",
                                     f"{t['used']:.3f}", f"{t['old'] / t['used']:.2f}", ms["old_bwd"], ms["tiled_bwd"],
                                     path_used(weight, m, dtype)])
                    print(rows_out[-1], flush=True)
    append_result(
        f"Low-bit matmul kernels vs dequantize-then-matmul (ms, median of {args.repeats}, {args.threads} threads)",
        markdown_table(["format", "out×in", "dtype", "M", "dense", "dequantize+mm", "native", "int4 kernel", "tiled",
                        "used", "speed-up", "bwd dequantize+mm", "bwd tiled", "path used"], rows_out),
        "speed-up: dequantize+mm time over the dispatched path's (`used`); bwd: the input gradient grad @ W. "
        f"native: {LOWBIT.status()}. TILE_ELEMENTS = {kernels.TILE_ELEMENTS}; NATIVE_MAX_ROWS = "
        f"{ {str(k).removeprefix('torch.'): v for k, v in kernels.NATIVE_MAX_ROWS.items()} }; INT4PACK_MAX_ROWS = "
        f"{ {str(k).removeprefix('torch.'): v for k, v in kernels.INT4PACK_MAX_ROWS.items()} }; INT8_SPLIT_MAX_ROWS = "
        f"{ {str(k).removeprefix('torch.'): v for k, v in kernels.INT8_SPLIT_MAX_ROWS.items()} }. "
        f"Load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in load_before)}; after: "
        f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}.",
    )


if __name__ == "__main__":
    main()
