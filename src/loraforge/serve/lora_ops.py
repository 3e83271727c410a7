"""Heterogeneous batched LoRA: one call adds the LoRA update of many adapters, of different ranks, to a batch.

Each token ``t`` of a batch carries an adapter slot ``s[t]`` (``-1`` = no adapter). For every token
with a slot, ``y[t] += B_s @ (A_s @ x[t])`` where ``A_s`` is ``(r_s, in)`` and ``B_s`` is ``(out, r_s)``
with the scaling already folded in. Ranks differ between slots and nothing is padded to a maximum
rank: tokens are grouped into runs of one slot (segments), and each run costs two matmuls at its
adapter's own rank (SGMV's segment formulation, done with torch ops on CPU).

The engine lays tokens out grouped by adapter, so its segments need no permutation. The boundary of
``add_lora`` (input, output, segment starts and slots, per-slot weight views) is the one a Triton
SGMV/BGMV kernel would take; this package has none yet because no GPU was available to test one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

LoraPair = tuple[torch.Tensor, torch.Tensor]
"""``(A.T (in, r), B.T (r, out))`` of one adapter on one module, ``B`` pre-scaled: the update is ``x @ A.T @ B.T``.

Transposed views are kept ready so that the per-segment loop creates no views of its own.
"""


@dataclass(frozen=True)
class Segments:
    """Runs of tokens that share one adapter slot.

    ``order`` lists the token indices with a slot, grouped by slot, or is ``None`` when the tokens are
    already laid out in runs. ``runs`` holds ``(start, end, slot)`` positions into that grouped order.
    ``split_sizes`` cut the (grouped) tokens into chunks, runs and the gaps between them, and
    ``chunk_slots`` pairs each run's chunk index with its slot.
    """

    order: torch.Tensor | None
    runs: tuple[tuple[int, int, int], ...]
    split_sizes: tuple[int, ...]
    chunk_slots: tuple[tuple[int, int], ...]

    @classmethod
    def from_token_slots(cls, slots: torch.Tensor) -> Segments:
        """Group tokens by their slot ``(T,)`` (``-1`` = no adapter); stable within a slot."""
        slots = slots.long()
        values, counts = torch.unique_consecutive(slots, return_counts=True)
        adapted = values[values >= 0]
        if adapted.unique().numel() == adapted.numel():  # every slot is one run already
            return cls.from_runs(_runs(values, counts), len(slots))
        order = torch.argsort(slots, stable=True)
        order = order[slots[order] >= 0]
        values, counts = torch.unique_consecutive(slots[order], return_counts=True)
        return cls._build(order, _runs(values, counts), len(order))

    @classmethod
    def from_runs(cls, runs: Sequence[tuple[int, int, int]], num_tokens: int) -> Segments:
        """Segments of a batch of ``num_tokens`` tokens already laid out by slot."""
        return cls._build(None, runs, num_tokens)

    @classmethod
    def _build(cls, order, runs, num_tokens: int) -> Segments:
        sizes, chunk_slots, at = [], [], 0
        for start, end, slot in runs:
            if start > at:
                sizes.append(start - at)
            chunk_slots.append((len(sizes), slot))
            sizes.append(end - start)
            at = end
        if num_tokens > at:
            sizes.append(num_tokens - at)
        return cls(order, tuple(runs), tuple(sizes), tuple(chunk_slots))


def _runs(values: torch.Tensor, counts: torch.Tensor) -> list[tuple[int, int, int]]:
    runs, start = [], 0
    for value, count in zip(values.tolist(), counts.tolist()):
        if value >= 0:
            runs.append((start, start + count, value))
        start += count
    return runs


def add_lora(y: torch.Tensor, x: torch.Tensor, segments: Segments, weights: Sequence[LoraPair | None]) -> torch.Tensor:
    """Add each token's adapter update to ``y`` ``(T, out)`` in place, from ``x`` ``(T, in)``.

    ``weights[slot]`` is the slot's ``LoraPair`` on this module, or ``None`` when that adapter does not
    adapt this module. Returns ``y``.
    """
    if segments.order is None:
        _segment_matmuls(y, x, segments, weights)
        return y
    xs = x.index_select(0, segments.order)
    delta = torch.zeros(xs.shape[0], y.shape[1], dtype=y.dtype, device=y.device)
    _segment_matmuls(delta, xs, segments, weights)
    return y.index_add_(0, segments.order, delta)


def _segment_matmuls(y: torch.Tensor, x: torch.Tensor, segments: Segments, weights: Sequence[LoraPair | None]) -> None:
    # One split per call instead of two slices per segment: at decode, segments are single tokens and
    # per-op overhead is most of the cost.
    xs, ys = x.split(segments.split_sizes), y.split(segments.split_sizes)
    for chunk, slot in segments.chunk_slots:
        pair = weights[slot]
        if pair is not None:
            ys[chunk].addmm_(torch.mm(xs[chunk], pair[0]), pair[1])
