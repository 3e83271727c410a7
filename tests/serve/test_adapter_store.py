"""Adapter registration checks, residency in the shared pool (LRU, pinning), unregistering under load."""

import gc
import threading
import weakref

import pytest
import torch
from peft import IA3Config, get_peft_model

from loraforge.adapters.peft_format import AdapterFormatError, read_adapter_dir
from loraforge.models import tiny_model
from loraforge.serve import Engine, Request
from loraforge.serve.adapter_store import AdapterStore
from loraforge.serve.memory_pool import PagePool

from .helpers import greedy, save_peft_adapter


def test_registration_rejects_what_the_engine_cannot_serve(llama, tokenizer, adapter_dirs, tmp_path):
    engine = Engine(llama, tokenizer, max_rank=32, pool_bytes=1 << 22)
    with pytest.raises(AdapterFormatError, match="rank 64, above the engine's max_rank=32"):
        engine.register_adapter("big", adapter_dirs["r64"])
    torch.manual_seed(0)
    get_peft_model(tiny_model("tiny-llama"), IA3Config(target_modules=["k_proj"], feedforward_modules=[])).save_pretrained(tmp_path / "ia3")
    with pytest.raises(AdapterFormatError, match=r"peft_type 'IA3' is not supported; loraforge loads \['ADALORA', "
                                                 r"'LORA', 'VERA'\]"):
        engine.register_adapter("ia3", tmp_path / "ia3")
    other = save_peft_adapter(tmp_path / "other", r=4, target_modules=["q_proj"])
    config, tensors = read_adapter_dir(other)
    head = dict(tensors, **{"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64),
                            "base_model.model.lm_head.lora_B.weight": torch.zeros(259, 4)})
    with pytest.raises(AdapterFormatError, match="lm_head.lora_A.weight names no linear module of this model"):
        engine.register_adapter_weights("head", config, head)
    key = next(k for k in tensors if "layers.1" in k and "lora_A" in k)
    tensors[key] = torch.zeros(4, 32)
    with pytest.raises(AdapterFormatError, match=r"lora_A.weight has shape \(4, 32\), but this model's adapter needs \(4, 64\)"):
        engine.register_adapter_weights("other", config, tensors)
    with pytest.raises(AdapterFormatError, match="adapter_config.json is missing"):
        engine.register_adapter("missing", tmp_path)
    engine.register_adapter("ok", adapter_dirs["r8"])
    with pytest.raises(ValueError, match="already registered"):
        engine.register_adapter("ok", adapter_dirs["r16"])
    assert engine.adapter_names == ["ok"]


def test_thousand_adapters_in_a_pool_that_fits_eight(llama, tokenizer, adapter_dirs):
    """1000 registered; resident count never exceeds 8; least recently used goes first; pinned stays."""
    config, tensors = read_adapter_dir(adapter_dirs["r8"])
    probe = Engine(llama, tokenizer, max_rank=16)
    probe.register_adapter_weights("probe", config, tensors)
    adapter_pages = probe.store.get("probe").num_pages
    kv_pages = 1  # one short request at a time
    engine = Engine(llama, tokenizer, max_rank=16, pool_bytes=(8 * adapter_pages + kv_pages) * probe.pool.page_bytes)
    for i in range(1000):
        engine.register_adapter_weights(f"a{i}", config, tensors)
    engine.pin_adapter("a999")
    most_resident = 0

    def check(_delta):
        nonlocal most_resident
        most_resident = max(most_resident, engine.stats().resident_adapters)

    def run(name):
        handle = engine.submit(Request("hi", greedy(max_tokens=3), adapter=name), sink=check)
        while not handle.done:
            engine.step()

    for i in range(7):
        run(f"a{i}")
    assert engine.store.resident == ["a999"] + [f"a{i}" for i in range(7)]
    run("a0")  # a0 becomes the most recent
    run("a7")  # evicts a1, the least recently used unpinned adapter
    assert engine.store.resident == ["a999", "a2", "a3", "a4", "a5", "a6", "a0", "a7"]
    for i in range(100, 140):
        run(f"a{i}")
    assert most_resident == 8
    assert "a999" in engine.store.resident and len(engine.store.resident) == 8
    stats = engine.stats()
    assert stats.registered_adapters == 1000 and stats.adapter_pages == 8 * adapter_pages


