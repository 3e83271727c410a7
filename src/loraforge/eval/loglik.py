"""Log-likelihood of labelled tokens, batched across samples and adapters.

Rows of one batch may run different adapters (``adapters.mixed_adapter_batch``), so scoring a data
set under the base model and N adapters takes one pass over ``(N + 1) × samples`` rows. As in
training (``train/loss.py``) the output head runs only where a label is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.adapters import mixed_adapter_batch
from loraforge.data.collate import collate
from loraforge.data.tokenize import IGNORE_INDEX, Sample


@torch.no_grad()
def labelled_logprobs(model: nn.Module, rows: Sequence[tuple[Sample, str | None]], batch_size: int, pad_id: int,
                      device: torch.device) -> list[tuple[float, int]]:
    """Per row ``(sample, adapter name on the model or None for the base)``: the sum of
    ``log p(label_t | tokens < t)`` over the sample's labelled positions, and their count."""
    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0].input_ids))  # longest first: OOM early
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate([rows[i][0] for i in chunk], pad_id).items()}
        with mixed_adapter_batch(model, [rows[i][1] for i in chunk]):
            hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                         use_cache=False).last_hidden_state  # (B, T, H)
        targets = batch["labels"][:, 1:]
        picked = targets != IGNORE_INDEX  # (B, T-1)
        logits = model.get_output_embeddings()(hidden[:, :-1][picked]).float()  # (N, V)
        token_logprobs = F.log_softmax(logits, dim=-1).gather(1, targets[picked][:, None])[:, 0]  # (N,)
        sums = torch.zeros(len(chunk), dtype=torch.float64, device=device)
        sums.index_add_(0, picked.nonzero()[:, 0], token_logprobs.double())
        counts = picked.sum(dim=1)
        for row, i in enumerate(chunk):
            out[i] = (float(sums[row]), int(counts[row]))
    return out
