"""Vision-language LoRA on the tiny Qwen2.5-VL: training vs transformers Trainer + PEFT, and serving mixed
image/text requests.

Training: each trainer runs in its own subprocess (its own peak RSS), on the bundled shapes data
(examples/data/vlm_shapes), LoRA r=8 all-linear plus the vision tower's qkv, the same initial adapter
weights (PEFT loads the adapter loraforge initialised with the same seed) and the same batches in the same
order, so the per-step losses are directly comparable.

Serving: one Engine over the tiny VLM with two adapters; batches of greedy requests, text only, images only
and mixed half and half, all adapters round-robin; and transformers' generate through PEFT, one request at
a time, as the reference row.

    python benchmarks/vlm.py [--steps 30] [--batch 4] [--threads 1] [--requests 32]

One thread by default: the tiny model's matmuls are too small to split, and on a shared machine two
OpenMP threads spent most of each step waiting for each other (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from report import append_result, markdown_table

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "vlm_shapes" / "train.jsonl"
LORA = {"r": 8, "alpha": 16, "target_modules": "all-linear", "vision": ["qkv"]}


def worker_ours(args) -> dict:
    """loraforge's trainer through ``run_training``, as ``loraforge train`` runs it."""
    from loraforge.config import Config
    from loraforge.train import run_training

    config = Config.from_dict({
        "model": {"source": "tiny-qwen2.5-vl", "threads": args.threads},
        "adapter": dict(LORA),
        "data": {"format": "openai", "train_files": [str(DATA)], "cutoff_len": 256},
        "train": {"seed": 0, "max_steps": args.steps, "batch_size": args.batch, "lr": args.lr,
                  "scheduler": "constant", "max_grad_norm": 1.0},
        "output": {"dir": str(Path(args.tmp) / "ours"), "overwrite_output_dir": True, "tensorboard": False,
                   "plot": False},
    })
    result = run_training(config, echo=lambda *_: None)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"losses": [r["loss"] for r in records if "loss" in r], "tokens_per_s": result.summary["tokens_per_s"]}


def worker_hf(args) -> dict:
    """transformers Trainer + PEFT on loraforge's batches, from loraforge's initial adapter weights."""
    import numpy as np
    from peft import PeftModel
    from torch.utils.data import DataLoader
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from loraforge.adapters import AdapterSpec, add_adapter, save_adapter
    from loraforge.data.collate import batches
    from loraforge.data.vision import build_vision_datasets, collate_vision
    from loraforge.models.tiny_vlm import tiny_vlm, tiny_vlm_processor

    processor = tiny_vlm_processor()
    data = build_vision_datasets(processor, train_files=[str(DATA)], eval_files=None, format="openai", columns=None,
                                 val_size=0, cutoff_len=256, train_on_prompt=False, system_prompt=None,
                                 template="auto", on_overflow="drop", seed=0)
    step_batches = [[data.train[i] for i in batch] for epoch in range(100)
                    for batch in batches(data.train, args.batch, 0, epoch)][: args.steps]
    random.seed(0), np.random.seed(0), torch.manual_seed(0)  # as run_training seeds before adding the adapter
    init = tiny_vlm()
    spec = AdapterSpec(**LORA)
    add_adapter(init, spec)
    save_adapter(init, Path(args.tmp) / "init", spec)
    model = PeftModel.from_pretrained(tiny_vlm(), Path(args.tmp) / "init", is_trainable=True)
    rows = [s for batch in step_batches for s in batch]
    bounds = [0]
    for batch in step_batches:
        bounds.append(bounds[-1] + len(batch))
    index_batches = [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]

    class InOrder(Trainer):
        def get_train_dataloader(self):
            return DataLoader(self.train_dataset, batch_sampler=index_batches, collate_fn=self.data_collator)

    class Clock(TrainerCallback):
        """From the first step's start to the last step's end: the batches' collation (image decoding and
        pixel processing) happens between steps, and loraforge's clock counts it too."""

        def __init__(self):
            self.first, self.seconds, self.tokens = None, 0.0, 0

        def on_step_begin(self, targs, state, control, **kw):
            if self.first is None:
                self.first = time.perf_counter()

        def on_step_end(self, targs, state, control, **kw):
            self.seconds = time.perf_counter() - self.first
            self.tokens += sum(len(s.input_ids) for s in step_batches[state.global_step - 1])

    clock = Clock()
    targs = TrainingArguments(output_dir=str(Path(args.tmp) / "hf"), per_device_train_batch_size=args.batch,
                              max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
                              warmup_steps=0, weight_decay=0.0, logging_steps=1, save_strategy="no", report_to=[],
                              use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, max_grad_norm=1.0,
                              remove_unused_columns=False)
    trainer = InOrder(model=model, args=targs, train_dataset=rows, callbacks=[clock],
                      data_collator=lambda samples: collate_vision(samples, processor))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"losses": losses, "tokens_per_s": clock.tokens / clock.seconds}


