"""The OpenAI-compatible server against the official ``openai`` client, on tiny-llama with real PEFT adapters."""

import asyncio
import json
import shutil
import threading
import time

import openai
import pytest

from loraforge.adapters.peft_format import read_adapter_dir
from loraforge.models import tiny_model, tiny_tokenizer
from loraforge.serve import Engine, Request, SamplingParams
from loraforge.serve.api import create_app

from .helpers import ServerThread, StepGate, events, http, metric, open_stream

KEY = "test-key"
BASE = "tiny-llama"


@pytest.fixture(scope="module")
def served(tmp_path_factory, adapter_dirs):
    """A server with adapters r8 and r16 registered; r64 sits in the adapter root, ready to be loaded."""
    root = tmp_path_factory.mktemp("adapter-root")
    for name, path in adapter_dirs.items():
        shutil.copytree(path, root / name)
    engine = Engine(tiny_model(BASE), tiny_tokenizer(), adapters={"r8": root / "r8", "r16": root / "r16"}, pool_bytes=1 << 23)
    with ServerThread(create_app(engine, BASE, adapter_root=root, api_key=KEY)) as server:
        yield server.url, engine, root


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def solo(engine, prompt, adapter, max_tokens, **kw):
    [out] = engine.generate([Request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, **kw), adapter=adapter)])
    return out


def chat_ids(engine, messages):
    text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return engine.tokenizer.encode(text, add_special_tokens=False)


def test_models_lists_the_base_and_each_adapter_with_its_parent(client):
    models = {m.id: m for m in client.models.list().data}
    assert {BASE, "r8", "r16"} <= set(models)
    assert models["r8"].parent == BASE and models[BASE].parent is None


@pytest.mark.parametrize("model", [BASE, "r8", "r16"])
def test_completion_equals_engine_greedy_streaming_or_not(client, served, model):
    engine = served[1]
    expected = solo(engine, "Hello there", None if model == BASE else model, 12)
    out = client.completions.create(model=model, prompt="Hello there", max_tokens=12, temperature=0)
    assert out.choices[0].text == expected.text
    assert out.choices[0].finish_reason == expected.finish_reason
    assert out.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert out.usage.completion_tokens == len(expected.token_ids)
    chunks = list(client.completions.create(model=model, prompt="Hello there", max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)


@pytest.mark.parametrize("model", [BASE, "r8", "r16"])
def test_chat_equals_engine_greedy_with_the_chat_template(client, served, model):
    engine = served[1]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is LoRA?"}]
    expected = solo(engine, chat_ids(engine, messages), None if model == BASE else model, 10)
    out = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
    assert out.choices[0].message.content == expected.text and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(expected.prompt_token_ids)
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason


def test_several_prompts_and_stop_strings(client, served):
    engine = served[1]
    first, second = solo(engine, "abc", "r8", 16), solo(engine, "xyz", "r8", 16)
    stop = second.text[4:6]
    cut = second.text.index(stop)
    out = client.completions.create(model="r8", prompt=["abc", "xyz"], max_tokens=16, temperature=0, stop=[stop])
    texts = {c.index: c for c in out.choices}
    assert texts[1].text == second.text[:cut] and texts[1].finish_reason == "stop"
    if stop in first.text:
        assert texts[0].text == first.text[: first.text.index(stop)] and texts[0].finish_reason == "stop"
    else:
        assert texts[0].text == first.text and texts[0].finish_reason == first.finish_reason


def test_seeded_sampling_repeats_for_a_seed_and_differs_across_seeds(client):
    kw = dict(model="r16", prompt="Sample", max_tokens=10, temperature=1.0, top_p=0.9)
    seven, again, eight = (client.completions.create(seed=seed, **kw).choices[0].text for seed in (7, 7, 8))
    assert seven == again
    assert seven != eight


def test_errors_come_in_openai_shape_with_the_right_status(client, served):
    url = served[0]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert http("GET", url + "/v1/models")[0] == 401
    with pytest.raises(openai.BadRequestError, match="context") as too_long:
        client.completions.create(model=BASE, prompt="x" * 600, max_tokens=2)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="only n=1"):
        client.completions.create(model=BASE, prompt="hi", max_tokens=2, n=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens") as zero:
        client.completions.create(model=BASE, prompt="hi", max_tokens=0)
    assert zero.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="exceeds the model's context") as beyond:
        client.completions.create(model=BASE, prompt="hi", max_tokens=10_000)
    assert beyond.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="logprobs are not supported") as logprobs:
        client.completions.create(model=BASE, prompt="hi", max_tokens=2, logprobs=2)
    assert logprobs.value.param == "logprobs"
    with pytest.raises(openai.BadRequestError, match="logprobs are not supported"):
        client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=2, logprobs=True)
    with pytest.raises(openai.BadRequestError, match=r"seed=.* must be an integer in"):
        client.completions.create(model=BASE, prompt="hi", max_tokens=2, seed=2**70)
    auth = {"Authorization": f"Bearer {KEY}"}
    status, text = http("POST", url + "/v1/completions", {"model": BASE, "prompt": "hi", "temperature": "hot"}, auth)
    assert status == 400 and json.loads(text)["error"]["param"] == "temperature"
    status, text = http("POST", url + "/v1/completions", headers=auth, raw=b"{nope")
    assert status == 400 and json.loads(text)["error"]["type"] == "invalid_request_error"
    status, text = http("POST", url + "/v1/chat/completions", {"model": BASE}, auth)
    assert status == 400 and json.loads(text)["error"]["param"] == "messages"
    assert json.loads(http("GET", url + "/health")[1])["status"] == "ok"


