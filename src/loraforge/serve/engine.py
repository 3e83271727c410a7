"""The serving engine: one base model, many LoRA adapters, continuous batching over one memory pool.

    engine = Engine(model, tokenizer, adapters={"support": "runs/support/adapter"}, pool_bytes=2**30)
    [done] = engine.generate([Request("Hello", SamplingParams(temperature=0, max_tokens=20), adapter="support")])
    async for delta in engine.stream(Request("Hi", adapter="support")): print(delta.text, end="")  # in async code

``generate`` drives the engine in the calling thread when no background loop is running; ``stream``
starts the background loop (``start``), which steps whenever there is work. Every public method is
thread-safe. ``submit``, ``stream`` and ``abort`` hand their work in without waiting; adapter
management and ``stats`` wait for the step in progress to end.

A step holds the engine lock only to schedule, run the model and sample. Its output is detokenized
and delivered after the lock is released, in order, one token's worth of decoding per request.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field, fields, replace

import torch
from torch import nn

from loraforge.adapters.fold import fold_adapter
from loraforge.adapters.gguf_lora import read_adapter
from loraforge.data.images import ImageRef
from loraforge.models.device import resolve_device
from loraforge.models.kind import is_vision_language
from loraforge.serve.adapter_store import AdapterStore
from loraforge.serve.errors import (
    EngineClosedError,
    RequestTooLargeError,
    UnknownAdapterError,
)
from loraforge.serve.memory_pool import PagePool
from loraforge.serve.paged_kv import PagedKVCache, kv_page_numel
from loraforge.serve.prefix_cache import PrefixCache
from loraforge.serve.runner import ModelRunner
from loraforge.serve.sampling import SamplingParams, make_generator, sample
from loraforge.serve.scheduler import Scheduler, Sequence, group_by_adapter, pack_step
from loraforge.serve.text import TextStream
from loraforge.serve.vision import PromptVision

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings; every default lives here."""

    pool_bytes: int = 1 << 30
    """One budget for KV-cache blocks and resident adapter weights together."""
    max_rank: int = 64
    """Largest LoRA rank accepted at registration."""
    block_size: int | None = None
    """Tokens per KV block. ``None``: the smallest power of two >= 16 whose page holds a LoRA matrix of ``max_rank``."""
    max_num_seqs: int = 64
    """Most sequences in one step."""
    max_batch_tokens: int = 2048
    """Token budget of one step (decodes count one each); longer prompts are prefilled in chunks over
    several steps (a prompt with images, which is prefilled whole, may exceed it when it runs first)."""
    max_bypass: int = 32
    """How many later requests may be admitted ahead of a waiting one before it blocks admission."""
    max_lookahead: int = 256
    """Most waiting requests admission looks at per step, from the front of the queue."""
    prefix_caching: bool = True
    """Share the KV blocks of common prompt prefixes between requests of the same adapter weights."""

    def __post_init__(self):
        problems = [
            f"{f.name}={getattr(self, f.name)!r} must be true or false" if f.type in (bool, "bool")
            else f"{f.name}={getattr(self, f.name)!r} must be a positive integer"
            for f in fields(self)
            if not (getattr(self, f.name) is None and f.name == "block_size")
            and not (isinstance(getattr(self, f.name), bool) if f.type in (bool, "bool")
                     else isinstance(getattr(self, f.name), int) and not isinstance(getattr(self, f.name), bool)
                     and getattr(self, f.name) > 0)
        ]
        if problems:
            raise ValueError("invalid engine settings: " + "; ".join(problems))


@dataclass
class Request:
    """One generation request: a prompt (text, or token ids), how to sample, and which adapter (None = base)."""

    prompt: str | list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None
    request_id: str | None = None
    images: Seq[ImageRef] = ()
    """For a vision-language model: the images whose (already expanded) image tokens the prompt holds, in
    order (``data.vision.prompt_sample`` builds such a prompt)."""


