"""S-LoRA's serving workload on loraforge's engine, side by side with a PEFT baseline, in one run.

The trace follows S-LoRA's generator (benchmarks/trace.py in the S-LoRA repo):
- adapter of request i = int(numpy.random.power(alpha) * n_adapters): alpha=1 is uniform, smaller
  alpha favours the first adapters;
- arrival gaps ~ gamma(shape=1/cv², scale=cv²/rate) (cv=1 is Poisson);
- input and output lengths uniform in [lo, hi), greedy decoding, EOS ignored;
- ranks 8, 16, 32, 64 round-robin over the adapters, on q/k/v/o_proj as in S-LoRA's experiments.

Scaled to a 2-core CPU: lengths in [8, 48) instead of [8, 512), 48 requests per configuration, and a
rate (20 req/s) well above what the CPU serves, so every configuration runs saturated and the
throughput measured is the engine's capacity under that trace (start-up and tail included). One
engine serves every row (adapters re-registered in between); rows run in interleaved rounds and
each keeps its best round, since the machine is shared and other people's jobs come and go.
Lengths and arrival times are the same in every configuration; only the adapter of each request
changes with n and alpha.

Host memory: 1000 adapters of ~14 MB each would need 14 GB on a machine shared with others, so the
registered adapters draw their weights from 64 distinct random weight sets. Each registered adapter
is still its own entry: loading it copies its weights into its own pool pages, and a batch step
reads every distinct adapter's pages, exactly as with 1000 distinct weight sets.

The PEFT baseline is transformers' ``generate`` on a PeftModel holding the same adapters (those the
trace uses), one mixed-adapter batch (``adapter_names``) of ``--peft-batch`` requests at a time, in
arrival order, each batch generating until its longest request is done. Swapping adapters per
request means batch 1, which is slower; batch 16 measured faster than 8 here, so 16 is the default.

A second table isolates the cost of adapter diversity: the time of one decode step of 32 sequences
(steady state, context ~40 tokens) with no adapter, one adapter, 8 and 32 distinct adapters, with
q/k/v and gate/up as separate GEMMs (the runner's default) and, for the first and last case, fused
into one GEMM each (``--no-fused`` skips those). The fp32 matmul peak is measured in the same run
(best of square GEMMs at the step's thread count), and the no-adapter step's FLOPs (2 per weight
per token, plus attention) are quoted as a share of it. ``--profile`` adds a per-op profile
(torch.profiler, self CPU time) of that step with 32 distinct adapters, unfused (and fused).

The ceilings are measured in the same run too: the step's base GEMMs alone at their real shapes
(``gemm_ceiling``: the most any decode step can reach with them), the one-thread read bandwidth
(``read_bandwidth``) and from it the least time the 32 distinct adapters' extra bytes cost, which
bounds the 32-distinct step's ratio to the one-adapter step. With ``--bf16`` (the default where the
CPU has bf16 units) the steps and the GEMM ceiling are also measured on a bf16 copy of the model,
against the bf16 matmul peak.

    python benchmarks/serve_slora.py [--model default] [--requests 48] [--adapters 1,10,100,1000]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from report import append_result, markdown_table

from loraforge.models import load_model
from loraforge.quant.quantize_model import bf16_supported
from loraforge.serve import Engine, Request, SamplingParams
from loraforge.serve.runner import ATTENTION_PROJS, MLP_PROJS, ModelRunner

RANKS = (8, 16, 32, 64)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
WEIGHT_SETS = 64


@dataclass(frozen=True)
class TraceRequest:
    arrival: float
    """Seconds after the start of the replay."""
    adapter: int
    input_len: int
    output_len: int


def make_trace(num_requests: int, n_adapters: int, alpha: float, rate: float, cv: float,
               input_range: tuple[int, int], output_range: tuple[int, int], seed: int) -> list[TraceRequest]:
    """S-LoRA's trace; lengths and arrivals depend on ``seed`` only, adapters on ``seed``, n and alpha."""
    shape = np.random.RandomState(seed)
    gaps = shape.gamma(1 / cv**2, cv**2 / rate, num_requests)
    inputs = shape.randint(*input_range, num_requests)
    outputs = shape.randint(*output_range, num_requests)
    choice = np.random.RandomState(seed + 1)
    adapters = np.minimum((choice.power(alpha, num_requests) * n_adapters).astype(int), n_adapters - 1)
    arrivals = np.cumsum(gaps) - gaps[0]
    return [TraceRequest(float(t), int(a), int(i), int(o)) for t, a, i, o in zip(arrivals, adapters, inputs, outputs)]


