"""The engine end to end on tiny-llama: mixed-adapter batches, sampling, streaming, preemption, errors."""

import asyncio

import pytest
import torch

from loraforge.models import ModelSourceError
from loraforge.serve import Engine, Request, RequestTooLargeError, SamplingParams, UnknownAdapterError
from loraforge.serve.sampling import sample

from .helpers import greedy, hf_logits, merged_model, step_logits

PROMPTS = ["Hello world", "Paged attention is neat.", "x", "The quick brown fox jumps over the lazy dog"]


@pytest.fixture
def engine(llama, tokenizer, adapter_dirs):
    return Engine(llama, tokenizer, adapters=adapter_dirs, pool_bytes=1 << 23)


def test_mixed_batch_equals_each_request_alone(engine):
    requests = [Request(p, greedy(max_tokens=16 + i), adapter=a)
                for i, (p, a) in enumerate((p, a) for a in (None, "r8", "r16", "r64") for p in PROMPTS[:3])]
    requests = requests[::2] + requests[1::2]  # interleave adapters in arrival order
    together = engine.generate(requests)
    for request, out in zip(requests, together):
        [alone] = engine.generate([request])
        assert out.token_ids == alone.token_ids, request
        assert len(out.token_ids) == request.params.max_tokens and out.finish_reason == "length"
    assert len({tuple(o.token_ids) for o in together if o.prompt_token_ids == together[0].prompt_token_ids}) > 1


def test_logits_equal_merged_weights_reference(engine, adapter_dirs, tokenizer):
    """One step with base + each adapter mixed equals HF forward of W + s·B·A for that adapter."""
    ids = tokenizer.encode("LoRA on many adapters")
    prompts = [(ids, "r64"), (ids, None), (ids[:7], "r8"), (ids, "r16"), (ids[3:], "r8")]
    ours = step_logits(engine, prompts)
    references = {name: merged_model("tiny-llama", path) for name, path in adapter_dirs.items()}
    references[None] = engine.runner.model
    for (prompt, adapter), logits in zip(prompts, ours):
        torch.testing.assert_close(logits, hf_logits(references[adapter], prompt), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours[0], ours[1], atol=1e-2)  # the adapters do change the output


def test_greedy_decode_with_adapter_equals_merged_model_generate(engine, adapter_dirs, tokenizer):
    merged = merged_model("tiny-llama", adapter_dirs["r16"])
    ids = tokenizer("Merged equals unmerged", return_tensors="pt").input_ids
    ref = merged.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=256)
    [out] = engine.generate([Request("Merged equals unmerged", greedy(max_tokens=20), adapter="r16")])
    assert out.token_ids == ref[0, ids.shape[1]:].tolist()


def test_temperature_zero_is_greedy_whatever_else_is_set(engine):
    [plain] = engine.generate([Request("abc", greedy())])
    [zero] = engine.generate([Request("abc", SamplingParams(temperature=0, top_p=0.3, top_k=5, seed=1, max_tokens=12, ignore_eos=True))])
    assert zero.token_ids == plain.token_ids


def test_seeded_sampling_is_reproducible_in_any_batch(engine):
    params = SamplingParams(temperature=1.3, top_k=50, top_p=0.95, seed=1234, max_tokens=15, ignore_eos=True)
    [alone] = engine.generate([Request("sample me", params, adapter="r8")])
    batch = engine.generate([Request("other", greedy()), Request("sample me", params, adapter="r8"),
                             Request("more", SamplingParams(temperature=1.0, seed=5, max_tokens=9))])
    assert batch[1].token_ids == alone.token_ids
    [other_seed] = engine.generate([Request("sample me", SamplingParams(temperature=1.3, seed=99, max_tokens=15, ignore_eos=True), adapter="r8")])
    assert other_seed.token_ids != alone.token_ids


def test_top_k_one_and_tiny_top_p_are_greedy(engine):
    [plain] = engine.generate([Request("abc", greedy())])
    for params in (SamplingParams(temperature=2.0, top_k=1, max_tokens=12, ignore_eos=True),
                   SamplingParams(temperature=0.7, top_p=1e-6, seed=3, max_tokens=12, ignore_eos=True)):
        [out] = engine.generate([Request("abc", params)])
        assert out.token_ids == plain.token_ids


