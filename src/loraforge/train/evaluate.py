"""Evaluation helpers of the training loop: loss and perplexity on tokenized samples, greedy replies.
Scores that compare models (exact match, BLEU, multiple choice, ...) live in ``loraforge.eval``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from loraforge.adapters import AdapterError, adapted_layers, merge_adapters, unmerge_adapters
from loraforge.data.collate import collate
from loraforge.data.tokenize import Sample
from loraforge.train.loss import summed_token_loss


@torch.no_grad()
def eval_loss(model: nn.Module, samples: Sequence[Sample], batch_size: int, pad_id: int, device,
              batch_of=None, loss_of=None, world=None) -> dict:
    """Mean token loss and perplexity. ``batch_of`` turns a list of samples into a batch (a vision-language
    model's needs pixels: ``data.collate.batch_builder``); None pads text samples with ``pad_id``.

    ``loss_of``: ``batch -> (summed loss, count)``, how the model runs (``train.distributed.World.wrap``'s
    module); None: ``summed_token_loss`` on ``model``. ``world`` (``train.distributed.World``): every rank
    calls this, evaluates every ``world.size``-th batch, and gets the sums over all ranks; ranks short of
    a batch run the first one again at weight 0, as FSDP needs every rank in every forward.
    """
    batch_of = batch_of or partial(collate, pad_id=pad_id)
    loss_of = loss_of or partial(summed_token_loss, model)
    rank, size = (world.rank, world.size) if world is not None else (0, 1)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids))
    chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    mine = chunks[rank::size]
    for k in range(math.ceil(len(chunks) / size)):
        chunk, weight = (mine[k], 1) if k < len(mine) else (chunks[0], 0)
        batch = batch_of([samples[i] for i in chunk])
        loss, n = loss_of({key: v.to(device) for key, v in batch.items()})
        total, count = total + weight * loss.item(), count + weight * n
    model.train(was_training)
    if world is not None:
        total, count = world.sum(total, count)
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
