"""loraforge serve vs llama.cpp's llama-server on S-LoRA's mixed-adapter trace, in one run.

Both serve the default model's own Q4_1 GGUF (SmolLM2-135M; loraforge computes with its dequantized values,
or with the Q4_1 blocks themselves under ``--native-q4``) and
the same 4 adapters, written once as GGUF LoRA files by ``loraforge export``'s writer: llama-server loads
them with ``--lora`` ×4 (``--lora-init-without-apply``) and each request names its adapter with
``"lora": [{"id": k, "scale": 1}]``; loraforge hot-loads the same files (its GGUF-LoRA reader). The
adapters are S-LoRA's: random, ranks 8/16/32/64 on q/k/v/o_proj (``serve_slora.weight_sets``).

The trace is ``serve_slora.make_trace``: adapter = int(power(alpha) · 4), Poisson arrivals, input and output
lengths uniform in [8, 128), the prompt "Hello " repeated, greedy, EOS ignored. The same requests (as token
ids) go over HTTP to each server from a separate client process (the official ``openai`` client,
streaming), one server after the other. llama-server's prompt cache is off for the trace (its prompts share
long prefixes that loraforge does not cache either). llama-server batches only requests whose adapters
are equal (its README); loraforge batches any mix.

Reported: throughput (requests/s, output tokens/s), time to first token p50/p99 and end-to-end latency p99
(from each request's scheduled arrival), as loraforge/llama-server ratios; and single-stream decode tokens/s
of one request (8 prompt tokens, 128 new, adapter 0) on each.

llama-server is built from the llama-cpp-python source package's vendored llama.cpp (see --llama-server).

    python benchmarks/serve_vs_llama_server.py --llama-server /path/to/llama-server [--requests 32] [--rate 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch
from report import append_result, markdown_table
from serve_slora import load_average, make_trace, prompt_ids, weight_sets

from loraforge.export.gguf_lora import write_gguf_lora
from loraforge.models import load_model
from loraforge.models.sources import default_gguf_path
from loraforge.serve import Engine
from loraforge.serve.api import create_app, make_server

N_ADAPTERS = 4
SLOT_CONTEXT = 256
"""Tokens per llama-server slot: the longest request is 127 + 127."""


def replay(url: str, trace_file: str) -> dict:
    """Client side (its own process): send every job at its arrival time, streaming; per-request timings."""
    import openai

    jobs = json.loads(Path(trace_file).read_text())

    async def run() -> list[dict]:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=1800)
        start = time.perf_counter()

        async def one(job) -> dict:
            await asyncio.sleep(max(0.0, start + job["arrival"] - time.perf_counter()))
            stream = await client.completions.create(model=job["model"], prompt=job["prompt"], max_tokens=job["max_tokens"],
                                                     temperature=0, stream=True, extra_body=job["extra"],
                                                     stream_options={"include_usage": True})
            stamps, usage = [], None
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    stamps.append(time.perf_counter())
                if chunk.usage is not None:
                    usage = chunk.usage.completion_tokens
            arrival = start + job["arrival"]
            return {"ttft": stamps[0] - arrival, "e2e": stamps[-1] - arrival, "end": stamps[-1] - start,
                    "first": stamps[0], "last": stamps[-1], "tokens": usage if usage is not None else len(stamps)}

        results = await asyncio.gather(*(one(job) for job in jobs))
        await client.close()
        return results

    return {"results": asyncio.run(run())}


def summarize(results: list[dict], jobs: list[dict]) -> dict:
    def pct(values, q):
        values = sorted(values)
        return values[min(len(values) - 1, round(q * (len(values) - 1)))]

    assert all(r["tokens"] == job["max_tokens"] for r, job in zip(results, jobs)), "a request ended early"
    elapsed = max(r["end"] for r in results)
    ttft, e2e = [r["ttft"] for r in results], [r["e2e"] for r in results]
    return {"elapsed": elapsed, "req_s": len(jobs) / elapsed, "tok_s": sum(r["tokens"] for r in results) / elapsed,
            "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99), "e2e_p99": pct(e2e, 0.99)}


def send(url: str, jobs: list[dict]) -> list[dict]:
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(jobs, f)
        f.flush()
        out = subprocess.run([sys.executable, __file__, "--replay", url, f.name], capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"the client failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["results"]


def single_stream(url: str, job: dict) -> float:
    """Decode tokens/s of one request alone: (tokens − 1) / (last token − first token)."""
    [result] = send(url, [job])
    return (result["tokens"] - 1) / (result["last"] - result["first"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen | None = None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"llama-server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not become healthy in {timeout} s")


def run_llama_server(binary: str, loras: list[Path], threads: int, parallel: int, jobs: list[dict],
                     single: dict) -> tuple[dict, float]:
    port = free_port()
    command = [binary, "-m", str(default_gguf_path()), "--host", "127.0.0.1", "--port", str(port),
               "-t", str(threads), "-tb", str(threads), "-np", str(parallel), "-c", str(parallel * SLOT_CONTEXT),
               "--lora-init-without-apply"]
    for lora in loras:
        command += ["--lora", str(lora)]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(url, process)
            decode = single_stream(url, single)
            results = send(url, jobs)
        except Exception:
            log.seek(0)
            print(log.read()[-5000:], file=sys.stderr)
            raise
        finally:
            process.terminate()
            process.wait(60)
    return summarize(results, jobs), decode


def run_loraforge(model, tokenizer, loras: list[Path], args, jobs: list[dict], single: dict) -> tuple[dict, float]:
    engine = Engine(model, tokenizer, pool_bytes=int(args.pool_gib * 2**30), max_num_seqs=args.max_num_seqs)
    for i, lora in enumerate(loras):
        engine.register_adapter(f"a{i}", lora)
    server = make_server(create_app(engine, "default"), port=0, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    try:
        decode = single_stream(url, single)
        results = send(url, jobs)
    finally:
        server.should_exit = True
        thread.join()
    return summarize(results, jobs), decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"),
                        help="the llama-server binary (default: $LLAMA_SERVER). Build it from the source package: "
                             "pip download llama-cpp-python==0.3.36 --no-binary :all: --no-deps; untar; cmake -S "
                             "vendor/llama.cpp -B build -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF; cmake --build "
                             "build --target llama-server")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--rate", type=float, default=1.0, help="arrival rate, requests/s (Poisson)")
    parser.add_argument("--alpha", type=float, default=0.5, help="power-law alpha of the adapter choice")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads of each server. On a busy shared machine llama.cpp's spinning threads "
                             "collapse when there are fewer free cores than threads (2 threads on 2 loaded cores: "
                             "1.6-1.9 decode tok/s, against 33-41 with 1 thread, measured side by side)")
    parser.add_argument("--parallel", type=int, default=16, help="llama-server slots (-np)")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="loraforge's sequences per step")
    parser.add_argument("--pool-gib", type=float, default=1.0)
    parser.add_argument("--native-q4", action="store_true",
                        help="loraforge computes with the Q4_1 blocks themselves (default: their dequantized values, "
                             "the same weights in fp32, which its CPU matmuls run faster)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replay", nargs=2, metavar=("URL", "TRACE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.replay:
        print(json.dumps(replay(*args.replay)))
        return
    if not args.llama_server or not Path(args.llama_server).is_file():
        parser.error("--llama-server: give the llama-server binary (see --help for how to build it)")
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model("default", native_gguf=args.native_q4)
    work = Path(tempfile.mkdtemp(prefix="serve_vs_llama_server."))
    loras = []
    for i, (config, tensors) in enumerate(weight_sets(model, N_ADAPTERS)):
        loras.append(work / f"a{i}.gguf")
        write_gguf_lora(model, config, tensors, f"a{i}", loras[-1], "f16")
    trace = make_trace(args.requests, N_ADAPTERS, args.alpha, args.rate, 1.0, (8, 128), (8, 128), args.seed)
    prompts = [prompt_ids(tokenizer, t.input_len) for t in trace]
    ours = [{"arrival": t.arrival, "model": f"a{t.adapter}", "prompt": p, "max_tokens": t.output_len,
             "extra": {"ignore_eos": True}} for t, p in zip(trace, prompts)]
    theirs = [{**job, "model": "default",
               "extra": {"ignore_eos": True, "cache_prompt": False, "lora": [{"id": t.adapter, "scale": 1.0}]}}
              for job, t in zip(ours, trace)]
    single = {"arrival": 0.0, "prompt": prompt_ids(tokenizer, 8), "max_tokens": 128}
    load_before = load_average()
    llama, llama_decode = run_llama_server(args.llama_server, loras, args.threads, args.parallel, theirs,
                                           {**single, "model": "default", "extra": {"ignore_eos": True, "lora": [{"id": 0, "scale": 1.0}]}})
    print(f"llama-server: {llama}, single-stream {llama_decode:.1f} tok/s", flush=True)
    forge, forge_decode = run_loraforge(model, tokenizer, loras, args, ours,
                                        {**single, "model": "a0", "extra": {"ignore_eos": True}})
    print(f"loraforge: {forge}, single-stream {forge_decode:.1f} tok/s", flush=True)

    rows = [[name, f"{r['req_s']:.3f}", f"{r['tok_s']:.1f}", f"{r['ttft_p50']:.2f}", f"{r['ttft_p99']:.2f}",
             f"{r['e2e_p99']:.2f}", f"{decode:.1f}"]
            for name, r, decode in (("llama-server", llama, llama_decode), ("loraforge serve", forge, forge_decode))]
    rows.append(["loraforge / llama-server", f"{forge['req_s'] / llama['req_s']:.2f}x",
                 f"{forge['tok_s'] / llama['tok_s']:.2f}x", f"{forge['ttft_p50'] / llama['ttft_p50']:.2f}x",
                 f"{forge['ttft_p99'] / llama['ttft_p99']:.2f}x", f"{forge['e2e_p99'] / llama['e2e_p99']:.2f}x",
                 f"{forge_decode / llama_decode:.2f}x"])
    table = markdown_table(["server", "req/s", "output tok/s", "TTFT p50 s", "TTFT p99 s", "e2e p99 s",
                            "single-stream decode tok/s"], rows)
    notes = [
        (f"{args.requests} requests, Poisson arrivals at {args.rate} req/s, adapter power-law alpha {args.alpha} over "
        f"{N_ADAPTERS} adapters (ranks 8/16/32/64 on q/k/v/o, F16 GGUF LoRA files), lengths in [8, 128), greedy, EOS "
        "ignored; the same token ids to both servers over HTTP (openai client, streaming, separate process)."),
        (f"llama-server: -t {args.threads} -np {args.parallel} -c {args.parallel * SLOT_CONTEXT} "
        "--lora-init-without-apply, per-request lora scales, cache_prompt off; loraforge: "
        f"{'the Q4_1 blocks kept natively' if args.native_q4 else 'the Q4_1 weights dequantized to fp32'}, "
        f"{args.threads} torch threads, max_num_seqs {args.max_num_seqs}."),
        "Ratios below 1 are better for TTFT and e2e, above 1 for throughput and decode.",
        f"Load average (1 min) of this shared machine: {load_before} before, {load_average()} after.",
    ]
    append_result("serve_vs_llama_server: loraforge serve vs llama-server, 4 GGUF LoRA adapters, S-LoRA trace",
                  table, "\n".join(f"- {n}" for n in notes))


if __name__ == "__main__":
    main()
