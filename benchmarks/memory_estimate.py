"""The memory-fit estimate (``loraforge estimate``) against measured peaks of real training runs.

Each case trains a few steps with ``loraforge train`` in its own process and reads the peak it records
in ``summary.json`` (CPU: the process's peak resident set; CUDA: ``torch.cuda.max_memory_allocated``),
next to ``estimate_memory`` for the same config. The cases marked "held out" were not looked at while
the estimate was built. The data make every sample fill ``data.cutoff_len``
and carry labels everywhere (``train_on_prompt``), which is the case the estimate describes. One step
holds the peak (the optimizer state is allocated at its end). The 1B
model is a random Llama (Llama-3.2-1B's layer shapes, the default model's 49,152-token vocabulary)
written once as a safetensors folder under ``--workdir``.

    python benchmarks/memory_estimate.py [--workdir /tmp/memory_estimate] [--skip-1b]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from report import append_result, markdown_table

from loraforge.config import Config
from loraforge.train.memory import estimate_memory

CASES = [
    ("default", "LoRA r16, batch 4 x 256", {}),
    ("default", "LoRA r16, batch 4 x 256, grad. checkpointing", {"train": {"gradient_checkpointing": True}}),
    ("default", "QLoRA nf4, batch 4 x 256", {"model": {"quantization": {"type": "nf4"}}}),
    ("1b", "LoRA r16, batch 2 x 256", {"train": {"batch_size": 2}}),
    ("default", "held out: LoRA r16, batch 2 x 512", {"train": {"batch_size": 2}, "data": {"cutoff_len": 512}}),
    ("1b", "held out: QLoRA nf4, batch 1 x 512, grad. checkpointing",
     {"model": {"quantization": {"type": "nf4"}}, "data": {"cutoff_len": 512},
      "train": {"batch_size": 1, "gradient_checkpointing": True}}),
]
ALLOCATORS = ("compact", "fast")
"""``train.cpu_allocator``: each case is measured and estimated under both."""


def write_data(path: Path) -> None:
    words = " ".join(f"word{i % 97}" for i in range(400))  # well over 512 tokens
    rows = [{"instruction": f"Repeat sample {i}.", "input": "", "output": words} for i in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_random_1b(folder: Path) -> Path:
    """A random Llama with Llama-3.2-1B's layer shapes, and the default model's tokenizer."""
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from loraforge.models.sources import _cached_default_dir

    tokenizer = AutoTokenizer.from_pretrained(_cached_default_dir())
    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=len(tokenizer), tie_word_embeddings=True,
                         max_position_embeddings=2048)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def case_config(source: str, overrides: dict, data: Path, out: Path) -> dict:
    config = {"model": {"source": source}, "adapter": {"r": 16},
              "data": {"train_files": [str(data)], "cutoff_len": 256, "train_on_prompt": True},
              "train": {"max_steps": 1, "batch_size": 4, "lr": 1e-4},
              "output": {"dir": str(out), "tensorboard": False, "plot": False, "overwrite_output_dir": True}}
    for section, values in overrides.items():
        config[section].update(values)
    return config


def measured(config: dict, path: Path) -> dict:
    """The run's summary.json (``peak_memory_bytes``, ``tokens_per_s``)."""
    path.write_text(yaml.safe_dump(config))
    subprocess.run([sys.executable, "-m", "loraforge.cli.main", "train", str(path)], check=True,
                   stdout=subprocess.DEVNULL)
    return json.loads((Path(config["output"]["dir"]) / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/memory_estimate")
    parser.add_argument("--skip-1b", action="store_true")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "long.jsonl"
    write_data(data)
    sources = {"default": "default"}
    if not args.skip_1b:
        sources["1b"] = str(write_random_1b(work / "random-llama-1b"))

    rows = []
    for i, (model, label, overrides) in enumerate(CASES):
        if model not in sources:
            continue
        runs = {}
        for allocator in ALLOCATORS:
            config = case_config(sources[model], overrides, data, work / f"run{i}-{allocator}")
            config["train"]["cpu_allocator"] = allocator
            estimate = estimate_memory(Config.from_dict(config))
            runs[allocator] = summary = measured(config, work / f"case{i}-{allocator}.yaml")
            peak = summary["peak_memory_bytes"]
            parts = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in estimate.components.items() if v)
            rows.append([model if model == "default" else "random Llama 1.07B", label, allocator,
                         f"{peak / 2**20:.0f}", f"{estimate.total_bytes / 2**20:.0f}",
                         f"{estimate.total_bytes / peak - 1:+.1%}", f"{summary['tokens_per_s']:.1f}", parts])
            print(rows[-1], flush=True)
        compact, fast = runs["compact"], runs["fast"]
        rows[-1][2] += (f" (compact/fast: peak {compact['peak_memory_bytes'] / fast['peak_memory_bytes']:.2f}x, "
                        f"tokens/s {compact['tokens_per_s'] / fast['tokens_per_s']:.2f}x)")
    table = markdown_table(["model", "run", "train.cpu_allocator", "measured peak MiB", "estimate MiB", "error",
                            "tokens/s", "estimate parts (MiB)"], rows)
    load = os.getloadavg()[0]
    append_result("memory_estimate: `loraforge estimate` vs measured training peaks (CPU, fp32, 1 step)", table,
                  "Measured: `peak_memory_bytes` of the run's summary.json (peak RSS of the `loraforge train` "
                  "process). Estimate: `loraforge.train.memory.estimate_memory` on the same config, before any "
                  "weight is loaded. Each case runs under both `train.cpu_allocator` settings, one after the other. "
                  "Target: within 15%; for `fast` the allocator term is an upper bound."
                  f"\n\nLoad average (1 min) of this shared machine at the end: {load:.2f}.")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