def test_adapter_loading_stays_inside_the_root_and_checks_the_adapter(served, tmp_path):
    url, engine, root = served
    auth = {"Authorization": f"Bearer {KEY}"}

    def load(name, path):
        return http("POST", url + "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)}, auth)

    shutil.copytree(root / "r8", tmp_path / "outside")
    (root / "escape").symlink_to(tmp_path / "outside", target_is_directory=True)
    (root / "empty").mkdir()
    for name, path, status, words in [
        ("r8", "r8", 400, "already loaded"),
        ("x", "../outside", 400, "outside the adapter root"),
        ("x", tmp_path / "outside", 400, "outside the adapter root"),
        ("x", "escape", 400, "outside the adapter root"),
        ("x", "empty", 400, "adapter_config.json is missing"),
        ("x", "nothing-here", 400, "no such adapter directory"),
    ]:
        got, text = load(name, path)
        assert got == status and words in json.loads(text)["error"]["message"], (path, text)
    assert http("POST", url + "/v1/unload_lora_adapter", {"lora_name": "nope"}, auth)[0] == 404


def test_hot_load_serve_and_unload(client, served):
    url, engine, root = served
    auth = {"Authorization": f"Bearer {KEY}"}
    assert http("POST", url + "/v1/load_lora_adapter", {"lora_name": "fresh", "lora_path": "r64"}, auth)[0] == 200
    assert "fresh" in {m.id for m in client.models.list().data}
    expected = solo(engine, "hot", "fresh", 8)
    assert client.completions.create(model="fresh", prompt="hot", max_tokens=8, temperature=0).choices[0].text == expected.text
    assert http("POST", url + "/v1/unload_lora_adapter", {"lora_name": "fresh"}, auth)[0] == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="fresh", prompt="hot", max_tokens=2)