@dataclass
class Delta:
    """What one step added to a request's output; the last one has ``finish_reason`` set."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    """``stop`` (EOS, stop token or stop string), ``length``, ``abort``, or ``error``."""
    error: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0


@dataclass
class Completion:
    request_id: str
    adapter: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    error: str | None = None


@dataclass(frozen=True)
class EngineStats:
    waiting: int
    running: int
    registered_adapters: int
    resident_adapters: int
    pool_pages: int
    page_bytes: int
    kv_pages: int
    adapter_pages: int
    free_pages: int
    requests_finished: int
    prompt_tokens: int
    output_tokens: int
    preemptions: int
    prefix_cached_pages: int = 0
    """Pages holding a prefix-cache block, in use or idle (idle ones also count as free)."""
    prefix_hit_blocks: int = 0
    """KV blocks found in the prefix cache instead of computed, since the start."""


class RequestHandle:
    """A submitted request: collects its deltas; ``wait`` blocks until it has finished."""

    def __init__(self, request_id: str, adapter: str | None, prompt_ids: list[int], sink: Callable[[Delta], None] | None):
        self.request_id = request_id
        self.adapter = adapter
        self.prompt_ids = prompt_ids
        self._sink = sink
        self._tokens: list[int] = []
        self._text: list[str] = []
        self._final: Delta | None = None
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _deliver(self, delta: Delta) -> None:
        self._tokens += delta.token_ids
        self._text.append(delta.text)
        if delta.finish_reason is not None:
            self._final = delta
            self._done.set()
        if self._sink is not None:
            self._sink(delta)

    def wait(self, timeout: float | None = None) -> Completion:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        return self.result()

    def result(self) -> Completion:
        final = self._final
        return Completion(
            self.request_id, self.adapter, self.prompt_ids, list(self._tokens), "".join(self._text), final.finish_reason, final.error
        )


@dataclass(eq=False)
class _Live:
    """Engine-side state of a request besides its scheduling: sampler, text, and where output goes."""

    seq: Sequence
    handle: RequestHandle
    generator: torch.Generator | None
    text: TextStream | None
    """Touched only while delivering output (under ``_deliver_lock``)."""


class Engine:
    """Serve ``model`` (a loaded Llama-family HF causal LM, or a Qwen2-VL / Qwen2.5-VL model with its
    ``VisionProcessor`` as ``tokenizer``) with many LoRA adapters; see the module docstring.

    ``device`` (``cpu``, ``cuda``, ``cuda:N``; None: CUDA when visible, else the CPU) is where the model
    is moved and the memory pool allocated. ``adapters`` maps names to PEFT adapter directories to
    register at start. ``settings`` are ``EngineConfig`` fields (``pool_bytes``, ``max_rank``, ...).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer=None,
        *,
        device: str | torch.device | None = None,
        adapters: Mapping[str, str | os.PathLike] | None = None,
        config: EngineConfig | None = None,
        **settings,
    ):
        self.config = replace(config or EngineConfig(), **settings)
        self.runner = ModelRunner(model.to(resolve_device(None if device is None else str(device))))
        self.processor = tokenizer if is_vision_language(model) else None
        """A vision-language model's ``VisionProcessor`` (None for a text model); ``tokenizer`` is then its tokenizer."""
        tokenizer = tokenizer.tokenizer if self.processor is not None else tokenizer
        self.tokenizer = tokenizer
        self.block_size = self.config.block_size or _auto_block_size(self.runner, self.config.max_rank)
        page_numel = kv_page_numel(self.runner.num_layers, self.runner.num_kv_heads, self.runner.head_dim, self.block_size)
        num_pages = self.config.pool_bytes // (page_numel * self.runner.dtype.itemsize)
        if num_pages < 2:
            raise ValueError(
                f"pool_bytes={self.config.pool_bytes} holds {num_pages} pages of "
                f"{page_numel * self.runner.dtype.itemsize} bytes; give the engine at least two pages"
            )
        self.pool = PagePool(num_pages, page_numel, self.runner.dtype, self.runner.device)
        self.kv = PagedKVCache(self.pool, self.runner.num_layers, self.runner.num_kv_heads, self.runner.head_dim, self.block_size)
        self.store = AdapterStore(self.pool, self.runner.targets, self.config.max_rank,
                                  functools.partial(fold_adapter, self.runner.model))
        self.scheduler = Scheduler(
            self.kv, self.store, self.config.max_num_seqs, self.config.max_batch_tokens, self.config.max_bypass,
            self.config.max_lookahead, PrefixCache(self.pool, enabled=self.config.prefix_caching),
        )
        self.eos_ids = _eos_ids(model, tokenizer)
        self._lock = threading.RLock()
        """Guards the engine state (scheduler, pool, adapter store, ``_live``); a step holds it throughout."""
        self._live: dict[str, _Live] = {}
        self._outbox: deque[tuple[_Live, Delta]] = deque()
        """Deltas in the order they happened, appended under ``_lock``, delivered by ``_flush``."""
        self._deliver_lock = threading.RLock()
        """Held while delivering, so that deltas reach their requests in order. Never taken under ``_lock``."""
        self._inbox_cv = threading.Condition()
        """Guards what callers hand in without waiting for a step (``_inbox``, ``_aborts``, ``_ids``,
        ``_closing``), and wakes the loop. Taken after ``_lock`` when both are needed, never before."""
        self._inbox: list[_Live] = []
        self._aborts: list[str] = []
        self._ids: set[str] = set()
        self._next_id = itertools.count()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._shutdown_lock = threading.Lock()
        self._counters = {"requests_finished": 0, "prompt_tokens": 0, "output_tokens": 0}
        for name, path in (adapters or {}).items():
            self.register_adapter(name, path)

    # adapters -----------------------------------------------------------------------------------

    def register_adapter(self, name: str, path: str | os.PathLike, pinned: bool = False) -> None:
        """Register the adapter at ``path`` as ``name``, while requests run: a PEFT adapter folder (any registry
        method) or a GGUF LoRA file, as llama.cpp takes it.

        Raises ``AdapterFormatError`` (unsupported type, shapes that don't fit, rank above
        ``max_rank``, missing or corrupt files) or ``ValueError`` (name taken).
        """
        config, tensors = read_adapter(path, self.runner.model.config)  # outside the lock: steps go on meanwhile
        self.register_adapter_weights(name, config, tensors, source=str(path), pinned=pinned)

    def register_adapter_weights(
        self, name: str, config: dict, tensors: Mapping[str, torch.Tensor], source: str = "<memory>", pinned: bool = False
    ) -> None:
        """Register an adapter from its PEFT config dict and tensors (PEFT key names); see ``register_adapter``."""
        with self._lock:
            self.store.register(name, config, dict(tensors), source=source, pinned=pinned)

    def unregister_adapter(self, name: str) -> int:
        """Remove adapter ``name`` and free its pages; requests using it end with ``abort``. Returns their count."""
        with self._lock:
            self.store.get(name)
            self._take_inbox()
            users = [live for live in self._live.values() if live.seq.adapter_name == name]
            for live in users:
                self._finish(live, "abort", error=f"adapter {name!r} was unregistered")
            self.store.unregister(name)
        self._flush()
        return len(users)

    def pin_adapter(self, name: str) -> None:
        """Keep ``name`` resident until ``unpin_adapter``; raises ``MemoryError`` if the pool can't make room."""
        with self._lock:
            self.store.pin(name)

    def unpin_adapter(self, name: str) -> None:
        with self._lock:
            self.store.unpin(name)

    @property
    def adapter_names(self) -> list[str]:
        with self._lock:
            return list(self.store.adapters)

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                waiting=len(self.scheduler.waiting) + len(self._inbox),
                running=len(self.scheduler.running),
                registered_adapters=len(self.store.adapters),
                resident_adapters=len(self.store.resident),
                pool_pages=self.pool.num_pages,
                page_bytes=self.pool.page_bytes,
                kv_pages=self.pool.used("kv"),
                adapter_pages=self.pool.used("adapter"),
                free_pages=self.pool.num_free,
                preemptions=self.scheduler.num_preemptions,
                prefix_cached_pages=self.scheduler.cache.num_cached,
                prefix_hit_blocks=self.scheduler.cache.hit_blocks,
                **self._counters,
            )

    # requests -----------------------------------------------------------------------------------

    def submit(self, request: Request, sink: Callable[[Delta], None] | None = None) -> RequestHandle:
        """Queue ``request`` without waiting for a running step; ``sink`` (if any) receives each ``Delta``,
        from the thread that steps the engine.

        Raises ``UnknownAdapterError``, ``RequestTooLargeError`` (prompt + max_tokens beyond the context
        or the pool), ``ValueError`` (empty prompt, stop strings without a tokenizer, id in use) or
        ``EngineClosedError``.
        """
        live = self._prepare(request, sink)
        self._enqueue([live])
        return live.handle

    def abort(self, request_id: str) -> bool:
        """End a request early (finish reason ``abort``) at the next step; False if it isn't in flight."""
        with self._inbox_cv:
            if request_id not in self._ids:
                return False
            self._aborts.append(request_id)
            self._inbox_cv.notify_all()
            return True

    def generate(self, requests: Seq[Request]) -> list[Completion]:
        """Run ``requests`` together to completion; every request is validated before any runs."""
        prepared = [self._prepare(r, None) for r in requests]
        self._enqueue(prepared)
        handles = [live.handle for live in prepared]
        if self._thread is not None:
            return [h.wait() for h in handles]
        while not all(h.done for h in handles):
            self.step()
        return [h.result() for h in handles]

    def stream(self, request: Request) -> AsyncIterator[Delta]:
        """Submit ``request`` now (so a bad request raises here, before any output) and return an async
        iterator over its deltas. Call it from a running event loop; it starts the background loop.
        Leaving the iteration early (``break``, cancellation, a dropped client) aborts the request.
        """
        return self.streams([request])[0]

    def streams(self, requests: Seq[Request]) -> list[AsyncIterator[Delta]]:
        """``stream`` for several requests: all are validated before any is queued."""
        loop = asyncio.get_running_loop()
        queues = [asyncio.Queue() for _ in requests]
        prepared = [
            self._prepare(r, lambda delta, q=q: loop.call_soon_threadsafe(q.put_nowait, delta)) for r, q in zip(requests, queues)
        ]
        self._enqueue(prepared)
        self.start()
        return [self._deltas(q, live.handle) for q, live in zip(queues, prepared)]

    async def _deltas(self, queue: asyncio.Queue, handle: RequestHandle) -> AsyncIterator[Delta]:
        try:
            while True:
                delta = await queue.get()
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            if not handle.done:
                self.abort(handle.request_id)

    # the loop -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background loop that steps whenever requests are queued (idempotent)."""
        with self._inbox_cv:
            self._closing = False
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="loraforge-engine", daemon=True)
                self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking requests, let those in flight finish for up to ``timeout`` seconds, abort the rest, and
        stop the background loop. The engine is then as if new: ``start`` (or ``generate``) uses it again."""
        with self._shutdown_lock:  # shutdowns from several threads run one after the other
            with self._inbox_cv:
                self._closing = True
                self._inbox_cv.notify_all()
                thread = self._thread
            if thread is not None:
                thread.join(timeout)
            with self._lock:
                self._take_inbox()
                for live in list(self._live.values()):
                    self._finish(live, "abort", error="the engine is shutting down")
            self._flush()
            if thread is not None:
                thread.join()
            with self._inbox_cv:
                self._thread = None
                self._closing = False  # back to a fresh engine's state: inline use, or start() again

    def _loop(self) -> None:
        while True:
            with self._inbox_cv:
                while not (self._inbox or self._aborts or self.scheduler.has_work):
                    if self._closing:
                        return
                    self._inbox_cv.wait()
            try:
                self.step()
            except Exception as err:  # keep serving: fail what was in flight, not the loop
                log.exception("engine step failed outside the model run")
                with self._lock:
                    for live in list(self._live.values()):
                        self._finish(live, "error", error=f"engine failure: {err}")
                self._flush()

    def step(self) -> bool:
        """Run one engine step; returns False when there was nothing to do.

        If the model (or sampling) raises, the requests of this step end with finish reason ``error``
        and the engine goes on serving the others.
        """
        with self._lock:
            self._take_inbox()
            plan = self.scheduler.schedule()
            for seq in plan.finished:
                self._finish(self._live[seq.request_id], "length")
            seqs = group_by_adapter(plan.prefills + plan.decodes)
            if seqs:
                try:
                    self._run(seqs)
                except Exception as err:  # a failed step must not take other requests or the loop down
                    log.exception("engine step failed")
                    for seq in seqs:
                        if seq.request_id in self._live:
                            self._finish(self._live[seq.request_id], "error", error=f"engine step failed: {err}")
        self._flush()
        return bool(seqs or plan.finished)

    def _run(self, seqs: list[Sequence]) -> None:
        batch = pack_step(seqs, self.kv)
        for adapter in batch.adapters:
            self.store.touch(adapter)
        logits = self.runner.forward(batch, self.kv)
        lives = []  # the sequences whose step reached their last token: they sample one
        for seq in seqs:
            complete = seq.num_cached + seq.num_new == seq.num_tokens
            seq.num_cached += seq.num_new
            self.scheduler.cache_blocks(seq)
            if complete:
                lives.append(self._live[seq.request_id])
        tokens = sample(logits, [live.seq.params for live in lives], [live.generator for live in lives])
        for live, token in zip(lives, tokens):
            seq = live.seq
            seq.output_ids.append(token)
            self._counters["output_tokens"] += 1
            self._advance(live, token)

    def _advance(self, live: _Live, token: int) -> None:
        """Account for one new token, and end the request on a stop token or at its length.

        Stop strings are found later, while delivering (``_flush``), which ends the request then.
        """
        seq, params = live.seq, live.seq.params
        stop_token = token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_ids)
        if stop_token or len(seq.output_ids) >= seq.max_tokens:
            self._retire(live)
            self._emit(live, [token], "stop" if stop_token else "length")
        else:
            self._emit(live, [token])

    # bookkeeping ----------------------------------------------------------------------------------

    def _prepare(self, request: Request, sink) -> _Live:
        params = request.params
        if isinstance(request.prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer: pass one to Engine, or send token ids")
            prompt_ids = list(self.tokenizer.encode(request.prompt))
        else:
            prompt_ids = [int(t) for t in request.prompt]
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: pass one to Engine")
        if any(not 0 <= t < self.runner.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.runner.vocab_size})")
        if request.adapter is not None and request.adapter not in self.store.adapters:
            raise UnknownAdapterError(f"no adapter named {request.adapter!r} is registered")
        max_tokens = self._max_tokens(len(prompt_ids), params.max_tokens, request.adapter)
        vision = self._vision(prompt_ids, request.images)
        request_id = request.request_id or f"req-{next(self._next_id)}"
        seq = Sequence(request_id, prompt_ids, params, max_tokens, adapter_name=request.adapter, vision=vision)
        handle = RequestHandle(request_id, request.adapter, prompt_ids, sink)
        generator = None if params.greedy else make_generator(params.seed)
        text = TextStream(self.tokenizer, params.stop) if self.tokenizer is not None else None
        return _Live(seq, handle, generator, text)

    def _vision(self, prompt_ids: list[int], images: Seq[ImageRef]) -> PromptVision | None:
        """The pixels and M-RoPE positions of a prompt with images; None for a text prompt.

        Raises ``ValueError``: images for a text model, or image tokens that don't match the images."""
        processor = self.processor
        if processor is None:
            if images:
                raise ValueError("this model takes no images; serve a vision-language model (Qwen2-VL, Qwen2.5-VL)")
            return None
        found = prompt_ids.count(processor.image_token_id)
        if not images:
            if found:
                raise ValueError(f"the prompt holds {found} image tokens but the request has no images")
            return None
        pixels = processor.pixels([image.open() for image in images])
        expected = int((pixels["image_grid_thw"].prod(-1) // processor.image_processor.merge_size ** 2).sum())
        if found != expected:
            raise ValueError(f"the prompt holds {found} image tokens; its {len(images)} images need {expected}")
        return self.runner.prompt_vision(prompt_ids, pixels)

    def _max_tokens(self, prompt_len: int, requested: int | None, adapter: str | None) -> int:
        """``requested`` checked against the context and the pool, or the most both allow when None."""
        context = self.runner.max_positions
        if prompt_len >= context:
            raise RequestTooLargeError(f"the prompt has {prompt_len} tokens; the model's context is {context} tokens")
        if requested is not None and prompt_len + requested > context:
            raise RequestTooLargeError(
                f"the prompt ({prompt_len} tokens) plus max_tokens ({requested}) exceeds the model's context of {context} tokens"
            )
        adapter_pages = 0 if adapter is None or self.store.get(adapter).pinned else self.store.get(adapter).num_pages
        usable_pages = self.pool.num_pages - self.store.pinned_pages - adapter_pages
        capacity = usable_pages * self.block_size + 1  # the last token never needs a KV slot
        if prompt_len + (requested or 1) > capacity:
            raise RequestTooLargeError(
                f"the prompt ({prompt_len} tokens) plus max_tokens ({requested or 1}) needs more KV cache than the "
                f"memory pool can give one request ({capacity} tokens); start the engine with a larger pool_bytes"
            )
        return requested if requested is not None else min(context, capacity) - prompt_len

    def _enqueue(self, lives: list[_Live]) -> None:
        with self._inbox_cv:
            if self._closing:
                raise EngineClosedError("the engine is shutting down and takes no new requests")
            ids = set(self._ids)
            for live in lives:
                if live.seq.request_id in ids:
                    raise ValueError(f"request id {live.seq.request_id!r} is already in use")
                ids.add(live.seq.request_id)
            self._ids = ids
            self._inbox += lives
            self._inbox_cv.notify_all()

    def _take_inbox(self) -> None:
        """Move what callers handed in into the scheduler (under ``_lock``)."""
        with self._inbox_cv:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        for live in inbox:
            self._live[live.seq.request_id] = live
            self._counters["prompt_tokens"] += len(live.seq.prompt_ids)
            if live.seq.adapter_name is None or live.seq.adapter_name in self.store.adapters:
                self.scheduler.add(live.seq)
            else:
                self._finish(live, "abort", error=f"adapter {live.seq.adapter_name!r} was unregistered")
        for request_id in aborts:
            if request_id in self._live:
                self._finish(self._live[request_id], "abort")

    def _emit(self, live: _Live, token_ids: list[int], finish_reason: str | None = None, error: str | None = None) -> None:
        """Queue a delta (its text is filled in on delivery); under ``_lock``."""
        seq = live.seq
        delta = Delta(seq.request_id, token_ids, "", finish_reason, error, len(seq.prompt_ids), len(seq.output_ids))
        self._outbox.append((live, delta))

    def _finish(self, live: _Live, reason: str, error: str | None = None) -> None:
        self._retire(live)
        self._emit(live, [], reason, error)

    def _retire(self, live: _Live) -> None:
        """Take a request out of the engine and give back its pages (under ``_lock``); no-op if already out."""
        if self._live.get(live.seq.request_id) is not live:
            return
        self.scheduler.free(live.seq)
        del self._live[live.seq.request_id]
        with self._inbox_cv:
            self._ids.discard(live.seq.request_id)
        self._counters["requests_finished"] += 1

    def _flush(self) -> None:
        """Detokenize and deliver the queued deltas, in order, outside ``_lock`` (sinks never run while the
        engine is locked). A request is over at its first final delta; later deltas of it are dropped."""
        with self._deliver_lock:
            while self._outbox:
                live, delta = self._outbox.popleft()
                if live.handle.done:
                    continue
                try:
                    self._add_text(live, delta)
                except Exception as err:  # a tokenizer failure ends this request, not the engine
                    log.exception("detokenizing the output of request %s failed", delta.request_id)
                    delta.text, delta.finish_reason, delta.error = "", "error", f"detokenizing the output failed: {err}"
                if delta.finish_reason is not None and self._live.get(delta.request_id) is live:
                    with self._lock:  # ended by a stop string or the tokenizer: free it before anyone hears
                        self._retire(live)
                try:
                    live.handle._deliver(delta)
                except Exception:  # a broken sink (say, a closed event loop) must not stop the engine
                    log.exception("delivering output of request %s failed; aborting it", delta.request_id)
                    if delta.finish_reason is None:
                        self.abort(delta.request_id)

    def _add_text(self, live: _Live, delta: Delta) -> None:
        """Set ``delta.text`` from its new tokens; a stop string in it makes it final (``stop``)."""
        if live.text is None or delta.finish_reason in ("abort", "error"):
            return
        text, stopped = live.text.push(delta.token_ids)
        if delta.finish_reason is not None and not stopped:
            rest, stopped = live.text.flush()
            text += rest
        delta.text = text
        if stopped:
            delta.finish_reason = "stop"


def _auto_block_size(runner: ModelRunner, max_rank: int) -> int:
    """Smallest power of two >= 16 whose page holds the largest LoRA matrix of rank ``max_rank``."""
    largest = max_rank * max(max(t.in_features, t.out_features) for t in runner.targets.values())
    per_token = kv_page_numel(runner.num_layers, runner.num_kv_heads, runner.head_dim, 1)
    block = 16
    while block * per_token < largest:
        block *= 2
    return block


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    ids: set[int] = set()
    generation = getattr(model, "generation_config", None)
    for source in (getattr(generation, "eos_token_id", None), model.config.eos_token_id, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(source)
    return ids