def weight_sets(model, count: int) -> list[tuple[dict, dict[str, torch.Tensor]]]:
    """``count`` random LoRA adapters in PEFT's format (config, tensors); set j has rank RANKS[j % 4]."""
    g = torch.Generator().manual_seed(0)
    sets = []
    for j in range(count):
        r = RANKS[j % len(RANKS)]
        tensors = {}
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS:
                a = torch.randn(r, module.in_features, generator=g) / math.sqrt(module.in_features)
                b = torch.randn(module.out_features, r, generator=g) * (0.2 / math.sqrt(r))
                tensors[f"base_model.model.{name}.lora_A.weight"] = a
                tensors[f"base_model.model.{name}.lora_B.weight"] = b
        config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(TARGETS),
                  "bias": "none", "rank_pattern": {}, "alpha_pattern": {}}
        sets.append((config, tensors))
    return sets


def prompt_ids(tokenizer, length: int) -> list[int]:
    """S-LoRA's prompt, "Hello " repeated, cut to exactly ``length`` tokens."""
    ids = tokenizer.encode("Hello " * length)
    return (ids * (length // max(len(ids), 1) + 1))[:length]


def use_adapters(engine: Engine, sets, names: list[str]) -> None:
    """Make ``names`` the registered adapters, adapter i drawing on weight set ``i % len(sets)``."""
    for name in engine.adapter_names:
        engine.unregister_adapter(name)
    for i, name in enumerate(names):
        engine.register_adapter_weights(name, *sets[i % len(sets)])


def run_engine(engine: Engine, tokenizer, sets, trace, n_adapters: int) -> dict:
    """Replay ``trace`` against ``engine`` (its background loop) with adapters a0..a{n-1} registered."""
    use_adapters(engine, sets, [f"a{i}" for i in range(n_adapters)])
    requests = [Request(prompt_ids(tokenizer, t.input_len),
                        SamplingParams(temperature=0, max_tokens=t.output_len, ignore_eos=True), adapter=f"a{t.adapter}")
                for t in trace]
    first_token: dict[int, float] = {}
    handles = []
    preempted_before = engine.stats().preemptions
    engine.start()
    start = time.perf_counter()
    for i, (t, request) in enumerate(zip(trace, requests)):
        time.sleep(max(0.0, start + t.arrival - time.perf_counter()))

        def sink(delta, i=i):
            first_token.setdefault(i, time.perf_counter())

        handles.append(engine.submit(request, sink=sink))
    done = [h.wait() for h in handles]
    elapsed = time.perf_counter() - start
    engine.shutdown()
    assert all(len(c.token_ids) == t.output_len for c, t in zip(done, trace))
    ttft = sorted(first_token[i] - (start + t.arrival) for i, t in enumerate(trace))
    return {
        "elapsed": elapsed,
        "req_s": len(trace) / elapsed,
        "tok_s": sum(t.output_len for t in trace) / elapsed,
        "ttft_p50": ttft[len(ttft) // 2],
        "ttft_p99": ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))],
        "distinct": len({t.adapter for t in trace}),
        "preemptions": engine.stats().preemptions - preempted_before,
    }


def run_peft(model_source: str, sets, trace, n_adapters: int, batch: int) -> dict:
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    model, tokenizer = load_model(model_source)
    model.generation_config.eos_token_id = None
    used = sorted({t.adapter for t in trace})
    peft_model = None
    for i in used:
        config, tensors = sets[i % len(sets)]
        lora = LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"], target_modules=list(TARGETS))
        if peft_model is None:
            peft_model = get_peft_model(model, lora, adapter_name=f"a{i}")
        else:
            peft_model.add_adapter(f"a{i}", lora)
        set_peft_model_state_dict(peft_model, tensors, adapter_name=f"a{i}")
    peft_model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    start = time.perf_counter()
    for b in range(0, len(trace), batch):
        group = trace[b:b + batch]
        prompts = [prompt_ids(tokenizer, t.input_len) for t in group]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        wait = start + group[-1].arrival - time.perf_counter()  # a batch starts once its last request arrived
        time.sleep(max(0.0, wait))
        with torch.inference_mode():
            peft_model.generate(input_ids=ids, attention_mask=mask, adapter_names=[f"a{t.adapter}" for t in group],
                                max_new_tokens=max(t.output_len for t in group), min_new_tokens=max(t.output_len for t in group),
                                do_sample=False, pad_token_id=pad)
    elapsed = time.perf_counter() - start
    return {"elapsed": elapsed, "req_s": len(trace) / elapsed, "tok_s": sum(t.output_len for t in trace) / elapsed}


