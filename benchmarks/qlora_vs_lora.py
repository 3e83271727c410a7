"""QLoRA vs LoRA on CPU, and loraforge QLoRA vs bitsandbytes + PEFT QLoRA: memory and step time.

Variants, each in its own subprocess (so peak RSS is its own), same model, batch and LoRA config:
- ``lora``: dense fp32 base + LoRA (the reference);
- ``qlora``: loraforge NF4 + double quant base, compute fp32;
- ``qlora-bf16``: the same with bf16 compute (where the CPU has bf16 units);
- ``qalora-int4``: QA-LoRA on a group-wise INT4 base (group 64), fp32 compute;
- ``bnb-peft``: transformers ``BitsAndBytesConfig`` NF4 + DQ, PEFT LoRA (bitsandbytes' CPU path).

The loraforge variants give freed memory back to the OS after each step, as loraforge's trainer does on
CPU (``utils.memory.release_free_memory``); the step time includes it. bnb-peft runs as transformers +
PEFT users run it, without.

Models: the default model, and a random-initialised ~1.1B Llama (TinyLlama's shape) with ``--model 1b``.

    python benchmarks/qlora_vs_lora.py [--model default|1b] [--steps 6] [--seq 256] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from loraforge.utils.memory import release_free_memory
from report import append_result, markdown_table

VARIANTS = ("lora", "qlora", "qlora-bf16", "qalora-int4", "bnb-peft")
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


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.worker == "bnb-peft":
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
        from loraforge.adapters import AdapterSpec, add_adapter, mark_only_adapters_trainable
        from loraforge.quant.quantize_model import quantize_model

        model = build_model(args.model)
        method = "lora"
        if args.worker == "qalora-int4":  # QA-LoRA on group-wise INT4 (group 64), fp32 compute
            quantize_model(model, bits=4, type="int", block_size=64, compute_dtype="fp32")
            method = "qalora"
        elif args.worker != "lora":
            compute = "bf16" if args.worker == "qlora-bf16" else "fp32"
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
    for step in range(args.steps):
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(step))
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.worker != "bnb-peft":
            release_free_memory()  # as loraforge's trainer does after each step on CPU
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return {"step_s": statistics.median(times[1:]), "peak_rss_gb": peak_rss_gb(), "load_peak_rss_gb": load_peak,
            "linear_bytes": now, "linear_bytes_bf16": bf16, "first_loss": losses[0]}


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
    parser.add_argument("--worker", choices=VARIANTS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return
    variants = [v for v in args.variants.split(",") if not (v == "bnb-peft" and args.model == "1b")]
    results = {}
    for name in variants:
        proc = subprocess.run([sys.executable, __file__, "--worker", name, *sys.argv[1:]], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results[name] = json.loads(proc.stdout.split("RESULT ", 1)[1])
    ref = results["lora"]
    rows = []
    for name, r in results.items():
        rows.append([name, f"{r['step_s']:.2f}", f"{r['step_s'] / ref['step_s']:.2f}", f"{r['load_peak_rss_gb']:.2f}",
                     f"{r['peak_rss_gb']:.2f}", f"{r['peak_rss_gb'] / ref['peak_rss_gb']:.2f}",
                     f"{r['linear_bytes'] / 2**20:.0f}",
                     f"{r['linear_bytes'] / r['linear_bytes_bf16']:.3f}", f"{r['first_loss']:.3f}"])
    append_result(
        f"QLoRA vs LoRA on CPU ({args.model}, LoRA r=16 all-linear, batch {args.batch}×{args.seq}, "
        f"{args.steps} steps, {args.threads} threads)",
        markdown_table(["variant", "step s", "step ratio", "load peak RSS GB", "training peak RSS GB",
                        "training RSS ratio", "decoder-linear MiB",
                        "linear bytes / bf16", "first loss"], rows),
        "step ratio and RSS ratio are relative to dense-fp32 LoRA. Load peak: reading the dense checkpoint and "
        "quantizing it layer by layer; training peak: the high-water mark after a reset once the model is ready "
        "(Linux VmHWM). linear bytes / bf16 is the stored size of the "
        "decoder linears relative to bf16 (NF4 + double quant: 4.127/16 = 0.258).",
    )


if __name__ == "__main__":
    main()