@pytest.mark.parametrize("prompts", [1, 3])
def test_a_client_that_leaves_mid_stream_frees_its_slots_quietly(served, caplog, prompts):
    url, engine, _ = served
    body = {"model": "r16", "prompt": ["long"] * prompts, "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "stream": True}
    connection, response = open_stream(url, "/v1/completions", body, {"Authorization": f"Bearer {KEY}"})
    assert response.readline().startswith(b"data: ")
    connection.close()
    deadline = time.monotonic() + 20
    while (engine.stats().running or engine.stats().kv_pages) and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = engine.stats()
    assert stats.running == 0 and stats.kv_pages == 0 and stats.requests_finished > 0
    assert not [r for r in caplog.records if r.levelname == "ERROR"], "a dropped stream is no error"


def test_metrics_move_by_what_requests_did(client, served):
    url, engine, _ = served

    def completions_200():
        text = http("GET", url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})[1]
        line = next((line for line in text.splitlines() if line.startswith(
            'loraforge_http_requests_total{path="/v1/completions",status="200"}')), None)
        return 0 if line is None else int(line.split()[-1])

    names = ("loraforge_requests_finished_total", "loraforge_prompt_tokens_total", "loraforge_generated_tokens_total")
    before = {name: metric(url, name, KEY) for name in names}
    requests_before = completions_200()
    prompts = ["count me", "and me too"]
    out = client.completions.create(model="r8", prompt=prompts, max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    assert [c.finish_reason for c in out.choices] == ["length", "length"] and out.usage.completion_tokens == 14
    after = {name: metric(url, name, KEY) for name in names}
    assert after["loraforge_requests_finished_total"] - before["loraforge_requests_finished_total"] == 2
    assert after["loraforge_generated_tokens_total"] - before["loraforge_generated_tokens_total"] == 14
    prompt_tokens = sum(len(engine.tokenizer.encode(p)) for p in prompts)
    assert after["loraforge_prompt_tokens_total"] - before["loraforge_prompt_tokens_total"] == prompt_tokens
    assert completions_200() - requests_before == 1
    for gauge in ("loraforge_requests_waiting", "loraforge_requests_running", "loraforge_pool_kv_pages"):
        assert metric(url, gauge, KEY) == 0
    assert metric(url, "loraforge_pool_free_bytes", KEY) == engine.pool.num_free * engine.pool.page_bytes
    hits = metric(url, "loraforge_prefix_hit_blocks_total", KEY)
    blocks = min(3, 256 // engine.block_size)  # several full KV blocks, well inside the 512-token context
    ids = engine.tokenizer.encode(" ".join(f"word{i}" for i in range(400)))[:blocks * engine.block_size + 5]
    shared = engine.tokenizer.decode(ids)
    for _ in range(2):  # the second request reuses the first one's blocks
        client.completions.create(model="r8", prompt=shared, max_tokens=1, temperature=0)
    assert metric(url, "loraforge_prefix_hit_blocks_total", KEY) > hits
    assert metric(url, "loraforge_prefix_hit_blocks_total", KEY) == engine.stats().prefix_hit_blocks
    assert metric(url, "loraforge_prefix_cached_pages", KEY) == engine.stats().prefix_cached_pages > 0


def test_load_200_concurrent_streams_over_20_adapters_with_hot_load_and_unload(served):
    url, engine, root = served
    extra = [f"load{i}" for i in range(18)]
    for i, name in enumerate(extra):
        engine.register_adapter_weights(name, *(read_adapter_dir(root / ("r16" if i % 2 else "r8"))))
    adapters = ["r8", "r16"] + extra
    jobs = [(f"prompt {i % 7}", adapters[i % len(adapters)], 4 + i % 9) for i in range(200)]
    expected = {(p, a, n): solo(engine, p, a, n).text for p, a, n in set(jobs)}
    baseline = engine.stats()
    auth = {"Authorization": f"Bearer {KEY}"}

    async def run():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)

        async def one(prompt, adapter, n):
            stream = await client.completions.create(model=adapter, prompt=prompt, max_tokens=n, temperature=0, stream=True)
            return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

        async def churn():  # hot load and unload an adapter, and use it, while the load runs
            for _ in range(3):
                await asyncio.sleep(0.05)
                load = {"lora_name": "hot", "lora_path": "r64"}
                assert (await asyncio.to_thread(http, "POST", url + "/v1/load_lora_adapter", load, auth))[0] == 200
                out = await client.completions.create(model="hot", prompt="churn", max_tokens=3, temperature=0)
                assert out.choices[0].finish_reason in ("stop", "length")
                unload = {"lora_name": "hot"}
                assert (await asyncio.to_thread(http, "POST", url + "/v1/unload_lora_adapter", unload, auth))[0] == 200

        results = await asyncio.wait_for(asyncio.gather(*(one(*job) for job in jobs), churn()), timeout=180)
        await client.close()
        return results[:-1]

    texts = asyncio.run(run())
    assert texts == [expected[job] for job in jobs]
    after = engine.stats()
    assert after.running == after.waiting == after.kv_pages == 0
    assert after.requests_finished - baseline.requests_finished == 203
    assert "hot" not in engine.adapter_names and not engine._live
    for name in extra:
        engine.unregister_adapter(name)


@pytest.mark.parametrize("in_time", [True, False], ids=["finishes-in-time", "outlives-the-timeout"])
def test_graceful_shutdown_finishes_or_fails_in_flight_requests(in_time):
    """On shutdown a stream either completes or ends with an error event; the server never hangs.

    The test decides when steps run, so the machine's speed can't change the outcome: the stream is
    mid-way when shutdown begins; then either every step may run (and the grace period is far longer
    than 20 steps need), or none may, so the grace period runs out with the request in flight.
    """
    engine = Engine(tiny_model(BASE), tiny_tokenizer(), pool_bytes=1 << 22)
    gate = StepGate(engine)
    shutdown_began = threading.Event()
    shutdown = engine.shutdown
    engine.shutdown = lambda timeout: (shutdown_began.set(), shutdown(timeout))[1]
    server = ServerThread(create_app(engine, BASE, shutdown_timeout=60.0 if in_time else 0.5))
    with server:
        body = {"model": BASE, "prompt": "go", "max_tokens": 20, "temperature": 0, "ignore_eos": True, "stream": True}
        connection, response = open_stream(server.url, "/v1/completions", body)
        gate.allow(5)
        gate.wait_steps(5)
        stopping = threading.Thread(target=server.stop)
        stopping.start()
        try:
            assert shutdown_began.wait(30)
            if in_time:
                gate.open()
            rest = events(response)  # returns once the server has ended the stream
        finally:
            gate.open()
            stopping.join(60)
        connection.close()
    if in_time:
        assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in rest[-2]
    else:
        assert json.loads(rest[-1].removeprefix("data: "))["error"]["message"] == "the engine is shutting down"
    assert engine.stats().running == 0


def test_run_server_end_to_end_in_a_subprocess(adapter_dirs, tmp_path):
    """``run_server`` as the CLI calls it: adapters from --adapter and --adapter-dir, key from the environment."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    root = tmp_path / "root"
    shutil.copytree(adapter_dirs["r16"], root / "from-dir")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (f"from loraforge.serve.api import run_server; run_server('tiny-llama', adapters={{'r8': {str(adapter_dirs['r8'])!r}}}, "
            f"adapter_dir={str(root)!r}, port={port}, threads=1, log_level='warning')")
    env = {**os.environ, "LORAFORGE_API_KEY": "from-env"}
    process = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stderr.read()
            try:
                if http("GET", url + "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        assert http("GET", url + "/v1/models")[0] == 401
        client = openai.OpenAI(base_url=url + "/v1", api_key="from-env", max_retries=0, timeout=60)
        assert {m.id for m in client.models.list().data} == {"tiny-llama", "r8", "from-dir"}
        messages = [{"role": "user", "content": "hi"}]
        out = client.chat.completions.create(model="from-dir", messages=messages, max_tokens=5, temperature=0,
                                             extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"
        local = Engine(tiny_model(BASE), tiny_tokenizer(), adapters={"from-dir": root / "from-dir"}, pool_bytes=1 << 22)
        assert out.choices[0].message.content == solo(local, chat_ids(local, messages), "from-dir", 5, ignore_eos=True).text
    finally:
        process.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully; run_server then returns
        assert process.wait(timeout=30) == 0, process.stderr.read()
