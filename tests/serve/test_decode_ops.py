"""The native decode ops (``native/decode_ops.cpp``) against the torch computations they replace: transformers'
LlamaRMSNorm, rotate-half RoPE, the paged KV cache's own indexing and torch's SDPA over gathered keys."""

import pytest
import torch
import torch.nn.functional as F
from native_threads import worker_share
from references import require_built
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from loraforge.native import DECODE_OPS
from loraforge.serve.paged_kv import PagedKVCache

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def ops():
    return require_built(DECODE_OPS)


def pool(dtype, pages=13, layers=3, block_size=16, kv_heads=2, head_dim=32, seed=0):
    """A random (pages, layers, 2, block_size, kv_heads, head_dim) KV pool."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(pages, layers, 2, block_size, kv_heads, head_dim, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_is_llamas_after_the_residual_add(ops, dtype, residual):
    g = torch.Generator().manual_seed(1)
    norm = LlamaRMSNorm(96, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96, generator=g))
    h, delta = torch.randn(7, 96, generator=g).to(dtype), torch.randn(7, 96, generator=g).to(dtype)
    out = ops.rms_norm(h, delta if residual else None, norm.weight, norm.variance_epsilon)
    summed = h + delta if residual else h
    if residual:
        assert torch.equal(out[0], summed)  # the add rounds as torch's does
    # the sum of squares runs in another order: ~1e-7 relative in float32, at most one unit in the last place in bf16
    rtol = 2e-6 if dtype == torch.float32 else 2.0 ** -8
    torch.testing.assert_close(out[-1], norm(summed), atol=0, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_rotates_rows_of_a_strided_view_in_place_as_rotate_half(ops, dtype):
    g = torch.Generator().manual_seed(2)
    fused = torch.randn(5, 3 * 64, generator=g).to(dtype)  # q, k side by side, as a fused projection's output holds them
    q = fused[:, :128].view(5, 4, 32)
    cos, sin = torch.randn(5, 32, generator=g).to(dtype), torch.randn(5, 32, generator=g).to(dtype)
    rotated_half = torch.cat((-q[..., 16:], q[..., :16]), dim=-1)
    expected = q * cos[:, None] + rotated_half * sin[:, None]
    untouched = fused[:, 128:].clone()
    ops.rope_(q, cos, torch.cat((-sin[:, :16], sin[:, 16:]), dim=-1))
    assert torch.equal(q, expected) and torch.equal(fused[:, 128:], untouched)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_write_stores_each_token_where_the_cache_indexes_it(ops, dtype):
    blocks = pool(dtype)
    expected = blocks.clone()
    k, v = pool(dtype, pages=4, layers=1, block_size=1, seed=3)[:, 0, :, 0].unbind(1)
    pages, offsets = torch.tensor([12, 0, 5, 5]), torch.tensor([15, 0, 3, 4])
    expected[:, 1, 0][pages, offsets] = k
    expected[:, 1, 1][pages, offsets] = v
    ops.kv_write(blocks, 1, k, v, pages, offsets)
    assert torch.equal(blocks, expected)
    with pytest.raises(RuntimeError, match="slot out of the pool"):
        ops.kv_write(blocks, 1, k, v, torch.tensor([13, 0, 0, 0]), offsets)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [0, 5, 40])
@pytest.mark.parametrize("head_dim", [32, 24])
def test_paged_decode_attention_is_sdpa_over_each_sequences_own_keys(ops, dtype, window, head_dim):
    """Three sequences of different lengths over scattered pages, 6 query heads on 2 KV heads (head_dim 32 takes the
    vector path, 24 the portable one)."""
    block_size = 16
    blocks = pool(dtype, block_size=block_size, head_dim=head_dim)
    tables = torch.tensor([[4, 9, 2, 0], [7, 0, 0, 0], [1, 3, 11, 12]])
    lens = torch.tensor([33, 1, 64])
    q = torch.randn(3, 6, head_dim, generator=torch.Generator().manual_seed(4)).to(dtype)
    out = ops.paged_decode_attention(q, blocks, 2, tables, lens, window)
    cache = PagedKVCache.__new__(PagedKVCache)
    cache.blocks, cache.block_size = blocks, block_size
    keys, values = cache.gather(2, tables)  # (seqs, kv_heads, 64, hd)
    for s, n in enumerate(lens.tolist()):
        first = max(0, n - window) if window else 0
        expected = F.scaled_dot_product_attention(q[s, :, None].float()[None], keys[s:s + 1, :, first:n].float(),
                                                  values[s:s + 1, :, first:n].float(), enable_gqa=True)[0, :, 0]
        tolerance = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 8e-3, "rtol": 8e-3}
        torch.testing.assert_close(out[s].float(), expected, **tolerance)


def rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' Llama RoPE of ``x`` ``(T, heads, hd)`` by per-token ``cos``/``sin`` ``(T, hd)``."""
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin[:, None]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [32, 24])
@pytest.mark.parametrize("window", [0, 5])
def test_decode_attention_step_is_rope_then_the_cache_write_then_sdpa(ops, dtype, head_dim, window):
    """One new token for each of three sequences, from a fused q/k/v projection's output (6 query heads on 2 KV
    heads; head_dim 32 takes the vector path, 24 the portable one)."""
    block_size, heads, layer = 16, 6, 2
    blocks = pool(dtype, block_size=block_size, head_dim=head_dim)
    g = torch.Generator().manual_seed(6)
    fused = torch.randn(3, (heads + 4) * head_dim, generator=g).to(dtype)
    q, k, v = fused.split([heads * head_dim, 2 * head_dim, 2 * head_dim], dim=1)
    cos, sin = torch.randn(3, head_dim, generator=g).to(dtype), torch.randn(3, head_dim, generator=g).to(dtype)
    tables = torch.tensor([[4, 9, 2, 0], [7, 0, 0, 0], [1, 3, 11, 12]])
    lens = torch.tensor([33, 1, 64])  # each sequence's new token is its last position
    pages, offsets = tables[torch.arange(3), (lens - 1) // block_size], (lens - 1) % block_size

    q_rot = rotate_half_rope(q.view(3, heads, head_dim), cos, sin)
    k_rot = rotate_half_rope(k.view(3, 2, head_dim), cos, sin)
    expected_blocks = blocks.clone()
    expected_blocks[:, layer, 0][pages, offsets] = k_rot
    expected_blocks[:, layer, 1][pages, offsets] = v.view(3, 2, head_dim)
    cache = PagedKVCache.__new__(PagedKVCache)
    cache.blocks, cache.block_size = expected_blocks, block_size
    keys, values = cache.gather(layer, tables)

    half = head_dim // 2
    out = ops.decode_attention_step(q, k, v, cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1), blocks, layer,
                                    pages, offsets, tables, lens, window)
    assert torch.equal(blocks, expected_blocks)
    assert out.shape == (3, heads * head_dim)
    tolerance = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 8e-3, "rtol": 8e-3}
    for s, n in enumerate(lens.tolist()):
        first = max(0, n - window) if window else 0
        expected = F.scaled_dot_product_attention(q_rot[s, :, None].float()[None], keys[s:s + 1, :, first:n].float(),
                                                  values[s:s + 1, :, first:n].float(), enable_gqa=True)[0, :, 0]
        torch.testing.assert_close(out[s].view(heads, head_dim).float(), expected, **tolerance)


