"""Engine replicas on Ray Serve (``loraforge serve --replicas``) on S-LoRA's trace with 100 adapters:
throughput of 1 vs 2 replicas, and how many adapter loads adapter-affinity routing saves against Ray's
default routing (by queue length only), in one run on one Ray cluster.

Rows, each a fresh deployment of the same application (``serve.replicas.build_application``):
- 1 replica (every request goes to it; its LRU holds ``--adapters-per-replica`` adapters);
- 2 replicas, adapter affinity (Ray Serve's model multiplexing, what ``--replicas`` does);
- 2 replicas, no affinity (the same deployment, the multiplexed model id left out).
Each replica runs one torch thread and asks Ray for one CPU. The trace (``serve_slora.make_trace``:
power-law adapter choice, gamma arrivals, lengths in [8, 48), EOS ignored) is replayed over HTTP at
its arrival times, each request a ``/v1/completions`` call with ``ignore_eos``; the adapter loads are
read from the ingress's ``/metrics``. The 100 adapters draw their weights from ``serve_slora``'s
weight sets (ranks 8-64 on q/k/v/o), written as PEFT folders the replicas load from.

Ray's listeners bind every interface, so the script re-runs itself in a loopback-only network
namespace (``unshare -n`` plus ``ip link set lo up``) and never reaches another address.

    flock /work/helpers/bench.lock python benchmarks/serve_replicas.py [--model default] [--requests 96] [--alpha 0.3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from report import append_result, markdown_table
from safetensors.torch import save_file
from serve_slora import WEIGHT_SETS, load_average, make_trace, prompt_ids, weight_sets

from loraforge.models import load_model
from loraforge.serve.api import served_name
from loraforge.serve.replicas import APP_NAME, ReplicaSettings, build_application

INSIDE = "LORAFORGE_BENCH_IN_NAMESPACE"
PORT = 8000
ROWS = ((1, True), (2, True), (2, False))
"""(replicas, adapter affinity) per row."""


def write_adapters(root: Path, sets, count: int) -> dict[str, str]:
    """``count`` PEFT adapter folders ``a{i}`` under ``root``, adapter i holding weight set ``i % len(sets)``."""
    paths = {}
    for i in range(count):
        config, tensors = sets[i % len(sets)]
        folder = root / f"a{i}"
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(json.dumps(config))
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "adapter_model.safetensors")
        paths[f"a{i}"] = str(folder)
    return paths


async def replay(trace, prompts: list[list[int]], url: str) -> float:
    """Send the trace's requests at their arrival times; returns the seconds until the last one is answered."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=len(trace))) as client:
        start = time.perf_counter()

        async def one(t, prompt):
            await asyncio.sleep(max(0.0, start + t.arrival - time.perf_counter()))
            response = await client.post("/v1/completions", json={
                "model": f"a{t.adapter}", "prompt": prompt, "max_tokens": t.output_len, "temperature": 0,
                "ignore_eos": True})
            assert response.status_code == 200, response.text
            assert response.json()["usage"]["completion_tokens"] == t.output_len, response.text

        await asyncio.gather(*(one(t, p) for t, p in zip(trace, prompts)))
        return time.perf_counter() - start


