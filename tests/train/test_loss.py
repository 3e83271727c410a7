"""The in-place summed cross-entropy of the training loss against torch's own ``F.cross_entropy``."""

import pytest
import torch
import torch.nn.functional as F

from loraforge.train.loss import summed_cross_entropy


@pytest.mark.parametrize(("tokens", "vocab"), [(1, 7), (37, 300), (0, 5)])
def test_value_and_gradients_equal_torch_cross_entropy(tokens, vocab):
    generator = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, 16, generator=generator, requires_grad=True)
    head = torch.randn(vocab, 16, generator=generator) * 3
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    reference = F.cross_entropy(F.linear(hidden, head), targets, reduction="sum")
    (expected,) = torch.autograd.grad(reference * 0.7, hidden)
    ours = summed_cross_entropy(F.linear(hidden, head), targets)
    (grad,) = torch.autograd.grad(ours * 0.7, hidden)  # a scaled loss, as the trainer divides by the token count
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_large_logits_stay_finite():
    logits = torch.tensor([[1000.0, -1000.0, 0.0], [-5e4, 5e4, 5e4]], requires_grad=True)
    targets = torch.tensor([0, 2])
    reference = F.cross_entropy(logits.detach(), targets, reduction="sum")
    loss = summed_cross_entropy(logits * 1, targets)
    loss.backward()
    torch.testing.assert_close(loss, reference)
    assert torch.isfinite(logits.grad).all()


def test_a_second_backward_through_the_same_graph_fails_loudly():
    """The logits become their own gradient in place, so the graph can't be differentiated twice."""
    hidden = torch.randn(4, 8, requires_grad=True)
    loss = summed_cross_entropy(F.linear(hidden, torch.randn(10, 8)), torch.tensor([1, 2, 3, 4]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
