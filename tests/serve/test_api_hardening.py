"""The HTTP server against bad clients and faults: the API key on every endpoint, bounded request bodies,
idle and trickling connections (slowloris), a model step that raises, unloading an adapter mid-stream."""

import json
import shutil
import socket
import threading
from http.client import HTTPConnection
from urllib.parse import urlsplit

import openai
import pytest

from loraforge.models import tiny_model, tiny_tokenizer
from loraforge.serve import Engine
from loraforge.serve.api import create_app

from .helpers import FaultyForward, ServerThread, StepGate, events, http, metric, open_stream, wait_until

KEY = "test-key"
BASE = "tiny-llama"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMIT = 1000


@pytest.fixture(scope="module")
def root(tmp_path_factory, adapter_dirs):
    root = tmp_path_factory.mktemp("adapter-root")
    shutil.copytree(adapter_dirs["r8"], root / "r8")
    return root


def serve(root=None, head_timeout=0.5, **app_options):
    """A server on a fresh tiny-llama engine with r8 registered, a 1000-byte body limit and short timeouts."""
    engine = Engine(tiny_model(BASE), tiny_tokenizer(), adapters={"r8": root / "r8"} if root else None, pool_bytes=1 << 23)
    options = dict(api_key=KEY, adapter_root=root, max_body_bytes=LIMIT, body_timeout=0.5) | app_options
    app = create_app(engine, BASE, **options)
    return ServerThread(app, head_timeout=head_timeout), app, engine


