"""The heterogeneous batched LoRA op against a padded einsum reference."""

import pytest
import torch

from loraforge.serve.lora_ops import Segments, add_lora


def einsum_reference(x, slots, weights):
    """Pad every adapter to the largest rank and gather per token: what add_lora must equal, without padding."""
    r_max = max(a.shape[0] for a, _ in (w for w in weights if w is not None))
    n_out = next(b.shape[0] for _, b in (w for w in weights if w is not None))
    a_pad = torch.zeros(len(weights) + 1, r_max, x.shape[1], dtype=x.dtype)
    b_pad = torch.zeros(len(weights) + 1, n_out, r_max, dtype=x.dtype)
    for s, w in enumerate(weights):
        if w is not None:
            a, b = w
            a_pad[s, : a.shape[0]] = a
            b_pad[s, :, : a.shape[0]] = b
    index = torch.where(slots < 0, len(weights), slots)  # the last padded slot is all zeros: "no adapter"
    u = torch.einsum("tri,ti->tr", a_pad[index], x)
    return torch.einsum("tor,tr->to", b_pad[index], u)


def make_weights(ranks, n_in, n_out, seed=0):
    """Per slot ``(A (r, in), B (out, r))``, or None for a slot that doesn't adapt the module."""
    g = torch.Generator().manual_seed(seed)
    return [None if r is None else (torch.randn(r, n_in, generator=g), torch.randn(n_out, r, generator=g)) for r in ranks]


def pairs(weights):
    """The op's weight views: ``(A.T, B.T, no row scale)``."""
    return [None if w is None else (w[0].T, w[1].T, None) for w in weights]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unsorted_token_map_with_no_adapter_matches_einsum(seed):
    g = torch.Generator().manual_seed(seed)
    ranks = [8, 1, None, 64, 16]  # slot 2 doesn't adapt this module
    weights = make_weights(ranks, 24, 20, seed)
    slots = torch.randint(-1, len(ranks), (57,), generator=g)
    assert (slots == -1).any() and not bool((slots[1:] >= slots[:-1]).all())
    x = torch.randn(57, 24, generator=g)
    y0 = torch.randn(57, 20, generator=g)
    y = add_lora(y0.clone(), x, Segments.from_token_slots(slots), pairs(weights))
    torch.testing.assert_close(y, y0 + einsum_reference(x, slots, weights), atol=1e-4, rtol=1e-4)


def test_grouped_layout_needs_no_permutation_and_matches():
    slots = torch.tensor([-1, -1, 3, 3, 3, 0, 1, 1, -1, 2])
    segments = Segments.from_token_slots(slots)
    assert segments.order is None
    assert segments.runs == ((2, 5, 3), (5, 6, 0), (6, 8, 1), (9, 10, 2))
    assert segments == Segments.from_runs(segments.runs, 10)
    weights = make_weights([4, 2, 7, 3], 6, 5)
    x, y0 = torch.randn(10, 6), torch.randn(10, 5)
    y = add_lora(y0.clone(), x, segments, pairs(weights))
    torch.testing.assert_close(y, y0 + einsum_reference(x, slots, weights), atol=1e-5, rtol=1e-5)
    assert torch.equal(y[[0, 1, 8]], y0[[0, 1, 8]])


def test_all_tokens_without_adapter_leave_output_unchanged():
    y0 = torch.randn(4, 3)
    y = add_lora(y0.clone(), torch.randn(4, 2), Segments.from_token_slots(torch.full((4,), -1)), pairs(make_weights([2], 2, 3)))
    assert torch.equal(y, y0)


@pytest.mark.parametrize("slots", [[0, 0, 1, 1, -1, 2], [1, 0, -1, 2, 0, 1]], ids=["runs", "unsorted"])
def test_a_row_scale_rescales_the_unbiased_base_output(slots):
    """DoRA's form: a slot with a row scale m gets ``b + m ⊙ (y − b) + B A x``; the others plain LoRA."""
    g = torch.Generator().manual_seed(4)
    weights = make_weights([2, 3, 4], 6, 5)
    scales = [torch.rand(5, generator=g) + 0.5, None, torch.rand(5, generator=g) + 0.5]
    bias = torch.randn(5, generator=g)
    x, y0 = torch.randn(6, 6, generator=g), torch.randn(6, 5, generator=g)
    views = [(a.T, b.T, m) for (a, b), m in zip(weights, scales)]
    y = add_lora(y0.clone(), x, Segments.from_token_slots(torch.tensor(slots)), views, bias)
    for t, slot in enumerate(slots):
        expected = y0[t].clone()
        if slot >= 0:
            a, b = weights[slot]
            if scales[slot] is not None:
                expected = bias + scales[slot] * (y0[t] - bias)
            expected = expected + b @ (a @ x[t])
        assert torch.allclose(y[t], expected, atol=1e-5), t


def test_bf16_one_token_runs_skip_onednn_match_and_restore_it(monkeypatch):
    """On CPU, bf16 runs of one token go through torch's own matmul (oneDNN off for them only), equal to the
    reference at bf16 precision, and oneDNN's switch is back as it was afterwards."""
    from loraforge.serve import lora_ops

    switched = []
    real = lora_ops._set_onednn
    monkeypatch.setattr(lora_ops, "_set_onednn", lambda enabled: (switched.append(enabled), real(enabled)))
    weights = [(a.bfloat16(), b.bfloat16()) for a, b in make_weights([8, 16, 4], 32, 24, seed=5)]
    slots = torch.tensor([0, 1, 2, 2, 2, -1, 1])  # one-token runs of slots 0 and 1 (twice), a three-token run of 2
    g = torch.Generator().manual_seed(5)
    x, y0 = torch.randn(7, 32, generator=g).bfloat16(), torch.randn(7, 24, generator=g).bfloat16()
    before = torch._C._get_mkldnn_enabled()
    y = add_lora(y0.clone(), x, Segments.from_token_slots(slots), pairs(weights))
    assert switched == [False, before]
    assert torch._C._get_mkldnn_enabled() == before
    expected = y0.float() + einsum_reference(x.float(), slots, [(a.float(), b.float()) for a, b in weights])
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-1)
    switched.clear()
    add_lora(y0.float(), x.float(), Segments.from_token_slots(slots), pairs([(a.float(), b.float()) for a, b in weights]))
    assert switched == []  # fp32 keeps oneDNN everywhere
