"""The memory estimate against what a real model holds: parameter counts of the model that training
builds, and the bytes autograd really saves in a CPU forward pass (the real sdpa kernel, real tensors)."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from loraforge.config import Config
from loraforge.train.loss import summed_token_loss
from loraforge.train.memory import (
    HEADROOM,
    OPTIMIZER_BYTES_PER_PARAM,
    MemoryEstimate,
    _Parts,
    estimate_memory,
)
from loraforge.train.run import prepare_model


def config(**sections) -> Config:
    data = {"model": {"source": "tiny-llama"}, "data": {"cutoff_len": 64}, "train": {"batch_size": 2}}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return Config.from_dict(data, check_files=False)


def real_bytes(model, frozen: bool) -> int:
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers()) if t.requires_grad != frozen}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("sections", [
    {},
    {"adapter": {"method": "dora", "r": 8}},
    {"model": {"quantization": {"type": "nf4"}}},
    {"model": {"quantization": {"type": "int", "bits": 4}}, "adapter": {"method": "qalora"}},
    {"model": {"dtype": "bfloat16"}, "train": {"optim": "adamw_8bit"}},
])
def test_parameter_components_match_the_model_training_builds(sections):
    cfg = config(**sections)
    parts = estimate_memory(cfg, "cpu").components
    model, _, _ = prepare_model(cfg, torch.device("cpu"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable > 0
    assert parts["adapter"] == parts["gradients"] == real_bytes(model, frozen=False)
    # (a tiny model cast after construction also casts its fp32 rotary buffers: a few bytes)
    assert parts["weights"] == pytest.approx(real_bytes(model, frozen=True), rel=1e-3)
    assert parts["optimizer"] == OPTIMIZER_BYTES_PER_PARAM[cfg.train.optim] * trainable


def measured_saved_bytes(cfg: Config) -> int:
    """Bytes of the distinct tensors autograd saves in one real CPU training forward (parameters excluded)."""
    model, _, _ = prepare_model(cfg, torch.device("cpu"))
    model.train()
    params = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens = cfg.data.cutoff_len
    ids = torch.randint(0, model.config.vocab_size, (cfg.train.batch_size, tokens))
    with saved_tensors_hooks(pack, lambda t: t):
        summed_token_loss(model, {"input_ids": ids, "labels": ids.clone()})
    return sum(saved.values())


@pytest.mark.parametrize("sections", [{}, {"adapter": {"method": "dora"}}, {"model": {"quantization": {"type": "nf4"}}}])
def test_saved_activations_match_a_real_forward(sections):
    cfg = config(**sections)
    parts = _Parts.of(cfg, torch.device("cpu"))
    tokens = cfg.train.batch_size * cfg.data.cutoff_len
    counted = parts.activation_bytes_per_token * tokens + parts.logit_bytes_per_token * tokens
    measured = measured_saved_bytes(cfg)
    # the real run has labels on T - 1 positions per row (a few percent less); DoRA's count is ~13% high
    assert 0.85 * counted <= measured <= 1.02 * counted, (measured, counted)


def test_batch_terms_scale_and_checkpointing_saves_activations():
    small, big = estimate_memory(config(), "cpu"), estimate_memory(config(train={"batch_size": 4}), "cpu")
    for name in ("activations", "logits"):
        assert big.components[name] == pytest.approx(2 * small.components[name], rel=1e-6)
    for name in ("weights", "adapter", "optimizer"):
        assert big.components[name] == small.components[name]
    checkpointed = estimate_memory(config(train={"gradient_checkpointing": True}), "cpu")
    assert checkpointed.components["activations"] < small.components["activations"]


def test_the_compact_cpu_allocator_drops_the_heap_slack_and_training_fixes_the_mmap_threshold(monkeypatch, tmp_path):
    fast, compact = (estimate_memory(config(train={"cpu_allocator": a}), "cpu") for a in ("fast", "compact"))
    assert fast.components["allocator"] > 0 and compact.components["allocator"] == 0
    assert {k: v for k, v in fast.components.items() if k != "allocator"} == \
           {k: v for k, v in compact.components.items() if k != "allocator"}
    assert estimate_memory(config(), "meta").components["allocator"] == 0  # not a CPU: no glibc heap

    import loraforge.train.run as run

    calls = []
    monkeypatch.setattr(run, "return_large_blocks_on_free", lambda: calls.append(1))
    monkeypatch.setattr(run, "prepare_model", lambda *a: (_ for _ in ()).throw(RuntimeError("stop here")))
    for allocator, expected in (("fast", 0), ("compact", 1)):
        calls.clear()
        cfg = config(train={"cpu_allocator": allocator}, output={"dir": str(tmp_path / allocator)})
        with pytest.raises(RuntimeError, match="stop here"):
            run.run_training(cfg, echo=lambda *a: None)
        assert len(calls) == expected, allocator


def test_a_run_that_does_not_fit_says_so_and_what_would_help():
    cfg = config(model={"source": "tiny-llama"}, train={"batch_size": 64}, data={"cutoff_len": 2048})
    fitting = estimate_memory(cfg, "cpu")
    too_small = MemoryEstimate(fitting.device, fitting.total_bytes // 2, fitting.components,
                               fitting.tokens_per_micro_batch)
    assert too_small.verdict.startswith("won't fit") and "activations" in too_small.verdict
    report = MemoryEstimate(fitting.device, int(fitting.total_bytes / HEADROOM / 1.5), fitting.components,
                            fitting.tokens_per_micro_batch, _changes_of(cfg)).report()
    assert "won't fit" in report and "what would help" in report
    for remedy in ("train.gradient_checkpointing=true", "train.batch_size=32 train.grad_accum=2",
                   "data.cutoff_len=1024", "model.quantization={type: nf4}", "train.cpu_allocator=compact"):
        assert remedy in report


def _changes_of(cfg: Config):
    from loraforge.train.memory import _changes

    return _changes(cfg, _Parts.of(cfg, torch.device("cpu")), torch.device("cpu"))


def test_a_first_quantized_load_counts_the_dense_weights_it_holds(tmp_path):
    """Streamed from a folder: its largest shard beside the quantized weights; from elsewhere: the dense model."""
    from loraforge.models import tiny_model, tiny_tokenizer

    folder = tmp_path / "model"
    tiny_model("tiny-llama").save_pretrained(folder, max_shard_size="200KB")
    tiny_tokenizer().save_pretrained(folder)
    shards = sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    assert len(shards) > 1
    nf4 = {"quantization": {"type": "nf4", "block_size": 32}}
    streamed = estimate_memory(config(model={"source": str(folder), **nf4}), "cpu")
    c = streamed.components
    assert streamed.loading_bytes == c["runtime"] + c["weights"] + shards[-1].stat().st_size
    dense = estimate_memory(config(model={"source": "tiny-llama", **nf4}), "cpu")
    unquantized = estimate_memory(config(), "cpu")
    d = dense.components
    assert dense.loading_bytes == d["runtime"] + d["weights"] + unquantized.components["weights"]
    assert unquantized.loading_bytes == 0
    assert dense.total_bytes == max(sum(d.values()), dense.loading_bytes)


def test_a_cached_quantized_base_adds_no_loading_peak(tmp_path, monkeypatch):
    from loraforge.models import tiny_model, tiny_tokenizer
    from loraforge.models.prepare import load_base

    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    tiny_model("tiny-llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    cfg = config(model={"source": str(folder), "quantization": {"type": "nf4", "block_size": 32}})
    assert estimate_memory(cfg, "cpu").loading_bytes > 0
    load_base(cfg.model, torch.device("cpu"))  # the first load writes the cache
    assert estimate_memory(cfg, "cpu").loading_bytes == 0