def decode_step_times(engine: Engine, tokenizer, sets, rounds: int, batch: int = 32, steps: int = 6,
                      fused: bool = True) -> dict[str, float]:
    """Seconds per decode step of ``batch`` sequences, by how many distinct adapters they use (best of ``rounds``);
    with ``fused``, the first and last case also with q/k/v and gate/up fused into one GEMM each."""
    use_adapters(engine, sets, [f"a{i}" for i in range(batch)])
    cases = {"no adapter": [None] * batch, "1 adapter (rank 8)": ["a0"] * batch,
             "1 adapter (rank 64)": ["a3"] * batch, "8 distinct": [f"a{i % 8}" for i in range(batch)],
             f"{batch} distinct": [f"a{i}" for i in range(batch)]}
    variants = [(name, adapters, False) for name, adapters in cases.items()]
    if fused:
        variants += [(f"{name}, fused q/k/v, gate/up", cases[name], True) for name in ("no adapter", f"{batch} distinct")]
    times: dict[str, float] = {}
    for name, adapters, fuse in [case for _ in range(rounds) for case in variants]:
        with fusion(engine, fuse):
            times[name] = min(times.get(name, math.inf), decode_step(engine, tokenizer, adapters, steps))
    return times


def decode_step(engine: Engine, tokenizer, adapters: list[str | None], steps: int, measure=None) -> float:
    """Mean seconds of ``steps`` decode steps of one sequence per entry of ``adapters`` (their adapter),
    run inside ``measure`` (a context manager, e.g. a profiler) when given."""
    handles = [engine.submit(Request(prompt_ids(tokenizer, 32), SamplingParams(temperature=0, max_tokens=steps + 2,
                                                                            ignore_eos=True), adapter=a))
               for a in adapters]
    engine.step()  # prefill
    engine.step()
    with measure or contextlib.nullcontext():
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        elapsed = (time.perf_counter() - start) / steps
    while not all(h.done for h in handles):
        engine.step()
    return elapsed


@contextlib.contextmanager
def fusion(engine: Engine, fused: bool):
    """Run ``engine``'s runner with fused q/k/v and gate/up GEMMs, or (False) with the separate modules."""
    runner = engine.runner
    saved = runner.fused_qkv, runner.fused_gate_up
    if fused != any(runner.fused_qkv):
        fresh = ModelRunner(runner.model, fuse=fused)
        runner.fused_qkv, runner.fused_gate_up = fresh.fused_qkv, fresh.fused_gate_up
    try:
        yield
    finally:
        runner.fused_qkv, runner.fused_gate_up = saved


