"""``loraforge serve --replicas N``: N engine replicas under Ray Serve, with adapter-affinity routing.

Two Ray Serve deployments make one application:

- ``EngineReplica`` (N replicas): one ``Engine`` and the same OpenAI app that ``loraforge serve`` runs
  (``api.create_app``). Adapters are loaded lazily through Ray Serve's model multiplexing
  (``@serve.multiplexed``): the first request for an adapter on a replica registers it with that replica's
  engine. Each replica keeps at most ``adapters_per_replica`` adapters registered and unregisters the least
  recently used one to make room (Ray's per-replica LRU); one still in use by a running request is
  unregistered when that request ends.
- ``Ingress`` (one replica, behind Ray Serve's HTTP proxy): checks the API key and body limits
  (``http_guard``), reads the ``model`` field of a completion request and calls an engine replica through a
  deployment handle with ``multiplexed_model_id`` = that adapter. Ray routes the call to a replica that
  already holds the adapter (when none does, to one holding the fewest). The replica's app answers, and its
  response (JSON, or server-sent events as they are produced) streams back through Ray unchanged, so a
  client sees the API of ``loraforge serve``.

The ingress answers three paths itself: ``GET /v1/models`` (every adapter served, loaded on a replica or
not), ``GET /metrics`` (adapter loads per replica, as the replicas last reported them) and the run-time
``/v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``, which are refused: the adapter set is fixed at start.

Scale: a replica asks Ray for ``num_gpus`` GPUs (one when the driver sees CUDA) and ``num_cpus`` CPUs, so
on a cluster each engine gets its own device; adapter paths must be readable on every node. Ray's own
listeners (GCS, raylet, object manager) bind the node address, not ``--host``; only the HTTP proxy
takes ``--host``/``--port``. ``RAY_ADDRESS`` joins an existing cluster instead of starting one. The
ingress is one replica on one CPU core: it only parses JSON and relays bytes, but at thousands of requests
per second it would need more replicas (each would then report only the loads it has seen).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import PlainTextResponse, StreamingResponse

from loraforge.serve.api import (
    API_KEY_ENV,
    create_app,
    discover_adapters,
    model_list,
    served_name,
)
from loraforge.serve.engine import EngineConfig
from loraforge.serve.http_errors import APIError
from loraforge.serve.http_guard import BODY_TIMEOUT, MAX_BODY_BYTES, RequestGuard

log = logging.getLogger(__name__)

APP_NAME = "loraforge"
"""The Ray Serve application's name."""
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
"""Paths whose ``model`` field picks the replica (by adapter affinity)."""
RUNTIME_ADAPTER_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})


class ReplicasError(ValueError):
    """A bad ``--replicas`` setting, named in the message."""


@dataclass(frozen=True)
class ReplicaSettings:
    """What every engine replica loads and how its engine is set up; ``adapters`` maps served names to
    adapter paths (PEFT folders or GGUF LoRA files), registered lazily on the replicas that get requests."""

    model_source: str = "default"
    model_name: str = "default"
    adapters: Mapping[str, str] = field(default_factory=dict)
    quantization: str = "auto"
    device: str | None = None
    pool_bytes: int = EngineConfig.pool_bytes
    max_rank: int = EngineConfig.max_rank
    max_num_seqs: int = EngineConfig.max_num_seqs
    threads: int | None = None
    image_root: str | None = None
    shutdown_timeout: float = 10.0
    adapters_per_replica: int = 8
    """Ray's ``max_num_models_per_replica``: adapters one replica keeps registered (its LRU's size)."""


@dataclass
class ReplicaReport:
    """What an engine replica tells the ingress ahead of each response: its id and its adapter loads so far."""

    replica: str
    adapter_loads: dict[str, int]
    evictions: int

    def merge(self, other: ReplicaReport) -> ReplicaReport:
        """The newest counts of two reports of one replica. Reports of concurrent requests can arrive out of
        order, but every count only grows, so the larger one is the newer."""
        loads = {a: max(self.adapter_loads.get(a, 0), other.adapter_loads.get(a, 0))
                 for a in self.adapter_loads.keys() | other.adapter_loads.keys()}
        return ReplicaReport(self.replica, loads, max(self.evictions, other.evictions))


