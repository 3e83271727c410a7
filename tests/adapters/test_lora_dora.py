"""The PEFT-style suite for LoRA and DoRA on tiny random Llama-family models."""

import pytest
import torch

from loraforge.adapters import (
    AdapterSpec,
    add_adapter,
    disable_adapters,
    load_adapter,
    mark_only_adapters_trainable,
    merge_adapters,
    merge_and_unload,
    mixed_adapter_batch,
    save_adapter,
    set_active_adapters,
    unmerge_adapters,
)
from loraforge.adapters.layer import AdaptedLinear
from loraforge.models import tiny_model

METHODS = ["lora", "dora"]
FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-mistral"]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def ids():
    return torch.randint(0, 250, (3, 11), generator=torch.Generator().manual_seed(1))


def adapted(family="tiny-llama", method="lora", name="default", seed=0, **spec_fields):
    model = tiny_model(family)
    torch.manual_seed(seed)
    spec = AdapterSpec(method=method, r=4, alpha=8, init="none", **spec_fields)
    add_adapter(model, spec, name)
    return model, spec


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_merged_equals_unmerged_and_merge_is_idempotent(family, method, ids):
    model, _ = adapted(family, method)
    unmerged = logits(model, ids)
    assert not torch.allclose(unmerged, logits(tiny_model(family), ids), atol=1e-3), "adapter must change output"
    merge_adapters(model)
    assert torch.allclose(logits(model, ids), unmerged, atol=1e-5)
    merge_adapters(model)
    assert torch.allclose(logits(model, ids), unmerged, atol=1e-5)
    unmerge_adapters(model)
    assert torch.allclose(logits(model, ids), unmerged, atol=1e-5)
    merge_and_unload(model)
    assert not any(isinstance(m, AdaptedLinear) for m in model.modules())
    assert torch.allclose(logits(model, ids), unmerged, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_disable_equals_base_even_when_merged(method, ids):
    model, _ = adapted(method=method)
    base = logits(tiny_model("tiny-llama"), ids)
    with_adapter = logits(model, ids)
    with disable_adapters(model):
        assert torch.allclose(logits(model, ids), base, atol=1e-6)
    merge_adapters(model)
    with disable_adapters(model):
        assert torch.allclose(logits(model, ids), base, atol=1e-5)
    assert torch.allclose(logits(model, ids), with_adapter, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_save_load_roundtrip(method, ids, tmp_path):
    model, spec = adapted(method=method, use_rslora=True)
    expected = logits(model, ids)
    save_adapter(model, tmp_path, spec)
    fresh = tiny_model("tiny-llama")
    loaded_spec = load_adapter(fresh, tmp_path)
    assert loaded_spec.method == method and loaded_spec.use_rslora
    assert torch.equal(logits(fresh, ids), expected)


def test_mixed_batch_equals_each_adapter_alone(ids):
    model = tiny_model("tiny-llama")
    torch.manual_seed(0)
    add_adapter(model, AdapterSpec(method="lora", r=4, init="none"), "a")
    add_adapter(model, AdapterSpec(method="dora", r=8, init="none", target_modules=["q_proj", "v_proj"]), "b")
    rows = ["b", None, "a"]
    with mixed_adapter_batch(model, rows):
        mixed = logits(model, ids)
    for i, name in enumerate(rows):
        if name is None:
            with disable_adapters(model):
                alone = logits(model, ids[i : i + 1])
        else:
            set_active_adapters(model, name)
            alone = logits(model, ids[i : i + 1])
        assert torch.allclose(mixed[i], alone[0], atol=1e-5), f"row {i} ({name})"


@pytest.mark.parametrize("method", METHODS)
def test_only_adapter_params_change(method, ids):
    model, _ = adapted(method=method)
    n_trainable = mark_only_adapters_trainable(model)
    assert n_trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".adapters.default." in k for k in changed)
    assert any("lora_A" in k for k in changed) and any("lora_B" in k for k in changed)


def test_dora_matches_its_formula(ids):
    """W' = m ⊙ (W + s·BA) / ‖W + s·BA‖_row, applied as a plain linear."""
    model, _ = adapted(method="dora")
    layer = model.model.layers[0].self_attn.q_proj
    adapter = layer.adapters["default"]
    with torch.no_grad():
        adapter.lora_magnitude_vector.mul_(1.5)
        combined = layer.base_layer.weight + adapter.scaling * adapter.lora_B @ adapter.lora_A
        expected_w = adapter.lora_magnitude_vector[:, None] * combined / combined.norm(dim=1, keepdim=True)
        x = torch.randn(5, layer.in_features)
        assert torch.allclose(layer(x), x @ expected_w.T, atol=1e-5)


def test_lora_formula_and_scaling():
    model, _ = adapted(method="lora", use_rslora=False)
    layer = model.model.layers[1].mlp.down_proj
    adapter = layer.adapters["default"]
    assert adapter.scaling == 8 / 4
    x = torch.randn(5, layer.in_features)
    with torch.no_grad():
        expected = x @ (layer.base_layer.weight + 2.0 * adapter.lora_B @ adapter.lora_A).T
        assert torch.allclose(layer(x), expected, atol=1e-5)


def test_default_init_is_identity_and_kaiming(ids):
    model = tiny_model("tiny-llama")
    add_adapter(model, AdapterSpec(r=4))
    assert torch.equal(logits(model, ids), logits(tiny_model("tiny-llama"), ids))
    adapter = model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert adapter.lora_B.abs().sum() == 0 and adapter.lora_A.abs().sum() > 0


def test_rank_and_alpha_pattern_per_module():
    model = tiny_model("tiny-llama")
    add_adapter(model, AdapterSpec(r=4, alpha=8, rank_pattern={"q_proj": 2}, alpha_pattern={r"layers\.1\.mlp\.up_proj": 3}))
    q = model.model.layers[0].self_attn.q_proj.adapters["default"]
    up1 = model.model.layers[1].mlp.up_proj.adapters["default"]
    up0 = model.model.layers[0].mlp.up_proj.adapters["default"]
    assert q.r == 2 and q.scaling == 4
    assert up1.r == 4 and up1.scaling == 3 / 4
    assert up0.scaling == 2


def test_target_specs():
    model = tiny_model("tiny-llama")
    paths = add_adapter(model, AdapterSpec(target_modules="all-linear"))
    assert len(paths) == 2 * 7 and not any("lm_head" in p for p in paths)
    model = tiny_model("tiny-llama")
    paths = add_adapter(model, AdapterSpec(target_modules=r".*\.self_attn\.(q|v)_proj", layers_to_transform=[1]))
    assert paths == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    model = tiny_model("tiny-llama")
    paths = add_adapter(model, AdapterSpec(target_modules=["o_proj"]))
    assert paths == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
