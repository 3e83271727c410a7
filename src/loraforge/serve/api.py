"""OpenAI-compatible HTTP API over the engine (FastAPI + uvicorn): ``loraforge serve``.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true``
sends server-sent events ending with ``data: [DONE]``), ``POST /v1/load_lora_adapter`` and
``/v1/unload_lora_adapter`` (named as in vLLM), ``GET /health`` and ``GET /metrics`` (Prometheus text).
``model`` picks the base model or an adapter by name. Errors use OpenAI's JSON shape
``{"error": {"message", "type", "param", "code"}}``. When an API key is set, every path but ``/health``
needs ``Authorization: Bearer <key>`` (``/metrics`` too, unless ``metrics_public``). Request bodies
and slow clients are bounded (``http_guard``). If a model step fails, the requests in it end with a
500 error (an error event in a stream) and the others go on.

Adapters loaded at run time must lie inside the adapter root (``--adapter-dir``); a path that
leaves it, directly or through a symbolic link, is refused before anything is read.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.routing import Match

from loraforge.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME, AdapterError
from loraforge.quant.summary import quant_summary
from loraforge.serve.chat_images import vision_prompt
from loraforge.serve.engine import Delta, Engine, EngineConfig, Request
from loraforge.serve.errors import EngineClosedError, RequestTooLargeError, UnknownAdapterError
from loraforge.serve.http_errors import APIError
from loraforge.serve.http_guard import (
    BODY_TIMEOUT,
    HEAD_TIMEOUT,
    KEEP_ALIVE_TIMEOUT,
    MAX_BODY_BYTES,
    MAX_HEAD_BYTES,
    HeadTimeoutH11Protocol,
    RequestGuard,
)
from loraforge.serve.request_bodies import ChatBody, CompletionBody, LoadAdapterBody, SamplingFields, UnloadAdapterBody
from loraforge.serve.sampling import SamplingParams

log = logging.getLogger(__name__)

API_KEY_ENV = "LORAFORGE_API_KEY"
"""Environment variable read for the API key when none is passed."""
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
"""OpenAI's default ``max_tokens`` for ``/v1/completions``; chat defaults to as many as fit."""


# the app --------------------------------------------------------------------------------------------