class AdapterLeases:
    """Which adapters one replica's engine holds, for Ray's multiplexer: ``load`` registers an adapter
    (Ray calls it on a cache miss), ``evict`` unregisters one (Ray's LRU calls it through the object
    ``load`` returned), and ``use`` marks a request using one, so that an adapter evicted while requests
    run is unregistered only when the last of them ends (or kept, if Ray loads it again meanwhile).
    Thread-safe: Ray evicts from a worker thread."""

    def __init__(self, engine, paths: Mapping[str, str]):
        self.engine = engine
        self.paths = paths
        self.loads: Counter = Counter()
        """Adapter -> times its files were read and registered here."""
        self.evictions = 0
        self._lock = threading.Lock()
        self._users: Counter = Counter()
        self._evicted: set[str] = set()
        """Evicted while requests used them: unregistered when the last one ends."""

    async def load(self, name: str) -> _Lease:
        with self._lock:
            if name in self._evicted:  # evicted but still in use, so still registered
                self._evicted.discard(name)
                return _Lease(self, name)
        await asyncio.to_thread(self.engine.register_adapter, name, self.paths[name])
        with self._lock:
            self.loads[name] += 1
        return _Lease(self, name)

    def evict(self, name: str) -> None:
        with self._lock:
            self.evictions += 1
            if self._users[name]:
                self._evicted.add(name)
                return
        self.engine.unregister_adapter(name)

    @contextmanager
    def use(self, name: str):
        with self._lock:
            self._users[name] += 1
        try:
            yield
        finally:
            with self._lock:
                self._users[name] -= 1
                unregister = not self._users[name] and name in self._evicted
                if unregister:
                    self._evicted.discard(name)
            if unregister:
                self.engine.unregister_adapter(name)

    def report(self, replica: str) -> ReplicaReport:
        with self._lock:
            return ReplicaReport(replica, dict(self.loads), self.evictions)


class _Lease:
    """The "model" Ray's multiplexer caches for one adapter; Ray calls ``__del__`` when it evicts it."""

    def __init__(self, leases: AdapterLeases, name: str):
        self._leases, self._name, self._ended = leases, name, False

    def __del__(self):  # called by Ray on eviction, and by the garbage collector later: act once
        if not self._ended:
            self._ended = True
            self._leases.evict(self._name)


class EngineReplica:
    """One engine and its OpenAI app; ``http`` answers one HTTP request forwarded by the ingress."""

    def __init__(self, settings: ReplicaSettings):
        import torch
        from ray import serve

        from loraforge.models import resolve_device
        from loraforge.serve.base_model import load_serving_base
        from loraforge.serve.engine import Engine

        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        self.settings = settings
        model, tokenizer = load_serving_base(settings.model_source, settings.quantization, resolve_device(settings.device))
        self.engine = Engine(model, tokenizer, device=settings.device, pool_bytes=settings.pool_bytes,
                             max_rank=settings.max_rank, max_num_seqs=settings.max_num_seqs)
        self.app = create_app(self.engine, settings.model_name, shutdown_timeout=settings.shutdown_timeout,
                              image_root=settings.image_root)
        self.engine.start()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.leases = AdapterLeases(self.engine, settings.adapters)

        async def load_adapter(name: str) -> _Lease:
            return await self.leases.load(name)

        self._adapter = serve.multiplexed(max_num_models_per_replica=settings.adapters_per_replica)(load_adapter)

    async def http(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
                   adapter: str) -> AsyncIterator:
        """Answer one HTTP request with the replica's app: yields a ``ReplicaReport``, then
        ``(status, headers)``, then the body in chunks as the app sends them. ``adapter`` (the request's,
        also its multiplexed model id; "" for none) is loaded first unless this replica holds it."""
        with self.leases.use(adapter) if adapter else nullcontext():
            if adapter:
                await self._adapter(adapter)
            yield self.leases.report(self.replica_id)
            async for message in _call_asgi(self.app, method, path, query, headers, body):
                yield message

    def __del__(self):  # Ray Serve calls it when it stops the replica
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(self.settings.shutdown_timeout)


