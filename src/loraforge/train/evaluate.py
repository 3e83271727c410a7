"""Evaluation: loss and perplexity on tokenized samples, exact match of generated replies."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from loraforge.adapters import AdapterError, adapted_layers, merge_adapters, unmerge_adapters
from loraforge.data.collate import collate
from loraforge.data.tokenize import Sample, prompt_ids
from loraforge.train.loss import summed_token_loss


@torch.no_grad()
def eval_loss(model: nn.Module, samples: Sequence[Sample], batch_size: int, pad_id: int, device) -> dict:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids))
    for start in range(0, len(order), batch_size):
        batch = collate([samples[i] for i in order[start : start + batch_size]], pad_id)
        loss, n = summed_token_loss(model, {k: v.to(device) for k, v in batch.items()})
        total, count = total + loss.item(), count + n
    model.train(was_training)
    mean = total / max(count, 1)
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50))}


@torch.no_grad()
def generate_replies(model: nn.Module, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int,
                     batch_size: int, device) -> list[str]:
    """Greedy replies to tokenized prompts, batched with left padding; adapters are merged meanwhile
    where the base allows it (no LoRA latency), and unmerged after."""
    was_training = model.training
    model.eval()
    merged = False
    if not any(layer.disabled for layer in adapted_layers(model).values()):
        try:
            merge_adapters(model)
            merged = True
        except AdapterError:  # a quantized base can't take an in-place merge: run unmerged
            pass
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    replies: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                 eos_token_id=tokenizer.eos_token_id)
            for row, i in enumerate(chunk):
                replies[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True)
    finally:
        if merged:
            unmerge_adapters(model)
        model.train(was_training)
    return replies


def exact_match(model: nn.Module, tokenizer, test: Sequence[tuple[list[dict], str]], template: str,
                max_new_tokens: int, device, batch_size: int = 32) -> tuple[float, list[str]]:
    """Fraction of test prompts whose greedy reply equals the reference (surrounding whitespace ignored)."""
    prompts = [prompt_ids(tokenizer, messages, template) for messages, _ in test]
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens, batch_size, device)
    hits = sum(reply.strip() == reference.strip() for reply, (_, reference) in zip(replies, test))
    return hits / max(len(test), 1), replies
