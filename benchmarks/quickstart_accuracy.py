"""Held-out accuracy on the quickstart task: LoRA vs QLoRA vs QA-LoRA, and what survives export to 4 bits.

One run trains three adapters on the default model with the shipped example configs, then scores
held-out exact match for:
- (a) LoRA, fp32 base (``examples/quickstart.yaml``);
- (b) QLoRA, NF4 + double quant base (``examples/qlora_nf4.yaml``): the adapter model, and the model
  merged then re-quantized to Q4_1 by round-to-nearest (``loraforge export --gguf-type q4_1``);
- (c) QA-LoRA on the default model's own Q4_1 blocks (``examples/qalora_gguf.yaml``): the adapter
  model, and the merged, lossless Q4_1 GGUF export, scored in loraforge from the exported file and in
  llama.cpp when llama-cpp-python is installed.
It also compares QA-LoRA's and QLoRA's training speed (tokens/s, same data and steps).

    python benchmarks/quickstart_accuracy.py [--workdir /tmp/loraforge-accuracy]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from report import append_result, markdown_table

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"lora": "quickstart.yaml", "qlora": "qlora_nf4.yaml", "qalora": "qalora_gguf.yaml"}


def loraforge(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "loraforge.cli.main", *args], check=True)


def test_pairs() -> list[tuple[list[dict], str]]:
    from loraforge.data import read_records, to_conversations

    records = read_records(ROOT / "examples" / "data" / "quickstart_test.jsonl")
    return [(c.messages[:-1], c.messages[-1]["content"]) for c in to_conversations(records, "alpaca", {}, None)]


def loraforge_accuracy(gguf_path: Path) -> float:
    from loraforge.eval import EvalOptions, evaluate, read_eval_data
    from loraforge.models import load_model

    model, tokenizer = load_model(str(gguf_path), native_gguf=True)
    data = read_eval_data(ROOT / "examples" / "data" / "quickstart_test.jsonl", "alpaca")
    result = evaluate(model, tokenizer, data, options=EvalOptions(metrics=("exact_match",), max_new_tokens=24))
    return result.scores["base"]["exact_match"]


def llama_cpp_accuracy(gguf_path: Path) -> float | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from loraforge.data.tokenize import prompt_ids
    from loraforge.models.gguf_native import load_gguf_native
    from loraforge.utils import llama_cpp_reference

    _, tokenizer = load_gguf_native(gguf_path)
    llm = llama_cpp_reference.load(gguf_path, n_ctx=512, n_threads=2, verbose=False)
    hits = 0
    for messages, reference in test_pairs():
        out = llm.create_completion(prompt_ids(tokenizer, messages, "auto"), max_tokens=24, temperature=0.0, top_k=1)
        hits += out["choices"][0]["text"].strip() == reference.strip()
    return hits / len(test_pairs())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/loraforge-accuracy")
    args = parser.parse_args()
    work = Path(args.workdir)
    summaries = {}
    for name, config in RUNS.items():
        run_dir = work / name
        loraforge("train", str(ROOT / "examples" / config), f"output.dir={run_dir}", "output.overwrite_output_dir=true")
        summaries[name] = json.loads((run_dir / "summary.json").read_text())
    loraforge("export", "--run", str(work / "qlora"), "--format", "gguf", "--gguf-type", "q4_1", "--out",
              str(work / "qlora-q4_1.gguf"))
    loraforge("export", "--run", str(work / "qalora"), "--format", "gguf", "--out", str(work / "qalora-q4_1.gguf"))

    def pct(value):
        return "n/a (llama-cpp-python not installed)" if value is None else f"{value:.1%}"

    rows = [
        ["(a) LoRA, fp32 base", "adapter model", pct(summaries["lora"]["test_exact_match_after"])],
        ["(b) QLoRA, NF4+DQ base", "adapter model", pct(summaries["qlora"]["test_exact_match_after"])],
        ["(b) QLoRA", "merged, re-quantized to Q4_1 (RTN), loraforge",
         pct(loraforge_accuracy(work / "qlora-q4_1.gguf"))],
        ["(b) QLoRA", "merged, re-quantized to Q4_1 (RTN), llama.cpp", pct(llama_cpp_accuracy(work / "qlora-q4_1.gguf"))],
        ["(c) QA-LoRA, native Q4_1 base", "adapter model", pct(summaries["qalora"]["test_exact_match_after"])],
        ["(c) QA-LoRA", "merged into Q4_1 (lossless), loraforge", pct(loraforge_accuracy(work / "qalora-q4_1.gguf"))],
        ["(c) QA-LoRA", "merged into Q4_1 (lossless), llama.cpp", pct(llama_cpp_accuracy(work / "qalora-q4_1.gguf"))],
    ]
    before = summaries["lora"]["test_exact_match_before"]
    speed = [[name, f"{s['tokens_per_s']:.1f}", f"{s['train_seconds']:.0f}", s["steps"],
              f"{s['tokens_per_s'] / summaries['qlora']['tokens_per_s']:.2f}"] for name, s in summaries.items()]
    append_result(
        "Quickstart held-out exact match: LoRA vs QLoRA vs QA-LoRA, before and after 4-bit export",
        markdown_table(["method", "model scored", "exact match"], rows) + "\n\n"
        + markdown_table(["run", "train tokens/s", "train seconds", "steps", "speed vs QLoRA"], speed),
        f"Base model before training: {before:.1%}. 32 held-out prompts (8 identity paraphrases, 24 unseen dates).",
    )


if __name__ == "__main__":
    main()
