"""loraforge's trainer vs the transformers Trainer + PEFT: same model, data, LoRA config and steps.

Each trainer runs in its own subprocess (so peak RSS is its own), one after the other, in one
invocation. Both see the same batches in the same order: loraforge's length-grouped order is handed
to the HF Trainer as the same batches (a batch sampler), so the per-step losses are directly comparable (and
HF gets the benefit of our padding-saving batch order; the speed ratio measures the trainers alone).

    python benchmarks/train_vs_hf.py [--steps 20] [--batch 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from report import append_result, markdown_table

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "quickstart_train.jsonl"
LORA = {"r": 16, "alpha": 32, "target_modules": "all-linear"}


def load_everything(args):
    from loraforge.data import build_datasets
    from loraforge.data.collate import batches
    from loraforge.models import load_model

    model, tokenizer = load_model(args.model)
    data = build_datasets(tokenizer, train_files=[DATA], eval_files=None, test_files=None, format="alpaca",
                          columns=None, val_size=0, cutoff_len=args.cutoff, train_on_prompt=False, packing=False,
                          system_prompt=None, template="auto", seed=0)
    # loraforge's trainer walks these batches in this order (seed 0; an epoch's last batch may be
    # short); the HF Trainer is handed exactly the same batches.
    step_batches = [[data.train[i] for i in batch] for epoch in range(100)
                    for batch in batches(data.train, args.batch, 0, epoch)][: args.steps]
    return model, tokenizer, step_batches


def worker_ours(args) -> dict:
    """loraforge's own trainer, through the same ``run_training`` that ``loraforge train`` calls."""
    from loraforge.config import Config
    from loraforge.train import run_training

    config = Config.from_dict({
        "model": {"source": args.model, "threads": args.threads},
        "adapter": {**LORA},
        "data": {"train_files": [str(DATA)], "cutoff_len": args.cutoff},
        "train": {"seed": 0, "max_steps": args.steps, "batch_size": args.batch, "lr": args.lr,
                  "scheduler": "constant", "max_grad_norm": 1.0, "precision": args.precision},
        "output": {"dir": str(Path(args.tmp) / "ours"), "overwrite_output_dir": True, "tensorboard": False,
                   "plot": False},
    })
    result = run_training(config, echo=lambda *_: None)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"losses": [r["loss"] for r in records if "loss" in r], "tokens_per_s": result.summary["tokens_per_s"]}


def worker_hf(args) -> dict:
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    model, tokenizer, step_batches = load_everything(args)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules="all-linear",
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    rows = [{"input_ids": s.input_ids, "labels": s.labels, "attention_mask": [1] * len(s.input_ids)}
            for batch in step_batches for s in batch]
    bounds = list(itertools.accumulate([0] + [len(b) for b in step_batches]))
    index_batches = [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]

    class InOrder(Trainer):
        def get_train_dataloader(self):
            return DataLoader(self.train_dataset, batch_sampler=index_batches, collate_fn=self.data_collator)

    class Clock(TrainerCallback):
        def __init__(self):
            self.starts, self.seconds, self.tokens = {}, 0.0, 0

        def on_step_begin(self, targs, state, control, **kw):
            self.starts[state.global_step] = time.perf_counter()

        def on_step_end(self, targs, state, control, **kw):
            step = state.global_step - 1
            self.seconds += time.perf_counter() - self.starts[step]
            self.tokens += sum(len(s.input_ids) for s in step_batches[step])

    clock = Clock()
    targs = TrainingArguments(output_dir=str(Path(args.tmp) / "hf"), per_device_train_batch_size=args.batch,
                              max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
                              warmup_steps=0, weight_decay=0.0, logging_steps=1, save_strategy="no", report_to=[],
                              use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, max_grad_norm=1.0,
                              remove_unused_columns=False, bf16=args.precision == "bf16")
    trainer = InOrder(model=model, args=targs, train_dataset=rows, callbacks=[clock],
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"losses": losses, "tokens_per_s": clock.tokens / clock.seconds}


