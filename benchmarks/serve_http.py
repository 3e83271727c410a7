"""The S-LoRA-style trace through the OpenAI-compatible HTTP API vs the in-process engine, in one run.

Same trace generator as ``serve_slora.py`` (adapter = int(power(alpha) · n), gamma arrivals, lengths
uniform in [8, 48), greedy, EOS ignored, ranks 8/16/32/64 on q/k/v/o). For n ∈ {1, 100} adapters and
two arrival rates, the same requests (as token ids) go
- straight into the engine (``Engine.submit``), and
- through ``loraforge serve``'s app on 127.0.0.1, sent by the official ``openai`` client with
  ``stream=True`` from a separate process (so that the client doesn't share the server's GIL).
Both use one engine. Time to first token counts from a request's scheduled arrival to its first
streamed token (HTTP: its first SSE chunk). At 20 req/s the server is saturated and TTFT is mostly
queueing; at 2 req/s it is closer to one prefill plus the HTTP path.

    python benchmarks/serve_http.py [--model default] [--requests 48]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from loraforge.models import load_model
from loraforge.serve import Engine
from loraforge.serve.api import create_app, make_server
from report import append_result, markdown_table
from serve_slora import WEIGHT_SETS, load_average, make_trace, prompt_ids, run_engine, use_adapters, weight_sets


def replay_over_http(url: str, trace_file: str) -> dict:
    """Client side (run in its own process): replay the trace with the openai client, streaming."""
    import openai

    jobs = json.loads(Path(trace_file).read_text())

    async def run() -> dict:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        start = time.perf_counter()

        async def one(job) -> tuple[float, float, int]:
            await asyncio.sleep(max(0.0, start + job["arrival"] - time.perf_counter()))
            stream = await client.completions.create(model=job["model"], prompt=job["prompt"], max_tokens=job["max_tokens"],
                                                     temperature=0, stream=True, extra_body={"ignore_eos": True},
                                                     stream_options={"include_usage": True})
            first, tokens = None, 0
            async for chunk in stream:
                if first is None:
                    first = time.perf_counter()
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            return first - (start + job["arrival"]), time.perf_counter(), tokens

        results = await asyncio.gather(*(one(job) for job in jobs))
        await client.close()
        ttft = sorted(r[0] for r in results)
        elapsed = max(r[1] for r in results) - start
        assert all(r[2] == job["max_tokens"] for r, job in zip(results, jobs))
        return {"elapsed": elapsed, "req_s": len(jobs) / elapsed, "tok_s": sum(r[2] for r in results) / elapsed,
                "ttft_p50": ttft[len(ttft) // 2], "ttft_p99": ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))]}

    return asyncio.run(run())


def run_http(engine: Engine, tokenizer, sets, trace, n_adapters: int, model_name: str) -> dict:
    use_adapters(engine, sets, [f"a{i}" for i in range(n_adapters)])
    jobs = [{"arrival": t.arrival, "model": f"a{t.adapter}", "prompt": prompt_ids(tokenizer, t.input_len),
             "max_tokens": t.output_len} for t in trace]
    server = make_server(create_app(engine, model_name), port=0, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(jobs, f)
        f.flush()
        out = subprocess.run([sys.executable, __file__, "--replay", url, f.name], capture_output=True, text=True, check=True)
    server.should_exit = True
    thread.join()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--adapters", default="1,100")
    parser.add_argument("--rates", default="20,2", help="arrival rates, requests/s")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--pool-gib", type=float, default=1.5)
    parser.add_argument("--max-num-seqs", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replay", nargs=2, metavar=("URL", "TRACE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.replay:
        print(json.dumps(replay_over_http(*args.replay)))
        return
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model)
    sets = weight_sets(model, WEIGHT_SETS)
    engine = Engine(model, tokenizer, pool_bytes=int(args.pool_gib * 2**30), max_num_seqs=args.max_num_seqs)
    load_before = load_average()
    rows, ratios = [], []
    for rate in (float(r) for r in args.rates.split(",")):
        for n in (int(n) for n in args.adapters.split(",")):
            trace = make_trace(args.requests, n, args.alpha, rate, 1.0, (8, 48), (8, 48), args.seed)
            local = run_engine(engine, tokenizer, sets, trace, n)
            remote = run_http(engine, tokenizer, sets, trace, n, args.model)
            print(f"rate={rate} n={n}: engine {local}\n  http {remote}", flush=True)
            for mode, r in (("in-process engine", local), ("HTTP + openai client", remote)):
                rows.append([rate, n, mode, f"{r['req_s']:.3f}", f"{r['tok_s']:.1f}", f"{r['ttft_p50']:.3f}", f"{r['ttft_p99']:.3f}"])
            ratios.append(f"rate {rate}, n={n}: HTTP/in-process throughput {remote['req_s'] / local['req_s']:.2f}x, "
                          f"TTFT p50 {remote['ttft_p50'] / local['ttft_p50']:.2f}x")
    table = markdown_table(["rate req/s", "n adapters", "path", "req/s", "output tok/s", "TTFT p50 s", "TTFT p99 s"], rows)
    notes = [f"{args.requests} requests per row, lengths in [8, 48), alpha {args.alpha}, cv 1; in-process and HTTP rows "
             "of a pair replay the same requests on the same engine, one after the other."] + ratios + [
             f"Load average (1 min) of this shared machine: {load_before} before, {load_average()} after; torch threads: {args.threads}."]
    append_result("serve_http: the trace through the OpenAI-compatible API vs in-process", table,
                  "\n".join(f"- {n}" for n in notes))


if __name__ == "__main__":
    main()
