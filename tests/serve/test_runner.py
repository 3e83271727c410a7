"""Our model runner against transformers' own forward, on the tiny models of each family."""

import pytest
import torch

from loraforge.models import tiny_model
from loraforge.native import DECODE_OPS
from loraforge.serve import Engine, Request
from loraforge.serve.runner import FusedQuantLinear, ModelRunner

from .helpers import greedy, hf_logits, step_logits

FAMILIES = [
    ("tiny-llama", {}),
    ("tiny-qwen2", {}),  # q/k/v biases
    ("tiny-mistral", {"sliding_window": 8}),  # windowed attention, shorter than the prompts
    ("tiny-llama", {"head_dim": 32}),  # head_dim != hidden / heads
    ("tiny-llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 4.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    ("tiny-llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                        "original_max_position_embeddings": 128}}),
]
IDS = [f"{family}-{'-'.join(overrides) or 'plain'}" for family, overrides in FAMILIES]


@pytest.mark.parametrize(("family", "overrides"), FAMILIES, ids=IDS)
@pytest.mark.usefixtures("decode_ops")
def test_prefill_logits_equal_hf_forward(family, overrides):
    model = tiny_model(family, **overrides)
    engine = Engine(model, max_rank=16, pool_bytes=1 << 22)
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (37, 5, 20)]
    for ids, ours in zip(prompts, step_logits(engine, [(ids, None) for ids in prompts])):
        torch.testing.assert_close(ours, hf_logits(model, ids), atol=2e-5, rtol=1e-4)
    assert engine.pool.num_free == engine.pool.num_pages


@pytest.mark.parametrize(("family", "overrides"), FAMILIES, ids=IDS)
@pytest.mark.usefixtures("decode_ops")
def test_batched_paged_decode_equals_hf_greedy(family, overrides, tokenizer):
    """Several sequences decode together across KV block boundaries (block_size 16) and match HF's generate."""
    model = tiny_model(family, **overrides)
    engine = Engine(model, tokenizer, max_rank=16, pool_bytes=1 << 22)
    prompts = ["Hello there, paged cache!", "a", "The quick brown fox jumps over the lazy dog."]
    outputs = engine.generate([Request(p, greedy(max_tokens=24)) for p in prompts])
    for prompt, out in zip(prompts, outputs):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        ref = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=256)
        assert out.token_ids == ref[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize(("family", "overrides"), FAMILIES, ids=IDS)
def test_one_sequence_decoding_alone_equals_hf_greedy(family, overrides, tokenizer, decode_ops, monkeypatch):
    """A lone decoding sequence attends through the native decode step (RoPE, KV write and paged attention in one
    call), or, with torch's ops, takes the sliced-keys path (no mask; the window applied by slicing)."""
    model = tiny_model(family, **overrides)
    engine = Engine(model, tokenizer, max_rank=16, pool_bytes=1 << 22)
    lone_steps = []
    if decode_ops == "native":
        library = DECODE_OPS.library()
        original = library.decode_attention_step

        def recording_step(*args):
            lone_steps.append(args[0].shape[0] == 1)  # one query token
            return original(*args)

        monkeypatch.setattr(library, "decode_attention_step", recording_step)
    else:
        original = engine.runner._attention

        def recording_attention(*args):
            lone_steps.append(args[7] is not None)  # single_len
            return original(*args)

        engine.runner._attention = recording_attention
    prompt = "The quick brown fox jumps over the lazy dog, twice."
    [out] = engine.generate([Request(prompt, greedy(max_tokens=30))])
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    ref = model.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=256)
    assert out.token_ids == ref[0, ids.shape[1]:].tolist()
    assert sum(lone_steps) == 29 * model.config.num_hidden_layers  # every decode step after the prefill