def test_stop_string_truncates_text_and_ends_request(engine):
    [free] = engine.generate([Request("Hello world", greedy(max_tokens=30), adapter="r8")])
    stop = free.text[10:13]
    cut = free.text.index(stop)
    [out] = engine.generate([Request("Hello world", greedy(max_tokens=30, stop=[stop, "never appears"]), adapter="r8")])
    assert out.finish_reason == "stop"
    assert out.text == free.text[:cut]
    assert free.token_ids[: len(out.token_ids)] == out.token_ids and len(out.token_ids) < 30


def test_stop_token_and_eos(llama, tokenizer):
    engine = Engine(llama, tokenizer, pool_bytes=1 << 22)
    [free] = engine.generate([Request("Hello", greedy(max_tokens=10))])
    stop_token = free.token_ids[4]
    first = free.token_ids.index(stop_token)
    [out] = engine.generate([Request("Hello", greedy(max_tokens=10, stop_token_ids=[stop_token]))])
    assert out.token_ids == free.token_ids[: first + 1] and out.finish_reason == "stop"
    engine.eos_ids = {stop_token}  # as if the model's EOS came up: it ends the request unless ignore_eos
    [eos] = engine.generate([Request("Hello", SamplingParams(temperature=0, max_tokens=10))])
    assert eos.token_ids == free.token_ids[: first + 1] and eos.finish_reason == "stop"
    [ignored] = engine.generate([Request("Hello", greedy(max_tokens=10))])
    assert ignored.token_ids == free.token_ids


def test_stream_yields_the_generate_output_piece_by_piece(engine):
    request = Request("Stream me", greedy(max_tokens=14, stop=["zzz"]), adapter="r64")
    [expected] = engine.generate([request])

    async def collect():
        return [delta async for delta in engine.stream(request)]

    try:
        deltas = asyncio.run(collect())
    finally:
        engine.shutdown()
    assert [t for d in deltas for t in d.token_ids] == expected.token_ids
    assert "".join(d.text for d in deltas) == expected.text
    assert [d.finish_reason for d in deltas] == [None] * (len(deltas) - 1) + ["length"]
    assert deltas[-1].num_output_tokens == 14


def test_leaving_a_stream_early_aborts_and_frees(engine):
    async def take_three():
        deltas = []
        async for delta in engine.stream(Request("Long one", greedy(max_tokens=200), adapter="r16")):
            deltas.append(delta)
            if len(deltas) == 3:
                break
        return deltas

    try:
        assert len(asyncio.run(take_three())) == 3
        for _ in range(200):
            if engine.stats().running == 0:
                break
            asyncio.run(asyncio.sleep(0.01))
    finally:
        engine.shutdown()
    stats = engine.stats()
    assert stats.running == stats.waiting == stats.kv_pages == 0


def test_preemption_under_memory_pressure_keeps_outputs(llama, tokenizer):
    """A pool too small for all sequences at once: they wait or are preempted and recomputed, never fail."""
    roomy = Engine(llama, tokenizer, max_rank=16, pool_bytes=1 << 22)
    tight = Engine(llama, tokenizer, max_rank=16, pool_bytes=7 * roomy.pool.page_bytes)
    requests = [Request(p, greedy(max_tokens=40)) for p in ("one two three four five six", "seven eight nine ten 11",
                                                            "twelve thirteen fourteen", "fifteen sixteen seventeen")]
    expected = roomy.generate(requests)
    got = tight.generate(requests)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert tight.stats().preemptions > 0
    assert tight.stats().free_pages == tight.pool.num_pages


