"""Causal-LM loss that runs the output head only where a label is.

With prompts masked, most positions carry no label; the head (hidden × vocab, ~21% of SmolLM2-135M's
forward FLOPs) and its backward are skipped there, and no (batch, seq, vocab) logits tensor is made.

The hidden states come from the model's own backbone for its kind (``models.kind``): a causal LM's
decoder, or a vision-language model's multimodal backbone (``model.model``), which runs the vision
tower on ``pixel_values``, scatters the image features into the image tokens and computes M-RoPE
positions from ``mm_token_type_ids`` and ``image_grid_thw``, exactly as its own ``forward`` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.data.tokenize import IGNORE_INDEX
from loraforge.models.kind import is_vision_language


def summed_token_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labelled positions, and their count.

    ``batch`` has ``input_ids`` and ``labels`` ``(B, T)`` (labels unshifted, -100 = no loss) and either
    ``attention_mask`` or, for packed rows, ``position_ids``; a vision-language batch also has
    ``mm_token_type_ids`` and, when it holds images, ``pixel_values`` and ``image_grid_thw``.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    mask = inputs.get("attention_mask")
    if mask is not None and bool(mask.all()):
        inputs.pop("attention_mask")  # no padding: let attention take its causal fast path
    backbone = model.model if is_vision_language(model) else model.get_decoder()
    hidden = backbone(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
    targets = batch["labels"][:, 1:]
    picked = targets != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden[:, :-1][picked])  # (N, V)
    loss = F.cross_entropy(logits.float(), targets[picked], reduction="sum")
    return loss, int(picked.sum())
