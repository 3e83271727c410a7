"""The training forward of an adapted linear (base and update as one autograd op, ``low_rank_linear``, the update
folded into the weight or added into the output) against PEFT: same outputs and the same gradients for A, B and
the input, on dense and quantized bases."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from loraforge.adapters import AdapterSpec, add_adapter, mark_only_adapters_trainable
from loraforge.adapters.layer import AdaptedLinear
from loraforge.adapters.lora import LoraAdapter
from loraforge.adapters.qalora import QALoraAdapter
from loraforge.models import tiny_model
from loraforge.quant import kernels
from loraforge.quant.base import QuantLinear
from loraforge.quant.blockwise4bit import Blockwise4bitWeight
from loraforge.quant.intk import quantize_intk
from tests.references import require

BASES = {
    "dense": lambda w: None,
    "nf4": lambda w: Blockwise4bitWeight.from_dense(w, "nf4", block_size=64, double_quant=True),
    "int4-g32": lambda w: quantize_intk(w, 4, 32),
    "q4_1": lambda w: quantize_intk(w, 4, 32).to_q4_1(),
}


def adapted_layer(base: str, method: str, dropout: float = 0.0) -> AdaptedLinear:
    torch.manual_seed(0)
    dense = nn.Linear(128, 48, bias=True)
    dense.requires_grad_(False)
    weight = BASES[base](dense.weight.data)
    layer = dense if weight is None else QuantLinear(weight, dense.bias, torch.float32)
    cls = QALoraAdapter if method == "qalora" else LoraAdapter
    wrapped = AdaptedLinear(layer)
    wrapped.adapters["a"] = cls(layer, r=4, scaling=1.5, dropout=dropout, init="none")
    wrapped.active.append("a")
    return wrapped


def peft_reference(layer: AdaptedLinear, method: str, x: torch.Tensor) -> torch.Tensor:
    """PEFT's LoRA forward (``lora_B(lora_A(x)) * scaling`` added to the base output), or its QA-LoRA variant's."""
    adapter = layer.adapters["a"]
    result = layer.base_layer(x)
    if method == "lora":
        return result + nn.functional.linear(nn.functional.linear(x, adapter.lora_A), adapter.lora_B) * adapter.scaling
    variants = require("peft.tuners.lora.variants")
    module = SimpleNamespace(lora_A={"a": SimpleNamespace(weight=adapter.lora_A)},
                             lora_B={"a": SimpleNamespace(weight=adapter.lora_B)}, lora_dropout={"a": nn.Identity()},
                             scaling={"a": adapter.scaling}, qalora_group_size={"a": adapter.group_size},
                             in_features=x.shape[-1], training=True)
    return variants.QALoraLinearVariant.forward(module, "a", x, result)


def grads(layer: AdaptedLinear, forward, x: torch.Tensor, grad_out: torch.Tensor):
    x = x.clone().requires_grad_()
    out = forward(x)
    out.backward(grad_out)
    adapter = layer.adapters["a"]
    result = (out.detach(), x.grad, adapter.lora_A.grad, adapter.lora_B.grad)
    adapter.lora_A.grad = adapter.lora_B.grad = None
    return result


def assert_equal_to_peft(layer: AdaptedLinear, method: str, tokens: int) -> None:
    x = torch.randn(2, tokens, 128, generator=torch.Generator().manual_seed(1))
    grad_out = torch.randn(2, tokens, 48, generator=torch.Generator().manual_seed(2))
    ours = grads(layer, layer, x, grad_out)
    theirs = grads(layer, lambda v: peft_reference(layer, method, v), x, grad_out)
    for name, a, b in zip(("output", "input grad", "lora_A grad", "lora_B grad"), ours, theirs):
        # fp32 sums over 2·tokens rows in another order: within a few ulps of the tensor's largest entry
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


def fused_op_ran(layer: AdaptedLinear, dtype: torch.dtype = torch.float32) -> bool:
    """Whether the layer's training output comes from the fused op (under the layer's reshaping view)."""
    node = layer(torch.randn(3, 128, dtype=dtype, requires_grad=True)).grad_fn
    while type(node).__name__ == "ViewBackward0":
        node = node.next_functions[0][0]
    return type(node).__name__ == "_LowRankLinearBackward"


BASES_AND_METHODS = [("dense", "lora"), ("nf4", "lora"), ("int4-g32", "qalora"), ("q4_1", "qalora"), ("q4_1", "lora")]
QUANTIZED = BASES_AND_METHODS[1:]


@pytest.mark.parametrize("tokens", [5, 100])
@pytest.mark.parametrize(("base", "method"), BASES_AND_METHODS)
def test_training_forward_and_gradients_equal_peft(base, method, tokens):
    """fp32: the update folded into a quantized base's dequantized weight, forward and backward; a dense base's
    added apart."""
    layer = adapted_layer(base, method)
    assert fused_op_ran(layer)
    assert_equal_to_peft(layer, method, tokens)


@pytest.mark.parametrize(("base", "method"), QUANTIZED)
def test_the_fold_holds_across_tiles(base, method, monkeypatch):
    """Weights decoded a few rows (forward) and 32 columns (backward) at a time, each tile with its part of the
    update."""
    monkeypatch.setattr(kernels, "TILE_ELEMENTS", 1024)
    assert_equal_to_peft(adapted_layer(base, method), method, 100)


@pytest.mark.parametrize(("base", "method"), BASES_AND_METHODS)
def test_bf16_adds_the_update_apart_from_the_weight(base, method):
    """bf16 never folds (``W + s·b a`` rounded to bf16 would lose a small update): the update goes into the
    output and the input gradient. Against PEFT's sum in bf16, within bf16's rounding."""
    layer = adapted_layer(base, method).to(torch.bfloat16)
    if isinstance(layer.base_layer, QuantLinear):
        layer.base_layer.compute_dtype = torch.bfloat16
    assert fused_op_ran(layer, torch.bfloat16)
    x = torch.randn(2, 100, 128, generator=torch.Generator().manual_seed(1)).bfloat16()
    grad_out = torch.randn(2, 100, 48, generator=torch.Generator().manual_seed(2)).bfloat16()
    ours = grads(layer, layer, x, grad_out)
    theirs = grads(layer, lambda v: peft_reference(layer, method, v), x, grad_out)
    for name, a, b in zip(("output", "input grad", "lora_A grad", "lora_B grad"), ours, theirs):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * float(b.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(("base", "method"), BASES_AND_METHODS)
def test_bf16_autocast_trains_every_base(base, method):
    """``train.precision: bf16`` (autocast) on a quantized base: the base's Function answers in fp32 while the
    update's GEMMs run in bf16, so the update is summed out of place. Same as PEFT's sum under autocast, within
    bf16's rounding (the two sum in different orders)."""
    layer = adapted_layer(base, method)
    x = torch.randn(2, 100, 128, generator=torch.Generator().manual_seed(1))
    grad_out = torch.randn(2, 100, 48, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = grads(layer, layer, x, grad_out)
        theirs = grads(layer, lambda v: peft_reference(layer, method, v), x, grad_out)
    for name, a, b in zip(("output", "input grad", "lora_A grad", "lora_B grad"), ours, theirs):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2 * float(b.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_dropout_and_autocast_take_the_plain_sum():
    """The fused op has no dropout mask and no autocast casts: those keep autograd's own graph, still equal to
    PEFT's (dropout 0 checks the graph choice alone)."""
    layer = adapted_layer("nf4", "lora", dropout=0.1)
    assert not fused_op_ran(layer)
    layer.adapters["a"].dropout.p = 0.0
    assert_equal_to_peft(layer, "lora", 100)
    layer = adapted_layer("dense", "lora")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_op_ran(layer)
    layer.base_layer.weight.requires_grad_(True)
    assert not fused_op_ran(layer)


def test_inference_leaves_the_base_output_alone_and_equals_training():
    """Without autograd the update is added out of place (a kernel may hand back a buffer of its own)."""
    layer = adapted_layer("nf4", "lora")
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        inference = layer(x)
    torch.testing.assert_close(inference, layer(x).detach(), rtol=1e-6, atol=1e-6)


def test_a_peft_training_step_matches_ours_on_a_model():
    """Loss and every adapter gradient of one step on a tiny Llama, ours against PEFT's LoRA with the same weights."""
    peft = require("peft")
    ids = torch.randint(0, 250, (2, 13), generator=torch.Generator().manual_seed(4))
    ours = tiny_model("tiny-llama")
    torch.manual_seed(0)
    add_adapter(ours, AdapterSpec(method="lora", r=4, alpha=8, init="none"))
    mark_only_adapters_trainable(ours)
    theirs = peft.get_peft_model(tiny_model("tiny-llama"), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                             init_lora_weights=False))
    mine = {name.replace(".adapters.default.", ".").replace(".base_layer", ""): p
            for name, p in ours.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                key = name.removeprefix("base_model.model.").replace(".default.weight", "").replace(".base_layer", "")
                p.copy_(mine[key])
    loss_ours = ours(ids, labels=ids).loss
    loss_ours.backward()
    loss_theirs = theirs(ids, labels=ids).loss
    loss_theirs.backward()
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-5, atol=1e-6)
    checked = 0
    for name, p in theirs.named_parameters():
        if p.requires_grad:
            key = name.removeprefix("base_model.model.").replace(".default.weight", "").replace(".base_layer", "")
            torch.testing.assert_close(mine[key].grad, p.grad, rtol=1e-4, atol=1e-6)
            checked += 1
    assert checked == len(mine) > 0
