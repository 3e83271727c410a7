"""Prefix caching and chunked prefill on loraforge's engine, each against itself without, in one run.

Prefix caching: ``--requests`` requests over ``--adapters`` adapters (request i uses adapter i mod n),
each a shared system prompt of ``--system`` tokens plus a distinct user turn of ``--user`` tokens,
arriving every ``--gap`` seconds, generating ``--out`` tokens (greedy). The engine runs its
background loop; TTFT is from submission to the first token. With caching, the system prompt's KV
blocks are computed once per adapter (the cache key holds the adapter's content hash) and shared.

Chunked prefill: 32 sequences decode (short prompts); after ``--warm-steps`` steps a prompt of
``--long`` tokens arrives. The engine is stepped inline and every step's duration is one
inter-token latency (ITL) of each decoding sequence. Rows: no long prompt; the long prompt with
chunks of the step budget (``--budgets``, tokens per step); the long prompt whole (a budget above
its length). ITL p50/p99 are over the steps from its arrival until its first token (the same number
of steps for the row without it).

    python benchmarks/serve_prefix_chunked.py [--model default] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from report import append_result, markdown_table
from serve_slora import load_average

from loraforge.models import load_model
from loraforge.serve import Engine, Request, SamplingParams


def random_adapter(model, rank: int, seed: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """A random rank-``rank`` LoRA on q/k/v/o_proj, in PEFT's format (config, tensors)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) / math.sqrt(module.in_features)
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * (0.2 / math.sqrt(rank))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
              "bias": "none", "rank_pattern": {}, "alpha_pattern": {}}
    return config, tensors


