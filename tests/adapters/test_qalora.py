"""QA-LoRA: pooled-input algebra, PEFT's forward, lossless merge into INTk/Q4_1/Q4_0, PEFT files, training."""

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from loraforge.adapters import (
    AdapterError,
    AdapterFormatError,
    AdapterSpec,
    adapted_layers,
    add_adapter,
    load_adapter,
    mark_only_adapters_trainable,
    merge_adapters,
    save_adapter,
    unmerge_adapters,
)
from loraforge.adapters.qalora import QALoraAdapter, fold_into_group_min
from loraforge.models import tiny_model
from loraforge.quant.base import QuantLinear
from loraforge.quant.gguf_blocks import Q4_1Weight, quantize_q4_0, quantize_q4_1, quantize_q8_0
from loraforge.quant.intk import IntKWeight, quantize_intk

BASES = {
    "int4-g32": lambda w: quantize_intk(w, 4, 32),
    "int3-g64": lambda w: quantize_intk(w, 3, 64),
    "int2-g32": lambda w: quantize_intk(w, 2, 32),
    "q4_1": quantize_q4_1,
    "q4_0": quantize_q4_0,
}


def group_quantized(model: nn.Module, base: str) -> nn.Module:
    """Every linear but the output head replaced by a QuantLinear of format ``base``."""
    head = model.get_output_embeddings()
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and module is not head:
            model.set_submodule(path, QuantLinear(BASES[base](module.weight), module.bias, torch.float32))
    return model


def qalora_model(base="int4-g32", family="tiny-llama", seed=0, r=4):
    model = group_quantized(tiny_model(family), base)
    torch.manual_seed(seed)
    spec = AdapterSpec(method="qalora", r=r, alpha=2 * r, init="none")
    add_adapter(model, spec)
    return model, spec


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def ids():
    return torch.randint(0, 250, (2, 9), generator=torch.Generator().manual_seed(1))


def _layer(base="int4-g32", out=16, in_features=128, init="none"):
    torch.manual_seed(0)
    layer = QuantLinear(BASES[base](torch.randn(out, in_features) * 0.1), None, torch.float32)
    return layer, QALoraAdapter(layer, r=4, scaling=2.0, dropout=0.0, init=init)


