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
    logits = model.get_output_embeddings()(hidden[:, :-1][picked])  # (N, V), a tensor of its own
    loss = summed_cross_entropy(logits.float(), targets[picked])
    return loss, int(picked.sum())


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy(logits, targets, reduction="sum")`` for fp32 ``logits`` ``(N, V)`` that nothing else
    holds, computed in their own memory: see ``_SummedCrossEntropy``. ``targets`` ``(N,)`` are all valid classes."""
    return _SummedCrossEntropy.apply(logits, targets)


class _SummedCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy with no ``(N, V)`` tensor besides the logits.

    ``F.cross_entropy`` makes three more, each as large as the logits (the log-softmax, the NLL's gradient and
    the log-softmax's gradient: 200 MB each for a batch of 1024 tokens over a 49k vocabulary); on CPU each is a
    fresh mapping whose pages fault in on first write, every step. Here the forward turns the logits into
    ``exp(logits − max)`` in place and keeps them; the backward turns that into the gradient
    ``g · (softmax − onehot)`` in place and hands it on. The logits' producer (the output head, a matmul)
    doesn't keep its output, so writing into it is safe; a second backward through the same graph fails
    loudly (the saved tensor has changed), as it must.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        work = logits.detach()
        work.sub_(work.amax(dim=-1, keepdim=True))  # shifted: every row's max is 0
        picked = work.gather(1, targets[:, None])
        sums = work.exp_().sum(dim=-1, keepdim=True)
        ctx.save_for_backward(work, sums, targets)
        return (sums.log() - picked).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None]:
        work, sums, targets = ctx.saved_tensors
        grad = work.mul_(grad_loss / sums)  # g · softmax
        grad.scatter_add_(1, targets[:, None], (-grad_loss).expand(len(targets), 1))
        return grad, None
