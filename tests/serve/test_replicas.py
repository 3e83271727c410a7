"""``loraforge serve --replicas 2`` on Ray Serve with 20 adapters, driven by the official openai client.

Ray's listeners bind every interface, so the whole session (Ray, the server and the client) runs in a
loopback-only network namespace made here (``unshare -n`` plus ``ip link set lo up``): nothing in it can
reach another address. One session serves the whole module (starting Ray takes a while on 2 cores); its
outputs are compared with one plain ``Engine`` holding every adapter.
"""

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from references import IN_CI, require

from loraforge.models import tiny_model, tiny_tokenizer
from loraforge.serve import Engine, Request, SamplingParams
from loraforge.serve.replicas import AdapterLeases

from .helpers import save_peft_adapter

require("openai")
require("ray.serve")

NUM_ADAPTERS = 20
MAX_TOKENS = 8
TARGETS = (["q_proj", "v_proj"], ["k_proj", "o_proj"], ["gate_proj", "down_proj"], ["up_proj", "q_proj"])
SESSION = Path(__file__).with_name("replica_session.py")


def loopback_namespace(argv: list[str]) -> list[str]:
    """``argv`` run in a new network namespace holding only the loopback interface, brought up."""
    missing = [tool for tool in ("unshare", "ip") if shutil.which(tool) is None]
    if not missing:
        flags = "-n" if os.geteuid() == 0 else "-rn"  # not root: map us to root in a user namespace
        probe = subprocess.run(["unshare", flags, "sh", "-c", "ip link set lo up"], capture_output=True, text=True,
                               check=False)
        if probe.returncode == 0:
            return ["unshare", flags, "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *argv]
        missing = [f"a network namespace ({probe.stderr.strip()})"]
    message = f"the replica tests need {', '.join(missing)}: install util-linux and iproute2 (bash scripts/setup.sh test)"
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    adapters = {f"a{i:02d}": save_peft_adapter(root / "adapters" / f"a{i:02d}", seed=i, r=4 + 4 * (i % 2),
                                               lora_alpha=16, target_modules=TARGETS[i % len(TARGETS)])
                for i in range(NUM_ADAPTERS)}
    prompts = {name: f"prompt {i} for {name}:" for i, name in enumerate(adapters)}
    prompts["tiny-llama"] = "the base model"
    plan = {"adapter_dir": str(root / "adapters"), "port": 8000, "replicas": 2, "adapters_per_replica": NUM_ADAPTERS,
            "prompts": prompts, "stream": ["a03", "a11", "tiny-llama"], "chat": ["a05", "tiny-llama"],
            "max_tokens": MAX_TOKENS, "server_log": str(root / "server.log")}
    (root / "plan.json").write_text(json.dumps(plan))
    command = loopback_namespace([sys.executable, str(SESSION), str(root / "plan.json"), str(root / "result.json")])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SESSION.parent.parent), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, check=False)
    log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
    assert run.returncode == 0 and (root / "result.json").exists(), f"{run.stdout}\n{run.stderr}\n--- server log\n{log[-5000:]}"
    result = json.loads((root / "result.json").read_text())
    assert result["server_exit"] == 0, log[-5000:]
    return plan, adapters, result


@pytest.fixture(scope="module")
def reference(setup):
    """What one plain engine holding every adapter answers to the same requests."""
    plan, adapters, _ = setup
    tokenizer = tiny_tokenizer()
    engine = Engine(tiny_model("tiny-llama"), tokenizer, adapters=adapters, pool_bytes=2**26)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)

    def adapter(model):
        return None if model == "tiny-llama" else model

    completions = engine.generate([Request(p, params, adapter(m)) for m, p in plan["prompts"].items()])
    chats = engine.generate([
        Request(tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": plan["prompts"][m]}],
                                                               add_generation_prompt=True, tokenize=False),
                                 add_special_tokens=False), params, adapter(m))
        for m in plan["chat"]])
    return ({m: c.text for m, c in zip(plan["prompts"], completions)},
            {m: c.text for m, c in zip(plan["chat"], chats)})


def adapter_loads(metrics: str) -> dict[str, dict[str, int]]:
    """adapter -> {replica: loads}, from the ingress's /metrics."""
    loads = defaultdict(dict)
    for replica, adapter, count in re.findall(
            r'^loraforge_replica_adapter_loads_total\{replica="([^"]+)",adapter="([^"]+)"\} (\d+)$', metrics, re.MULTILINE):
        loads[adapter][replica] = int(count)
    return dict(loads)


def test_completions_equal_one_engine_in_both_rounds(setup, reference):
    _, _, result = setup
    completions, _ = reference
    assert len(set(completions.values())) > NUM_ADAPTERS // 2  # the adapters do change the output
    assert result["rounds"] == [completions, completions]


def test_streams_arrive_in_pieces_and_equal_one_engine(setup, reference):
    plan, _, result = setup
    completions, _ = reference
    for model in plan["stream"]:
        pieces = result["streams"][model]
        assert len([p for p in pieces if p]) > 1, pieces
        assert "".join(pieces) == completions[model]


def test_chat_equals_one_engine(setup, reference):
    _, _, result = setup
    assert result["chats"] == reference[1]


def test_models_and_errors_as_one_server(setup):
    _, adapters, result = setup
    assert result["models"] == ["tiny-llama", *adapters]
    status, body = result["unknown_model"]
    assert status == 404 and body["code"] == "model_not_found", body


def test_each_adapter_is_loaded_on_one_replica_only(setup):
    """Affinity: 20 adapters, each requested 2-4 times one after another, are each loaded once in all
    (never on both replicas, never again), and both replicas take a share."""
    _, adapters, result = setup
    loads = adapter_loads(result["metrics"])
    assert sorted(loads) == sorted(adapters), result["metrics"]
    assert all(list(per_replica.values()) == [1] for per_replica in loads.values()), loads
    replicas = {replica for per_replica in loads.values() for replica in per_replica}
    assert len(replicas) == 2, loads
    assert 'loraforge_replica_adapter_evictions_total' in result["metrics"]


def test_an_adapter_evicted_while_in_use_stays_until_its_last_request_ends(tmp_path):
    """The per-replica bookkeeping behind Ray's LRU, on a real engine (no Ray needed)."""
    paths = {name: str(save_peft_adapter(tmp_path / name, seed=i, r=4, target_modules=["q_proj"]))
             for i, name in enumerate(["x", "y"])}
    engine = Engine(tiny_model("tiny-llama"), tiny_tokenizer(), pool_bytes=2**24)
    leases = AdapterLeases(engine, paths)
    x = asyncio.run(leases.load("x"))
    y = asyncio.run(leases.load("y"))
    assert engine.adapter_names == ["x", "y"] and leases.loads == {"x": 1, "y": 1}
    y.__del__()  # Ray's LRU evicts y, unused: gone at once
    assert engine.adapter_names == ["x"]
    with leases.use("x"):
        x.__del__()  # evicted while a request uses it: kept until the request ends
        assert engine.adapter_names == ["x"]
    assert engine.adapter_names == []
    with leases.use("x"):
        again = asyncio.run(leases.load("x"))  # Ray loads it again: a real load (x was unregistered)
        again.__del__()
        kept = asyncio.run(leases.load("x"))  # asked again while still in use: no new load (Ray holds `kept`)
    assert engine.adapter_names == ["x"] and leases.loads == {"x": 2, "y": 1} and leases.evictions == 3
    x.__del__()  # the garbage collector after Ray: nothing more happens
    assert engine.adapter_names == ["x"] and leases.evictions == 3
    kept.__del__()
    assert engine.adapter_names == [] and leases.evictions == 4
