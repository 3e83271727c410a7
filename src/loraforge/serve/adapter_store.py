"""Registered adapters: all of them in host memory, the ones in use resident in the page pool.

Every method of the adapter registry is served: an adapter is folded on registration into plain
low-rank pairs (``loraforge.adapters.fold``), plus DoRA's per-row scale, so the batched op never learns
which method it runs. Residency is a cache: an adapter that requests need is copied into pool pages
(its ``B`` multiplied by the scaling, and DoRA's row scale, on the way), stays there while idle, and
is evicted least-recently-used when the pool needs its pages, for KV blocks or for another adapter.
An adapter in use by a running request (``refs > 0``) or pinned is never evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from loraforge.adapters.fold import LowRank
from loraforge.adapters.peft_format import CONFIG_NAME, PREFIX, AdapterFormatError
from loraforge.adapters.registry import METHODS
from loraforge.serve.errors import UnknownAdapterError
from loraforge.serve.lora_ops import LoraPair
from loraforge.serve.memory_pool import PagePool
from loraforge.serve.prefix_cache import content_hash

SUPPORTED = f"adapters of the methods {', '.join(METHODS)} on the attention and MLP projections"
UNSUPPORTED_FIELDS = {
    "modules_to_save": "full copies of extra modules",
    "trainable_token_indices": "trained token embeddings",
    "layer_replication": "replicated layers",
    "target_parameters": "adapted parameters (not modules)",
}


@dataclass(frozen=True)
class TargetModule:
    """A base projection an adapter may adapt: decoder layer, projection name, and its shape."""

    layer: int
    proj: str
    in_features: int
    out_features: int


ModuleKey = tuple[int, str]
"""``(layer index, projection name)``, e.g. ``(3, "q_proj")``."""


@dataclass(eq=False)
class Adapter:
    """One registered adapter. ``modules`` holds the host copy: ``A (r, in)``, ``B (out, r)``, scaling."""

    name: str
    source: str
    modules: dict[ModuleKey, LowRank]
    layout: list[tuple[ModuleKey, int, int, int]]
    """Where each tensor goes in the adapter's pages: (module, 0 for A / 1 for B / 2 for the row scale,
    page index, offset)."""
    num_pages: int
    content_hash: bytes = b""
    """Digest of the folded weights: the root of this adapter's prefix-cache keys (``serve.prefix_cache``)."""
    pinned: bool = False
    refs: int = 0
    pages: list[int] | None = None
    views: dict[ModuleKey, LoraPair] = field(default_factory=dict)
    """Resident only: the ``LoraPair`` views (transposed ``A``, scaled ``B``, row scale) into pool pages that
    the LoRA op reads."""

    @property
    def resident(self) -> bool:
        return self.pages is not None