@pytest.mark.parametrize("base", sorted(BASES))
def test_shapes_init_and_pooled_algebra(base):
    layer, adapter = _layer(base)
    group = 64 if base == "int3-g64" else 32
    assert adapter.group_size == group
    assert adapter.lora_A.shape == (4, 128 // group) and adapter.lora_B.shape == (16, 4)
    x = torch.randn(3, 5, 128)
    out = layer(x)
    # the pooled update equals a dense weight that is constant inside each group
    torch.testing.assert_close(adapter.delta(x, out, layer), x @ adapter.delta_weight(layer).T, rtol=1e-5, atol=1e-6)
    dense = adapter.delta_weight(layer).unflatten(1, (-1, group))
    assert torch.equal(dense, dense[..., :1].expand_as(dense))
    _, fresh = _layer(base, init="kaiming")
    assert torch.equal(fresh.lora_B, torch.zeros(16, 4))


def test_forward_equals_peft_qalora_variant():
    from peft.tuners.lora.variants import QALoraLinearVariant

    layer, adapter = _layer()
    x = torch.randn(2, 3, 128)
    result = layer(x)
    module = SimpleNamespace(
        lora_A={"a": SimpleNamespace(weight=adapter.lora_A)},
        lora_B={"a": SimpleNamespace(weight=adapter.lora_B)},
        lora_dropout={"a": nn.Identity()},
        scaling={"a": adapter.scaling},
        qalora_group_size={"a": 32},
        in_features=128,
        training=False,
    )
    with torch.no_grad():
        theirs = QALoraLinearVariant.forward(module, "a", x, result)
        ours = result + adapter.delta(x, result, layer)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("base", sorted(BASES))
def test_merge_error_is_exactly_the_fp16_rounding_of_the_new_min(base):
    """y_merged − y_adapter = Σ_g (Σ_{i∈g} x_i) · (fp16(min_g + Δ_g) − (min_g + Δ_g)), each term under half an ulp."""
    layer, adapter = _layer(base)
    group = adapter.group_size
    x = torch.randn(6, 128)
    with torch.no_grad():
        before = layer.qweight.dequantize()
        y_adapter = layer(x) + adapter.delta(x, layer(x), layer)
        exact_min = _offset(layer.qweight) + adapter.group_delta()
        adapter.merge(layer)
        new_min = _offset(layer.qweight)
        y_merged = layer(x)
    rounding = new_min.float() - exact_min
    half_ulp = _half_ulp(new_min)
    assert (rounding.abs() <= half_ulp).all()
    group_sums = x.unflatten(1, (-1, group)).sum(-1)
    torch.testing.assert_close(y_merged - y_adapter, group_sums @ rounding.T, rtol=1e-3, atol=2e-5)
    assert ((y_merged - y_adapter).abs() <= group_sums.abs() @ half_ulp.T + 2e-5).all()
    # codes and scales are untouched; a Q4_0 base became Q4_1
    merged = layer.qweight
    assert isinstance(merged, Q4_1Weight if base.startswith("q4") else IntKWeight)
    torch.testing.assert_close(merged.dequantize() - before, adapter.delta_weight(layer) + rounding.repeat_interleave(group, 1))


def _offset(weight) -> torch.Tensor:
    if isinstance(weight, IntKWeight):
        return weight.min.float()
    if isinstance(weight, Q4_1Weight):
        return weight.m.float()
    return weight.d.float() * -8


def _half_ulp(values: torch.Tensor) -> torch.Tensor:
    values = values.half()
    up = torch.nextafter(values.abs(), torch.tensor(float("inf"), dtype=torch.float16))
    return (up.float() - values.abs().float()) / 2


@pytest.mark.parametrize("base", ["q4_0", "q4_1", "int4-g32"])
def test_unmerge_restores_the_exact_weight(base):
    layer, adapter = _layer(base)
    original = layer.qweight
    snapshot = {k: v.clone() for k, v in original.tensors().items()}
    adapter.merge(layer)
    assert layer.qweight is not original
    adapter.unmerge(layer)
    assert layer.qweight is original and isinstance(layer.qweight, type(original))
    assert all(torch.equal(v, snapshot[k]) for k, v in layer.qweight.tensors().items())


@pytest.mark.parametrize("base", ["int4-g32", "q4_1", "q4_0"])
def test_merged_model_logits_equal_adapter_logits_up_to_min_rounding(base, ids):
    """Merged logits = adapter logits + the effect of rounding each new min to fp16, and nothing else.

    The rounding R_g = fp16(min_g + Δ_g) − (min_g + Δ_g) (at most half an ulp, checked per layer above)
    is added to the adapter model's layers as an explicit correction Σ_g (Σ_{i∈g} x_i)·R_g; that model
    must match the merged one to fp32 noise, and R's effect must be small beside the adapter's own.
    """
    model, _ = qalora_model(base)
    base_logits = logits(group_quantized(tiny_model("tiny-llama"), base), ids)
    adapter_logits = logits(model, ids)
    layers = adapted_layers(model)
    rounding = {}
    with torch.no_grad():
        for path, layer in layers.items():
            adapter = layer.adapters["default"]
            folded = fold_into_group_min(layer.base_layer.qweight, adapter.group_delta())
            rounding[path] = _offset(folded) - (_offset(layer.base_layer.qweight) + adapter.group_delta())
    hooks = [
        layer.register_forward_hook(
            lambda module, args, out, r=rounding[path]: out + args[0].unflatten(-1, (r.shape[1], -1)).sum(-1) @ r.T
        )
        for path, layer in layers.items()
    ]
    corrected_logits = logits(model, ids)
    for hook in hooks:
        hook.remove()
    merge_adapters(model)
    merged_logits = logits(model, ids)
    torch.testing.assert_close(merged_logits, corrected_logits, rtol=1e-4, atol=1e-5)
    rounding_effect = (merged_logits - adapter_logits).abs().max()
    assert 0 < rounding_effect < 0.05 * (adapter_logits - base_logits).abs().max()
    assert torch.equal(merged_logits.argmax(-1), adapter_logits.argmax(-1))
    unmerge_adapters(model)
    torch.testing.assert_close(logits(model, ids), adapter_logits, rtol=0, atol=0)


def test_fold_of_zero_is_identity_even_for_q4_0():
    torch.manual_seed(0)
    q4_0 = quantize_q4_0(torch.randn(4, 64))
    folded = fold_into_group_min(q4_0, torch.zeros(4, 2))
    assert isinstance(folded, Q4_1Weight)
    assert torch.equal(folded.dequantize(), q4_0.dequantize())


@pytest.mark.parametrize("make_base", [lambda w: nn.Linear(64, 8), lambda w: QuantLinear(quantize_q8_0(w), None, torch.float32)])
def test_non_group_quantized_base_says_what_it_needs(make_base):
    base = make_base(torch.randn(8, 64))
    with pytest.raises(AdapterError, match="QA-LoRA needs a group-quantized base weight"):
        QALoraAdapter(base, 4, 1.0, 0.0, "kaiming")


def test_peft_file_roundtrip(ids, tmp_path):
    model, spec = qalora_model("q4_1")
    expected = logits(model, ids)
    save_adapter(model, tmp_path, spec)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_qalora"] is True and config["qalora_group_size"] == 32 and config["peft_type"] == "LORA"
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 128 // 32)
    fresh = group_quantized(tiny_model("tiny-llama"), "q4_1")
    loaded = load_adapter(fresh, tmp_path)
    assert loaded.method == "qalora"
    torch.testing.assert_close(logits(fresh, ids), expected, rtol=0, atol=0)
    other_groups = group_quantized(tiny_model("tiny-llama"), "int3-g64")
    with pytest.raises(AdapterFormatError, match="qalora_group_size 32.*groups of 64"):
        load_adapter(other_groups, tmp_path)
    with pytest.raises(AdapterError, match="QA-LoRA needs a group-quantized base weight"):
        load_adapter(tiny_model("tiny-llama"), tmp_path)


@pytest.mark.parametrize("base", ["int4-g32", "q4_0"])
def test_trains_only_the_adapter(base, ids):
    model, _ = qalora_model(base)
    assert mark_only_adapters_trainable(model) > 0
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "adapters" not in k}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())
