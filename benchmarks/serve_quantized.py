"""Serving a 4-bit base: the default model's own Q4_1 GGUF with its blocks kept (``loraforge serve`` with
``--quantization auto``), against llama.cpp on the same file and against our dense fp32 engine, in one run.

1. Single-stream decode tokens/s, greedy, EOS ignored, the same prompt token ids (a chat question in the
   model's template, ``PROMPT``) and the same thread count for all:
   - llama.cpp: llama-cpp-python's ``Llama.generate`` (top_k=1) on the file; the time between its first and
     last token, over the tokens in between;
   - loraforge: the engine (``serve.Engine``) stepping one request, Q4_1 blocks kept (computing in bf16 on a
     CPU with bf16 units, see ``serve.base_model``) with our native int8-activation kernel (the default) and
     with torch's kernels only (``LORAFORGE_QUANT_KERNEL=torch``, exact products), and dense fp32 (the same
     file's weights dequantized, what ``--quantization none`` serves);
   each in ``--rounds`` interleaved rounds, keeping each one's best (the machine is shared).
2. Where a Q4_1 decode step's time goes: ``torch.profiler`` over ``--profile-steps`` single-stream decode
   steps, the ops' own (self) CPU time summed by kind (matmul, attention, everything else) and the rest of
   the step's wall time, which is Python and dispatch plus our native kernel and decode ops (``loraforge.native``,
   pybind11 calls the profiler doesn't see), the profiler's own cost included (so that share is
   an upper bound), plus the top ops with their shapes.
3. Batched decode: the time of one decode step of 32 sequences with no adapter and with 8 distinct
   adapters (``serve_slora.decode_step_times``; S-LoRA's random adapters, ranks 8-64 on q/k/v/o), Q4_1
   engine against dense fp32 engine.
4. Memory: the weights' bytes (``quant_summary`` total for ours, ``llama_model_size`` for llama.cpp) and the
   process's RSS growth over loading the model and decoding one request.

    flock /work/helpers/bench.lock python benchmarks/serve_quantized.py [--threads 1] [--tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import gc
import time
from collections import defaultdict

import torch
from report import append_result, markdown_table
from serve_slora import decode_step_times, load_average, weight_sets

from loraforge.data.tokenize import prompt_ids as chat_ids
from loraforge.models.sources import default_gguf_path
from loraforge.native import LOWBIT
from loraforge.quant import kernels
from loraforge.quant.summary import quant_summary
from loraforge.serve import Engine, Request, SamplingParams
from loraforge.serve.base_model import load_serving_base
from loraforge.utils import llama_cpp_reference
from loraforge.utils.memory import release_free_memory

PROMPT = "Write a short story about a robot who learns to paint."
SINGLE_POOL_BYTES = 64 << 20
"""Pool of the single-stream engines: a few KV pages is all one request needs."""
KINDS = {"matmul": ("mm", "linear", "matmul", "int4pack", "int8pack", "gemm"),
         "attention": ("scaled_dot_product", "attention", "softmax")}
"""Profile kinds by substrings of the op name; the first kind that matches wins, unmatched ops are "other ops"."""


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def settled_rss() -> int:
    gc.collect()
    release_free_memory()
    return rss_bytes()


class Ours:
    """One of our engines for the single-stream rows: the default model loaded as ``quantization`` says."""

    def __init__(self, quantization: str, label: str, kernel: str = "native"):
        self.label = label
        self.kernel = kernel
        kernels.KERNEL = kernel  # the runner picks its fused kernels when it is built
        self.model, self.tokenizer = load_serving_base("default", quantization)
        self.engine = Engine(self.model, self.tokenizer, pool_bytes=SINGLE_POOL_BYTES)
        self.weight_bytes = quant_summary(self.model)["total_bytes"]

    def decode(self, ids: list[int], tokens: int) -> tuple[float, list[int]]:
        """Decode tokens/s of one greedy request (prefill and first token excluded), and its tokens."""
        kernels.KERNEL = self.kernel  # single layers choose per call
        handle = self.engine.submit(Request(ids, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)))
        self.engine.step()  # prefill, first token
        start, steps = time.perf_counter(), 0
        while not handle.done:
            self.engine.step()
            steps += 1
        return steps / (time.perf_counter() - start), handle.result().token_ids

    def profile(self, ids: list[int], steps: int) -> tuple[float, dict[str, float], list[tuple[str, str, float]]]:
        """(wall ms per decode step under the profiler, self ms per kind per step, top ops (name, shapes, ms))."""
        from torch.profiler import ProfilerActivity, profile

        kernels.KERNEL = self.kernel
        handle = self.engine.submit(Request(ids, SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True)))
        self.engine.step()
        self.engine.step()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                self.engine.step()
            wall = (time.perf_counter() - start) / steps * 1000
        while not handle.done:
            self.engine.step()
        kinds: dict[str, float] = defaultdict(float)
        for event in prof.key_averages():
            kind = next((k for k, marks in KINDS.items() if any(m in event.key.lower() for m in marks)), "other ops")
            kinds[kind] += event.self_cpu_time_total / 1000 / steps
        kinds["Python, dispatch and loraforge.native's kernels (wall - torch ops)"] = wall - sum(kinds.values())
        top = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
        return wall, dict(kinds), [(e.key, str(e.input_shapes)[:60], e.self_cpu_time_total / 1000 / steps) for e in top]


class LlamaCpp:
    def __init__(self, threads: int):
        import llama_cpp

        self.llm = llama_cpp_reference.load(default_gguf_path(), n_ctx=512, n_threads=threads, n_threads_batch=threads,
                                            verbose=False)
        self.weight_bytes = llama_cpp.llama_model_size(self.llm.model)
        plain = " (plain CPU buffers: its AMX path crashes on this CPU)" if llama_cpp_reference.cpu_has_amx() else ""
        self.label = f"llama.cpp (llama-cpp-python), Q4_1{plain}"

    def decode(self, ids: list[int], tokens: int) -> tuple[float, list[int]]:
        stamps, out = [], []
        for token in self.llm.generate(ids, top_k=1, temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            out.append(token)
            if len(out) == tokens:
                break
        return (len(out) - 1) / (stamps[-1] - stamps[0]), out


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1,
                        help="threads of llama.cpp and of torch alike (the machine is shared; see serve_vs_llama_server)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per single-stream request")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved single-stream rounds; each row keeps its best")
    parser.add_argument("--profile-steps", type=int, default=8)
    parser.add_argument("--batch-rounds", type=int, default=2, help="rounds of the 32-sequence decode steps")
    parser.add_argument("--pool-gib", type=float, default=1.0, help="pool of the batched engines")
    parser.add_argument("--single-only", action="store_true", help="skip the batched decode steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = load_average()

    rss: dict[str, int] = {}
    systems = []
    ids: list[int] = []
    start = time.perf_counter()
    LOWBIT.library()  # built here unless $LORAFORGE_CACHE holds it: outside the RSS and the timings
    build_note = (f"native kernel: {LOWBIT.status()}, "
                  + (f"built in this run in {LOWBIT._state['build_seconds']:.1f} s" if "build_seconds" in LOWBIT._state
                     else f"loaded from the cache in {time.perf_counter() - start:.2f} s"))
    for make in (lambda: Ours("auto", "loraforge engine, Q4_1 blocks kept (auto), native kernel"),
                 lambda: LlamaCpp(args.threads),
                 lambda: Ours("auto", "loraforge engine, Q4_1 blocks kept (auto), torch kernels (exact)", "torch"),
                 lambda: Ours("none", "loraforge engine, dense fp32 (none)")):
        before = settled_rss()
        system = make()
        ids = ids or chat_ids(system.tokenizer, [{"role": "user", "content": PROMPT}], "auto")
        system.decode(ids, args.tokens)  # warm-up: every weight page touched
        rss[system.label] = settled_rss() - before
        systems.append(system)
    q4, llama, exact, dense = systems
    best: dict[str, float] = {}
    tokens: dict[str, list[int]] = {}
    for round_ in range(args.rounds):
        for system in systems:
            rate, out = system.decode(ids, args.tokens)
            best[system.label] = max(best.get(system.label, 0.0), rate)
            tokens[system.label] = out
            print(f"round {round_}: {system.label}: {rate:.1f} tok/s", flush=True)
    wall, kinds, top = q4.profile(ids, args.profile_steps)

    single_rows = [[s.label, f"{best[s.label]:.1f}", f"{best[s.label] / best[llama.label]:.2f}x",
                    f"{s.weight_bytes / 2**20:.0f}", f"{rss[s.label] / 2**20:.0f}",
                    f"{agreeing_prefix(tokens[s.label], tokens[llama.label])}/{args.tokens}"] for s in systems]
    single = markdown_table(["single stream", "decode tok/s", "vs llama.cpp", "weights MiB",
                             "RSS growth MiB (load + one request)", "greedy tokens equal to llama.cpp's (prefix)"],
                            single_rows)
    profile_rows = [[kind, f"{ms:.2f}", f"{ms / wall:.0%}"] for kind, ms in kinds.items()]
    profile_table = markdown_table([f"Q4_1 decode step, 1 sequence ({wall:.1f} ms under the profiler)", "ms", "share"],
                                   profile_rows)
    top_table = markdown_table(["top ops (self time)", "input shapes", "ms/step"],
                               [[name, shapes.replace("|", "/"), f"{ms:.2f}"] for name, shapes, ms in top])

    q4_dtype = str(q4.engine.runner.dtype).removeprefix("torch.")
    del q4.engine, exact.engine, dense.engine, llama
    kernels.KERNEL = "native"
    batch = {}
    for quantization, label in () if args.single_only else (("auto", "Q4_1 blocks kept"), ("none", "dense fp32")):
        model, tokenizer = load_serving_base("default", quantization)
        engine = Engine(model, tokenizer, pool_bytes=int(args.pool_gib * 2**30), max_num_seqs=32)
        times = decode_step_times(engine, tokenizer, weight_sets(model, 8), args.batch_rounds)
        batch[label] = times
        print(f"{label}: {times}", flush=True)
        del engine, model
        gc.collect()
    cases = ("no adapter", "8 distinct")
    batch_rows = [[label] + [f"{batch[label][case] * 1000:.0f}" for case in cases]
                  + [f"{32 / batch[label]['8 distinct']:.1f}"] for label in batch]
    if batch:
        batch_rows.append(["Q4_1 / dense speed"]
                          + [f"{batch['dense fp32'][c] / batch['Q4_1 blocks kept'][c]:.2f}x" for c in cases] + [""])
    batch_table = markdown_table(["decode step, 32 sequences", "ms/step, no adapter", "ms/step, 8 adapters",
                                  "tok/s, 8 adapters"], batch_rows)
    notes = [
        (f"Single stream: prompt {PROMPT!r} in the chat template ({len(ids)} tokens), {args.tokens} new, greedy, EOS ignored; best of {args.rounds} "
        f"interleaved rounds; {args.threads} thread(s) for llama.cpp (n_threads, n_threads_batch) and torch alike; our Q4_1 engine computes in {q4_dtype}."),
        ("llama.cpp quantizes each matmul's input to 8 bits (Q8_1 for Q4_1), and so does our native kernel (its "
        "block dot products equal libggml's: tests/quant/test_native_kernel.py); torch's kernels don't. Our engine "
        "holds activations in bf16 where llama.cpp keeps fp32, so with either kernel the greedy tokens part from "
        "llama.cpp's where two tokens are nearly tied; tests/serve/test_quantized_base.py checks the logits."),
        build_note,
        ("Weights: ours count every parameter and buffer (the Q4_1 engine: Q4_1 blocks and the tied Q8_0 "
         "token_embd, used as the head too, as stored; the dense engine: all fp32); llama.cpp's is its model size. "
         "The int4 kernel's packed copies (codes + bf16 scales, built on the first step of 5-32 tokens; the exact "
         "row builds them on its first decode step) are in the RSS only; the native kernel reads the blocks as stored."),
        ("Batched: not measured (--single-only)." if not batch else f"Batched: 32 sequences, prompt 32 tokens, steady-state decode steps, best of {args.batch_rounds}; adapters "
        "from serve_slora.weight_sets (ranks 8/16/32/64 on q/k/v/o)."),
        f"Load average (1 min) of this shared machine: {load_before} before, {load_average()} after.",
    ]
    append_result("serve_quantized: a 4-bit base served (default model's Q4_1 GGUF) vs llama.cpp and dense fp32",
                  "\n\n".join([single, profile_table, top_table] + ([batch_table] if batch else [])),
                  "\n".join(f"- {n}" for n in notes))


if __name__ == "__main__":
    main()
