"""Evaluation helpers of the training loop: loss and perplexity on tokenized samples, greedy replies.
Scores that compare models (exact match, BLEU, multiple choice, ...) live in ``loraforge.eval``."""

from __future__ import annotations

import math
from functools import partial
from collections.abc import Sequence

import torch
from torch import nn

from loraforge.adapters import AdapterError, adapted_layers, merge_adapters, unmerge_adapters
from loraforge.data.collate import collate
from loraforge.data.tokenize import Sample
from loraforge.train.loss import summed_token_loss


@torch.no_grad()
def eval_loss(model: nn.Module, samples: Sequence[Sample], batch_size: int, pad_id: int, device,
              batch_of=None) -> dict:
    """Mean token loss and perplexity. ``batch_of`` turns a list of samples into a batch (a vision-language
    model's needs pixels: ``data.collate.batch_builder``); None pads text samples with ``pad_id``."""
    batch_of = batch_of or partial(collate, pad_id=pad_id)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids))
    for start in range(0, len(order), batch_size):
        batch = batch_of([samples[i] for i in order[start : start + batch_size]])
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
