"""LoRA, DoRA, AdaLoRA, VeRA and PiSSA side by side on the quickstart task, trained and then served.

Each method trains once from ``examples/quickstart.yaml`` (the default model, the bundled data), with
only the adapter overridden (see ``METHODS``); LoRA, DoRA and PiSSA keep the quickstart's r=16,
alpha=32, lr=1e-3. Per method the table gives:
- held-out exact match before and after training (``summary.json``; 32 prompts, so one prompt is 3.1%);
- trainable parameters while training (counted on the model with the adapter added; AdaLoRA's are
  its ``init_r`` triplets, before the allocator prunes them);
- the saved ``adapter_model.safetensors`` size (VeRA's includes its shared projections, PiSSA's is
  saved for the original base, i.e. at rank 2r);
- mean optimizer-step time of the run (``train_seconds / steps``), and, since the machine is shared and
  its load moves during the runs, the same measured side by side: short runs of ``--step-steps``
  steps (no held-out scoring), the methods in interleaved rounds, each keeping its best round.

Serving: every trained adapter is registered in one ``Engine`` over the default model, and greedy
batches of the same size (``--requests-per-method`` x the number of methods, ``--max-tokens`` new
tokens each, EOS ignored, the held-out prompts cycled) run in interleaved rounds, keeping each
batch's best round: the base model alone, each method alone, and the mixed batch (the methods round
robin). Output tokens/s are quoted as ratios to the base-only batch. The mixed batch's tokens are
compared with the same requests' tokens in the single-method batches.

    python benchmarks/methods.py [--methods lora,dora,adalora,vera,pissa] [--max-steps 3] [--epochs E]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch
from report import append_result, markdown_table

from loraforge.adapters import add_adapter, mark_only_adapters_trainable
from loraforge.adapters.peft_format import AdapterFormatError
from loraforge.config import load_config
from loraforge.data import build_datasets, read_records, to_conversations
from loraforge.data.tokenize import prompt_ids
from loraforge.models import load_model
from loraforge.serve import Engine, Request, SamplingParams
from loraforge.train import run_training

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"

METHODS = {
    "lora": [],
    "dora": ["adapter.method=dora"],
    "adalora": ["adapter.method=adalora"],
    "vera": ["adapter.method=vera", "adapter.r=256", "train.lr=1e-2"],
    "pissa": ["adapter.init=pissa"],
}
"""Method -> overrides of ``examples/quickstart.yaml``. VeRA: PEFT's default rank and a 10x higher lr, as
the VeRA paper trains its scaling vectors at much higher rates than LoRA's matrices."""

ADALORA_RANKS = (24, 16)
"""AdaLoRA's ``init_r`` and ``target_r``: it starts above LoRA's r=16 and prunes down to it on average."""
ADALORA_SCHEDULE = (0.25, 0.5)
"""AdaLoRA's ``tinit`` and ``tfinal`` as shares of the run's optimizer steps (42 steps: 10 and 21)."""


def planned_steps(config, tokenizer) -> int:
    """The optimizer steps ``run_training`` will take with ``config`` (its own formula)."""
    if config.train.max_steps:
        return config.train.max_steps
    d = config.data
    data = build_datasets(
        tokenizer, train_files=d.train_files, eval_files=d.eval_files, test_files=d.test_files, format=d.format,
        columns=d.columns, val_size=d.val_size, cutoff_len=d.cutoff_len, train_on_prompt=d.train_on_prompt,
        packing=d.packing, system_prompt=d.system_prompt, template=d.template, seed=config.train.seed,
    )
    per_epoch = math.ceil(math.ceil(len(data.train) / config.train.batch_size) / config.train.grad_accum)
    return max(1, math.ceil(config.train.epochs * per_epoch))


def method_config(name: str, run_dir: Path, run_overrides: list[str], tokenizer):
    """The quickstart config for method ``name``, written to ``run_dir``."""
    overrides = [*METHODS[name], *run_overrides, f"output.dir={run_dir}", "output.overwrite_output_dir=true",
                 "output.tensorboard=false", "output.plot=false"]
    if name == "adalora":
        steps = planned_steps(load_config(QUICKSTART, overrides), tokenizer)
        tinit, tfinal = (int(share * steps) for share in ADALORA_SCHEDULE)
        overrides.append(f"adapter.options={{init_r: {ADALORA_RANKS[0]}, target_r: {ADALORA_RANKS[1]}, "
                         f"tinit: {tinit}, tfinal: {tfinal}}}")
    return load_config(QUICKSTART, overrides)