def worker_serve(args) -> dict:
    """Engine throughput on text-only, image-only and mixed batches; PEFT + generate one at a time."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from PIL import Image

    from loraforge.data.images import image_ref
    from loraforge.data.vision import collate_vision, prompt_sample
    from loraforge.models.tiny_vlm import tiny_vlm, tiny_vlm_processor
    from loraforge.serve import Engine, Request, SamplingParams

    processor = tiny_vlm_processor()
    tmp = Path(args.tmp)
    adapters = {}
    for seed, name in enumerate(("a", "b")):
        torch.manual_seed(seed)
        peft = get_peft_model(tiny_vlm(), LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                                     target_modules=r".*language_model.*_proj"))
        peft.save_pretrained(tmp / name)
        adapters[name] = tmp / name
    images = []
    for i, size in enumerate([(56, 56), (84, 56), (112, 84)]):
        Image.new("RGB", size, (40 * i, 200 - 50 * i, 90)).save(tmp / f"{i}.png")
        images.append(image_ref(str(tmp / f"{i}.png"), tmp, "bench"))

    def sample(k, with_image):
        shown = [images[k % len(images)]] if with_image else []
        content = [{"type": "image"}] * len(shown) + [{"type": "text", "text": f"Request {k}: describe it."}]
        return prompt_sample(processor, [{"role": "user", "content": content}], shown, processor.chat_template)

    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    mixes = {"text only": [False] * args.requests, "images only": [True] * args.requests,
             "mixed (half images)": [k % 2 == 0 for k in range(args.requests)]}
    engine = Engine(tiny_vlm(), processor, device="cpu", adapters=adapters, pool_bytes=1 << 26)
    out = {}
    for round_ in range(2):  # best of 2 interleaved rounds
        for name, flags in mixes.items():
            samples = [sample(k, flag) for k, flag in enumerate(flags)]
            requests = [Request(s.input_ids, params, "ab"[k % 2], images=s.images) for k, s in enumerate(samples)]
            start = time.perf_counter()
            done = engine.generate(requests)
            rate = sum(len(c.token_ids) for c in done) / (time.perf_counter() - start)
            out[name] = max(out.get(name, 0.0), rate)
    mixed = [sample(k, k % 2 == 0) for k in range(args.requests // 4)]
    models = {name: PeftModel.from_pretrained(tiny_vlm(), path).eval() for name, path in adapters.items()}
    start = time.perf_counter()
    tokens = 0
    for k, s in enumerate(mixed):
        batch = collate_vision([s], processor)
        batch.pop("labels")
        with torch.no_grad():
            generated = models["ab"[k % 2]].generate(**batch, do_sample=False, max_new_tokens=args.new_tokens,
                                                     min_new_tokens=args.new_tokens,
                                                     pad_token_id=processor.pad_token_id)
        tokens += generated.shape[1] - len(s.input_ids)
    out["hf_generate"] = tokens / (time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--worker", choices=["ours", "hf", "serve"])
    parser.add_argument("--tmp", default="/tmp/loraforge-bench-vlm")
    args = parser.parse_args()
    if args.worker:
        Path(args.tmp).mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(args.threads)
        result = {"ours": worker_ours, "hf": worker_hf, "serve": worker_serve}[args.worker](args)
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print("RESULT " + json.dumps(result))
        return
    load_before = os.getloadavg()[0]
    results = {}
    for name in ("hf", "ours", "serve"):
        out = subprocess.run([sys.executable, __file__, "--worker", name, *sys.argv[1:]], capture_output=True,
                             text=True, check=True).stdout
        results[name] = json.loads(out.split("RESULT ", 1)[1])
    ours, hf, serve = results["ours"], results["hf"], results["serve"]
    max_diff = max(abs(a - b) for a, b in zip(ours["losses"], hf["losses"]))
    rows = [["transformers Trainer + PEFT", f"{hf['tokens_per_s']:.1f}", f"{hf['peak_rss_gb']:.2f}", "1.00"],
            ["loraforge", f"{ours['tokens_per_s']:.1f}", f"{ours['peak_rss_gb']:.2f}",
             f"{ours['tokens_per_s'] / hf['tokens_per_s']:.2f}"]]
    every = max(1, args.steps // 8)
    curve = ", ".join(f"{a:.3f}/{b:.3f}" for a, b in list(zip(ours["losses"], hf["losses"]))[::every])
    serve_rows = [[name, f"{serve[name]:.1f}", f"{serve[name] / serve['hf_generate']:.1f}x"]
                  for name in ("text only", "images only", "mixed (half images)")]
    serve_rows.append(["transformers generate + PEFT, one request at a time (mixed)", f"{serve['hf_generate']:.1f}",
                       "1.0x"])
    append_result(
        f"Vision-language LoRA on the tiny Qwen2.5-VL: training vs transformers Trainer + PEFT, and serving "
        f"(LoRA r=8 all-linear + vision qkv, batch {args.batch}, {args.steps} steps, {args.threads} threads)",
        markdown_table(["trainer", "tokens/s", "peak RSS GB", "speed ratio"], rows),
        f"Loss curves (loraforge/HF, every {every} steps, same initial adapter and batches): {curve}. Largest "
        f"per-step difference: {max_diff:.5f}.\n\nServing (one Engine, two LM adapters round-robin, "
        f"{args.requests} greedy requests x {args.new_tokens} new tokens per batch, best of 2 rounds; images "
        f"of 16-48 image tokens; peak RSS {serve['peak_rss_gb']:.2f} GB):\n\n"
        + markdown_table(["requests", "output tok/s", "vs HF generate"], serve_rows)
        + "\n\nThe tiny model (0.1M parameters) makes every step dispatch-bound: these ratios say how much "
          "per-step overhead each stack has, not how a 7B model's FLOP-bound steps compare. Tokens/s counts "
          "prompt and image tokens; both trainers' clocks include batch collation (image decoding, pixels). "
          f"Load average (1 min) of this shared machine: {load_before:.2f} before, {os.getloadavg()[0]:.2f} "
          "after.",
    )


if __name__ == "__main__":
    main()
