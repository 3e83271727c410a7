"""In-process A/B of one training step on the default model: LoRA, QLoRA (NF4 + double quant), QA-LoRA INT4 g64
and QA-LoRA Q4_1, each with the fused base-and-adapter op (``adapters.low_rank_linear``, what training runs) and
with the plain sum it replaced (autograd's graph of base matmul plus update), and bitsandbytes + PEFT's QLoRA.
Every case steps once per rep, the order rotated each rep; min and median over reps, as ratios to LoRA's
(fused) step, and ``paired``: the median over reps of each step's ratio to LoRA's step of the same rep, which a
machine's slow drift (minutes) moves least. One process and interleaved steps: steadier than ``qlora_vs_lora.py``'s separate processes on a
shared machine. fp32 compute, LoRA r=16 alpha=32 on every linear, batch 4×256, random token ids.

    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 \\
        python benchmarks/qlora_decode_ab.py --threads 2 --reps 5 [--lock FILE] [--random-weights] [--no-bnb] \\
        [--model default|1b] [--kinds lora,qlora] [--layers N --vocab V]

``--random-weights``: the default model's shapes with random weights, for a machine without the model package
(bitsandbytes + PEFT needs the saved weights and is left out). ``--model 1b``: the random TinyLlama-shaped 1.1B
model of ``qlora_vs_lora.py`` (several tiles per layer), random weights. ``--layers 6 --vocab 4096`` (with
``--random-weights``): the default model's layers, fewer of them and a small head, so that a step takes ~0.8 s and
many reps fit in a few minutes (the layers are what QLoRA changes; the 49152-word head is a quarter of the full
model's step). It prints, it doesn't append:
BENCHMARKS.md quotes its runs by hand with the machine's CPU flags.
"""

from __future__ import annotations

import argparse
import fcntl
import statistics
import time
from contextlib import contextmanager, nullcontext

import torch

from loraforge.adapters import AdapterSpec, add_adapter, layer, mark_only_adapters_trainable
from loraforge.quant.base import QuantLinear
from loraforge.quant.quantize_model import quantize_model
from loraforge.train.loss import summed_token_loss

KINDS = ("lora", "qlora", "int4", "q4_1")
MODES = ("fused", "plain")
DEFAULT_SHAPES = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=True)
"""SmolLM2-135M's (the default model's) config, for ``--random-weights``."""


def base_model(random_weights: bool, shape: str = "default"):
    torch.manual_seed(0)
    if random_weights or shape == "1b":
        from qlora_vs_lora import LLAMA_1B
        from transformers import AutoModelForCausalLM, LlamaConfig

        config = LlamaConfig(**(LLAMA_1B if shape == "1b" else DEFAULT_SHAPES))
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    from loraforge.models import load_model

    return load_model("default")[0]


def build(kind: str, random_weights: bool, shape: str = "default"):
    model = base_model(random_weights, shape)
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
    return train_ready(model)


def build_bnb_peft():
    """transformers' bitsandbytes NF4 + double quant, fp32 compute, and PEFT's LoRA on every linear."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from loraforge.models.sources import _cached_default_dir

    torch.manual_seed(0)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(_cached_default_dir(), quantization_config=config,
                                                 dtype=torch.float32, device_map="cpu")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return train_ready(model)


def train_ready(model):
    model.train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def step(model, optimizer, seed: int) -> None:
    ids = torch.randint(0, model.config.vocab_size, (4, 256), generator=torch.Generator().manual_seed(seed))
    total, count = summed_token_loss(model, {"input_ids": ids, "labels": ids})
    (total / count).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@contextmanager
def locked(path: str):
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextmanager
def plain_sum(on: bool):
    """Training's layers without the fused op: the base's own forward, then the adapter's update added."""
    fused = layer.fused_linear
    if on:
        layer.fused_linear = lambda adapter, x, base: None
    try:
        yield
    finally:
        layer.fused_linear = fused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--lock", help="a file to flock around the build and each rep (a machine shared with other timings)")
    parser.add_argument("--random-weights", action="store_true", help="the default model's shapes, random weights")
    parser.add_argument("--no-bnb", action="store_true", help="leave bitsandbytes + PEFT out")
    parser.add_argument("--model", choices=("default", "1b"), default="default")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"some of {','.join(KINDS)} (lora is always run)")
    parser.add_argument("--layers", type=int, help="with --random-weights: this many of the default model's layers")
    parser.add_argument("--vocab", type=int, help="with --random-weights: this vocabulary size (the head's width)")
    args = parser.parse_args()
    if (args.layers or args.vocab) and not (args.random_weights and args.model == "default"):
        parser.error("--layers and --vocab change the default model's random-weight shapes: add --random-weights")
    DEFAULT_SHAPES.update({key: value for key, value in (("num_hidden_layers", args.layers), ("vocab_size", args.vocab))
                           if value})
    kinds = ["lora", *(k for k in args.kinds.split(",") if k in KINDS and k != "lora")]
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads")
    bnb = not (args.no_bnb or args.random_weights or args.model == "1b")
    with locked(args.lock) if args.lock else nullcontext():
        runs = {kind: build(kind, args.random_weights, args.model) for kind in kinds}
        if bnb:
            runs["bnb-peft"] = build_bnb_peft()
        for run in runs.values():
            step(*run, 0)
    cases = [(kind, mode) for kind in kinds for mode in MODES] + ([("bnb-peft", "-")] if bnb else [])
    times: dict[tuple[str, str], list[float]] = {case: [] for case in cases}
    for rep in range(args.reps):
        with locked(args.lock) if args.lock else nullcontext():
            for kind, mode in cases[rep % len(cases):] + cases[:rep % len(cases)]:
                with plain_sum(mode == "plain"):
                    start = time.perf_counter()
                    step(*runs[kind], rep + 1)
                    times[kind, mode].append(time.perf_counter() - start)
        print(f"rep {rep}: " + ", ".join(f"{k}/{m} {t[-1]:.2f}" for (k, m), t in times.items()), flush=True)
    lora = times["lora", "fused"]
    for (kind, mode), t in times.items():
        paired = statistics.median(step / lora_step for step, lora_step in zip(t, lora))
        print(f"{kind:8s} {mode:5s} min {min(t):.3f} s  median {statistics.median(t):.3f} s  "
              f"min/LoRA {min(t) / min(lora):.3f}  median/LoRA {statistics.median(t) / statistics.median(lora):.3f}  "
              f"paired {paired:.3f}")


if __name__ == "__main__":
    main()