@pytest.mark.usefixtures("decode_ops")
def test_decode_logits_equal_hf_forward():
    """The logits a decode step samples from (paged KV, one token) equal HF's on the whole sequence."""
    model = tiny_model("tiny-qwen2")
    engine = Engine(model, max_rank=16, pool_bytes=1 << 22)
    seen = []
    original = engine.runner.forward

    def recording_forward(batch, kv):
        logits = original(batch, kv)
        seen.append((batch.input_ids.clone(), batch.decode_rows.numel(), logits))
        return logits

    engine.runner.forward = recording_forward
    prompt = list(range(40, 70))
    [out] = engine.generate([Request(prompt, greedy(max_tokens=6))])
    full = prompt + out.token_ids
    reference = hf_logits(model, full)
    for step, (_, decodes, logits) in enumerate(seen):
        position = len(prompt) - 1 + step
        assert decodes == (step > 0)
        torch.testing.assert_close(logits[0], reference[position], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("quant", ["nf4", "int"])
def test_quantized_base_runs_through_its_own_modules(quant):
    """A base whose projections are QuantLinear (NF4 / INT4 groups) runs as transformers runs it."""
    from loraforge.quant.quantize_model import quantize_model

    model = quantize_model(tiny_model("tiny-qwen2"), type=quant, compute_dtype=torch.float32, block_size=64 if quant == "nf4" else 32)
    engine = Engine(model, max_rank=16, pool_bytes=1 << 22)
    ids = torch.randint(0, 256, (21,), generator=torch.Generator().manual_seed(0)).tolist()
    [ours] = step_logits(engine, [(ids, None)])
    torch.testing.assert_close(ours, hf_logits(model, ids), atol=2e-5, rtol=1e-4)
    # no kernel takes fp32 decode steps by default (kernels.NATIVE_MAX_ROWS, INT4PACK_MAX_ROWS), so the modules run
    # alone; in bf16 INT4's decode steps run fused (next test), NF4's never (no packed kernel)
    assert all(f is None for f in engine.runner.fused_qkv)


def _decode_logits(engine, prompt: list[int], steps: int) -> list[torch.Tensor]:
    """The logits of each of a greedy request's decode steps (one token, paged KV)."""
    seen, original = [], engine.runner.forward

    def recording_forward(batch, kv):
        logits = original(batch, kv)
        if batch.decode_rows.numel():
            seen.append(logits[0])
        return logits

    engine.runner.forward = recording_forward
    engine.generate([Request(prompt, greedy(max_tokens=steps + 1))])
    return seen


@pytest.mark.parametrize(("kernel", "dtype"), [("native", torch.bfloat16), ("torch", torch.bfloat16),
                                               ("native", torch.float32)])  # fp32: with the native kernel switched on
def test_quantized_projections_decode_as_packed_kernel_calls_fused_or_alone(kernel, dtype, monkeypatch):
    """INT4 q/k/v (with Qwen2's biases) and gate/up run as one kernel call per group on decode steps (our native
    kernel, or torch's int4 kernel), and o/down as one call each without QuantLinear's checks: the logits equal
    those of every layer run alone, and the fused packs are the only packed copies made (no layer packs itself;
    the native kernel packs nothing at all)."""
    from loraforge.native import LOWBIT
    from loraforge.quant import kernels
    from loraforge.quant.quantize_model import quantize_model

    if kernel == "native" and LOWBIT.library() is None:
        pytest.fail(f"the native kernel did not build: {LOWBIT.status()}", pytrace=False)
    monkeypatch.setattr(kernels, "KERNEL", kernel)
    monkeypatch.setitem(kernels.NATIVE_MAX_ROWS, (4, torch.float32), 64)
    model = quantize_model(tiny_model("tiny-qwen2").to(dtype), type="int", bits=4, block_size=32, compute_dtype=dtype)
    fused = Engine(model, max_rank=16, pool_bytes=1 << 22)
    prompt = list(range(40, 61))
    got = _decode_logits(fused, prompt, 6)
    for layer in fused.runner.layers:
        for module in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            assert "_kernel_cache" not in module.qweight.__dict__
    assert all(isinstance(f, FusedQuantLinear) for f in [*fused.runner.fused_qkv, *fused.runner.fused_down])
    alone = Engine(model, max_rank=16, pool_bytes=1 << 22)
    alone.runner = ModelRunner(model, fuse_quantized=False)
    expected = _decode_logits(alone, prompt, 6)
    assert len(got) == len(expected) == 6
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    # alone, each layer packs itself for torch's int4 kernel; the native kernel reads the layers' own buffers
    assert ("_kernel_cache" in model.model.layers[0].self_attn.q_proj.qweight.__dict__) == (kernel == "torch")


def test_dense_qkv_and_gate_up_run_as_one_gemm_over_the_modules_own_memory():
    """Fused, the runner still equals HF, and the fused weight is the modules' storage (no second copy)."""
    model = tiny_model("tiny-qwen2")
    engine = Engine(model, max_rank=16, pool_bytes=1 << 22)
    engine.runner = ModelRunner(model, fuse=True)
    ids = torch.randint(0, 256, (21,), generator=torch.Generator().manual_seed(0)).tolist()
    [ours] = step_logits(engine, [(ids, None)])
    torch.testing.assert_close(ours, hf_logits(model, ids), atol=2e-5, rtol=1e-4)
    attn, mlp = engine.runner.layers[1].self_attn, engine.runner.layers[1].mlp
    qkv, gate_up = engine.runner.fused_qkv[1], engine.runner.fused_gate_up[1]
    assert qkv.sizes == (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features)
    assert attn.k_proj.weight.data_ptr() == qkv.weight[attn.q_proj.out_features].data_ptr()
    assert attn.v_proj.bias.data_ptr() == qkv.bias[-attn.v_proj.out_features:].data_ptr()
    assert mlp.up_proj.weight.data_ptr() == gate_up.weight[mlp.gate_proj.out_features].data_ptr()