def test_bad_layouts_are_refused_with_what_is_expected(ops):
    blocks = pool(torch.float32)
    q = torch.randn(1, 4, 32)
    with pytest.raises(RuntimeError, match="blocks must be the contiguous"):
        ops.paged_decode_attention(q, blocks.to(torch.bfloat16), 0, torch.zeros(1, 1, dtype=torch.long), torch.tensor([1]), 0)
    with pytest.raises(RuntimeError, match="tables must be contiguous int64"):
        ops.paged_decode_attention(q, blocks, 0, torch.zeros(1, 1, dtype=torch.int32), torch.tensor([1]), 0)
    with pytest.raises(RuntimeError, match="weight must be contiguous, of x's dtype"):
        ops.rms_norm(torch.randn(2, 8), None, torch.ones(8, dtype=torch.bfloat16), 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_is_the_llama_mlps_activation_of_strided_halves(ops, dtype):
    g = torch.Generator().manual_seed(5)
    fused = (4 * torch.randn(6, 2 * 80, generator=g)).to(dtype)  # gate and up side by side, as fused gate/up gives them
    gate, up = fused[:, :80], fused[:, 80:]
    # float32: exp in another library (1 unit in the last place); bf16: the same within one unit
    rtol = 2e-6 if dtype == torch.float32 else 2.0 ** -8
    torch.testing.assert_close(ops.silu_mul(gate, up), F.silu(gate) * up, atol=1e-30, rtol=rtol)


def test_rows_are_split_over_torchs_threads(ops):
    """The ops' at::parallel_for splits their rows over torch's threads (a batched decode step's tokens)."""
    gate, up = torch.randn(4096, 1024), torch.randn(4096, 1024)
    assert worker_share(lambda: ops.silu_mul(gate, up)) > 0.25