def trainable_parameters(base: torch.nn.Module, spec) -> int:
    """Parameters that train with ``spec``, counted on a copy of ``base``. The init changes no shape, so
    the count uses ``init: none``, which every method takes and which skips PiSSA's SVD."""
    model = copy.deepcopy(base)
    add_adapter(model, dataclasses.replace(spec, init="none"), "count")
    mark_only_adapters_trainable(model)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_all(names: list[str], work: Path, run_overrides: list[str], base, tokenizer) -> dict[str, dict]:
    results = {}
    for name in names:
        config = method_config(name, work / name, run_overrides, tokenizer)
        started = time.perf_counter()
        result = run_training(config)
        wall = time.perf_counter() - started
        summary = json.loads((result.run_dir / "summary.json").read_text())
        results[name] = {
            "summary": summary,
            "adapter_dir": result.adapter_dir,
            "adapter_bytes": (result.adapter_dir / "adapter_model.safetensors").stat().st_size,
            "trainable": trainable_parameters(base, config.adapter),
            "wall_s": wall,
            "config": config,
        }
    return results


def interleaved_step_seconds(names: list[str], work: Path, steps: int, rounds: int, tokenizer) -> dict[str, float]:
    """Best-round mean step time per method, from ``steps``-step runs in ``rounds`` interleaved rounds."""
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name in names:
            config = method_config(name, work / "step-time" / name, [f"train.max_steps={steps}", "data.test_files=[]"],
                                   tokenizer)
            summary = run_training(config, echo=lambda line: None).summary
            best[name] = min(best.get(name, math.inf), summary["train_seconds"] / summary["steps"])
    return best


def held_out_prompts(tokenizer, template: str) -> list[list[int]]:
    records = read_records(ROOT / "examples" / "data" / "quickstart_test.jsonl")
    return [prompt_ids(tokenizer, c.messages[:-1], template) for c in to_conversations(records, "alpaca", {}, None)]


