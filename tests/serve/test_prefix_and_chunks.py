"""Prefix caching and chunked prefill change how much is computed, never what comes out."""

import torch

from loraforge.adapters.peft_format import read_adapter_dir
from loraforge.serve import Engine, Request
from loraforge.serve.memory_pool import PagePool

from .helpers import greedy

SYSTEM = torch.randint(0, 256, (53,), generator=torch.Generator().manual_seed(7)).tolist()
"""A shared "system prompt": three full blocks of 16 tokens and a partial one."""


def ids(seed: int, n: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def engine_with(llama, adapter_dirs, **settings) -> Engine:
    engine = Engine(llama, max_rank=16, block_size=16, pool_bytes=1 << 23, **settings)
    for name in ("r8", "r16"):
        engine.register_adapter(name, adapter_dirs[name])
    return engine


def test_prefix_cached_answers_equal_uncached_ones_across_adapters(llama, adapter_dirs):
    requests = [Request(SYSTEM + ids(i, 5 + i), greedy(max_tokens=10), adapter=adapter)
                for i, adapter in enumerate(["r8", "r16", None, "r8", "r16", None])]
    cached, uncached = engine_with(llama, adapter_dirs), engine_with(llama, adapter_dirs, prefix_caching=False)
    expected = [out.token_ids for out in uncached.generate(requests)]
    assert uncached.stats().prefix_hit_blocks == 0
    first = cached.generate(requests[:3])  # one request per adapter fills the cache for it...
    assert [out.token_ids for out in first] == expected[:3]
    assert cached.stats().prefix_hit_blocks == 0  # ...whose keys differ per adapter, so nothing is shared yet
    again = cached.generate(requests[3:])
    assert [out.token_ids for out in again] == expected[3:]
    assert cached.stats().prefix_hit_blocks == 3 * 3  # three full system-prompt blocks, once per adapter
    stats = cached.stats()
    assert stats.kv_pages == 0 and stats.free_pages == stats.pool_pages - stats.adapter_pages and stats.prefix_cached_pages > 0


def test_requests_running_together_share_prefix_pages(llama, adapter_dirs):
    engine = engine_with(llama, adapter_dirs)
    engine.generate([Request(SYSTEM + [1], greedy(max_tokens=2), adapter="r8")])
    handles = [engine.submit(Request(SYSTEM + ids(i, 4), greedy(max_tokens=6), adapter="r8")) for i in range(4)]
    engine.step()
    # four sequences of 57 tokens (4 blocks each) hold 3 shared blocks and 1 own block apiece
    assert engine.stats().kv_pages == 3 + 4
    while not all(h.done for h in handles):
        engine.step()
    assert engine.stats().kv_pages == 0


def test_a_re_registered_adapter_name_never_reads_the_old_weights_kv(llama, adapter_dirs):
    prompt = Request(SYSTEM + [9, 9], greedy(max_tokens=10), adapter="x")
    reference = Engine(llama, max_rank=16, block_size=16, pool_bytes=1 << 23, prefix_caching=False)
    reference.register_adapter("x", adapter_dirs["r16"])
    [expected] = reference.generate([prompt])
    engine = Engine(llama, max_rank=16, block_size=16, pool_bytes=1 << 23)
    engine.register_adapter("x", adapter_dirs["r8"])
    [old] = engine.generate([prompt])
    engine.unregister_adapter("x")
    engine.register_adapter("x", adapter_dirs["r16"])  # same name, new weights
    [new] = engine.generate([prompt])
    assert engine.stats().prefix_hit_blocks == 0 and new.token_ids == expected.token_ids != old.token_ids
    config, tensors = read_adapter_dir(adapter_dirs["r16"])
    engine.register_adapter_weights("same weights, other name", config, tensors)
    [shared] = engine.generate([Request(prompt.prompt, prompt.params, adapter="same weights, other name")])
    assert engine.stats().prefix_hit_blocks == 3 and shared.token_ids == expected.token_ids


def test_cached_blocks_give_way_to_new_requests_in_a_small_pool(llama, tokenizer):
    """Idle cached pages count as free: a pool full of them still admits everything, and evicts them."""
    probe = Engine(llama, max_rank=16, block_size=16, pool_bytes=1 << 22)
    engine = Engine(llama, max_rank=16, block_size=16, pool_bytes=8 * probe.pool.page_bytes)
    requests = [Request(ids(i, 40), greedy(max_tokens=8)) for i in range(12)]
    expected = [out.token_ids for out in probe.generate(requests)]
    assert [out.token_ids for out in engine.generate(requests)] == expected
    stats = engine.stats()
    assert stats.free_pages == stats.pool_pages and 0 < stats.prefix_cached_pages <= stats.pool_pages


def test_idle_pages_are_handed_out_last_and_their_owner_hears_of_it():
    pool = PagePool(4, 8, torch.float32)
    reused = []
    pool.on_reuse = reused.append
    a, b = pool.allocate(2, "kv")
    pool.release([a], "kv", keep=True)
    pool.release([b], "kv")
    assert pool.num_free == 4 and pool.num_idle == 1 and pool.used("kv") == 0
    others = pool.allocate(3, "kv")
    assert a not in others and reused == []  # the pages that hold nothing go first
    pool.release(others, "kv")
    assert pool.allocate(4, "adapter")[-1] == a and reused == [a] and pool.num_idle == 0


def test_chunked_prefill_equals_unchunked_and_keeps_to_the_budget(llama, adapter_dirs):
    """Prompts 5 to 90 tokens long, prefilled in chunks of at most 8 tokens between other requests' decodes."""
    requests = [Request(ids(i, n), greedy(max_tokens=12), adapter=adapter)
                for i, (n, adapter) in enumerate([(90, "r8"), (5, None), (47, "r16"), (33, "r8"), (61, None)])]
    whole = engine_with(llama, adapter_dirs, prefix_caching=False)
    chunked = engine_with(llama, adapter_dirs, prefix_caching=False, max_batch_tokens=8)
    step_tokens = []
    forward = chunked.runner.forward

    def recording_forward(batch, kv):
        step_tokens.append((len(batch.input_ids), len(batch.extends), batch.decode_rows.numel()))
        return forward(batch, kv)

    chunked.runner.forward = recording_forward
    expected = [out.token_ids for out in whole.generate(requests)]
    assert [out.token_ids for out in chunked.generate(requests)] == expected
    assert max(tokens for tokens, _, _ in step_tokens) <= 8
    assert any(extends and decodes for _, extends, decodes in step_tokens)  # chunks ran beside decodes


def test_chunks_and_cache_hits_together(llama, adapter_dirs):
    requests = [Request(SYSTEM + ids(i, 30), greedy(max_tokens=8), adapter=adapter) for i, adapter in enumerate(["r16", "r16", None])]
    expected = [out.token_ids for out in engine_with(llama, adapter_dirs, prefix_caching=False).generate(requests)]
    engine = engine_with(llama, adapter_dirs, max_batch_tokens=12)
    assert [out.token_ids for out in engine.generate(requests[:1]) + engine.generate(requests[1:])] == expected
    assert engine.stats().prefix_hit_blocks == 3  # the second r16 request shares the system prompt's 3 full blocks


def test_requests_arriving_together_compute_their_shared_prefix_once(llama, adapter_dirs):
    requests = [Request(SYSTEM + ids(i, 6), greedy(max_tokens=5), adapter="r16") for i in range(4)]
    expected = [out.token_ids for out in engine_with(llama, adapter_dirs, prefix_caching=False).generate(requests)]
    engine = engine_with(llama, adapter_dirs)
    assert [out.token_ids for out in engine.generate(requests)] == expected
    assert engine.stats().prefix_hit_blocks == 3 * 3  # the first computes the 3 shared blocks, the others wait a step


def test_chunked_prefills_preempted_for_memory_keep_their_outputs(llama, adapter_dirs):
    """A pool too small for all at once, small chunks and a warm prefix cache: sequences are preempted
    (mid-prefill or decoding), recomputed, and still answer as an engine with room for everything."""
    requests = [Request(SYSTEM + ids(i, 20 + 7 * i), greedy(max_tokens=30), adapter=("r8", None)[i % 2]) for i in range(4)]
    expected = [out.token_ids for out in engine_with(llama, adapter_dirs, prefix_caching=False).generate(requests)]
    roomy = engine_with(llama, adapter_dirs)
    tight = Engine(llama, max_rank=16, block_size=16, max_batch_tokens=24,
                   pool_bytes=(12 + roomy.store.get("r8").num_pages) * roomy.pool.page_bytes)
    tight.register_adapter("r8", adapter_dirs["r8"])
    assert [out.token_ids for out in tight.generate(requests)] == expected
    stats = tight.stats()
    assert stats.preemptions > 0 and stats.kv_pages == 0
