"""Greedy replies of a vision-language model to image + text prompts (``loraforge chat --image``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from loraforge.data.vision import VisionSample, collate_vision


@torch.no_grad()
def generate_vision_reply(model: nn.Module, processor, prompt: VisionSample, max_new_tokens: int, device) -> str:
    """The greedy reply to one prompt (``data.vision.prompt_sample``), adapters active as they are.

    transformers' ``generate`` runs the vision tower at prefill and carries the M-RoPE offsets of the
    image tokens into decoding."""
    return generate_vision_replies(model, processor, [prompt], max_new_tokens, device)[0]


@torch.no_grad()
def generate_vision_replies(model: nn.Module, processor, prompts: Sequence[VisionSample], max_new_tokens: int,
                            device) -> list[str]:
    """Greedy replies, one ``generate`` call per prompt (rows of different image grids are not batched)."""
    was_training = model.training
    model.eval()
    tokenizer = processor.tokenizer
    replies = []
    try:
        for prompt in prompts:
            batch = collate_vision([prompt], processor)
            batch.pop("labels")
            inputs = {k: v.to(device) for k, v in batch.items()}
            out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=processor.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            replies.append(tokenizer.decode(out[0, len(prompt.input_ids):], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return replies