def timed_generate(engine: Engine, prompts: list[list[int]], adapters: list[str | None], max_tokens: int):
    """``(output tokens/s, token ids per request)`` of one ``engine.generate`` call."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    requests = [Request(p, params, adapter=a) for p, a in zip(prompts, adapters)]
    started = time.perf_counter()
    completions = engine.generate(requests)
    seconds = time.perf_counter() - started
    return sum(len(c.token_ids) for c in completions) / seconds, [c.token_ids for c in completions]


def serve_all(trained: dict[str, dict], base, tokenizer, template: str, per_method: int, max_tokens: int,
              rounds: int, max_rank: int, pool_bytes: int) -> tuple[dict, dict[str, str]]:
    """Throughput of the base-only, single-method and mixed batches; and why a method could not be served."""
    engine = Engine(base, tokenizer, pool_bytes=pool_bytes, max_rank=max_rank)
    refused = {}
    for name, run in trained.items():
        try:
            engine.register_adapter(name, run["adapter_dir"])
        except AdapterFormatError as err:  # the engine's refusal is the result to report
            refused[name] = str(err)
    served = [name for name in trained if name not in refused]
    size = per_method * len(trained)
    held_out = held_out_prompts(tokenizer, template)
    prompts = [held_out[i % len(held_out)] for i in range(size)]
    mixed = [served[i % len(served)] for i in range(size)] if served else []
    batches = {"base": [None] * size, **{name: [name] * size for name in served}}
    if len(served) > 1:
        batches["mixed"] = mixed
    timed_generate(engine, prompts[:4], [None] * 4, 4)  # warm-up
    best: dict[str, float] = {}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(rounds):
        for label, adapters in batches.items():
            rate, tokens[label] = timed_generate(engine, prompts, adapters, max_tokens)
            best[label] = max(best.get(label, 0.0), rate)
    if "mixed" in tokens:
        best["mixed_matches"] = sum(tokens["mixed"][i] == tokens[a][i] for i, a in enumerate(mixed))
        best["batch"] = size
    return best, refused


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--epochs", type=float, default=None, help="train.epochs (default: the quickstart's 2)")
    parser.add_argument("--max-steps", type=int, default=None, help="train.max_steps, e.g. 3 for a smoke run")
    parser.add_argument("--workdir", default="/tmp/loraforge-methods")
    parser.add_argument("--requests-per-method", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the serving batches")
    parser.add_argument("--step-steps", type=int, default=4, help="steps per run of the side-by-side step timing")
    parser.add_argument("--step-rounds", type=int, default=2, help="interleaved rounds of the step timing")
    parser.add_argument("--max-rank", type=int, default=256, help="the engine's max_rank (VeRA serves at its r)")
    parser.add_argument("--pool-mib", type=int, default=1536)
    parser.add_argument("--no-append", action="store_true", help="print the table only (smoke runs)")
    args = parser.parse_args()
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    run_overrides = ([f"train.epochs={args.epochs}"] if args.epochs is not None else []) + (
        [f"train.max_steps={args.max_steps}"] if args.max_steps is not None else [])

    load_before, started = os.getloadavg()[0], time.perf_counter()
    base, tokenizer = load_model("default")
    trained = train_all(names, Path(args.workdir), run_overrides, base, tokenizer)
    step_s = interleaved_step_seconds(names, Path(args.workdir), args.step_steps, args.step_rounds, tokenizer)
    template = trained[names[0]]["config"].data.template
    rates, refused = serve_all(trained, base, tokenizer, template, args.requests_per_method, args.max_tokens,
                               args.rounds, args.max_rank, args.pool_mib << 20)
    wall, load_after = time.perf_counter() - started, os.getloadavg()[0]

    lora = trained.get("lora")
    rows = []
    for name in names:
        run, s = trained[name], trained[name]["summary"]
        served = (f"{rates[name]:.1f} ({rates[name] / rates['base']:.2f}x)" if name in rates
                  else "not served (refused)")
        rows.append([
            name, " ".join(METHODS[name]) or "(quickstart.yaml)", f"{s['test_exact_match_before']:.1%}",
            f"{s['test_exact_match_after']:.1%}", f"{s.get('eval_loss', float('nan')):.3f}", f"{run['trainable']:,}",
            f"{run['trainable'] / lora['trainable']:.3f}" if lora else "",
            f"{run['adapter_bytes'] / 2**20:.2f}", f"{s['train_seconds'] / s['steps']:.2f}",
            f"{step_s[name]:.2f}" + (f" ({step_s[name] / step_s['lora']:.2f}x)" if lora else ""), served,
        ])
    header = ["method", "overrides", "exact match before", "exact match after", "final eval loss",
              "trainable params", "params vs LoRA", "adapter MiB", "step s (run)", "step s side by side (vs LoRA)",
              "served tok/s, this method only (vs base)"]
    steps = trained[names[0]]["summary"]["steps"]
    adalora = trained.get("adalora")
    notes = [
        (f"- {steps} optimizer steps per method, batch 8; held-out exact match on 32 prompts (one prompt = 3.1%). "
         f"Total wall time {wall / 60:.1f} min (training {sum(r['wall_s'] for r in trained.values()) / 60:.1f} min)."),
    ]
    notes.append(f"- step s (run): train_seconds / steps of the run above, methods one after the other; side by side: "
                 f"{args.step_steps}-step runs, best of {args.step_rounds} interleaved rounds.")
    if adalora:
        notes.append(f"- AdaLoRA: {adalora['config'].adapter.options}.")
    notes.append(
        f"- Serving: one Engine (max_rank {args.max_rank}, pool {args.pool_mib} MiB) over the default model, "
        f"batches of {args.requests_per_method * len(names)} greedy requests x {args.max_tokens} new tokens "
        f"(EOS ignored), best of {args.rounds} interleaved rounds. Base-only batch: {rates['base']:.1f} tok/s. "
        "Each method's column is a batch of that method's adapter only.")
    if "mixed" in rates:
        notes.append(f"- Mixed batch ({', '.join(n for n in names if n in rates)} round robin): "
                     f"{rates['mixed']:.1f} tok/s, {rates['mixed'] / rates['base']:.2f}x the base-only batch; "
                     f"{rates['mixed_matches']}/{rates['batch']} requests' tokens equal those of the same request "
                     "in its single-method batch.")
    if "vera" in trained:
        notes.append(f"- The engine serves every method as its exact fold into LoRA pairs; VeRA's pair has its full "
                     f"r={trained['vera']['config'].adapter.r} (LoRA's: 16), so its few trainable vectors do not make "
                     "it cheap to serve.")
    for name, reason in refused.items():
        notes.append(f"- {name} not served: the engine refused its adapter ({reason.splitlines()[0]}).")
    notes.append(f"- Load average (1 min) of this shared machine: {load_before:.2f} before, {load_after:.2f} after; "
                 f"torch threads: {torch.get_num_threads()}.")
    table, notes = markdown_table(header, rows), "\n".join(notes)
    if args.no_append:
        print(f"{table}\n\n{notes}")
    else:
        append_result("Adapter methods on the quickstart: accuracy, size, step time, serving (LoRA, DoRA, AdaLoRA, "
                      "VeRA, PiSSA)", table, notes)


if __name__ == "__main__":
    main()
