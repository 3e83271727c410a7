"""Heterogeneous batched LoRA: one call adds the LoRA update of many adapters, of different ranks, to a batch.

Each token ``t`` of a batch carries an adapter slot ``s[t]`` (``-1`` = no adapter). For every token
with a slot, ``y[t] += B_s @ (A_s @ x[t])`` where ``A_s`` is ``(r_s, in)`` and ``B_s`` is ``(out, r_s)``
with the scaling already folded in. A slot may also carry a per-row scale ``m`` ``(out,)`` (DoRA's
``magnitude / ‖W + s·B A‖``, with ``B`` pre-multiplied by it): its tokens get
``y[t] = b + m ⊙ (y[t] − b) + B_s A_s x[t]``, ``b`` the module's bias. Ranks differ between slots and
nothing is padded to a maximum rank: tokens are grouped into runs of one slot (segments), and each run costs two matmuls at its
adapter's own rank (SGMV's segment formulation, done with torch ops on CPU).

On a CPU, one-token runs in bf16/fp16 (decoding sequences, one per adapter) skip oneDNN: its per-call
cost on such tiny matmuls (~20 us) is several times torch's own kernel's, which measured ~1.6x faster
per 32-adapter bf16 decode step (``_without_onednn``; runs of many tokens keep oneDNN, faster there).

The engine lays tokens out grouped by adapter, so its segments need no permutation. The boundary of
``add_lora`` (input, output, segment starts and slots, per-slot weight views) is the one a Triton
SGMV/BGMV kernel would take; this package has none yet because no GPU was available to test one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

LoraPair = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
"""``(A.T (in, r), B.T (r, out), row scale (out,) or None)`` of one adapter on one module, ``B`` pre-scaled:
the update is ``x @ A.T @ B.T``, plus ``(m − 1) ⊙ (y − b)`` where a row scale ``m`` is given.

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


def add_lora(y: torch.Tensor, x: torch.Tensor, segments: Segments, weights: Sequence[LoraPair | None],
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """Add each token's adapter update to ``y`` ``(T, out)`` (the base output, ``bias`` included) in place,
    from ``x`` ``(T, in)``.

    ``weights[slot]`` is the slot's ``LoraPair`` on this module, or ``None`` when that adapter does not
    adapt this module. Returns ``y``.
    """
    if segments.order is None:
        _segment_matmuls(y, x, y, segments, weights, bias)
        return y
    xs = x.index_select(0, segments.order)
    delta = torch.zeros(xs.shape[0], y.shape[1], dtype=y.dtype, device=y.device)
    _segment_matmuls(delta, xs, y.index_select(0, segments.order), segments, weights, bias)
    return y.index_add_(0, segments.order, delta)


def _segment_matmuls(out: torch.Tensor, x: torch.Tensor, base: torch.Tensor, segments: Segments,
                     weights: Sequence[LoraPair | None], bias: torch.Tensor | None) -> None:
    """Add each run's update to ``out``; ``base`` holds the same tokens' base outputs (it may be ``out``)."""
    # One split per call instead of two slices per segment: at decode, segments are single tokens and
    # per-op overhead is most of the cost.
    xs, outs = x.split(segments.split_sizes), out.split(segments.split_sizes)
    scaled_rows = any(pair is not None and pair[2] is not None for pair in weights)  # DoRA's; most batches have none
    bases = base.split(segments.split_sizes) if scaled_rows else None
    single_skip_onednn = x.device.type == "cpu" and x.dtype in ONEDNN_SLOW_DTYPES and _set_onednn is not None
    single: list[tuple[int, LoraPair]] = []
    for (start, end, _), (chunk, slot) in zip(segments.runs, segments.chunk_slots):
        pair = weights[slot]
        if pair is None:
            continue
        if single_skip_onednn and end - start == 1:
            single.append((chunk, pair))
            continue
        _run_matmuls(outs[chunk], xs[chunk], bases[chunk] if scaled_rows else None, pair, bias)
    if single:
        with _without_onednn():
            for chunk, pair in single:
                _run_matmuls(outs[chunk], xs[chunk], bases[chunk] if scaled_rows else None, pair, bias)


def _run_matmuls(out: torch.Tensor, x: torch.Tensor, base: torch.Tensor | None, pair: LoraPair,
                 bias: torch.Tensor | None) -> None:
    """One run's update: ``out += x A.T B.T``, after DoRA's rescaling of the unbiased ``base`` if any."""
    a_t, b_t, row_scale = pair
    if row_scale is not None:
        unbiased = base if bias is None else base - bias
        out.add_(unbiased * (row_scale - 1))
    out.addmm_(torch.mm(x, a_t), b_t)


ONEDNN_SLOW_DTYPES = (torch.bfloat16, torch.float16)
"""CPU dtypes whose one-token LoRA matmuls run without oneDNN (see the module docstring)."""

_set_onednn = getattr(torch._C, "_set_mkldnn_enabled", None)
"""torch's switch of oneDNN for CPU ops (``torch.backends.mkldnn.flags`` sets it, with other flags and a
warning each time); when a torch lacks it, every run keeps oneDNN."""


@contextlib.contextmanager
def _without_onednn() -> Iterator[None]:
    """CPU matmuls inside skip oneDNN. The switch is process-wide: the engine runs its steps on one thread,
    and a matmul another thread runs meanwhile would skip oneDNN too (slower, the same result up to rounding)."""
    enabled = torch._C._get_mkldnn_enabled()
    _set_onednn(False)
    try:
        yield
    finally:
        _set_onednn(enabled)