def connect(url: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", urlsplit(url).port), timeout=30)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a socket timeout fails the test)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def error_of(text: str) -> dict:
    body = json.loads(text)
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_every_endpoint_but_health_needs_the_key(root):
    server, app, engine = serve(root)
    with server:
        routes = [(method, route.path) for route in app.routes for method in getattr(route, "methods", ()) - {"HEAD"}]
        assert {("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter"), ("GET", "/metrics"),
                ("GET", "/openapi.json")} <= set(routes)
        for method, path in routes:
            for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
                status, text = http(method, server.url + path, {"lora_name": "r8", "lora_path": "r8"}, headers)
                if path == "/health":
                    assert status == 200
                else:
                    assert status == 401 and error_of(text)["code"] == "invalid_api_key", (method, path, headers)
        assert engine.adapter_names == ["r8"]  # the refused unload did nothing
        assert http("GET", server.url + "/metrics", headers=AUTH)[0] == 200


def test_metrics_open_to_all_only_when_public(root):
    server, _, _ = serve(root, metrics_public=True)
    with server:
        assert http("GET", server.url + "/metrics")[0] == 200
        assert http("GET", server.url + "/v1/models")[0] == 401


def test_unknown_routes_and_methods_answer_in_openai_shape(root):
    server, _, _ = serve(root)
    with server:
        status, text = http("GET", server.url + "/v1/nothing", headers=AUTH)
        assert status == 404 and "/v1/nothing" in error_of(text)["message"]
        status, text = http("GET", server.url + "/v1/completions", headers=AUTH)
        assert status == 405 and error_of(text)["type"] == "invalid_request_error"


def test_a_body_over_the_limit_is_refused_with_413_declared_or_streamed(root):
    server, _, engine = serve(root)
    with server:
        port = urlsplit(server.url).port
        connection = HTTPConnection("127.0.0.1", port, timeout=30)
        connection.putrequest("POST", "/v1/completions")
        for name, value in {**AUTH, "Content-Type": "application/json", "Content-Length": str(100 * LIMIT)}.items():
            connection.putheader(name, value)
        connection.endheaders()  # the body is never sent: the declared length is enough to refuse it
        response = connection.getresponse()
        assert response.status == 413 and response.getheader("connection") == "close"
        assert error_of(response.read().decode())["code"] == "request_too_large"
        connection.close()

        prompt = json.dumps({"model": BASE, "prompt": "x" * LIMIT, "max_tokens": 1}).encode()
        connection = HTTPConnection("127.0.0.1", port, timeout=30)
        chunks = iter([prompt[:LIMIT // 2], prompt[LIMIT // 2:]])  # chunked: no length declared
        connection.request("POST", "/v1/completions", body=chunks, headers={**AUTH, "Content-Type": "application/json"},
                           encode_chunked=True)
        response = connection.getresponse()
        assert response.status == 413 and error_of(response.read().decode())["code"] == "request_too_large"
        connection.close()
        assert engine.stats().prompt_tokens == 0  # nothing reached the engine
        ok = {"model": BASE, "prompt": "x" * (LIMIT // 2), "max_tokens": 1}
        assert http("POST", server.url + "/v1/completions", ok, AUTH)[0] == 200


def test_a_body_that_does_not_arrive_in_time_gets_408_and_the_connection_closed(root):
    server, _, _ = serve(root)
    with server:
        sock = connect(server.url)
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{\"model\"".encode())
        reply = read_until_closed(sock).decode()
        assert reply.startswith("HTTP/1.1 408") and error_of(reply.split("\r\n\r\n", 1)[1])["code"] == "request_timeout"


def open_slow_clients(url: str) -> list[socket.socket]:
    """50 connections that stall: 20 send nothing, 15 part of a request head, 15 a head and part of a body."""
    idle = [connect(url) for _ in range(20)]
    partial_head = [connect(url) for _ in range(15)]
    for sock in partial_head:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    partial_body = [connect(url) for _ in range(15)]
    for sock in partial_body:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"mo".encode())
    return idle + partial_head + partial_body


def test_stalled_connections_do_not_keep_others_from_being_served(root):
    server, _, engine = serve(root, head_timeout=600, body_timeout=600)  # they stay open throughout
    with server:
        slow = open_slow_clients(server.url)
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
            out = client.completions.create(model="r8", prompt="still here", max_tokens=3, temperature=0,
                                            extra_body={"ignore_eos": True})
            assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"
            assert http("GET", server.url + "/health")[0] == 200
        finally:
            for sock in slow:
                sock.close()


def test_stalled_connections_are_closed(root):
    """Within the head timeout (no request head) or the body timeout (a 408 first): the socket timeout of
    30 s is only the bound that fails the test if the server never closes them."""
    server, _, _ = serve(root)
    with server:
        slow = open_slow_clients(server.url)
        replies = [read_until_closed(sock) for sock in slow]
        assert replies[:35] == [b""] * 35
        assert all(reply.startswith(b"HTTP/1.1 408") for reply in replies[35:])
        assert http("GET", server.url + "/health")[0] == 200


def test_a_failing_model_step_fails_its_requests_and_the_engine_goes_on():
    engine = Engine(tiny_model(BASE), tiny_tokenizer(), pool_bytes=1 << 22)
    faults = FaultyForward(engine)
    with ServerThread(create_app(engine, BASE, api_key=KEY)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        faults.fail_next()
        with pytest.raises(openai.InternalServerError) as failed:
            client.completions.create(model=BASE, prompt="boom", max_tokens=4)
        assert failed.value.status_code == 500
        assert failed.value.body["type"] == "server_error" and "injected fault" in failed.value.body["message"]

        faults.fail_next()
        body = {"model": BASE, "prompt": "boom", "max_tokens": 4, "stream": True}
        connection, response = open_stream(server.url, "/v1/completions", body, AUTH)
        last = json.loads(events(response)[-1].removeprefix("data: "))
        connection.close()
        assert last["error"]["type"] == "server_error" and "engine step failed: injected fault" in last["error"]["message"]

        out = client.completions.create(model=BASE, prompt="fine", max_tokens=4, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 4 and out.choices[0].finish_reason == "length"
        stats = engine.stats()
        assert stats.running == stats.kv_pages == 0 and stats.requests_finished == 3


def test_unloading_an_adapter_ends_its_open_streams_with_an_error_and_frees_its_memory(root):
    server, _, engine = serve(root, head_timeout=60)
    gate = StepGate(engine)
    with server:
        url = server.url
        free_before = metric(url, "loraforge_pool_free_bytes", KEY)
        assert http("POST", url + "/v1/load_lora_adapter", {"lora_name": "hot", "lora_path": "r8"}, AUTH)[0] == 200
        body = {"prompt": "stream on", "max_tokens": 30, "temperature": 0, "ignore_eos": True, "stream": True}
        hot = [open_stream(url, "/v1/completions", {**body, "model": "hot"}, AUTH) for _ in range(3)]
        base = open_stream(url, "/v1/completions", {**body, "model": BASE}, AUTH)
        answer = {}
        blocking = threading.Thread(target=lambda: answer.update(
            reply=http("POST", url + "/v1/completions", {**body, "model": "hot", "stream": False}, AUTH)))
        blocking.start()
        try:
            wait_until(lambda: engine.stats().waiting == 5, "all 5 requests submitted before the first step")
            gate.allow(3)
            gate.wait_steps(3)
            assert metric(url, "loraforge_requests_running", KEY) == 5
            assert metric(url, "loraforge_pool_free_bytes", KEY) < free_before
            assert http("POST", url + "/v1/unload_lora_adapter", {"lora_name": "hot"}, AUTH)[0] == 200
            hot_endings = [events(response)[-1] for _, response in hot]
            blocking.join(60)
        finally:
            gate.open()
        base_ending = events(base[1])
        for connection, _ in hot + [base]:
            connection.close()
        for ending in hot_endings:
            assert json.loads(ending.removeprefix("data: "))["error"]["message"] == "adapter 'hot' was unregistered"
        status, text = answer["reply"]
        assert status == 503 and error_of(text)["message"] == "adapter 'hot' was unregistered"
        assert base_ending[-1] == "data: [DONE]" and '"finish_reason": "length"' in base_ending[-2]
        assert metric(url, "loraforge_pool_free_bytes", KEY) == free_before
        assert "hot" not in engine.adapter_names