def worker_profile(args) -> dict:
    """Where one training step's time goes: torch.profiler self CPU time by op, for our masked-head loss
    and for the full-logits loss that HF computes, on the same model, batch and adapter."""
    from torch.profiler import ProfilerActivity, profile

    from loraforge.adapters import AdapterSpec, add_adapter, mark_only_adapters_trainable
    from loraforge.data.collate import collate
    from loraforge.train.loss import summed_token_loss

    model, tokenizer, step_batches = load_everything(args)
    add_adapter(model, AdapterSpec(**LORA))
    mark_only_adapters_trainable(model)
    model.train()
    batch = collate(step_batches[0], tokenizer.pad_token_id)

    def ours():
        loss_sum, count = summed_token_loss(model, batch)
        (loss_sum / count).backward()

    def full_logits():
        model(**batch, use_cache=False).loss.backward()

    out = {}
    for name, step in (("ours", ours), ("full_logits", full_logits)):
        step()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                step()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        out[name] = {"total_ms": total / 2e3, "top": [(e.key, e.self_cpu_time_total / 2e3) for e in events[:8]]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: autocast in both trainers (CPUs with bf16 units run it faster)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cutoff", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=["ours", "hf", "profile"])
    parser.add_argument("--tmp", default="/tmp/loraforge-bench")
    args = parser.parse_args()
    if args.worker:
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        result = {"ours": worker_ours, "hf": worker_hf, "profile": worker_profile}[args.worker](args)
        result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print("RESULT " + json.dumps(result))
        return
    results = {}
    for name in ("hf", "ours", "profile"):
        out = subprocess.run([sys.executable, __file__, "--worker", name, *sys.argv[1:]], capture_output=True,
                             text=True, check=True).stdout
        results[name] = json.loads(out.split("RESULT ", 1)[1])
    ours, hf = results["ours"], results["hf"]
    max_diff = max(abs(a - b) for a, b in zip(ours["losses"], hf["losses"]))
    rows = [["transformers Trainer + PEFT", f"{hf['tokens_per_s']:.1f}", f"{hf['peak_rss_gb']:.2f}", "1.00"],
            ["loraforge", f"{ours['tokens_per_s']:.1f}", f"{ours['peak_rss_gb']:.2f}",
             f"{ours['tokens_per_s'] / hf['tokens_per_s']:.2f}"]]
    curve = ", ".join(f"{a:.3f}/{b:.3f}" for a, b in list(zip(ours["losses"], hf["losses"]))[:: max(1, args.steps // 8)])
    prof = results["profile"]
    names = list(dict.fromkeys(k for side in ("ours", "full_logits") for k, _ in prof[side]["top"]))
    per_op = {side: dict(prof[side]["top"]) for side in ("ours", "full_logits")}
    profile_rows = [[op, f"{per_op['ours'].get(op, 0):.0f}", f"{per_op['full_logits'].get(op, 0):.0f}"]
                    for op in names]
    profile_rows.append(["total (all ops)", f"{prof['ours']['total_ms']:.0f}", f"{prof['full_logits']['total_ms']:.0f}"])
    append_result(
        f"Training throughput: loraforge vs transformers Trainer + PEFT ({args.model}, LoRA r=16 all-linear, "
        f"{args.precision}, "
        f"batch {args.batch}, {args.steps} steps, {args.threads} threads, prompt-masked SFT on the quickstart data)",
        markdown_table(["trainer", "tokens/s", "peak RSS GB", "speed ratio"], rows),
        f"Loss curves (loraforge/HF, every {max(1, args.steps // 8)} steps): {curve}. "
        f"Largest per-step difference: {max_diff:.4f}.\n\nWhere a forward+backward step's time goes (torch.profiler, "
        f"self CPU ms per step, top ops of each; same batch of {args.batch}, same adapter):\n\n"
        + markdown_table(["op", "loraforge (head at labelled positions)", "full logits (as HF/PEFT)"], profile_rows),
    )


if __name__ == "__main__":
    main()