def matmul_peak(seconds: float = 3.0, n: int = 1024, dtype: torch.dtype = torch.float32) -> float:
    """Best GFLOP/s of an ``n``x``n`` by ``n``x``n`` matmul in ``dtype`` over ``seconds``, at the current thread count."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def gemm_ceiling(runner: ModelRunner, batch: int = 32, rounds: int = 5, head_chunk: int | None = None) -> float:
    """Best seconds of exactly a decode step's base GEMMs, alone: every layer's q/k/v/o and gate/up/down
    projections and the output head, in step order, on ``batch`` rows, called as the runner calls them
    (the model's own modules). With ``head_chunk``, the head runs in slices of that many vocabulary rows.
    No decode step can be faster than this with these GEMMs; the weights (hundreds of MB) stream from
    memory as they do in a step."""
    modules = [getattr(getattr(layer, part), proj) for layer in runner.layers
               for part, projs in (("self_attn", ATTENTION_PROJS), ("mlp", MLP_PROJS)) for proj in projs]
    inputs = {m.in_features: torch.randn(batch, m.in_features, dtype=runner.dtype) for m in modules}
    head = runner.lm_head.weight
    x_head = torch.randn(batch, head.shape[1], dtype=runner.dtype)
    chunks = head.split(head_chunk) if head_chunk else None
    best = math.inf
    with torch.inference_mode():
        for _ in range(rounds):
            start = time.perf_counter()
            for module in modules:
                module(inputs[module.in_features])
            if chunks is None:
                runner.lm_head(x_head)
            else:
                torch.cat([F.linear(x_head, chunk) for chunk in chunks], dim=1)
            best = min(best, time.perf_counter() - start)
    return best


def read_bandwidth(mib: int = 256, rounds: int = 5) -> float:
    """Best GB/s of one thread summing a ``mib`` MiB fp32 buffer (far larger than the caches): the rate at
    which a step can stream weights that are not cached."""
    buffer = torch.empty(mib * 2**20 // 4).uniform_()
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        buffer.sum()
        best = max(best, buffer.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return best


def bf16_steps(model, tokenizer, sets, rounds: int, batch: int = 32) -> tuple[float, dict[str, float]]:
    """The bf16 matmul peak, and seconds per decode step of ``batch`` sequences (no adapter, one, ``batch``
    distinct) plus the GEMM ceiling, with a bf16 copy of ``model`` served by its own engine (adapters in
    bf16 pool pages too); all measured here."""
    engine = Engine(copy.deepcopy(model).to(torch.bfloat16), tokenizer, pool_bytes=2**29, max_num_seqs=batch)
    use_adapters(engine, sets, [f"a{i}" for i in range(batch)])
    cases = {"no adapter": [None] * batch, "1 adapter (rank 8)": ["a0"] * batch,
             f"{batch} distinct": [f"a{i}" for i in range(batch)]}
    decode_step(engine, tokenizer, cases[f"{batch} distinct"], 2)  # warm-up
    times: dict[str, float] = {}
    for name, adapters in [case for _ in range(rounds) for case in cases.items()]:
        times[name] = min(times.get(name, math.inf), decode_step(engine, tokenizer, adapters, 6))
    times["GEMMs alone"] = gemm_ceiling(engine.runner)
    return matmul_peak(dtype=torch.bfloat16), times


def sets_mb(sets) -> float:
    """MB of fp32 LoRA weights of the weight sets ``sets``."""
    return sum(t.numel() for config, tensors in sets for t in tensors.values()) * 4 / 1e6


def decode_step_gflop(model, batch: int = 32, context: int = 40) -> float:
    """FLOPs of one decode step of ``batch`` tokens: 2 per linear weight per token, plus attention
    (QK^T and PV over ``context`` keys, per layer and head)."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 4 * config.num_hidden_layers * config.num_attention_heads * head_dim * context
    return batch * (2 * linear + attention) / 1e9


def batch1_split(engine: Engine, tokenizer, rounds: int = 15) -> tuple[float, float]:
    """Median seconds of a decode step of one sequence (no adapter), and of its GEMMs alone (the same
    projections and lm_head on one token, called as the runner calls them), measured alternately."""
    runner = engine.runner
    gemms = []
    for i, layer in enumerate(runner.layers):
        attn, mlp = layer.self_attn, layer.mlp
        gemms += [runner.fused_qkv[i] or attn.q_proj, attn.k_proj, attn.v_proj][:1 if runner.fused_qkv[i] else 3]
        gemms += [attn.o_proj]
        gemms += [runner.fused_gate_up[i] or mlp.gate_proj, mlp.up_proj][:1 if runner.fused_gate_up[i] else 2]
        gemms += [mlp.down_proj]
    gemms.append(runner.lm_head)
    inputs = [torch.randn(1, g.weight.shape[1] if not isinstance(g, torch.nn.Module) else g.in_features, dtype=runner.dtype)
              for g in gemms]
    handle = engine.submit(Request(prompt_ids(tokenizer, 32), SamplingParams(temperature=0, max_tokens=rounds + 3, ignore_eos=True)))
    engine.step()
    engine.step()
    steps, alone = [], []
    with torch.inference_mode():
        for _ in range(rounds):
            start = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - start)
            start = time.perf_counter()
            for gemm, x in zip(gemms, inputs):
                gemm(x)
            alone.append(time.perf_counter() - start)
    while not handle.done:
        engine.step()
    return sorted(steps)[rounds // 2], sorted(alone)[rounds // 2]


def op_profile(engine: Engine, tokenizer, adapters: list[str], steps: int = 3, rows: int = 12) -> list[tuple[str, float, int]]:
    """The ops of a decode step, by self CPU ms per step: ``[(name, ms, calls per step)]``, largest first."""
    from torch.profiler import ProfilerActivity, profile

    profiler = profile(activities=[ProfilerActivity.CPU])
    decode_step(engine, tokenizer, adapters, steps, measure=profiler)
    events = sorted(profiler.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    top = [(e.key, e.self_cpu_time_total / 1000 / steps, e.count // steps) for e in events[:rows]]
    return top + [("(all ops)", total / 1000 / steps, sum(e.count for e in events) // steps)]


def load_average() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--adapters", default="1,10,100,1000", help="comma-separated adapter counts n")
    parser.add_argument("--alphas", default="1,0.3", help="comma-separated power-law alphas")
    parser.add_argument("--rate", type=float, default=20.0, help="arrival rate, requests/s")
    parser.add_argument("--cv", type=float, default=1.0)
    parser.add_argument("--input-range", type=int, nargs=2, default=(8, 48))
    parser.add_argument("--output-range", type=int, nargs=2, default=(8, 48))
    parser.add_argument("--pool-gib", type=float, default=1.5)
    parser.add_argument("--max-num-seqs", type=int, default=48)
    parser.add_argument("--peft-adapters", type=int, default=100, help="n for the PEFT baseline (0 = skip it)")
    parser.add_argument("--peft-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared; 1 measured faster)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all engine rows; each row keeps its best")
    parser.add_argument("--step-rounds", type=int, default=3,
                        help="interleaved rounds of the decode-step rows (each keeps its best); they are short and noisy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-fused", action="store_true", help="skip the fused q/k/v, gate/up decode-step rows")
    parser.add_argument("--profile", action="store_true", help="add a per-op profile of a 32-sequence decode step")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=bf16_supported(torch.device("cpu")),
                        help="add decode-step rows with the dense weights in bf16 (default: when the CPU has bf16 units)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model)
    sets = weight_sets(model, WEIGHT_SETS)
    counts = [int(n) for n in args.adapters.split(",")]
    alphas = [float(a) for a in args.alphas.split(",")]
    trace_args = (args.rate, args.cv, tuple(args.input_range), tuple(args.output_range), args.seed)

    load_before = load_average()
    engine = Engine(model, tokenizer, pool_bytes=int(args.pool_gib * 2**30), max_num_seqs=args.max_num_seqs)
    run_engine(engine, tokenizer, sets, make_trace(8, 1, 1.0, *trace_args), 1)  # warm-up: touch the pool, load code
    peak = matmul_peak()
    steps = decode_step_times(engine, tokenizer, sets, args.step_rounds, fused=not args.no_fused)
    ceilings = {"GEMMs alone (q/k/v/o, gate/up/down, head; 32 rows)": gemm_ceiling(engine.runner),
                "GEMMs alone, head in 1024-row vocabulary slices": gemm_ceiling(engine.runner, head_chunk=1024)}
    bandwidth = read_bandwidth()
    bf16 = bf16_steps(model, tokenizer, sets, args.step_rounds) if args.bf16 else None
    profiles = {}
    if args.profile:
        distinct = [f"a{i}" for i in range(32)]
        for fused in (False,) if args.no_fused else (False, True):
            with fusion(engine, fused):
                profiles["fused" if fused else "unfused"] = op_profile(engine, tokenizer, distinct)
    step_gflop = decode_step_gflop(model)
    single_step, single_gemms = batch1_split(engine, tokenizer)
    configs = [(n, alpha) for n in counts for alpha in (alphas if n > 1 else alphas[:1])]
    results: dict[tuple[int, float], dict] = {}
    for round_ in range(args.rounds):
        for n, alpha in configs:
            trace = make_trace(args.requests, n, alpha, *trace_args)
            r = run_engine(engine, tokenizer, sets, trace, n)
            print(f"round {round_} engine n={n} alpha={alpha}: {r}", flush=True)
            if (n, alpha) not in results or r["req_s"] > results[(n, alpha)]["req_s"]:
                results[(n, alpha)] = r
    weight_mb = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)) * 4 / 1e6
    lora_calls = 2 * 32 * len(TARGETS) * model.config.num_hidden_layers
    step_adapter_mb = sets_mb(sets[:32])
    del engine, model
    gc.collect()
    peft = None
    if args.peft_adapters:
        peft_trace = make_trace(args.requests, args.peft_adapters, alphas[0], *trace_args)
        peft = run_peft(args.model, sets, peft_trace, args.peft_adapters, args.peft_batch)
        print(f"peft n={args.peft_adapters} alpha={alphas[0]}: {peft}", flush=True)

    one = results[(counts[0], alphas[0])]
    rows = []
    for (n, alpha), r in results.items():
        rows.append(["loraforge engine", n, alpha, r["distinct"], f"{r['req_s']:.3f}", f"{r['tok_s']:.1f}",
                     f"{r['ttft_p50']:.2f}", r["preemptions"], f"{r['req_s'] / one['req_s']:.2f}"])
    if peft is not None:
        rows.append([f"PEFT generate, mixed batch of {args.peft_batch}", args.peft_adapters, alphas[0],
                     len({t.adapter for t in peft_trace}), f"{peft['req_s']:.3f}", f"{peft['tok_s']:.1f}", "", "",
                     f"{peft['req_s'] / one['req_s']:.2f}"])
    table = markdown_table(["system", "n adapters", "alpha", "distinct in trace", "req/s", "output tok/s",
                            "TTFT p50 s", "preemptions", f"vs n={counts[0]}"], rows)
    notes = [(f"{args.requests} requests per row, lengths in [{args.input_range[0]}, {args.input_range[1]}) (input) and "
              f"[{args.output_range[0]}, {args.output_range[1]}) (output), rate {args.rate} req/s (saturating), cv {args.cv}; "
              f"ranks {RANKS} round-robin on {'/'.join(TARGETS)}; pool {args.pool_gib} GiB; max {args.max_num_seqs} sequences per step; "
              f"engine rows: best of {args.rounds} interleaved rounds, decode-step rows: best of {args.step_rounds}, PEFT: one run.")]
    largest = max(counts)
    if (largest, alphas[0]) in results:
        ratio = results[(largest, alphas[0])]["req_s"] / one["req_s"]
        notes.append(f"n={largest} vs n={counts[0]} (alpha={alphas[0]}): {ratio:.2f}x throughput (target >= 0.95).")
    if peft is not None and (args.peft_adapters, alphas[0]) in results:
        ours = results[(args.peft_adapters, alphas[0])]
        tokens_per_output = (sum(args.input_range) + sum(args.output_range)) / sum(args.output_range)
        needed = 10 * peft["tok_s"] * tokens_per_output * 2 * weight_mb / 4 * 1e6 / 1e9
        notes.append(f"Engine vs PEFT at n={args.peft_adapters}, alpha={alphas[0]}: {ours['req_s'] / peft['req_s']:.1f}x "
                     f"throughput (target >= 10). Where the gap is: 10x PEFT would be {10 * peft['tok_s']:.0f} output tok/s, "
                     f"i.e. {10 * peft['tok_s'] * tokens_per_output:.0f} prompt+output tok/s at 2 FLOP per weight per token "
                     f"= {needed:.0f} GFLOP/s, against this machine's fp32 matmul peak of {peak:.0f} GFLOP/s measured in this run "
                     f"at {args.threads} thread(s){': out of reach, since PEFT at batch ' + str(args.peft_batch) + ' is compute-bound too' if needed > peak else ''}.")
    base_step = steps["no adapter"]
    step_rows = [[name, f"{t * 1000:.0f}", f"{base_step / t:.2f}", f"{step_gflop / t / peak:.0%} of fp32"
                  if name.startswith("no adapter") else ""] for name, t in steps.items()]
    step_rows += [[name, f"{t * 1000:.0f}", "", f"{step_gflop / t / peak:.0%} of fp32 (ceiling)"] for name, t in ceilings.items()]
    if bf16 is not None:
        peak_bf16, bf16_times = bf16
        step_rows += [[f"{name}, bf16 weights", f"{t * 1000:.0f}", f"{bf16_times['no adapter'] / t:.2f}" if "GEMMs" not in name else "",
                       f"{step_gflop / t / peak_bf16:.0%} of bf16{' (ceiling)' if 'GEMMs' in name else ''}"
                       if "GEMMs" in name or name == "no adapter" else ""] for name, t in bf16_times.items()]
    step_table = markdown_table(["decode step, 32 sequences", "ms/step", "throughput vs no adapter", "share of matmul peak"], step_rows)
    notes.append(f"Batch 1 (one sequence decoding, no adapter, the runner's default, unfused): {single_step * 1000:.1f} ms per step, of which "
                 f"its GEMMs alone take {single_gemms * 1000:.1f} ms: {1 - single_gemms / single_step:.0%} of the step is outside the "
                 f"matmuls (norms, RoPE, KV writes, attention, scheduling, sampling); medians of 15 alternating rounds.")
    notes.append(f"Matmul peak measured in this run: {peak:.1f} GFLOP/s (fp32, 1024^3 GEMM, {args.threads} thread(s)); a no-adapter "
                 f"decode step of 32 sequences is {step_gflop:.1f} GFLOP (2 per weight per token + attention over ~40 keys).")
    gemm_alone = next(iter(ceilings.values()))
    notes.append(f"Ceiling of target 1: the step's base GEMMs alone, at their real shapes on 32 rows, take {gemm_alone * 1000:.0f} ms "
                 f"= {step_gflop / gemm_alone / peak:.0%} of the fp32 peak: no decode step of this model can reach more with these "
                 f"GEMMs on this CPU (small-M GEMMs whose weights stream from memory run below the 1024^3 peak); the no-adapter "
                 f"step spends {1 - gemm_alone / base_step:.0%} of its time outside them.")
    one_mb, t1, t32 = sets_mb(sets[:1]), steps["1 adapter (rank 8)"], steps["32 distinct"]
    extra = (step_adapter_mb - one_mb) / 1e3 / bandwidth
    notes.append(f"Ceiling of target 2: a decode step of 32 sequences with 32 distinct adapters reads {step_adapter_mb:.0f} MB of "
                 f"fp32 adapter weights (vs {one_mb:.0f} MB with one rank-8 adapter, the n=1 trace's) next to {weight_mb:.0f} MB of "
                 f"base weights. At this machine's one-thread read bandwidth, measured here at {bandwidth:.1f} GB/s, the extra "
                 f"{step_adapter_mb - one_mb:.0f} MB cost at least {extra * 1000:.0f} ms, so the 32-distinct step is at best "
                 f"{t1 / (t1 + extra):.2f}x the one-adapter step ({t1 * 1000:.0f} ms); measured {t1 / t32:.2f}x"
                 + (f", i.e. the LoRA op reads them at {(step_adapter_mb - one_mb) / 1e3 / (t32 - t1):.1f} GB/s" if t32 > t1 + extra
                    else " (within this run's noise of the bound)")
                 + f" ({lora_calls} small matmul calls, one token each, each a few microseconds of dispatch with no memory traffic).")
    if bf16 is not None:
        b1, b32 = bf16_times["1 adapter (rank 8)"], bf16_times["32 distinct"]
        notes.append(f"bf16 rows: the dense weights (and the pool, so adapters too) in bf16, against the bf16 matmul peak measured "
                     f"here, {peak_bf16:.1f} GFLOP/s; adapter bytes halve, so the bandwidth bound on the 32-distinct step becomes "
                     f"{b1 / (b1 + extra / 2):.2f}x of the one-adapter step ({b1 * 1000:.0f} ms); measured {b1 / b32:.2f}x.")
    notes.append(f"Load average (1 min) of this shared machine: {load_before} before, {load_average()} after; "
                 f"torch threads: {args.threads}.")
    for name, ops in profiles.items():
        step_table += f"\n\nPer-op profile, decode step of 32 sequences with 32 distinct adapters, {name}:\n\n" + markdown_table(
            ["op", "self CPU ms/step", "calls/step"], [[op, f"{ms:.1f}", calls] for op, ms, calls in ops])
    append_result("serve_slora: S-LoRA workload, loraforge engine vs PEFT", table + "\n\n" + step_table,
                  "\n".join(f"- {n}" for n in notes))


if __name__ == "__main__":
    main()
