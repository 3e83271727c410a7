"""Prefix caching: the KV blocks of a prompt prefix, computed once and shared by every request that starts with it.

A full KV block (``block_size`` tokens) is named by a hash chain: block ``i``'s key hashes block
``i - 1``'s key and block ``i``'s token ids, and the chain starts from a root that names the
weights the K/V were computed with: the adapter's *content* hash (``content_hash`` of its folded
weights), or ``BASE_ROOT`` without an adapter. A token's K/V depend on every earlier token, on its
position (the block's place in the chain) and on every weight the request runs with, so equal keys
mean equal K/V. Keying by the adapter's content and not its name means that an adapter
re-registered under the same name with new weights never reads K/V of the old ones (vLLM #30931),
and that two names with the same weights share their blocks.

Only full blocks are shared, and a request always computes its last prompt token itself (its logits
are needed), so a request never writes into a block another one reads: no copy-on-write.

Pages are refcounted: a page shared by several running requests is freed when the last one lets it
go. A freed page that holds a cached block stays in the pool as an *idle* free page
(``PagePool.release(keep=True)``): it counts as free, and when the pool hands it out for anything
else (KV or adapter weights) the cache forgets it (``PagePool.on_reuse``). The cache thus lives
inside the pool's one budget and never blocks an allocation.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter
from collections.abc import Iterable

import torch

from loraforge.serve.memory_pool import PagePool

BASE_ROOT = hashlib.blake2b(b"loraforge base model, no adapter", digest_size=16).digest()


def _hasher():
    return hashlib.blake2b(digest_size=16)


def content_hash(items: Iterable[tuple[str, torch.Tensor | float | None]]) -> bytes:
    """A digest of named tensors and numbers (names, dtypes, shapes and bytes), in the order given."""
    digest = _hasher()
    for name, value in items:
        digest.update(name.encode() + b"\0")
        if isinstance(value, torch.Tensor):
            t = value.detach().contiguous().cpu()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            digest.update(repr(value).encode())
    return digest.digest()


def extend_block_hashes(hashes: list[bytes], root: bytes, tokens: list[int], block_size: int, num_blocks: int) -> list[bytes]:
    """Extend ``hashes`` (the keys of the first blocks of ``tokens``) in place to ``num_blocks`` keys."""
    for i in range(len(hashes), num_blocks):
        digest = _hasher()
        digest.update(hashes[i - 1] if i else root)
        digest.update(array("q", tokens[i * block_size:(i + 1) * block_size]).tobytes())
        hashes.append(digest.digest())
    return hashes


class PrefixCache:
    """Refcounted KV pages of ``pool``, with a map from block key to the page that holds that block.

    Every KV page of a sequence goes through ``take`` and ``release``. With ``enabled=False`` no block
    is ever found or kept, and pages are plain refcounted KV pages.
    """

    def __init__(self, pool: PagePool, enabled: bool = True):
        self.pool = pool
        self.enabled = enabled
        self._page_of: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._refs: dict[int, int] = {}
        self._pending: Counter[bytes] = Counter()
        """Keys of blocks that running sequences are computing and will insert."""
        self.hit_blocks = 0
        """Blocks found in the cache at admission, since the start."""
        pool.on_reuse = self._forget

    @property
    def num_cached(self) -> int:
        """Pages that hold a cached block (in use or idle)."""
        return len(self._key_of)

    def match(self, keys: list[bytes]) -> list[int]:
        """The pages of the longest run of ``keys``, from the first, that the cache holds."""
        pages = []
        if self.enabled:
            for key in keys:
                page = self._page_of.get(key)
                if page is None:
                    break
                pages.append(page)
        return pages

    def pending(self, key: bytes) -> bool:
        """Whether a running sequence is computing the block ``key``: a request that needs it next had
        better wait a step than compute it again."""
        return key in self._pending

    def expect(self, keys: list[bytes], done: bool = False) -> None:
        """Note that a sequence computes the blocks ``keys`` (or, with ``done``, no longer does)."""
        if self.enabled:
            if done:
                self._pending -= Counter(keys)
            else:
                self._pending.update(keys)

    def idle_among(self, pages: list[int]) -> int:
        """How many of ``pages`` are idle: taking them makes that many fewer pages free."""
        return sum(1 for page in pages if page not in self._refs)

    def take(self, hits: list[int], num_new: int) -> list[int]:
        """A block table: the cached ``hits`` (shared) followed by ``num_new`` fresh pages.

        The caller checked that ``idle_among(hits) + num_new`` pages are free.
        """
        for page in hits:
            if page in self._refs:
                self._refs[page] += 1
            else:
                self.pool.revive(page, "kv")
                self._refs[page] = 1
        self.hit_blocks += len(hits)
        fresh = self.pool.allocate(num_new, "kv")
        self._refs.update(dict.fromkeys(fresh, 1))
        return hits + fresh

    def release(self, pages: list[int]) -> None:
        """Drop one reference to each page; a page nobody holds goes back to the pool (idle if it is cached)."""
        for page in pages:
            refs = self._refs.pop(page, 1) - 1
            if refs:
                self._refs[page] = refs
            else:
                self.pool.release([page], "kv", keep=page in self._key_of)

    def insert(self, keys: list[bytes], pages: list[int]) -> None:
        """Record that ``pages[i]`` holds the block keyed ``keys[i]`` (its K/V are final). A key already
        cached keeps its page; the other page stays private to its sequence."""
        if not self.enabled:
            return
        for key, page in zip(keys, pages):
            if key not in self._page_of and page not in self._key_of:
                self._page_of[key] = page
                self._key_of[page] = key

    def _forget(self, page: int) -> None:
        key = self._key_of.pop(page, None)
        if key is not None:
            del self._page_of[key]