class AdapterStore:
    """Host registry plus the device-resident subset, living in ``pool``.

    ``targets`` maps base module paths (``model.layers.0.self_attn.q_proj``) to what may be adapted;
    ``fold(config, tensors, source)`` turns a PEFT adapter into module path -> ``LowRank`` (the engine
    passes ``loraforge.adapters.fold.fold_adapter`` over its model). Not thread-safe: the engine
    serialises calls.
    """

    def __init__(self, pool: PagePool, targets: dict[str, TargetModule], max_rank: int,
                 fold: Callable[[dict, dict, str], dict[str, LowRank]]):
        self.pool = pool
        self.fold = fold
        self.targets = targets
        self.max_rank = max_rank
        self.adapters: dict[str, Adapter] = {}
        self.pinned_pages = 0
        """Pages held by pinned adapters (kept as a count so that readers need no lock)."""
        self._lru: OrderedDict[str, Adapter] = OrderedDict()  # resident adapters, least recent first

    # registration -------------------------------------------------------------------------------

    def register(
        self, name: str, config: dict, tensors: dict[str, torch.Tensor], source: str = "<memory>", pinned: bool = False
    ) -> Adapter:
        """Validate a PEFT adapter of any registry method (config + tensors under PEFT key names), fold it
        and add it as ``name``.

        Raises ``AdapterFormatError`` listing every problem: unsupported adapter type or options,
        modules the base model lacks or that aren't projections, shapes that don't fit, ranks above
        ``max_rank``. Raises ``ValueError`` for a name already registered.
        """
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} is already registered; unregister it first or pick another name")
        modules = self._validate(config, tensors, source)
        layout, num_pages = _pack(modules, self.pool.page_numel)
        adapter = Adapter(name, source, modules, layout, num_pages, _content_hash(modules))
        self.adapters[name] = adapter
        if pinned:
            self.pin(name)
        return adapter

    def _validate(self, config: dict, tensors: dict[str, torch.Tensor], source: str) -> dict[ModuleKey, LowRank]:
        where = f"{source}/{CONFIG_NAME}" if source != "<memory>" else "adapter config"
        problems = []
        if config.get("bias", "none") != "none" or config.get("lora_bias"):
            problems.append(f"{where}: trained biases (bias={config.get('bias')!r}, lora_bias={config.get('lora_bias')!r}) "
                            f"are not supported; it serves {SUPPORTED}")
        if config.get("fan_in_fan_out"):
            problems.append(f"{where}: fan_in_fan_out=true is for GPT-2 style Conv1D layers, which Llama-family models lack")
        for key, what in UNSUPPORTED_FIELDS.items():
            if config.get(key):
                problems.append(f"{where}: {key} ({what}) is not supported; it serves {SUPPORTED}")
        if problems:
            raise AdapterFormatError("\n".join(problems))
        modules = {}
        for path, pair in self.fold(config, tensors, source).items():
            target = self.targets.get(path)
            key = f"{PREFIX}{path}"
            if target is None:
                problems.append(
                    f"{source}: {key} adapts {path!r}, which is not an attention or MLP projection of this base model "
                    f"(the engine adapts q/k/v/o_proj and gate/up/down_proj of each layer)"
                )
            elif pair.a.shape[0] > self.max_rank:
                problems.append(f"{source}: {key} has rank {pair.a.shape[0]}, above the engine's "
                                f"max_rank={self.max_rank}; start the engine with a larger max_rank")
            elif pair.a.shape[0]:  # a layer pruned to rank 0 adds nothing
                modules[(target.layer, target.proj)] = pair
        if problems:
            shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
            raise AdapterFormatError("\n".join(shown))
        return modules

    def unregister(self, name: str) -> None:
        """Forget ``name`` and free its pages. The caller makes sure no request still uses it."""
        adapter = self.get(name)
        if adapter.refs:
            raise RuntimeError(f"adapter {name!r} is still used by {adapter.refs} running requests")
        self.unpin(name)
        if adapter.resident:
            self._evict(adapter)
        del self.adapters[name]

    def get(self, name: str) -> Adapter:
        try:
            return self.adapters[name]
        except KeyError:
            raise UnknownAdapterError(f"no adapter named {name!r} is registered") from None

    # residency ----------------------------------------------------------------------------------

    @property
    def resident(self) -> list[str]:
        """Names of the resident adapters, least recently used first."""
        return list(self._lru)

    def pages_to_load(self, name: str) -> int:
        adapter = self.get(name)
        return 0 if adapter.resident else adapter.num_pages

    def evictable_pages(self, keep: str | None = None) -> int:
        """Pages that evicting every idle, unpinned adapter (other than ``keep``) would free."""
        return sum(a.num_pages for a in self._lru.values() if self._evictable(a) and a.name != keep)

    def make_room(self, num_pages: int, keep: str | None = None) -> bool:
        """Evict idle adapters, least recently used first, until ``num_pages`` pages are free.

        Evicts nothing and returns False when even evicting all idle adapters would not be enough.
        """
        if self.pool.num_free >= num_pages:
            return True
        if self.pool.num_free + self.evictable_pages(keep) < num_pages:
            return False
        for adapter in list(self._lru.values()):
            if self.pool.num_free >= num_pages:
                break
            if self._evictable(adapter) and adapter.name != keep:
                self._evict(adapter)
        return True

    def acquire(self, name: str) -> Adapter:
        """Mark ``name`` in use, loading it into the pool if needed (the caller made room)."""
        adapter = self.get(name)
        if not adapter.resident:
            self._load(adapter)
        adapter.refs += 1
        self._lru.move_to_end(name)
        return adapter

    def release(self, adapter: Adapter) -> None:
        adapter.refs -= 1

    def touch(self, adapter: Adapter) -> None:
        """Mark ``adapter`` most recently used."""
        self._lru.move_to_end(adapter.name)

    def pin(self, name: str) -> None:
        """Load ``name`` and keep it resident until ``unpin``; raises if the pool can't make room."""
        adapter = self.get(name)
        if not adapter.resident:
            if not self.make_room(adapter.num_pages, keep=name):
                raise MemoryError(
                    f"cannot pin adapter {name!r}: it needs {adapter.num_pages} pages and at most "
                    f"{self.pool.num_free + self.evictable_pages(name)} can be freed; give the engine a larger pool_bytes"
                )
            self._load(adapter)
            self._lru.move_to_end(name)
        if not adapter.pinned:
            adapter.pinned = True
            self.pinned_pages += adapter.num_pages

    def unpin(self, name: str) -> None:
        adapter = self.get(name)
        if adapter.pinned:
            adapter.pinned = False
            self.pinned_pages -= adapter.num_pages

    def _evictable(self, adapter: Adapter) -> bool:
        return adapter.refs == 0 and not adapter.pinned

    def _load(self, adapter: Adapter) -> None:
        pages = self.pool.allocate(adapter.num_pages, "adapter")
        storage = self.pool.storage
        views: dict[ModuleKey, list] = {key: [None, None, None] for key in adapter.modules}
        for key, which, page, offset in adapter.layout:
            pair = adapter.modules[key]
            source = _stored(pair)[which]
            view = storage[pages[page], offset : offset + source.numel()].view(source.shape)
            # copy_ moves the host tensor to the pool's device and dtype; it blocks, because the host copy
            # is pageable memory (non_blocking would gain nothing). B is then scaled in place, on the device.
            view.copy_(source)
            if which == 1:
                view.mul_(pair.scale)
            views[key][which] = view
        for key, (a, b, row_scale) in views.items():
            if row_scale is not None:
                b.mul_(row_scale[:, None])  # DoRA: the scale applies to the whole row of the update
        adapter.pages = pages
        adapter.views = {key: (a.T, b.T, row_scale) for key, (a, b, row_scale) in views.items()}
        self._lru[adapter.name] = adapter

    def _evict(self, adapter: Adapter) -> None:
        self.pool.release(adapter.pages, "adapter")
        adapter.pages = None
        adapter.views = {}
        del self._lru[adapter.name]


