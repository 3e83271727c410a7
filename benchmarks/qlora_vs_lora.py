"""QLoRA vs LoRA on CPU, and loraforge QLoRA vs bitsandbytes + PEFT QLoRA: memory and step time.

Variants, each in its own subprocess (so peak RSS is its own), same model, batch and LoRA config:
- ``lora``: dense fp32 base + LoRA (the reference);
- ``qlora``: loraforge NF4 + double quant base, compute fp32;
- ``qlora-bf16``: the same with bf16 compute (where the CPU has bf16 units);
- ``qalora-int4``: QA-LoRA on a group-wise INT4 base (group 64), fp32 compute;
- ``qalora-q4_1``: QA-LoRA on GGUF Q4_1 blocks (INT4 group 32 converted to Q4_1 without loss), fp32 compute;
- ``bnb-peft``: transformers ``BitsAndBytesConfig`` NF4 + DQ, PEFT LoRA (bitsandbytes' CPU path).

Every variant keeps freed memory in the heap between steps, as loraforge's trainer does by default
(``train.cpu_allocator: fast``) and as transformers + PEFT do. ``--trim-each-step`` gives it back to the OS after
each step in the loraforge variants (``utils.memory.release_free_memory``, what ``cpu_allocator: compact``
adds), the step time including it.

A loraforge variant with the suffix ``:dequantize`` (``qlora:dequantize``) runs the quantized layers as they
ran before ``quant/kernels.py``: the whole layer dequantized per call, then ``F.linear``; side by side with
the plain variant it shows what the kernels change. ``--profile`` adds, per variant, the top ops by self CPU
time over one more step (torch.profiler). The notes record the CPU flags of note, the load average, the
ISA-limiting environment variables set (``ONEDNN_MAX_CPU_ISA``, ``MKL_ENABLE_INSTRUCTIONS``,
``ATEN_CPU_CAPABILITY``: how a CPU without bf16 units is emulated on one with them) and, per run, torch's CPU
capability and the bf16/fp32 time ratio of a 1024² matmul, which shows whether the emulation took effect.

Each step is a forward, backward and AdamW step on a batch of random tokens with labels on every position. The
loraforge variants compute the loss as loraforge's trainer does (``train.loss.summed_token_loss``), bnb-peft as
transformers does (``model(labels=...).loss``): each tool's training step as its users run it. ``--baseline SRC``
adds every loraforge variant once more on the package under SRC (the code before a change), interleaved, for a
before/after in one run.

On a shared machine, ``--rounds N`` runs every variant N times, interleaved, and keeps each variant's fastest
round (the table lists every round with the load average at its start); ``--lock FILE`` (repeatable) holds an
flock on FILE around each variant's run, so that other timings never overlap one; ``--dry-run`` prints without
recording.

Models: the default model, and a random-initialised ~1.1B Llama (TinyLlama's shape) with ``--model 1b``.

    python benchmarks/qlora_vs_lora.py [--model default|1b] [--steps 6] [--seq 256] [--batch 4] [--profile]
        [--rounds 1] [--lock FILE] [--baseline SRC] [--dry-run]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from report import append_result, markdown_table

from loraforge.utils.memory import release_free_memory

VARIANTS = ("lora", "qlora", "qlora-bf16", "qalora-int4", "qalora-q4_1", "bnb-peft")
OLD_PATH = ":dequantize"
BASELINE = "@baseline"
ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)


def build_model(name: str, quantization_config=None):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if name == "1b":
        config = LlamaConfig(**LLAMA_1B)
        if quantization_config is None:
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        raise SystemExit("bnb-peft needs saved weights; run it on the default model")
    from loraforge.models import load_model
    from loraforge.models.sources import _cached_default_dir

    if quantization_config is None:
        return load_model(name)[0]
    return AutoModelForCausalLM.from_pretrained(_cached_default_dir(), quantization_config=quantization_config,
                                                dtype=torch.float32, device_map="cpu")


def linear_weight_bytes(model) -> tuple[int, int]:
    """(bytes the decoder linears take now, bytes they would take in bf16)."""
    from loraforge.quant.base import QuantLinear

    now, bf16 = 0, 0
    head = model.get_output_embeddings()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            now += module.qweight.nbytes
            bf16 += module.in_features * module.out_features * 2
        elif isinstance(module, torch.nn.Linear) and module is not head and module.weight.requires_grad is False:
            weight = module.weight
            if weight.dtype == torch.uint8:  # bitsandbytes Params4bit
                now += weight.numel() + module.weight.quant_state.absmax.numel()
                bf16 += module.in_features * module.out_features * 2
            elif module.in_features * module.out_features == weight.numel():
                now += weight.numel() * weight.element_size()
                bf16 += weight.numel() * 2
    return now, bf16


def use_dequantize_per_call() -> None:
    """Run quantized layers as before ``quant/kernels.py``: dequantize the whole layer per call."""
    import torch.nn.functional as F

    from loraforge.quant import kernels, native_dequant

    kernels.linear = lambda weight, x, low_rank=None: F.linear(x, native_dequant.plus(weight.dequantize(x.dtype),
                                                                                      low_rank))
    kernels.input_grad = lambda weight, grad, low_rank=None: grad @ native_dequant.plus(weight.dequantize(grad.dtype),
                                                                                       low_rank)


def to_q4_1(model) -> None:
    """Swap every INT4 group-32 ``QuantLinear`` weight for the same weights as GGUF Q4_1 blocks (lossless)."""
    from loraforge.quant.base import QuantLinear

    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.qweight = module.qweight.to_q4_1()


def bf16_matmul_ratio() -> float:
    """Time of a 1024² bf16 matmul over the fp32 one: < 1 with bf16 units in use, > 1 without."""
    a = torch.randn(1024, 1024)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = a.to(dtype)
        x @ x
        start = time.perf_counter()
        for _ in range(5):
            x @ x
        times[dtype] = time.perf_counter() - start
    return times[torch.bfloat16] / times[torch.float32]


def top_ops(step, rows: int = 12) -> list[list]:
    """``[op, self CPU ms, calls]`` of the ``rows`` ops with the most self CPU time over one ``step()``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return [[e.key, round(e.self_cpu_time_total / 1000, 1), e.count] for e in events]


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    name = args.worker.removesuffix(BASELINE)  # PYTHONPATH already points at the baseline's source
    variant, old_path = name.removesuffix(OLD_PATH), name.endswith(OLD_PATH)
    if old_path:
        use_dequantize_per_call()
    if variant == "bnb-peft":
        from peft import LoraConfig, get_peft_model
        from transformers import BitsAndBytesConfig

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
        model = build_model(args.model, bnb)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    else:
        from loraforge.adapters import (
            AdapterSpec,
            add_adapter,
            mark_only_adapters_trainable,
        )
        from loraforge.quant.quantize_model import quantize_model

        model = build_model(args.model)
        method = "lora"
        if variant == "qalora-int4":  # QA-LoRA on group-wise INT4 (group 64), fp32 compute
            quantize_model(model, bits=4, type="int", block_size=64, compute_dtype="fp32")
            method = "qalora"
        elif variant == "qalora-q4_1":  # QA-LoRA on GGUF Q4_1 blocks, fp32 compute
            quantize_model(model, bits=4, type="int", block_size=32, compute_dtype="fp32")
            to_q4_1(model)
            method = "qalora"
        elif variant != "lora":
            compute = "bf16" if variant == "qlora-bf16" else "fp32"
            quantize_model(model, bits=4, type="nf4", double_quant=True, block_size=64, compute_dtype=compute)
        add_adapter(model, AdapterSpec(method=method, r=16, alpha=32))
        mark_only_adapters_trainable(model)
    for p in model.parameters():
        if not p.requires_grad:
            p.requires_grad_(False)
    now, bf16 = linear_weight_bytes(model)
    load_peak = peak_rss_gb()
    reset_peak_rss()  # from here on, the high-water mark is training's own
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    times, losses = [], []

    def step(index: int) -> None:
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(index))
        if variant == "bnb-peft":  # as transformers + PEFT compute the loss
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        else:  # as loraforge's trainer does (train.run), labels on every position
            from loraforge.train.loss import summed_token_loss

            total, count = summed_token_loss(model, {"input_ids": ids, "labels": ids})
            loss = total / count
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if variant != "bnb-peft" and args.trim_each_step:
            release_free_memory()  # as loraforge's trainer does after each step with cpu_allocator: compact
        losses.append(loss.item())

    faults = []
    for index in range(args.steps):
        start, faults_before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step(index)
        times.append(time.perf_counter() - start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
    peak = peak_rss_gb()
    profile = top_ops(lambda: step(args.steps), args.profile_rows) if args.profile else None
    return {"step_s": statistics.median(times[1:]), "faults_per_step": statistics.median(faults[1:]),
            "peak_rss_gb": peak, "load_peak_rss_gb": load_peak,
            "linear_bytes": now, "linear_bytes_bf16": bf16, "first_loss": losses[0], "profile": profile,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "bf16_matmul_ratio": bf16_matmul_ratio()}


def peak_rss_gb() -> float:
    """The process's resident-set high-water mark (VmHWM), in GiB."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default", help="'default' or '1b' (random TinyLlama-shaped)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--profile", action="store_true", help="add the top ops by self CPU time per variant")
    parser.add_argument("--profile-rows", type=int, default=12, help="how many ops each profile lists")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every variant this many times, interleaved; a variant's step time is its fastest round")
    parser.add_argument("--lock", action="append", default=[],
                        help="a file to flock around each variant's run (a machine shared with other timings); "
                             "repeatable, taken in the order given")
    parser.add_argument("--trim-each-step", action="store_true",
                        help="loraforge variants call release_free_memory after each step (cpu_allocator: compact)")
    parser.add_argument("--dry-run", action="store_true", help="print the table, don't append it to BENCHMARKS.md")
    parser.add_argument("--baseline", metavar="SRC",
                        help="also run every loraforge variant on the package under SRC (a copy of src/ from before a "
                             "change, e.g. `git archive HEAD src | tar -x -C DIR`, then DIR/src), as NAME@baseline, "
                             "interleaved with the rest: a before/after in one run")
    parser.add_argument("--worker")
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return
    variants = [v for v in args.variants.split(",") if not (v == "bnb-peft" and args.model == "1b")]
    unknown = [v for v in variants if v.removesuffix(OLD_PATH) not in VARIANTS or v in (f"lora{OLD_PATH}", f"bnb-peft{OLD_PATH}")]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {VARIANTS} (quantized ones may add {OLD_PATH})")
    if args.baseline:
        variants = [v + suffix for v in variants for suffix in ("", BASELINE) if not (suffix and v == "bnb-peft")]
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {}
    for round_index in range(args.rounds):  # rounds interleave the variants, so that load hits them alike
        for name in variants:
            flags = [a for a in sys.argv[1:] if round_index == 0 or a != "--profile"]  # profile the first round only
            env = dict(os.environ, PYTHONPATH=args.baseline) if name.endswith(BASELINE) else None
            with held(args.lock):
                load = os.getloadavg()[0]
                proc = subprocess.run([sys.executable, __file__, "--worker", name, *flags], capture_output=True, text=True,
                                      check=False, env=env)
            if proc.returncode != 0:
                print(f"{name} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            runs.setdefault(name, []).append({**json.loads(proc.stdout.split("RESULT ", 1)[1]), "load": load})
            print(f"round {round_index + 1}: {name} {runs[name][-1]['step_s']:.2f} s/step (load {load:.1f})",
                  file=sys.stderr, flush=True)
    results = {name: combine(r) for name, r in runs.items()}
    rows = []
    for name, r in results.items():
        ref = results["lora" + BASELINE] if name.endswith(BASELINE) and "lora" + BASELINE in results else results["lora"]
        rows.append([name, f"{r['step_s']:.2f}", f"{r['step_s'] / ref['step_s']:.2f}", f"{r['load_peak_rss_gb']:.2f}",
                     f"{r['peak_rss_gb']:.2f}", f"{r['peak_rss_gb'] / ref['peak_rss_gb']:.2f}", f"{r['faults_per_step']:.0f}",
                     f"{r['linear_bytes'] / 2**20:.0f}",
                     f"{r['linear_bytes'] / r['linear_bytes_bf16']:.3f}", f"{r['first_loss']:.3f}",
                     " / ".join(f"{t:.2f} ({load:.1f})" for t, load in zip(r["round_step_s"], r["round_load"]))])
    (print if args.dry_run else append_result)(
        f"QLoRA vs LoRA on CPU ({args.model}, LoRA r=16 all-linear, batch {args.batch}×{args.seq}, "
        f"{args.steps} steps, {args.threads} threads, {args.rounds} round{'s' * (args.rounds > 1)}"
        f"{', malloc_trim after each loraforge step' if args.trim_each_step else ''})",
        markdown_table(["variant", "step s", "step ratio", "load peak RSS GB", "training peak RSS GB",
                        "training RSS ratio", "page faults per step", "decoder-linear MiB",
                        "linear bytes / bf16", "first loss", "step s per round (load average at its start)"], rows),
        "step ratio and RSS ratio are relative to dense-fp32 LoRA (of the same source tree: a "
        f"`{BASELINE}` row to `lora{BASELINE}`). The loraforge variants compute the loss as loraforge's trainer does "
        "(train.loss.summed_token_loss), bnb-peft as transformers does (`model(labels=...).loss`). Page faults: "
        "minor faults per step (fresh memory being touched), first round. Load peak: reading the dense checkpoint and "
        "quantizing it layer by layer; training peak: the high-water mark after a reset once the model is ready "
        "(Linux VmHWM); over rounds, the fastest round's step time and the highest peaks. "
        "linear bytes / bf16 is the stored size of the "
        "decoder linears relative to bf16 (NF4 + double quant: 4.127/16 = 0.258). "
        f"`{OLD_PATH}`: the quantized layers dequantized whole per call (the path before quant/kernels.py). "
        + (f"`{BASELINE}`: the same variant on the package in `{args.baseline}` (the code before this change).\n\n"
           if args.baseline else "\n\n")
        + run_notes(results, load_before) + profile_tables(results),
    )


@contextlib.contextmanager
def held(lock_paths: list[str]):
    """Hold an exclusive flock on each of ``lock_paths``, taken in order, for the block."""
    with contextlib.ExitStack() as stack:
        for path in lock_paths:
            f = stack.enter_context(open(path, "a"))
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file is closed
        yield


def combine(rounds: list[dict]) -> dict:
    """One variant's rounds as one result: the fastest round's step time (load on a shared machine only ever adds
    time), the highest peaks, the first round's profile, and every round's step time."""
    result = dict(rounds[0])
    result["step_s"] = min(r["step_s"] for r in rounds)
    result["round_step_s"] = [r["step_s"] for r in rounds]
    result["round_load"] = [r["load"] for r in rounds]
    for key in ("peak_rss_gb", "load_peak_rss_gb"):
        result[key] = max(r[key] for r in rounds)
    return result


def run_notes(results: dict, load_before: tuple) -> str:
    """CPU flags, ISA-limiting environment, torch's CPU capability and bf16 speed, load averages."""
    flags = next((set(line.split(":", 1)[1].split()) for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), set())
    of_note = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    isa = {name: os.environ[name] for name in ISA_VARIABLES if name in os.environ}
    any_result = next(iter(results.values()), {})
    return (f"- CPU flags of note: {' '.join(of_note)}\n"
            f"- ISA limits set: {isa or 'none (the full ISA of this CPU)'}; torch CPU capability "
            f"{any_result.get('cpu_capability')}; bf16/fp32 time of a 1024² matmul: "
            + ", ".join(f"{name} {r['bf16_matmul_ratio']:.2f}" for name, r in results.items()) + "\n"
            f"- load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; after: "
            f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} (2 cores shared with other work)\n")


def profile_tables(results: dict) -> str:
    blocks = []
    for name, r in results.items():
        if r.get("profile"):
            blocks.append(f"\nTop ops by self CPU time, one step, {name}:\n\n"
                          + markdown_table(["op", "self CPU ms", "calls"], r["profile"]))
    return "\n".join(blocks)


if __name__ == "__main__":
    main()
