"""Batching: padded tensors, a reproducible length-grouped batch order, and packing.

Packed rows hold several samples back to back. Their ``position_ids`` restart at 0 for each
sample, and their batches carry no ``attention_mask``. Called with ``use_cache=False``, the model's
``create_causal_mask`` (transformers ``masking_utils``) then detects the packed samples from the
position ids and lets each token attend only to earlier tokens of its own sample, with sdpa, eager
or flash attention alike. Two things turn that detection off, after which samples see each other:
an ``attention_mask``, and a KV cache, which transformers 5 models create by default
(``config.use_cache``) unless gradient checkpointing is on. So a training forward pass must be
``model(input_ids=..., position_ids=..., use_cache=False)``.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence

import torch

from loraforge.data.tokenize import IGNORE_INDEX, Sample

GROUP_BATCHES = 64
"""Batches per window in ``batches``: samples are sorted by length within a window of this many."""


def collate(samples: Sequence[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad samples on the right into LongTensors of shape ``(batch, longest)``.

    Unpacked samples give ``input_ids``, ``labels`` (-100 on padding) and ``attention_mask``
    (0 on padding). Packed rows give ``input_ids``, ``labels`` and ``position_ids``, and no
    ``attention_mask`` (see the module docstring); the padding of a packed row forms one more
    segment, which no real token attends to.

    Raises:
        ValueError: packed and unpacked samples are mixed.
    """
    packed = {s.position_ids is not None for s in samples}
    if len(packed) != 1:
        raise ValueError("cannot collate packed rows together with unpacked samples")
    width = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    extra = torch.zeros((len(samples), width), dtype=torch.long)  # attention_mask or position_ids
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        input_ids[row, :n] = torch.tensor(sample.input_ids)
        labels[row, :n] = torch.tensor(sample.labels)
        if sample.position_ids is None:
            extra[row, :n] = 1
        else:
            extra[row, :n] = torch.tensor(sample.position_ids)
            extra[row, n:] = torch.arange(width - n)
    key = "attention_mask" if packed == {False} else "position_ids"
    return {"input_ids": input_ids, "labels": labels, key: extra}


def batches(samples: Sequence[Sample], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch, as lists of sample indices, grouping samples of similar length.

    The samples are shuffled, cut into windows of ``GROUP_BATCHES * batch_size``, sorted by length
    within each window and split into batches, and the batches are shuffled. The result depends
    only on (``seed``, ``epoch``) and the sample lengths, so a resumed run can skip the batches it
    has done. Every sample appears once; only the last batch of the last window may be short.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rng = random.Random(f"loraforge.batches:{seed}:{epoch}")
    order = list(range(len(samples)))
    rng.shuffle(order)
    window = GROUP_BATCHES * batch_size
    result = []
    for start in range(0, len(order), window):
        group = sorted(order[start : start + window], key=lambda i: len(samples[i].input_ids))
        result += [group[k : k + batch_size] for k in range(0, len(group), batch_size)]
    rng.shuffle(result)
    return result


def pack(samples: Sequence[Sample], cutoff_len: int) -> list[Sample]:
    """Pack samples into rows of at most ``cutoff_len`` tokens (best fit, longest sample first).

    Each row concatenates whole samples; its ``position_ids`` restart at 0 for each, and the first
    label of each is -100, so no sample is trained to predict the start of the next.

    Raises:
        ValueError: a sample is longer than ``cutoff_len`` or is already packed.
    """
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in sorted(range(len(samples)), key=lambda i: -len(samples[i].input_ids)):
        sample = samples[i]
        n = len(sample.input_ids)
        if n > cutoff_len or sample.position_ids is not None:
            raise ValueError(f"sample {i} cannot be packed: {n} tokens (cutoff_len {cutoff_len}), or already packed")
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            rows.append([i])
            room, row = cutoff_len - n, len(rows) - 1
        else:
            room, row = free.pop(k)
            rows[row].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, row))
    return [_concat([samples[i] for i in row]) for row in rows]


def _concat(segments: list[Sample]) -> Sample:
    input_ids, labels, position_ids = [], [], []
    for s in segments:
        input_ids += s.input_ids
        labels += [IGNORE_INDEX] + s.labels[1:]
        position_ids += range(len(s.input_ids))
    return Sample(input_ids, labels, position_ids)