def adapter_counts(url: str) -> tuple[int, int, dict[str, int]]:
    """(adapter loads, evictions, requests by replica) from the ingress's /metrics."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=60).text
    loads = sum(int(n) for n in re.findall(r"^loraforge_replica_adapter_loads_total\{.*\} (\d+)$", text, re.MULTILINE))
    evictions = sum(int(n) for n in re.findall(r"^loraforge_replica_adapter_evictions_total\{.*\} (\d+)$", text,
                                               re.MULTILINE))
    requests = dict(re.findall(r'^loraforge_replica_requests_total\{replica="([^"]+)"\} (\d+)$', text, re.MULTILINE))
    return loads, evictions, {r: int(n) for r, n in requests.items()}


def run_row(settings: ReplicaSettings, replicas: int, affinity: bool, trace, prompts) -> dict:
    import httpx
    from ray import serve

    url = f"http://127.0.0.1:{PORT}"
    began = time.perf_counter()
    serve.run(build_application(settings, replicas, adapter_affinity=affinity), name=APP_NAME, route_prefix="/")
    deploy = time.perf_counter() - began
    for _ in range(2 * replicas):  # first forward passes, on the base model (no adapter loads)
        httpx.post(url + "/v1/completions", json={"model": settings.model_name, "prompt": "Hello", "max_tokens": 2},
                   timeout=300).raise_for_status()
    elapsed = asyncio.run(replay(trace, prompts, url))
    loads, evictions, requests = adapter_counts(url)
    serve.delete(APP_NAME)
    return {"replicas": replicas, "affinity": affinity, "elapsed": elapsed, "req_s": len(trace) / elapsed,
            "tok_s": sum(t.output_len for t in trace) / elapsed, "loads": loads, "evictions": evictions,
            "split": sorted(requests.values(), reverse=True), "deploy_s": deploy}


def inside(args) -> None:
    import ray
    from ray import serve

    model, tokenizer = load_model(args.model)
    sets = weight_sets(model, min(WEIGHT_SETS, args.adapters))
    del model
    trace = make_trace(args.requests, args.adapters, args.alpha, args.rate, 1.0, (8, 48), (8, 48), seed=0)
    prompts = [prompt_ids(tokenizer, t.input_len) for t in trace]
    before = load_average()
    with tempfile.TemporaryDirectory(prefix="serve-replicas-") as tmp:
        paths = write_adapters(Path(tmp), sets, args.adapters)
        settings = ReplicaSettings(args.model, served_name(args.model), paths, pool_bytes=int(args.pool_gb * 2**30),
                                   max_num_seqs=48, threads=1, adapters_per_replica=args.adapters_per_replica)
        ray.init(include_dashboard=False, num_cpus=os.cpu_count())
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        results = [run_row(settings, replicas, affinity, trace, prompts) for replicas, affinity in ROWS]
        serve.shutdown()
        ray.shutdown()
    distinct = len({t.adapter for t in trace})
    one = results[0]
    no_affinity = next(r for r in results if not r["affinity"])
    rows = [[r["replicas"], "adapter affinity" if r["affinity"] else "queue length only", f"{r['req_s']:.2f}",
             f"{r['tok_s']:.1f}", f"{r['tok_s'] / one['tok_s']:.2f}", r["loads"], r["evictions"],
             f"{r['loads'] / no_affinity['loads']:.2f}", "/".join(map(str, r["split"])), f"{r['deploy_s']:.0f}"]
            for r in results]
    table = markdown_table(["replicas", "routing", "req/s", "output tok/s", "tok/s vs 1 replica", "adapter loads",
                            "evictions", "loads vs no affinity", "requests per replica", "deploy s"], rows)
    notes = (f"- {args.requests} requests, {args.adapters} adapters, alpha {args.alpha} ({distinct} distinct in the "
             f"trace: the fewest loads possible), rate {args.rate} req/s, cv 1, lengths in [8, 48); "
             f"{args.adapters_per_replica} adapters per replica (Ray's max_num_models_per_replica); pool "
             f"{args.pool_gb} GiB and one torch thread per replica; model {args.model}.\n"
             f"- Load average (1 min) of this shared machine: {before} before, {load_average()} after.\n"
             f"- What 2 cores can show: the adapter loads (a count, independent of speed) and that 2 replicas run "
             f"side by side. Throughput can't scale past the 2 cores, which the ingress, Ray's proxy and controller "
             f"and the HTTP client share with the replicas (and other people's jobs share with all of them); on "
             f"GPUs each replica would own a device and the ingress a CPU core.")
    append_result("serve_replicas: 1 vs 2 engine replicas on Ray Serve, S-LoRA trace, 100 adapters", table, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.3, help="S-LoRA's power-law exponent (1 = uniform)")
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second (saturating)")
    parser.add_argument("--adapters-per-replica", type=int, default=8)
    parser.add_argument("--pool-gb", type=float, default=0.75)
    args = parser.parse_args()
    if os.environ.get(INSIDE):
        torch.set_num_threads(1)
        inside(args)
        return
    flags = "-n" if os.geteuid() == 0 else "-rn"
    command = ["unshare", flags, "sh", "-c", 'ip link set lo up && exec "$@"', "sh", sys.executable, *sys.argv]
    sys.exit(subprocess.run(command, env={**os.environ, INSIDE: "1"}, check=False).returncode)


if __name__ == "__main__":
    main()