def tokens(seed: int, n: int, vocab: int) -> list[int]:
    return torch.randint(100, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def prefix_run(model, tokenizer, adapters, args, caching: bool) -> dict:
    engine = Engine(model, tokenizer, pool_bytes=int(args.pool_gib * 2**30), prefix_caching=caching)
    for j, (config, tensors) in enumerate(adapters):
        engine.register_adapter_weights(f"a{j}", config, tensors)
    vocab = engine.runner.vocab_size
    system = tokens(0, args.system, vocab)
    requests = [Request(system + tokens(i + 1, args.user, vocab), SamplingParams(temperature=0, max_tokens=args.out, ignore_eos=True),
                        adapter=f"a{i % len(adapters)}") for i in range(args.requests)]
    first: dict[int, float] = {}
    submitted: dict[int, float] = {}
    engine.start()
    start = time.perf_counter()
    handles = []
    for i, request in enumerate(requests):
        time.sleep(max(0.0, start + i * args.gap - time.perf_counter()))
        submitted[i] = time.perf_counter()
        handles.append(engine.submit(request, sink=lambda delta, i=i: first.setdefault(i, time.perf_counter())))
    done = [h.wait() for h in handles]
    elapsed = time.perf_counter() - start
    engine.shutdown()
    ttft = [first[i] - submitted[i] for i in range(len(requests))]
    stats = engine.stats()
    return {"ttft_mean": sum(ttft) / len(ttft), "ttft_p50": percentile(ttft, 0.5), "ttft_p99": percentile(ttft, 0.99),
            "elapsed": elapsed, "hit_blocks": stats.prefix_hit_blocks, "block_size": engine.block_size,
            "outputs": [c.token_ids for c in done]}


def chunk_run(model, tokenizer, args, budget: int | None, long_prompt: bool) -> dict:
    engine = Engine(model, tokenizer, pool_bytes=int(args.pool_gib * 2**30), prefix_caching=False,
                    max_batch_tokens=budget or args.long + 64)
    vocab = engine.runner.vocab_size
    decodes = [engine.submit(Request(tokens(100 + i, 16, vocab), SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True)))
               for i in range(32)]
    for _ in range(args.warm_steps):
        engine.step()
    answered = []
    long = engine.submit(Request(tokens(7, args.long, vocab), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)),
                         sink=answered.append) if long_prompt else None
    itl = []
    steps = 0
    while (long is not None and not answered) or (long is None and steps < args.reference_steps):
        t = time.perf_counter()
        engine.step()
        itl.append(time.perf_counter() - t)
        steps += 1
    for handle in decodes + ([long] if long else []):
        engine.abort(handle.request_id)
    engine.step()
    return {"p50": percentile(itl, 0.5), "p99": percentile(itl, 0.99), "max": max(itl), "steps": steps, "total": sum(itl)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (on this shared machine 2 threads measured 10x slower per step)")
    parser.add_argument("--pool-gib", type=float, default=1.0)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--adapters", type=int, default=20)
    parser.add_argument("--system", type=int, default=256, help="shared system prompt, tokens")
    parser.add_argument("--user", type=int, default=16, help="distinct user turn, tokens")
    parser.add_argument("--out", type=int, default=4, help="output tokens per request")
    parser.add_argument("--gap", type=float, default=0.05, help="seconds between arrivals")
    parser.add_argument("--long", type=int, default=4096, help="the long prompt, tokens")
    parser.add_argument("--budgets", default="256,512", help="step token budgets to chunk the long prompt with")
    parser.add_argument("--warm-steps", type=int, default=3)
    parser.add_argument("--reference-steps", type=int, default=20, help="steps measured without the long prompt")
    parser.add_argument("--skip", default="", help="'prefix' or 'chunked' to run one part only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    load_before = load_average()
    sections, notes = [], []
    if args.skip != "prefix":
        adapters = [random_adapter(model, (8, 16, 32, 64)[j % 4], j) for j in range(args.adapters)]
        runs = {caching: prefix_run(model, tokenizer, adapters, args, caching) for caching in (False, True)}
        assert runs[True]["outputs"] == runs[False]["outputs"], "prefix-cached outputs differ from uncached ones"
        off, on = runs[False], runs[True]
        rows = [[name, f"{r['ttft_mean']:.2f}", f"{r['ttft_p50']:.2f}", f"{r['ttft_p99']:.2f}", f"{r['elapsed']:.1f}", r["hit_blocks"]]
                for name, r in (("prefix caching off", off), ("prefix caching on", on))]
        rows.append(["gain (off / on)", f"{off['ttft_mean'] / on['ttft_mean']:.1f}x", f"{off['ttft_p50'] / on['ttft_p50']:.1f}x",
                     f"{off['ttft_p99'] / on['ttft_p99']:.1f}x", f"{off['elapsed'] / on['elapsed']:.1f}x", ""])
        sections.append(markdown_table(["engine", "TTFT mean s", "TTFT p50 s", "TTFT p99 s", "wall s", "KV blocks reused"], rows))
        full = args.system // on["block_size"]
        notes.append(f"Prefix caching: {args.requests} requests over {args.adapters} adapters (ranks 8-64 on q/k/v/o), a shared "
                     f"{args.system}-token system prompt + a distinct {args.user}-token user turn, {args.out} output tokens, one "
                     f"arrival every {args.gap} s. Outputs identical with and without caching (checked). Reused blocks: at most "
                     f"{args.requests - args.adapters} later requests x {full} full system blocks = "
                     f"{(args.requests - args.adapters) * full} if each adapter's system prompt is computed exactly once.")
    if args.skip != "chunked":
        budgets = [int(b) for b in args.budgets.split(",")]
        cases = [("32 decodes, no long prompt", None, False)] + \
                [(f"+ {args.long}-token prompt, chunks of <= {b} tokens/step", b, True) for b in budgets] + \
                [(f"+ {args.long}-token prompt, prefilled whole (one step)", None, True)]
        rows = []
        for name, budget, long_prompt in cases:
            r = chunk_run(model, tokenizer, args, budget, long_prompt)
            rows.append([name, f"{r['p50'] * 1000:.0f}", f"{r['p99'] * 1000:.0f}", f"{r['max'] * 1000:.0f}", r["steps"], f"{r['total']:.1f}"])
            print(name, r, flush=True)
        sections.append(markdown_table(["decode batch", "ITL p50 ms", "ITL p99 ms", "ITL max ms", "steps", "s until its first token"], rows))
        notes.append(f"Chunked prefill: 32 greedy decodes of 16-token prompts; the {args.long}-token prompt arrives after "
                     f"{args.warm_steps} steps; ITL over the steps until its first token ({args.reference_steps} steps without it).")
    notes.append(f"Model: {args.model}; torch threads {args.threads}; load average (1 min) {load_before} before, {load_average()} after "
                 "(a shared 2-core machine: compare rows, not absolute times).")
    append_result("serve_prefix_chunked: prefix caching TTFT and chunked-prefill ITL", "\n\n".join(sections),
                  "\n".join(f"- {n}" for n in notes))


if __name__ == "__main__":
    main()