def test_more_adapters_in_flight_than_fit_all_finish_correctly(llama, tokenizer, adapter_dirs):
    """20 requests over 12 adapters with room for 3: requests wait for a slot, none fails, outputs are right."""
    weights = [read_adapter_dir(adapter_dirs[name]) for name in ("r8", "r16", "r64")]
    roomy = Engine(llama, tokenizer, max_rank=64, pool_bytes=1 << 24)
    pages = max(roomy.store.register(f"w{i}", c, t).num_pages for i, (c, t) in enumerate(weights))
    tight = Engine(llama, tokenizer, max_rank=64, pool_bytes=(3 * pages + 4) * roomy.pool.page_bytes)
    for engine in (roomy, tight):
        for i in range(12):
            engine.register_adapter_weights(f"a{i}", *weights[i % 3])
    requests = [Request(f"prompt {i}", greedy(max_tokens=5 + i % 4), adapter=f"a{(i * 7) % 12}") for i in range(20)]
    expected = roomy.generate(requests)
    got = tight.generate(requests)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert all(o.finish_reason == "length" for o in got)
    assert tight.stats().kv_pages == 0


def test_unregister_under_load_leaves_other_streams_intact_and_frees_memory(llama, tokenizer, adapter_dirs):
    engine = Engine(llama, tokenizer, adapters=adapter_dirs, pool_bytes=1 << 23)
    requests = [Request(f"stream {i}", greedy(max_tokens=40), adapter=name)
                for i, name in enumerate(["r8", "r16", None, "r64", "r16", "r8", None, "r16"])]
    expected = [engine.generate([r])[0] for r in requests]
    r16 = weakref.ref(engine.store.get("r16"))
    r16_pages = engine.store.get("r16").num_pages
    started = threading.Event()
    engine.start()
    try:
        handles = [engine.submit(r, sink=lambda d: started.set() if d.num_output_tokens >= 3 else None) for r in requests]
        assert started.wait(30)
        before = engine.stats()
        assert engine.unregister_adapter("r16") == 3
        after = engine.stats()
        results = [h.wait(60) for h in handles]
    finally:
        engine.shutdown()
    assert after.adapter_pages == before.adapter_pages - r16_pages
    for request, got, want in zip(requests, results, expected):
        if request.adapter == "r16":
            assert got.finish_reason == "abort" and "unregistered" in got.error
            assert got.token_ids == want.token_ids[: len(got.token_ids)]
        else:
            assert got.token_ids == want.token_ids and got.finish_reason == "length"
    assert "r16" not in engine.adapter_names
    gc.collect()
    assert r16() is None  # the host copy is gone too
    stats = engine.stats()
    assert stats.kv_pages == 0 and stats.free_pages == stats.pool_pages - stats.adapter_pages


@pytest.mark.parametrize("max_bypass", [2, 1000])
def test_a_request_waiting_for_room_is_overtaken_only_max_bypass_times(llama, tokenizer, adapter_dirs, max_bypass):
    """The r64 request arrives first but doesn't fit beside running base requests; later base requests
    may overtake it only ``max_bypass`` times, then admission waits for it (bounded wait)."""
    config, tensors = read_adapter_dir(adapter_dirs["r64"])
    probe = Engine(llama, tokenizer, max_rank=64)
    probe.register_adapter_weights("big", config, tensors)
    pages = probe.store.get("big").num_pages
    engine = Engine(llama, tokenizer, max_rank=64, max_bypass=max_bypass, pool_bytes=(pages + 1) * probe.pool.page_bytes)
    engine.register_adapter_weights("big", config, tensors)
    finished = []
    engine.submit(Request("base 0", greedy(max_tokens=6)), sink=lambda d: d.finish_reason and finished.append("base 0"))
    engine.step()  # base 0 runs and holds a KV page: "big" can't be loaded beside it
    engine.submit(Request("big one", greedy(max_tokens=3), adapter="big"), sink=lambda d: d.finish_reason and finished.append("big"))
    for i in range(1, 9):
        engine.submit(Request(f"base {i}", greedy(max_tokens=6)), sink=lambda d, i=i: d.finish_reason and finished.append(f"base {i}"))
    for _ in range(500):
        if len(finished) == 10:
            break
        engine.step()
    assert len(finished) == 10
    position = finished.index("big")
    assert position <= max_bypass + 1 if max_bypass < 10 else position == 9


def test_adapters_load_into_a_pool_on_another_device(llama, adapter_dirs):
    """Host weights reach the pool's device by ``copy_`` (a CPU tensor can't be an ``out=`` of a device op);
    the meta device stands in for a GPU."""
    host = Engine(llama, max_rank=64, pool_bytes=1 << 22)
    pool = PagePool(host.pool.num_pages, host.pool.page_numel, host.pool.storage.dtype, "meta")
    store = AdapterStore(pool, host.runner.targets, max_rank=64, fold=host.store.fold)
    store.register("r16", *read_adapter_dir(adapter_dirs["r16"]))
    adapter = store.acquire("r16")
    assert {t.device.type for pair in adapter.views.values() for t in pair if t is not None} == {"meta"}
    assert len(adapter.views) == len(store.get("r16").modules) and pool.used("adapter") == adapter.num_pages