def create_app(
    engine: Engine,
    model_name: str,
    *,
    adapter_root: str | os.PathLike | None = None,
    api_key: str | None = None,
    metrics_public: bool = False,
    shutdown_timeout: float = 10.0,
    max_body_bytes: int = MAX_BODY_BYTES,
    body_timeout: float = BODY_TIMEOUT,
    image_root: str | os.PathLike | None = None,
) -> FastAPI:
    """The HTTP app serving ``engine`` as ``model_name`` (its base model) plus every registered adapter.

    ``adapter_root``: the only folder ``/v1/load_lora_adapter`` may read from (None = run-time loading
    off). ``api_key``: when set, required as a bearer token on every path but ``/health``, and
    ``/metrics`` unless ``metrics_public``. On shutdown, requests still running after
    ``shutdown_timeout`` seconds end with an error. A request body over ``max_body_bytes`` is answered
    413, one that takes more than ``body_timeout`` seconds to arrive 408. ``image_root``: the only folder a
    vision-language model's chat may read local image files from (None = data URLs only).
    """
    root = Path(adapter_root).resolve() if adapter_root is not None else None
    image_dir = Path(image_root).resolve() if image_root is not None else None
    http_requests: Counter = Counter()
    base = quant_summary(engine.runner.model)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        yield
        await run_in_threadpool(engine.shutdown, shutdown_timeout)

    app = FastAPI(title="loraforge", lifespan=lifespan)
    app.state.engine = engine
    app.state.shutdown_timeout = shutdown_timeout

    @app.exception_handler(APIError)
    async def _api_error(_request, err: APIError):
        return err.response()

    @app.exception_handler(HTTPException)
    async def _http_error(request: HTTPRequest, err: HTTPException):  # FastAPI's own: no route, wrong method
        message = f"{request.method} {request.url.path}: {err.detail}"
        return APIError(err.status_code, message, headers=err.headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(_request, err: Exception):
        log.exception("unexpected error answering a request")
        return APIError(500, f"internal error: {err}").response()

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(_request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"][1:]) or None
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in err.errors()[:5])
        return APIError(400, message or "invalid request", param=param).response()

    open_paths = frozenset({"/health", "/metrics"} if metrics_public else {"/health"})
    app.add_middleware(RequestGuard, api_key=api_key, open_paths=open_paths, max_body_bytes=max_body_bytes,
                       body_timeout=body_timeout)

    @app.middleware("http")  # outside the guard, so that what it refuses is counted too
    async def _count(request: HTTPRequest, call_next):
        response = await call_next(request)
        http_requests[(_route_template(app, request.scope), response.status_code)] += 1
        return response

    def adapter_of(model: str) -> str | None:
        if model == model_name:
            return None
        if model not in engine.store.adapters:
            raise APIError(404, f"the model {model!r} does not exist; GET /v1/models lists what is served", param="model",
                           code="model_not_found")
        return model

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def models():
        return model_list(model_name, await run_in_threadpool(lambda: engine.adapter_names))

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        adapter = adapter_of(body.model)
        prompts = _prompts(body.prompt)
        params = _sampling(body, body.max_tokens if body.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS)
        return await _respond(engine, body, [Request(p, params, adapter) for p in prompts], "text_completion", "cmpl")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        adapter = adapter_of(body.model)
        if engine.processor is None and (engine.tokenizer is None or not getattr(engine.tokenizer, "chat_template", None)):
            raise APIError(400, "this model has no chat template; use /v1/completions")
        images = []
        if engine.processor is not None:
            prompt_ids, images = await run_in_threadpool(vision_prompt, engine.processor, body.messages, image_dir)
        else:
            messages = [{"role": m.role, "content": _text(m.content)} for m in body.messages]
            text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            prompt_ids = engine.tokenizer.encode(text, add_special_tokens=False)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        request = Request(prompt_ids, _sampling(body, max_tokens), adapter, images=images)
        return await _respond(engine, body, [request], "chat.completion", "chatcmpl")

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadAdapterBody):
        if body.lora_name == model_name:
            raise APIError(400, f"{body.lora_name!r} is the base model's name", param="lora_name")
        if body.lora_name in engine.store.adapters:
            raise APIError(400, f"an adapter named {body.lora_name!r} is already loaded; unload it first", param="lora_name")
        path = _inside_root(root, body.lora_path)
        try:
            await run_in_threadpool(engine.register_adapter, body.lora_name, path)
        except (AdapterError, ValueError) as err:
            raise APIError(400, str(err), param="lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadAdapterBody):
        try:
            await run_in_threadpool(engine.unregister_adapter, body.lora_name)
        except UnknownAdapterError:
            raise APIError(404, f"no adapter named {body.lora_name!r} is loaded", param="lora_name", code="model_not_found") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.get("/metrics")
    async def metrics():
        stats = await run_in_threadpool(engine.stats)
        return PlainTextResponse(_prometheus(stats, http_requests, base), media_type="text/plain; version=0.0.4")

    return app


def model_list(model_name: str, adapter_names) -> dict:
    """The body of ``GET /v1/models``: the base model, then each adapter (its ``parent`` is the base)."""
    created = int(time.time())
    base = {"id": model_name, "object": "model", "created": created, "owned_by": "loraforge", "root": model_name, "parent": None}
    return {"object": "list", "data": [base] + [
        {"id": name, "object": "model", "created": created, "owned_by": "loraforge", "root": name, "parent": model_name}
        for name in adapter_names
    ]}


def _prompts(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [prompt]
    return list(prompt)


def _text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if any(part.type == "image_url" for part in content):
        raise APIError(400, "this model takes no images; image_url parts need a vision-language model", param="messages")
    return "".join(part.text for part in content)


def _sampling(body: SamplingFields, max_tokens: int | None) -> SamplingParams:
    problems = body.unsupported()
    if problems:
        raise APIError(400, "; ".join(why for _, why in problems), param=problems[0][0])
    defaults = SamplingParams()
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    try:
        return SamplingParams(
            temperature=defaults.temperature if body.temperature is None else body.temperature,
            top_p=defaults.top_p if body.top_p is None else body.top_p,
            top_k=defaults.top_k if body.top_k is None else body.top_k,
            max_tokens=max_tokens,
            stop=tuple(stop),
            seed=body.seed,
            ignore_eos=body.ignore_eos,
        )
    except ValueError as err:
        raise APIError(400, str(err)) from None


def _start(engine: Engine, requests: list[Request]) -> list[AsyncIterator[Delta]]:
    """Submit every request now, so that a bad one is answered with an error status, not a broken stream."""
    try:
        return engine.streams(requests)
    except UnknownAdapterError as err:
        raise APIError(404, str(err), param="model", code="model_not_found") from None
    except RequestTooLargeError as err:
        raise APIError(400, str(err), param="max_tokens" if "max_tokens" in str(err) else "messages", code="context_length_exceeded") from None
    except EngineClosedError as err:
        raise APIError(503, str(err)) from None
    except ValueError as err:
        raise APIError(400, str(err)) from None


async def _respond(engine: Engine, body: SamplingFields, requests: list[Request], kind: str, prefix: str):
    ident = f"{prefix}-{uuid.uuid4().hex}"
    for index, request in enumerate(requests):
        request.request_id = f"{ident}-{index}"
    streams = _start(engine, requests)
    created = int(time.time())
    chat = kind == "chat.completion"
    if body.stream:
        def abort_all() -> None:
            for request in requests:
                engine.abort(request.request_id)

        usage = body.stream_options is not None and body.stream_options.include_usage
        events = _sse(streams, abort_all, ident, created, body.model, chat, usage)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    finals = await asyncio.gather(*(_collect(s) for s in streams))
    choices = []
    for index, (text, last) in enumerate(finals):
        _raise_if_failed(last)
        if chat:
            choices.append({"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                            "finish_reason": last.finish_reason})
        else:
            choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": last.finish_reason})
    return {"id": ident, "object": kind, "created": created, "model": body.model, "choices": choices,
            "usage": _usage([last for _, last in finals])}


async def _collect(stream: AsyncIterator[Delta]) -> tuple[str, Delta]:
    parts, last = [], None
    async for delta in stream:
        parts.append(delta.text)
        last = delta
    return "".join(parts), last


def _raise_if_failed(last: Delta) -> None:
    if last.finish_reason == "abort":
        raise APIError(503, last.error or "the request was aborted")
    if last.finish_reason == "error":
        raise APIError(500, last.error or "the engine failed")


def _usage(lasts: list[Delta]) -> dict:
    prompt = sum(d.num_prompt_tokens for d in lasts)
    completion = sum(d.num_output_tokens for d in lasts)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _sse(streams, abort_all: Callable[[], None], ident: str, created: int, model: str, chat: bool,
               include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format; several prompts interleave by choice index. However the
    events end (the last one sent, an error, the client gone), ``abort_all`` stops what still runs."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, text: str | None, finish_reason: str | None, role: bool = False) -> str:
        if chat:
            delta = {} if text is None else {"content": text}
            if role:
                delta["role"] = "assistant"
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return _event({"id": ident, "object": kind, "created": created, "model": model, "choices": [choice]})

    merged: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream) -> None:
        try:
            async for delta in stream:
                await merged.put((index, delta))
        finally:
            await merged.put((index, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    lasts: list[Delta] = []
    try:
        if chat:
            yield chunk(0, "", None, role=True)
        open_streams = len(streams)
        while open_streams:
            index, delta = await merged.get()
            if delta is None:
                open_streams -= 1
                continue
            if delta.finish_reason in ("abort", "error"):
                status = 503 if delta.finish_reason == "abort" else 500
                yield _event(APIError(status, delta.error or "the request failed").body())
                return
            if delta.text:
                yield chunk(index, delta.text, None)
            if delta.finish_reason is not None:
                lasts.append(delta)
                yield chunk(index, None if chat else "", delta.finish_reason)
        if include_usage:
            yield _event({"id": ident, "object": kind, "created": created, "model": model, "choices": [], "usage": _usage(lasts)})
        yield "data: [DONE]\n\n"
    finally:  # no awaiting here: when the client has gone, this runs in a cancelled scope
        for task in tasks:
            task.cancel()
        abort_all()


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _inside_root(root: Path | None, path: str) -> Path:
    """``path`` (absolute, or relative to ``root``) resolved, if it and its adapter files stay inside ``root``."""
    if root is None:
        raise APIError(400, "loading adapters at run time is off: start the server with --adapter-dir DIR", param="lora_path")
    try:
        resolved = (root / path).resolve()
        inside = [resolved] + [(resolved / name).resolve() for name in (CONFIG_NAME, WEIGHTS_NAME)]
    except (ValueError, OSError) as err:  # a NUL byte, a symlink loop, ...
        raise APIError(400, f"lora_path {path!r} is not a usable path: {err}", param="lora_path") from None
    if not all(p == root or p.is_relative_to(root) for p in inside):
        raise APIError(400, f"lora_path {path!r} is outside the adapter root {str(root)!r}", param="lora_path")
    return resolved


def _route_template(app: FastAPI, scope) -> str:
    """The path template of the route a request went to (or would have, when refused before routing), so
    that odd URLs can't add label values."""
    route = scope.get("route") or next((r for r in app.router.routes if r.matches(scope)[0] is Match.FULL), None)
    return getattr(route, "path", "unmatched")


def _prometheus(stats, http_requests: Counter, base: dict) -> str:
    """The Prometheus text of ``/metrics``; ``base`` is ``quant.summary.quant_summary`` of the base model."""
    metrics = [
        ("loraforge_base_model_bytes", "gauge", "Bytes of the base model's weights (quantized ones as stored).",
         base["total_bytes"]),
        ("loraforge_base_quantized_bytes", "gauge", "Bytes of the base model's quantized linears.", base["quantized_bytes"]),
        ("loraforge_requests_finished_total", "counter", "Requests finished (any reason).", stats.requests_finished),
        ("loraforge_prompt_tokens_total", "counter", "Prompt tokens of requests submitted.", stats.prompt_tokens),
        ("loraforge_generated_tokens_total", "counter", "Tokens generated.", stats.output_tokens),
        ("loraforge_preemptions_total", "counter", "Sequences preempted for memory and recomputed later.", stats.preemptions),
        ("loraforge_requests_waiting", "gauge", "Requests queued for admission (queue depth).", stats.waiting),
        ("loraforge_requests_running", "gauge", "Requests in the running batch.", stats.running),
        ("loraforge_adapters_registered", "gauge", "Adapters registered (host memory).", stats.registered_adapters),
        ("loraforge_adapters_resident", "gauge", "Adapters resident in the memory pool.", stats.resident_adapters),
        ("loraforge_pool_pages", "gauge", "Pages in the unified memory pool.", stats.pool_pages),
        ("loraforge_pool_page_bytes", "gauge", "Bytes per pool page.", stats.page_bytes),
        ("loraforge_pool_kv_pages", "gauge", "Pool pages holding KV-cache blocks.", stats.kv_pages),
        ("loraforge_pool_adapter_pages", "gauge", "Pool pages holding adapter weights.", stats.adapter_pages),
        ("loraforge_pool_free_pages", "gauge", "Free pool pages.", stats.free_pages),
        ("loraforge_pool_free_bytes", "gauge", "Free bytes in the memory pool.", stats.free_pages * stats.page_bytes),
        ("loraforge_prefix_cached_pages", "gauge", "Pool pages holding prefix-cache KV blocks (in use or idle).",
         stats.prefix_cached_pages),
        ("loraforge_prefix_hit_blocks_total", "counter", "KV blocks reused from the prefix cache instead of computed.",
         stats.prefix_hit_blocks),
    ]
    lines = []
    for name, kind, help_, value in metrics:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
    lines += ["# HELP loraforge_http_requests_total HTTP requests answered, by path and status.",
              "# TYPE loraforge_http_requests_total counter"]
    for (path, status), count in sorted(http_requests.items()):
        lines.append(f'loraforge_http_requests_total{{path="{path}",status="{status}"}} {count}')
    return "\n".join(lines) + "\n"


# the server -----------------------------------------------------------------------------------------


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", *,
                head_timeout: float = HEAD_TIMEOUT):
    """A uvicorn server for an app from ``create_app`` that shuts down gracefully (see ``GracefulServer``)
    and closes connections that send no request head within ``head_timeout`` seconds (``http_guard``)."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """When shutdown begins, the engine gets ``shutdown_timeout`` seconds to finish what is in flight and
        then ends the rest with an error event, so streams close cleanly before uvicorn's own deadline
        (5 s later) would cut their connections."""

        async def shutdown(self, sockets=None):
            threading.Thread(target=app.state.engine.shutdown, args=(app.state.shutdown_timeout,), daemon=True).start()
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            http=functools.partial(HeadTimeoutH11Protocol, head_timeout=head_timeout),
                            timeout_keep_alive=KEEP_ALIVE_TIMEOUT, h11_max_incomplete_event_size=MAX_HEAD_BYTES,
                            timeout_graceful_shutdown=int(app.state.shutdown_timeout) + 5)
    return GracefulServer(config)


def discover_adapters(adapter_dir: str | os.PathLike) -> dict[str, Path]:
    """Every sub-folder of ``adapter_dir`` holding an ``adapter_config.json``, by folder name."""
    root = Path(adapter_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--adapter-dir {root}: no such directory")
    return {p.name: p for p in sorted(root.iterdir()) if (p / CONFIG_NAME).is_file()}


def served_name(model_source: str) -> str:
    """The base model's name in the API: the source string, or a path's folder / file stem."""
    path = Path(model_source)
    if path.suffix == ".gguf":
        return path.stem
    return path.name if os.sep in model_source or path.is_dir() else model_source


def run_server(
    model_source: str = "default",
    adapters: Mapping[str, str | os.PathLike] | None = None,
    adapter_dir: str | os.PathLike | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    pool_bytes: int = EngineConfig.pool_bytes,
    *,
    device: str | None = None,
    metrics_public: bool = False,
    max_rank: int = EngineConfig.max_rank,
    max_num_seqs: int = EngineConfig.max_num_seqs,
    model_name: str | None = None,
    threads: int | None = None,
    shutdown_timeout: float = 10.0,
    log_level: str = "info",
    image_root: str | os.PathLike | None = None,
    quantization: str = "auto",
) -> None:
    """Load ``model_source``, register ``adapters`` (name -> PEFT directory) and every adapter folder in
    ``adapter_dir``, and serve the OpenAI-compatible API on ``host:port`` until interrupted.

    ``api_key`` falls back to the ``LORAFORGE_API_KEY`` environment variable; no key means no auth.
    ``metrics_public`` opens ``/metrics`` to callers without the key. ``image_root``: the folder a
    vision-language model's chat may read local images from. ``adapter_dir`` is also the root
    that ``/v1/load_lora_adapter`` may load from. ``device``: where the model runs (``cpu``, ``cuda``,
    ``cuda:N``; None: CUDA when visible, else the CPU). ``threads`` sets torch's thread count (None:
    torch's default). ``quantization`` (``serve.base_model.QUANTIZATIONS``): ``auto`` keeps a GGUF source's
    quantized blocks and serves other sources dense; ``nf4``/``int4``/... quantize on load. Raises
    ``ValueError`` for an adapter name given twice.
    """
    import torch

    from loraforge.models import resolve_device
    from loraforge.serve.base_model import load_serving_base

    if threads is not None:
        torch.set_num_threads(threads)
    api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    found = discover_adapters(adapter_dir) if adapter_dir is not None else {}
    both = sorted(set(found) & set(adapters or {}))
    if both:
        raise ValueError(f"adapter names given by --adapter and found in --adapter-dir: {both}; rename one")
    model, tokenizer = load_serving_base(model_source, quantization, resolve_device(device))
    engine = Engine(model, tokenizer, device=device, adapters={**found, **(adapters or {})}, pool_bytes=pool_bytes,
                    max_rank=max_rank, max_num_seqs=max_num_seqs)
    name = model_name or served_name(model_source)
    app = create_app(engine, name, adapter_root=adapter_dir, api_key=api_key, metrics_public=metrics_public,
                     shutdown_timeout=shutdown_timeout, image_root=image_root)
    log.info("serving %s with adapters %s on http://%s:%d", name, engine.adapter_names, host, port)
    try:
        make_server(app, host, port, log_level).run()
    except KeyboardInterrupt:
        pass  # uvicorn shut down gracefully on Ctrl-C, then raised it again: serving ended as asked
