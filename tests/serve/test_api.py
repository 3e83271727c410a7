"""The OpenAI-compatible server against the official ``openai`` client, on tiny-llama with real PEFT adapters."""

import asyncio
import json
import shutil
import time

import openai
import pytest

from loraforge.adapters.peft_format import read_adapter_dir
from loraforge.models import tiny_model, tiny_tokenizer
from loraforge.serve import Engine, Request, SamplingParams
from loraforge.serve.api import create_app

from .helpers import ServerThread, http, open_stream

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
    assert texts[0].text.startswith(first.text[: first.text.find(stop) if stop in first.text else None])


def test_seeded_sampling_repeats(client):
    kw = dict(model="r16", prompt="Sample", max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_errors_come_in_openai_shape_with_the_right_status(client, served):
    url = served[0]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert http("GET", url + "/v1/models")[0] == 401
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=BASE, prompt="x" * 600, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="only n=1"):
        client.completions.create(model=BASE, prompt="hi", max_tokens=2, n=2)
    auth = {"Authorization": f"Bearer {KEY}"}
    status, text = http("POST", url + "/v1/completions", {"model": BASE, "prompt": "hi", "temperature": "hot"}, auth)
    assert status == 400 and json.loads(text)["error"]["param"] == "temperature"
    status, text = http("POST", url + "/v1/completions", headers=auth, raw=b"{nope")
    assert status == 400 and "error" in json.loads(text)
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


def test_a_client_that_leaves_mid_stream_frees_its_slot(served):
    url, engine, _ = served
    body = {"model": "r16", "prompt": "long", "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
    connection, response = open_stream(url, "/v1/completions", body, {"Authorization": f"Bearer {KEY}"})
    assert response.readline().startswith(b"data: ")
    connection.close()
    deadline = time.monotonic() + 20
    while (engine.stats().running or engine.stats().kv_pages) and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = engine.stats()
    assert stats.running == 0 and stats.kv_pages == 0 and stats.requests_finished > 0


def test_metrics_in_prometheus_text(served):
    url, _, _ = served
    text = http("GET", url + "/metrics")[1]
    assert 'path="/v1/completions"' in text
    for name in ("loraforge_requests_waiting", "loraforge_adapters_resident", "loraforge_pool_free_pages",
                 "loraforge_generated_tokens_total", "loraforge_http_requests_total"):
        assert f"\n{name}" in "\n" + text


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


@pytest.mark.parametrize("step_delay", [0.0, 0.02], ids=["finishes-in-time", "outlives-the-timeout"])
def test_graceful_shutdown_finishes_or_fails_in_flight_requests(step_delay):
    """On shutdown a stream either completes or ends with an error event; the server never hangs."""
    engine = Engine(tiny_model(BASE), tiny_tokenizer(), pool_bytes=1 << 22)
    forward = engine.runner.forward
    engine.runner.forward = lambda batch, kv: (time.sleep(step_delay), forward(batch, kv))[1]
    server = ServerThread(create_app(engine, BASE, shutdown_timeout=1.0))
    with server:
        body = {"model": BASE, "prompt": "go", "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
        connection, response = open_stream(server.url, "/v1/completions", body)
        response.readline()
        started = time.monotonic()
        assert server.stop(timeout=20)
        rest = [line.strip() for line in response.read().decode().splitlines() if line.strip()]
        connection.close()
    if step_delay:  # 400 steps of 20 ms cannot finish within the 1 s grace period
        assert time.monotonic() - started < 10
        assert '"error"' in rest[-1] and "shutting down" in rest[-1]
    else:
        assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in rest[-2]
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
        out = client.chat.completions.create(model="from-dir", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        assert out.usage.completion_tokens <= 5
    finally:
        process.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully, then re-raises the signal
        assert process.wait(timeout=30) in (0, -signal.SIGINT)
