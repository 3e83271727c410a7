"""Loading a model bigger than it should take: a random 3B Llama streamed into NF4, against today's dense
path and transformers + bitsandbytes, the quantized cache, 2 QLoRA steps, and the estimate for 7B-70B.

The model: Llama shapes hidden 3072, 28 layers, intermediate 8192, 24 heads (8 KV heads), vocabulary
32,000, untied head: 3.02 B parameters, written here as bf16 safetensors in ~2 GB shards (6.0 GB), random
(``randn * 0.02``, norms 1), with loraforge's tiny byte-level tokenizer (ids < 259). Every load runs in a
fresh process and reports its peak resident set (``VmHWM``: anonymous memory plus the file pages it has
mapped) and its wall time:

- ``stream``: ``loraforge.models.prepare.load_base`` with ``model.dtype: bfloat16`` and NF4 (double quant,
  block 64, fp32 compute): the streaming load, which also writes the quantized cache;
- ``dense``: today's path before streaming, ``load_model`` in bfloat16 then ``quantize_model`` (bfloat16,
  not the float32 default, so that it fits beside the other sessions on this 24 GB machine);
- ``bnb``: ``transformers`` ``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True,
  nf4, double quant), device_map="cpu")``;
- ``cached``: ``load_base`` again, now a hit in the quantized cache.

Then ``loraforge train`` runs 2 QLoRA steps on the same base (LoRA r16 on every linear, batch 1 x 128 tokens,
bf16 base with fp32 compute), and ``estimate_memory`` gives its estimate of the same config; and the table
for 7B, 13B and 70B Llama shapes comes from ``estimate_memory`` on config-only folders.

    flock /work/helpers/bigmem.lock flock /work/helpers/bench.lock python benchmarks/big_model_load.py \
        [--workdir /tmp/big_model_load] [--keep]

The work folder (source, cache, run) is deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHAPE = {"hidden_size": 3072, "num_hidden_layers": 28, "intermediate_size": 8192, "num_attention_heads": 24,
         "num_key_value_heads": 8, "vocab_size": 32000}
BIG = {  # Llama-2 7B / 13B and Llama-2/3 70B shapes, Llama-2's vocabulary
    "7B": {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 11008, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000},
    "13B": {"hidden_size": 5120, "num_hidden_layers": 40, "intermediate_size": 13824, "num_attention_heads": 40,
            "num_key_value_heads": 40, "vocab_size": 32000},
    "70B": {"hidden_size": 8192, "num_hidden_layers": 80, "intermediate_size": 28672, "num_attention_heads": 64,
            "num_key_value_heads": 8, "vocab_size": 32000},
}
SHARD_BYTES = 2 * 10**9
NF4 = {"type": "nf4", "double_quant": True, "block_size": 64, "compute_dtype": "fp32"}
GiB = 2**30


def write_random_llama(folder: Path, shape: dict, weights: bool = True) -> Path:
    """A Llama HF folder of ``shape``: config, tokenizer and (``weights``) random bf16 shards with an index,
    written one tensor at a time (the model is never built)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from loraforge.models.tiny import tiny_tokenizer

    if (folder / "model.safetensors.index.json").is_file():  # written by an earlier, interrupted run
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**shape, tie_word_embeddings=False, max_position_embeddings=4096, dtype="bfloat16",
                         pad_token_id=256, eos_token_id=258, bos_token_id=None)
    config.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    if not weights:
        return folder
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(shape["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i)}
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (v, h)}
    generator = torch.Generator().manual_seed(0)
    shards, current, size, total = [], {}, 0, 0  # shards: the tensor names of each file written
    for name, tensor_shape in shapes.items():
        if len(tensor_shape) == 1:
            current[name] = torch.ones(tensor_shape, dtype=torch.bfloat16)
        else:
            current[name] = (torch.randn(tensor_shape, generator=generator) * 0.02).to(torch.bfloat16)
        size += current[name].numel() * 2
        if size >= SHARD_BYTES or name == "lm_head.weight":
            shards.append(list(current))
            save_file(current, folder / f"part-{len(shards)}.safetensors", metadata={"format": "pt"})
            current, total, size = {}, total + size, 0
    weight_map = {}
    for n, names in enumerate(shards, 1):
        final = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        (folder / f"part-{n}.safetensors").rename(folder / final)
        weight_map |= dict.fromkeys(names, final)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}, indent=1))
    return folder


def vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(kind: str, folder: str) -> dict:
    """One load in this process: seconds, peak RSS and the loaded model's bytes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, LlamaForCausalLM  # noqa: F401

    from loraforge.config.schema import ModelConfig, QuantizationConfig
    from loraforge.models.prepare import _quantize, load_base
    from loraforge.models.sources import load_model
    from loraforge.quant.summary import quant_summary

    config = ModelConfig(source=folder, dtype="bfloat16", quantization=QuantizationConfig(**NF4))
    started = time.perf_counter()  # imports done: the seconds are the load's own
    if kind in ("stream", "cached"):
        model, _ = load_base(config, torch.device("cpu"))
    elif kind == "dense":
        model, _ = load_model(folder, "bfloat16")
        model = _quantize(model, config)
    else:
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, dtype=torch.bfloat16,
                                                     device_map="cpu")
    seconds = time.perf_counter() - started
    summary = quant_summary(model)
    return {"seconds": seconds, "peak": vm_hwm(), "model_bytes": summary["total_bytes"],
            "quantized_bytes": summary["quantized_bytes"]}


def run_measure(kind: str, folder: Path, env: dict, timeout: int = 1200) -> dict:
    code = [sys.executable, __file__, "--measure", kind, "--folder", str(folder)]
    try:
        out = subprocess.run(code, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {timeout} s"}
    if out.returncode:
        last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {out.returncode}: {last[:200]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_config(source: str, data: Path, out: Path, steps: int = 2) -> dict:
    return {"model": {"source": source, "dtype": "bfloat16", "quantization": dict(NF4)},
            "adapter": {"r": 16, "alpha": 32},
            "data": {"train_files": [str(data)], "cutoff_len": 128, "train_on_prompt": True},
            "train": {"max_steps": steps, "batch_size": 1, "lr": 1e-4},
            "output": {"dir": str(out), "tensorboard": False, "plot": False, "overwrite_output_dir": True}}


def train(folder: Path, work: Path, env: dict) -> tuple[dict, dict, float]:
    import yaml

    data = work / "train.jsonl"
    words = " ".join(f"word{i % 97}" for i in range(200))
    data.write_text("".join(json.dumps({"instruction": f"Repeat {i}.", "input": "", "output": words}) + "\n"
                            for i in range(8)))
    config = train_config(str(folder), data, work / "run")
    (work / "train.yaml").write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "loraforge.cli.main", "train", str(work / "train.yaml")], check=True,
                   stdout=subprocess.DEVNULL, env=env)
    wall = time.perf_counter() - started
    return json.loads((work / "run" / "summary.json").read_text()), config, wall


def estimate(config: dict):
    from loraforge.config import Config
    from loraforge.train.memory import estimate_memory

    return estimate_memory(Config.from_dict(config, check_files=False), "cpu")


def gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def main() -> None:
    from report import append_result, markdown_table

    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/big_model_load")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = Path(args.workdir)
    load = os.getloadavg()
    env = {**os.environ, "LORAFORGE_CACHE": str(work / "cache"), "TOKENIZERS_PARALLELISM": "false"}
    try:
        started = time.perf_counter()
        folder = write_random_llama(work / "llama-3b", SHAPE)
        print(f"wrote {folder} in {time.perf_counter() - started:.0f} s", flush=True)
        shards = sorted(folder.glob("*.safetensors"))
        source_bytes, largest = sum(p.stat().st_size for p in shards), max(p.stat().st_size for p in shards)
        results = {}
        for kind in ("stream", "cached", "dense", "bnb"):
            results[kind] = run_measure(kind, folder, env)
            print(kind, results[kind], flush=True)
        cache_files = list((work / "cache" / "quantized").glob("*/model.safetensors"))
        cache_bytes = cache_files[0].stat().st_size if cache_files else 0
        model_bytes = results["stream"].get("model_bytes", 0)
        target = model_bytes + largest + GiB
        rows = []
        labels = {"stream": "(a) streaming NF4 load (`load_base`, writes the cache)",
                  "dense": "(b) before: dense bf16 load, then `quantize_model`",
                  "bnb": "(c) transformers + bitsandbytes `load_in_4bit`, CPU",
                  "cached": "(d) second `load_base`: the quantized cache"}
        for kind in ("stream", "dense", "bnb", "cached"):
            r = results[kind]
            if "error" in r:
                rows.append([labels[kind], "-", "-", "-", r["error"]])
                continue
            rows.append([labels[kind], f"{r['seconds']:.0f}", gib(r["peak"]), gib(r["model_bytes"]),
                         f"{r['peak'] / results['stream']['peak']:.2f}x of (a)" if "peak" in results["stream"] else ""])
        table = markdown_table(["load", "seconds", "peak RSS GiB", "model bytes GiB", "peak vs (a)"], rows)
        verdict = "met" if results["stream"].get("peak", target + 1) <= target else "NOT met"
        notes = (f"Load average at start: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} (2 cores shared with other "
                 f"sessions: seconds are indicative, peaks are not affected). Source: {len(shards)} shards, "
                 f"{gib(source_bytes)} GiB, largest {gib(largest)} GiB. Quantized cache file: {gib(cache_bytes)} GiB. "
                 f"Target for (a): peak <= model bytes + largest shard + 1 GiB = {gib(target)} GiB: {verdict}. "
                 f"Peak RSS is VmHWM (anonymous memory plus mapped file pages read so far).")

        summary, config, wall = train(folder, work, env)
        est = estimate(config)
        parts = est.components
        train_rows = [["measured (`loraforge train`, CPU)", f"{summary['train_seconds'] / summary['steps']:.0f}",
                       f"{wall:.0f}", gib(summary["peak_memory_bytes"]), "-"],
                      ["`loraforge estimate` (same config, CPU)", "-", "-", gib(est.total_bytes),
                       ", ".join(f"{k} {gib(v)}" for k, v in parts.items())]]
        train_table = markdown_table(["2 QLoRA steps, 3B, NF4, r16, batch 1 x 128", "s/step", "process wall s",
                                      "peak GiB", "estimate parts (GiB)"], train_rows)
        train_notes = (f"Estimate error: {est.total_bytes / summary['peak_memory_bytes'] - 1:+.1%} of the measured "
                       f"peak. The train process's base load is a cache hit.")

        big_rows = []
        for name, shape in BIG.items():
            config_only = write_random_llama(work / f"config-{name}", shape, weights=False)
            for gc in (False, True):
                cfg = train_config(str(config_only), work / "train.jsonl", work / "unused")
                cfg["data"]["cutoff_len"], cfg["train"]["batch_size"] = 2048, 1
                cfg["train"]["gradient_checkpointing"] = gc
                e = estimate(cfg).components
                big_rows.append([name, "yes" if gc else "no", gib(e["weights"]), gib(e["adapter"]),
                                 gib(e["optimizer"]), gib(e["activations"] + e["logits"]),
                                 gib(e["gradients"] + e["runtime"]), gib(sum(e.values()))])
        big_table = markdown_table(["model", "grad. ckpt", "weights (NF4) GiB", "adapter GiB", "optimizer GiB",
                                    "activations + logits GiB", "other GiB", "peak GiB"], big_rows)
        append_result("big_model_load: a 3B Llama streamed into NF4, the quantized cache, 2 QLoRA steps",
                      table + "\n\n" + train_table + "\n\n" + big_table,
                      notes + "\n\n" + train_notes + "\n\nLast table: `estimate_memory` (device cpu: the runtime "
                      "included in 'other' with the adapter gradients) for Llama shapes, QLoRA NF4 "
                      "r16 on every linear, model.dtype bfloat16, AdamW, batch 1 x 2048 tokens.")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if "--measure" in sys.argv:
        parsed = argparse.ArgumentParser()
        parsed.add_argument("--measure")
        parsed.add_argument("--folder")
        options = parsed.parse_args()
        print(json.dumps(measure(options.measure, options.folder)))
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        main()