async def _call_asgi(app, method: str, path: str, query: bytes, headers, body: bytes) -> AsyncIterator:
    """Run one request through the ASGI ``app`` in this process: yields ``(status, headers)``, then body
    chunks. When the caller stops iterating (the client went away), the app sees a disconnect and is cancelled."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "",
             "headers": [(bytes(k), bytes(v)) for k, v in headers], "client": ("127.0.0.1", 0),
             "server": ("127.0.0.1", 0)}
    sent = asyncio.Event()
    gone = asyncio.Event()
    messages: asyncio.Queue = asyncio.Queue()

    async def receive():
        if not sent.is_set():
            sent.set()
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def run():
        try:
            await app(scope, receive, messages.put)
        except Exception:  # the app has already answered 500 (Starlette's error middleware), if it could
            log.exception("the engine replica's app failed on %s %s", method, path)
        finally:
            messages.put_nowait(None)

    task = asyncio.ensure_future(run())
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                yield message["status"], [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body", False):
                    return
    finally:
        gone.set()
        if not task.done():
            task.cancel()


class Ingress:
    """The HTTP entry: an app that sends each request to an engine replica chosen by adapter affinity."""

    def __init__(self, engines, settings: ReplicaSettings, api_key: str | None, metrics_public: bool,
                 adapter_affinity: bool = True):
        self.engines = engines
        self.adapter_affinity = adapter_affinity
        self.settings = settings
        self.api_key = api_key
        self.metrics_public = metrics_public
        self.reports: dict[str, ReplicaReport] = {}
        self.requests: Counter = Counter()

    def __serve_build_asgi_app__(self):
        return build_ingress_app(self)

    async def forward(self, method: str, path: str, query: bytes, headers, body: bytes, adapter: str):
        """Send one request to an engine replica (with affinity: one holding ``adapter``, if any does);
        returns its status, headers and an async iterator over the body chunks."""
        handle = self.engines.options(stream=True, multiplexed_model_id=adapter if self.adapter_affinity else "")
        response = handle.http.remote(method, path, query, headers, body, adapter)
        try:
            report = await response.__anext__()
            status, response_headers = await response.__anext__()
        except BaseException:
            response.cancel()
            raise
        known = self.reports.get(report.replica)
        self.reports[report.replica] = report if known is None else known.merge(report)
        self.requests[report.replica] += 1

        async def chunks():
            try:
                async for chunk in response:
                    yield chunk
            finally:
                response.cancel()

        return status, response_headers, chunks()


def build_ingress_app(ingress: Ingress):
    """The ingress's FastAPI app (see the module docstring)."""
    settings = ingress.settings
    app = FastAPI(title="loraforge replicas")

    @app.exception_handler(APIError)
    async def _api_error(_request, err: APIError):
        return err.response()

    open_paths = frozenset({"/health", "/metrics"} if ingress.metrics_public else {"/health"})
    app.add_middleware(RequestGuard, api_key=ingress.api_key, open_paths=open_paths, max_body_bytes=MAX_BODY_BYTES,
                       body_timeout=BODY_TIMEOUT)

    @app.get("/v1/models")
    async def models():
        return model_list(settings.model_name, list(settings.adapters))

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(_prometheus(ingress.reports, ingress.requests), media_type="text/plain; version=0.0.4")

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    async def forward(request: HTTPRequest):
        path = request.url.path
        if path in RUNTIME_ADAPTER_PATHS:
            raise APIError(400, f"{path} is not available with --replicas: the adapters are fixed at start; put the "
                                f"adapter in --adapter-dir (or pass --adapter) and restart")
        body = await request.body()
        adapter = _adapter_of(body, settings) if path in GENERATION_PATHS and request.method == "POST" else ""
        try:
            status, headers, chunks = await ingress.forward(request.method, path, request.scope["query_string"],
                                                            request.scope["headers"], body, adapter)
        except Exception as err:
            log.exception("forwarding %s %s to an engine replica failed", request.method, path)
            raise APIError(500, f"the engine replica failed: {err}") from None
        response = StreamingResponse(chunks, status_code=status)
        response.raw_headers = headers
        return response

    return app