def test_requests_that_cannot_fit_are_refused_up_front(engine, llama, tokenizer):
    with pytest.raises(UnknownAdapterError, match="nope"):
        engine.generate([Request("hi", adapter="nope")])
    with pytest.raises(RequestTooLargeError, match="context is 512"):
        engine.generate([Request([5] * 600)])
    with pytest.raises(RequestTooLargeError, match="exceeds the model's context"):
        engine.generate([Request("hi", SamplingParams(max_tokens=511))])
    small = Engine(llama, tokenizer, max_rank=16, pool_bytes=3 * engine.pool.page_bytes // 4)
    with pytest.raises(RequestTooLargeError, match="larger pool_bytes"):
        small.generate([Request("hi", SamplingParams(max_tokens=100))])
    [capped] = small.generate([Request("hi", SamplingParams(temperature=0, ignore_eos=True))])
    assert capped.finish_reason == "length" and len(capped.token_ids) + 2 == small.pool.num_pages * small.block_size + 1
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1, top_p=0)
    with pytest.raises(ValueError, match="empty"):
        engine.generate([Request("")])


def test_stale_nan_bytes_in_the_pool_never_reach_attention(llama, tokenizer):
    """Decode attention reads whole KV blocks and masks the tail; a recycled page full of NaN must not
    leak through (0 * NaN = NaN), whatever the pool held before."""
    requests = [Request(f"stale {i}", SamplingParams(temperature=0, max_tokens=6)) for i in range(3)]
    clean = Engine(llama, tokenizer, pool_bytes=1 << 22).generate(requests)
    dirty = Engine(llama, tokenizer, pool_bytes=1 << 22)
    dirty.pool.storage.fill_(float("nan"))
    assert [o.token_ids for o in dirty.generate(requests)] == [o.token_ids for o in clean]


def test_extreme_temperature_and_top_p_sample_the_most_likely_token():
    """Found by fuzzing the API: top_p=5e-324 rounds to 0 in float32 and dropped every token; a tiny
    temperature overflowed the logits to inf. Both are as good as greedy."""
    logits = torch.randn(3, 259, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=1e-300), SamplingParams(top_p=5e-324),
              SamplingParams(temperature=1e-30, top_k=3, top_p=1e-9)]
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    assert sample(logits, params, generators) == logits.argmax(dim=-1).tolist()


def test_output_is_detokenized_outside_the_engine_lock(llama, tokenizer):
    """Stats, adapter management and new requests never wait for decoding text."""
    engine = Engine(llama, tokenizer, pool_bytes=1 << 22)
    locked = []

    class Spy:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def decode(self, ids, **kw):
            locked.append(engine._lock._is_owned())
            return tokenizer.decode(ids, **kw)

    engine.tokenizer = Spy()
    [out] = engine.generate([Request([104, 105], greedy(max_tokens=8, stop=["never"]))])
    assert len(out.token_ids) == 8 and locked and not any(locked)


def test_the_engine_puts_the_model_where_it_is_told(llama, tokenizer):
    engine = Engine(llama, tokenizer, device="cpu", pool_bytes=1 << 22)
    assert engine.runner.device.type == engine.pool.storage.device.type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ModelSourceError, match="0 CUDA device"):
            Engine(llama, tokenizer, device="cuda", pool_bytes=1 << 22)


def test_stale_nan_bytes_in_the_pool_never_reach_an_answer(llama, tokenizer, adapter_dirs):
    """Pages hold whatever memory the OS or the heap gave them (``torch.empty``) until written: an adapter
    page's unused tail, or a page no one has used yet. Decode attention reads whole blocks of every
    sequence's table (a shorter table is padded with page 0) and masks the slots past its length, but a
    masked weight of 0 times a NaN is NaN. Filled with NaN first, the pool must answer as a clean one."""
    requests = [Request(p, greedy(max_tokens=24), adapter=a)
                for p, a in (("x", "r8"), (PROMPTS[3], None), (PROMPTS[1], "r16"))]
    clean = Engine(llama, tokenizer, adapters=adapter_dirs, pool_bytes=1 << 23).generate(requests)
    dirty = Engine(llama, tokenizer, adapters=adapter_dirs, pool_bytes=1 << 23)
    dirty.pool.storage.fill_(float("nan"))
    assert [o.token_ids for o in dirty.generate(requests)] == [o.token_ids for o in clean]
