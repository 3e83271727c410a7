"""Helpers for the serving tests: PEFT adapters with random weights, references, one-step logits, a server in
a thread, and hooks that decide when engine steps run or fail."""

import threading
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from loraforge.models import tiny_model
from loraforge.serve import SamplingParams
from loraforge.serve.scheduler import Sequence, group_by_adapter, pack_step


def save_peft_adapter(directory, family="tiny-llama", seed=0, **lora_kwargs):
    """Save a PEFT LoRA adapter with random (non-zero) A and B for the tiny model ``family``."""
    torch.manual_seed(seed)
    model = get_peft_model(tiny_model(family), LoraConfig(init_lora_weights=False, **lora_kwargs))
    with torch.no_grad():  # PEFT's random B is large for a tiny model; keep the logits in a sane range
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.5)
    model.save_pretrained(directory)
    return directory


def greedy(max_tokens=12, **kw):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def merged_model(family, adapter_dir):
    """The base model with ``W + s·B·A`` written into every adapted weight: the reference for LoRA math."""
    import json
    import math
    import re

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    model = tiny_model(family)
    modules = dict(model.named_modules())
    for key, a in tensors.items():
        if not key.endswith("lora_A.weight"):
            continue
        path = key[len("base_model.model."):-len(".lora_A.weight")]
        b = tensors[key.replace("lora_A", "lora_B")]
        leaf = path.rsplit(".", 1)[-1]
        r = next((v for p, v in config["rank_pattern"].items() if re.fullmatch(rf"(.*\.)?{p}", path)), config["r"])
        alpha = next((v for p, v in config["alpha_pattern"].items() if re.fullmatch(rf"(.*\.)?{p}", path)), config["lora_alpha"])
        assert a.shape[0] == r, leaf
        scale = alpha / math.sqrt(r) if config["use_rslora"] else alpha / r
        with torch.no_grad():
            modules[path].weight += scale * b @ a
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def step_logits(engine, prompts):
    """All-position logits of ``prompts`` ``[(token ids, adapter name | None)]``, prefilled together in one
    engine step through the engine's runner; the pages are given back afterwards."""
    seqs = []
    for i, (ids, adapter) in enumerate(prompts):
        seq = Sequence(f"s{i}", list(ids), greedy(), 1, adapter_name=adapter)
        if adapter is not None:
            engine.store.make_room(engine.store.pages_to_load(adapter), keep=adapter)
            seq.adapter = engine.store.acquire(adapter)
        seq.block_table = engine.pool.allocate(engine.kv.blocks_for(len(ids)), "kv")
        seqs.append(seq)
    ordered = group_by_adapter(seqs)
    batch = pack_step(ordered, engine.kv)
    batch = replace(batch, logit_rows=torch.arange(len(batch.input_ids)))
    logits = engine.runner.forward(batch, engine.kv)
    out, row = {}, 0
    for seq in ordered:
        out[seq.request_id] = logits[row:row + len(seq.prompt_ids)]
        row += len(seq.prompt_ids)
        engine.scheduler.free(seq)
    return [out[f"s{i}"] for i in range(len(prompts))]


class StepGate:
    """Make ``engine``'s background loop step only when the test says: ``allow(n)`` lets ``n`` more steps
    run, ``open()`` lets all run. It waits before a step, outside the engine lock, so the test can call
    the engine (unload an adapter, read stats) while steps are held. Open it before the engine shuts down."""

    def __init__(self, engine):
        self._cv = threading.Condition()
        self._permits = 0
        self._open = False
        self.steps = 0
        step = engine.step

        def gated_step():
            with self._cv:
                self._cv.wait_for(lambda: self._open or self._permits > 0)
                if not self._open:
                    self._permits -= 1
            try:
                return step()
            finally:
                with self._cv:
                    self.steps += 1
                    self._cv.notify_all()

        engine.step = gated_step

    def allow(self, n: int = 1) -> None:
        with self._cv:
            self._permits += n
            self._cv.notify_all()

    def open(self) -> None:
        with self._cv:
            self._open = True
            self._cv.notify_all()

    def wait_steps(self, n: int, timeout: float = 60) -> None:
        """Block until ``n`` steps have run in all."""
        with self._cv:
            assert self._cv.wait_for(lambda: self.steps >= n, timeout), f"{self.steps} of {n} steps ran"


class InjectedFault(RuntimeError):
    pass


class FaultyForward:
    """Make the model of ``engine`` raise ``InjectedFault`` in its next ``fail_next(n)`` forward passes."""

    def __init__(self, engine):
        self._failures = 0
        forward = engine.runner.forward

        def faulty_forward(batch, kv):
            if self._failures:
                self._failures -= 1
                raise InjectedFault("injected fault")
            return forward(batch, kv)

        engine.runner.forward = faulty_forward

    def fail_next(self, n: int = 1) -> None:
        self._failures += n


class ServerThread:
    """Run an app from ``create_app`` with ``make_server`` on 127.0.0.1 (a free port) in a background thread;
    ``server_options`` go to ``make_server``."""

    def __init__(self, app, **server_options):
        from loraforge.serve.api import make_server

        self.server = make_server(app, port=0, log_level="warning", **server_options)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = None

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self, timeout: float = 30) -> bool:
        """Ask the server to exit; True when its thread ended within ``timeout`` seconds."""
        self.server.should_exit = True
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def __exit__(self, *exc):
        assert self.stop(), "the server did not shut down"


def http(method: str, url: str, body=None, headers=None, raw: bytes | None = None) -> tuple[int, str]:
    """One plain HTTP request (stdlib only); returns (status, response text) for any status."""
    import json
    import urllib.error
    import urllib.request

    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def metric(url: str, name: str, key: str | None = None) -> float:
    """The value of the unlabelled Prometheus metric ``name`` on ``url``/metrics."""
    status, text = http("GET", url + "/metrics", headers={"Authorization": f"Bearer {key}"} if key else None)
    assert status == 200, text
    [value] = [line.split()[1] for line in text.splitlines() if line.split(" ")[0] == name]
    return float(value)


def events(response) -> list[str]:
    """The rest of a server-sent event stream, one ``data: ...`` line per event, once the server has ended it."""
    return [line.strip() for line in response.read().decode().splitlines() if line.strip()]


def open_stream(url: str, path: str, body: dict, headers=None):
    """POST ``body`` and return the open response, to read server-sent events line by line (``readline``)."""
    import http.client
    import json
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    connection.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    assert response.status == 200, response.read()
    return connection, response


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)