def _adapter_of(body: bytes, settings: ReplicaSettings) -> str:
    """The adapter a completion request's ``model`` names ("" for the base model, an unknown name or a body
    that doesn't parse: the replica's app answers those as ``loraforge serve`` does)."""
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):
        return ""
    return model if isinstance(model, str) and model in settings.adapters else ""


def _prometheus(reports: Mapping[str, ReplicaReport], requests: Counter) -> str:
    lines = ["# HELP loraforge_replica_requests_total Requests the ingress sent to each engine replica.",
             "# TYPE loraforge_replica_requests_total counter"]
    lines += [f'loraforge_replica_requests_total{{replica="{r}"}} {n}' for r, n in sorted(requests.items())]
    lines += ["# HELP loraforge_replica_adapter_loads_total Adapter loads per engine replica, as it last reported.",
              "# TYPE loraforge_replica_adapter_loads_total counter"]
    lines += [f'loraforge_replica_adapter_loads_total{{replica="{r}",adapter="{a}"}} {n}'
              for r, report in sorted(reports.items()) for a, n in sorted(report.adapter_loads.items())]
    lines += ["# HELP loraforge_replica_adapter_evictions_total Adapters each engine replica's LRU evicted.",
              "# TYPE loraforge_replica_adapter_evictions_total counter"]
    lines += [f'loraforge_replica_adapter_evictions_total{{replica="{r}"}} {report.evictions}'
              for r, report in sorted(reports.items())]
    return "\n".join(lines) + "\n"


# starting it ----------------------------------------------------------------------------------------


def build_application(settings: ReplicaSettings, replicas: int, *, api_key: str | None = None,
                      metrics_public: bool = False, num_cpus: float = 1, num_gpus: float | None = None,
                      adapter_affinity: bool = True):
    """The Ray Serve application: ``replicas`` engine replicas (each asking Ray for ``num_cpus`` CPUs and
    ``num_gpus`` GPUs; None: one when this process sees CUDA) behind one ingress. ``adapter_affinity``
    False routes by Ray's default (queue lengths) alone, as a baseline for benchmarks/serve_replicas.py."""
    from ray import serve

    if replicas < 1:
        raise ReplicasError(f"--replicas {replicas}: give at least 1")
    if settings.adapters_per_replica < 1:
        raise ReplicasError(f"--adapters-per-replica {settings.adapters_per_replica}: give at least 1")
    if num_gpus is None:
        import torch

        num_gpus = 1 if torch.cuda.is_available() and settings.device != "cpu" else 0
    engines = serve.deployment(EngineReplica, name="EngineReplica", num_replicas=replicas,
                               max_ongoing_requests=max(settings.max_num_seqs, 8),
                               graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
                               ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus})
    ingress = serve.deployment(serve.ingress()(Ingress), name="Ingress", max_ongoing_requests=10_000,
                               graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S, ray_actor_options={"num_cpus": 0})
    return ingress.bind(engines.bind(settings), settings, api_key, metrics_public, adapter_affinity)