def _content_hash(modules: dict[ModuleKey, LowRank]) -> bytes:
    return content_hash((f"{layer}.{proj}.{field}", value) for (layer, proj), pair in sorted(modules.items())
                        for field, value in (("a", pair.a), ("b", pair.b), ("scale", pair.scale), ("m", pair.row_scale)))


def _stored(pair: LowRank) -> tuple[torch.Tensor, ...]:
    """The tensors an adapter keeps in its pages for one module: A, B and, for DoRA, the row scale."""
    return (pair.a, pair.b) if pair.row_scale is None else (pair.a, pair.b, pair.row_scale)


def _pack(modules: dict[ModuleKey, LowRank], page_numel: int):
    """Place every tensor in a page, largest first, first fit; no tensor straddles two pages."""
    items = [(key, which, t.numel()) for key, pair in modules.items() for which, t in enumerate(_stored(pair))]
    items.sort(key=lambda item: -item[2])
    fill: list[int] = []
    layout = []
    for key, which, numel in items:
        if numel > page_numel:
            raise AdapterFormatError(
                f"an adapter tensor of {numel} elements on {key} does not fit a {page_numel}-element page; "
                "start the engine with a larger block_size"
            )
        page = next((i for i, used in enumerate(fill) if used + numel <= page_numel), None)
        if page is None:
            page = len(fill)
            fill.append(0)
        layout.append((key, which, page, fill[page]))
        fill[page] += numel
    return layout, len(fill)
