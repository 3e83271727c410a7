"""Side-by-side chat: one serving ``Engine`` holds the base and up to two adapters, and one prompt goes to
each of them in the same batch (the engine mixes adapters per row); their replies stream together. The
base is built from a ``model`` config section through ``models.prepare.load_base``, as training built it
(a QLoRA run's base quantized as it was trained)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

from loraforge.config import ModelConfig
from loraforge.data.tokenize import prompt_ids
from loraforge.models import resolve_device
from loraforge.models.prepare import load_base
from loraforge.serve.engine import Engine, Request
from loraforge.serve.sampling import SamplingParams

BASE = "base"


class ChatSessions:
    """The engine of the last (base, adapters) asked for; a new combination replaces it."""

    def __init__(self, pool_bytes: int = 256 * 2**20):
        self.pool_bytes = pool_bytes
        self._key: tuple | None = None
        self._engine: Engine | None = None
        self._tokenizer = None
        self._lock = threading.Lock()

    def _engine_for(self, base: ModelConfig, adapters: dict[str, Path]) -> tuple[Engine, object]:
        key = (repr(base), tuple(sorted((name, str(path)) for name, path in adapters.items())))
        if key != self._key:
            if self._engine is not None:
                self._engine.shutdown()
                self._engine = None
            device = resolve_device(None)
            model, tokenizer = load_base(base, device)
            self._engine = Engine(model, tokenizer, device=device, adapters=adapters, pool_bytes=self.pool_bytes)
            self._engine.start()
            self._key, self._tokenizer = key, tokenizer
        return self._engine, self._tokenizer

    def replies(self, base: ModelConfig, adapters: dict[str, Path], prompt: str, max_tokens: int,
                interval: float = 0.2) -> Iterator[dict[str, str]]:
        """Yield ``{name: text so far}`` for the base (``BASE``) and each adapter until all have finished.

        Raises the engine's errors (``UnknownAdapterError``, ``AdapterFormatError``, ``ModelSourceError``)."""
        with self._lock:
            engine, tokenizer = self._engine_for(base, adapters)
        ids = prompt_ids(tokenizer, [{"role": "user", "content": prompt}], "auto")
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        texts = {name: "" for name in (BASE, *adapters)}
        handles = {}
        for name in texts:
            def sink(delta, name=name):
                texts[name] += delta.text
            handles[name] = engine.submit(Request(list(ids), params, None if name == BASE else name), sink)
        while not all(h.done for h in handles.values()):
            time.sleep(interval)
            yield dict(texts)
        yield {name: h.result().text for name, h in handles.items()}