def start_replicas(settings: ReplicaSettings, replicas: int, host: str = "127.0.0.1", port: int = 8000, *,
                   api_key: str | None = None, metrics_public: bool = False, num_cpus: float = 1):
    """Start (or join, with ``RAY_ADDRESS``) a Ray cluster and run the application with its HTTP proxy on
    ``host:port``; returns once every replica is up."""
    import ray
    from ray import serve

    app = build_application(settings, replicas, api_key=api_key, metrics_public=metrics_public, num_cpus=num_cpus)
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            ray.init(include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/")


def run_replicas(
    model_source: str = "default",
    adapters: Mapping[str, str | os.PathLike] | None = None,
    adapter_dir: str | os.PathLike | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    pool_bytes: int = EngineConfig.pool_bytes,
    *,
    replicas: int = 2,
    adapters_per_replica: int = ReplicaSettings.adapters_per_replica,
    model_name: str | None = None,
    metrics_public: bool = False,
    **engine_settings,
) -> None:
    """``run_server`` with ``replicas`` engine replicas under Ray Serve, until interrupted; see the module
    docstring. ``engine_settings`` are ``ReplicaSettings`` fields (``device``, ``max_rank``, ...)."""
    try:
        from ray import serve
    except ImportError as err:
        raise ImportError(f"serve --replicas needs Ray Serve ({err}); install it: pip install 'loraforge[distributed]' "
                          f"(or bash scripts/setup.sh test)") from None

    api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    found = discover_adapters(adapter_dir) if adapter_dir is not None else {}
    both = sorted(set(found) & set(adapters or {}))
    if both:
        raise ReplicasError(f"adapter names given by --adapter and found in --adapter-dir: {both}; rename one")
    paths = {name: str(path) for name, path in {**found, **(adapters or {})}.items()}
    missing = sorted(name for name, path in paths.items() if not os.path.exists(path))
    if missing:
        raise FileNotFoundError(f"--adapter: no adapter at {', '.join(f'{n}={paths[n]}' for n in missing)}")
    settings = ReplicaSettings(model_source, model_name or served_name(model_source), paths,
                               pool_bytes=pool_bytes, adapters_per_replica=adapters_per_replica, **engine_settings)
    start_replicas(settings, replicas, host, port, api_key=api_key, metrics_public=metrics_public,
                   num_cpus=settings.threads or 1)
    log.info("serving %s with %d adapters on %d replicas on http://%s:%d", settings.model_name, len(paths), replicas,
             host, port)
    # SIGTERM stops it as Ctrl-C does; SIGINT is set explicitly (as uvicorn does for `serve`) because Python keeps
    # an inherited SIG_IGN, which every job a non-interactive shell starts with `&` inherits
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        _shut_down(serve)


GRACEFUL_SHUTDOWN_S = 10.0
"""After Ctrl-C, how long a replica may spend finishing the requests it holds before Serve stops it (Ray's
default is 20 s)."""

SHUTDOWN_STEP_TIMEOUT_S = 25.0
"""How long each of Ray Serve's and Ray's shutdowns may take after Ctrl-C/SIGTERM before the server exits anyway."""


def _shut_down(serve) -> None:
    """``serve.shutdown()`` (replicas finish their requests), then ``ray.shutdown()`` (the local cluster this process
    started, if it did), each given ``SHUTDOWN_STEP_TIMEOUT_S`` in a thread. If either doesn't return in time (seen
    once: Serve's shutdown never returned on a loaded machine), the process logs which and exits with status 1
    at once, so that Ctrl-C always stops the server."""
    import ray

    stuck = []
    for name, step in (("Ray Serve", serve.shutdown), ("Ray", ray.shutdown)):
        worker = threading.Thread(target=step, name=f"{name} shutdown", daemon=True)
        worker.start()
        worker.join(SHUTDOWN_STEP_TIMEOUT_S)
        if worker.is_alive():
            stuck.append(name)
            log.error("%s's shutdown did not return within %.0f s", name, SHUTDOWN_STEP_TIMEOUT_S)
    if stuck:
        logging.shutdown()
        os._exit(1)


def _interrupt(_signum, _frame):
    raise KeyboardInterrupt
