"""One pool of fixed-size pages that holds both KV-cache blocks and resident adapter weights.

This is S-LoRA's unified paging: a single budget, a single tensor. A page is sized to hold one KV
block for all layers (``num_layers * 2 * block_size * num_kv_heads * head_dim`` elements), and an
adapter's matrices are packed into whole pages (a matrix never straddles two pages, so any free
pages will do and the pool never needs compaction). Freeing an adapter's pages makes them
available to the KV cache at once, and the other way round.

A free page may still hold useful content: a prefix-cache KV block no request uses any more
(``release(..., keep=True)``). Such pages count as free, are handed out only after the pages that
hold nothing (oldest first), and whoever cached them hears of it (``on_reuse``) when they are, so
the cache never outgrows the one budget. ``revive`` takes one back into use as it is.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch


class PoolExhausted(RuntimeError):
    """More pages were asked for than are free; callers check ``num_free`` first (admission control)."""


class PagePool:
    """``num_pages`` pages of ``page_numel`` elements each, in one ``(num_pages, page_numel)`` tensor.

    The tensor is allocated once with ``torch.empty``: the OS commits memory only for pages that are
    written, but the budget is fixed and never exceeded.
    """

    def __init__(self, num_pages: int, page_numel: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        if num_pages < 1:
            raise ValueError(f"a memory pool needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self.page_numel = page_numel
        self.storage = torch.empty(num_pages, page_numel, dtype=dtype, device=device)
        self._free = list(range(num_pages - 1, -1, -1))
        self._idle: OrderedDict[int, None] = OrderedDict()
        """Free pages whose content is kept until they are needed, least recently released first."""
        self._used = {"kv": 0, "adapter": 0}
        self.on_reuse: Callable[[int], None] | None = None
        """Called with an idle page's id when it is handed out for something else."""

    @property
    def page_bytes(self) -> int:
        return self.page_numel * self.storage.element_size()

    @property
    def num_free(self) -> int:
        """Pages that can be allocated now, idle ones (content kept) included."""
        return len(self._free) + len(self._idle)

    @property
    def num_idle(self) -> int:
        return len(self._idle)

    def used(self, kind: str) -> int:
        """Pages currently held for ``kind`` (``"kv"`` or ``"adapter"``)."""
        return self._used[kind]

    def allocate(self, n: int, kind: str) -> list[int]:
        """``n`` page ids for ``kind``; raises ``PoolExhausted`` rather than over-committing."""
        if n > self.num_free:
            raise PoolExhausted(f"asked for {n} pages, {self.num_free} of {self.num_pages} are free")
        pages = [self._free.pop() for _ in range(min(n, len(self._free)))]
        while len(pages) < n:
            page, _ = self._idle.popitem(last=False)
            if self.on_reuse is not None:
                self.on_reuse(page)
            pages.append(page)
        self._used[kind] += n
        if pages:
            # Attention reads whole KV blocks and masks the slots past each sequence's end (a shorter
            # block table is padded with page 0, whatever that page holds now); masked weights are 0, but
            # 0 * NaN is NaN, so no page in use may hold NaN/inf: neither uninitialised memory in a KV
            # block nor in the unused tail of an adapter's page. Zeroing costs one write per page.
            self.storage[torch.tensor(pages, device=self.storage.device)] = 0
        return pages

    def release(self, pages: list[int], kind: str, keep: bool = False) -> None:
        """Give ``pages`` back; with ``keep`` their content stays valid until they are handed out again."""
        if keep:
            self._idle.update(dict.fromkeys(pages))
        else:
            self._free.extend(reversed(pages))
        self._used[kind] -= len(pages)

    def revive(self, page: int, kind: str) -> None:
        """Take idle ``page`` back into use, content and all."""
        del self._idle[page]
        self._used[kind] += 1
