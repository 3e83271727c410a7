"""The paged KV cache: fixed-size blocks taken from the unified page pool, one block table per sequence.

Each pool page is viewed as one block of ``block_size`` token slots for every layer:
``(num_layers, 2, block_size, num_kv_heads, head_dim)`` where index 0/1 of the second axis is K/V.
A sequence's token at position ``p`` lives in page ``block_table[p // block_size]`` at slot
``p % block_size``.
"""

from __future__ import annotations

import torch

from loraforge.serve.memory_pool import PagePool


def kv_page_numel(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int) -> int:
    """Elements of one KV block across all layers: the pool's page size."""
    return num_layers * 2 * block_size * num_kv_heads * head_dim


class PagedKVCache:
    def __init__(self, pool: PagePool, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int):
        if pool.page_numel != kv_page_numel(num_layers, num_kv_heads, head_dim, block_size):
            raise ValueError("pool pages are not sized for this KV layout")
        self.pool = pool
        self.block_size = block_size
        self.blocks = pool.storage.view(pool.num_pages, num_layers, 2, block_size, num_kv_heads, head_dim)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def slots(self, block_table: list[int], start: int, end: int) -> tuple[list[int], list[int]]:
        """(page, offset) of positions ``start..end-1`` of a sequence."""
        bs = self.block_size
        return [block_table[p // bs] for p in range(start, end)], [p % bs for p in range(start, end)]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, pages: torch.Tensor, offsets: torch.Tensor,
              ops=None) -> None:
        """Store ``k``, ``v`` ``(T, num_kv_heads, head_dim)`` of ``T`` tokens at their (page, offset) slots, by the
        native ``kv_write`` when ``ops`` (``loraforge.native``'s library) is given."""
        if ops is not None:
            ops.kv_write(self.blocks, layer, k, v, pages, offsets)
            return
        self.blocks[:, layer, 0][pages, offsets] = k
        self.blocks[:, layer, 1][pages, offsets] = v

    def gather(self, layer: int, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of whole block tables ``(B, max_blocks)`` as ``(B, num_kv_heads, max_blocks * block_size, head_dim)``.

        Slots past a sequence's length hold stale data; the caller masks them.
        """
        b, n = block_tables.shape
        flat = block_tables.flatten()
        # index_select on one layer's (pages, block_size, kvh, hd) view copies whole blocks; it is ~10x
        # faster than advanced indexing with the layer as a second index (measured on CPU).
        k = self.blocks[:, layer, 0].index_select(0, flat)
        v = self.blocks[:, layer, 1].index_select(0, flat)
        shape = (b, n * self.block_size, k.shape[-2], k.shape[-1])
        return k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)
