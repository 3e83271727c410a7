"""VeRA against PEFT 0.21 as the reference: projections, logits, files both ways, merge and errors."""

import json

import pytest
import torch
from peft import PeftModel, VeraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from loraforge.adapters import AdapterError, AdapterSpec
from loraforge.adapters.inject import _wrap, select_targets
from loraforge.adapters.vera import (
    PROJECTION_KEYS,
    VeraAdapter,
    VeraOptions,
    build_projections,
    load_projections,
    projection_tensors,
)
from loraforge.models import tiny_model
from loraforge.quant.base import QuantLinear
from loraforge.quant.intk import quantize_intk

TARGETS = ["q_proj", "v_proj", "down_proj"]  # q (64x64), v (32x64), down (64x128): max_in 128, max_out 64
PREFIX = "base_model.model."

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # PEFT warns on every save_projection=False


@pytest.fixture
def ids():
    return torch.randint(0, 250, (2, 11), generator=torch.Generator().manual_seed(2))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def add_vera(model, options=None, r=8, name="default", targets=TARGETS, init="none", tensors=None, seed=1):
    """Attach VeRA adapter ``name`` (before the registry exists); ``tensors``: a PEFT file's contents to load."""
    options = options or VeraOptions()
    paths = select_targets(model, AdapterSpec(target_modules=targets))
    if tensors is None:
        projections = build_projections(model, paths, r, options, name)
    else:
        projections = load_projections(tensors, model, paths, r, options, name)
    torch.manual_seed(seed)
    for path in paths:
        layer = _wrap(model, path)
        layer.adapters[name] = VeraAdapter(layer.base_layer, r, 1.0, 0.0, init, options, projections)
        layer.active.append(name)
        if tensors is not None:
            layer.adapters[name].load_peft_tensors(
                {key: tensors[f"{PREFIX}{path}.{key}"] for key in ("vera_lambda_b", "vera_lambda_d")}
            )
    return {path: model.get_submodule(path).adapters[name] for path in paths}, projections


def peft_vera(key=0, save_projection=True, r=8, targets=TARGETS):
    config = VeraConfig(r=r, target_modules=targets, projection_prng_key=key, save_projection=save_projection)
    return get_peft_model(tiny_model("tiny-llama"), config)


def write_peft_dir(directory, adapters, projections, options, r=8, targets=TARGETS):
    """Our tensors under PEFT's keys, plus the adapter_config.json PEFT writes."""
    tensors = {f"{PREFIX}{path}.{key}": t.detach().contiguous()
               for path, adapter in adapters.items() for key, t in adapter.peft_tensors().items()}
    tensors.update({key: t.contiguous() for key, t in projection_tensors(projections).items()})
    save_file(tensors, directory / "adapter_model.safetensors")
    config = VeraConfig(r=r, target_modules=targets, projection_prng_key=options.projection_prng_key,
                        save_projection=options.save_projection, d_initial=options.d_initial)
    config.save_pretrained(directory)
    return tensors


@pytest.mark.parametrize(("key", "r"), [(0, 8), (1234, 256)])
def test_projections_bit_identical_to_peft(key, r):
    paths = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.0.self_attn.v_proj"]
    ours = build_projections(tiny_model("tiny-llama"), paths, r, VeraOptions(key))
    peft = peft_vera(key, r=r).base_model
    assert ours.vera_A.shape == (r, 128) and ours.vera_B.shape == (64, r)
    assert torch.equal(ours.vera_A, peft.vera_A["default"]) and torch.equal(ours.vera_B, peft.vera_B["default"])
    other = build_projections(tiny_model("tiny-llama"), paths[:1], r, VeraOptions(key + 1))
    assert not torch.equal(other.vera_A, ours.vera_A[:, :64])


def test_fresh_adapter_is_identity_and_init_none_is_not(ids):
    base = logits(tiny_model("tiny-llama"), ids)
    model = tiny_model("tiny-llama")
    adapters, _ = add_vera(model, init="kaiming")
    layer = next(iter(adapters.values()))
    assert torch.equal(layer.vera_lambda_b, torch.zeros(64)) and torch.equal(layer.vera_lambda_d, torch.full((8,), 0.1))
    assert torch.equal(logits(model, ids), base)
    add_vera(model, name="random")
    assert not torch.allclose(logits(model, ids), base, atol=1e-3)


@pytest.mark.parametrize("save_projection", [True, False])
def test_ours_loads_in_peft_with_same_logits(save_projection, ids, tmp_path):
    options = VeraOptions(projection_prng_key=7, save_projection=save_projection)
    model = tiny_model("tiny-llama")
    adapters, projections = add_vera(model, options)
    ours = logits(model, ids)
    assert not torch.allclose(ours, logits(tiny_model("tiny-llama"), ids), atol=1e-3)
    tensors = write_peft_dir(tmp_path, adapters, projections, options)
    assert (PROJECTION_KEYS[0] in tensors) == save_projection
    peft_model = PeftModel.from_pretrained(tiny_model("tiny-llama"), tmp_path)
    assert torch.allclose(logits(peft_model, ids), ours, atol=1e-5)


@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_adapter_loads_in_ours_with_same_logits(save_projection, ids, tmp_path):
    torch.manual_seed(3)
    peft_model = peft_vera(key=5, save_projection=save_projection)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "vera_lambda" in name:
                param.normal_()
    reference = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (PROJECTION_KEYS[0] in tensors) == save_projection
    options = VeraOptions(config["projection_prng_key"], config["d_initial"], config["save_projection"])
    model = tiny_model("tiny-llama")
    add_vera(model, options, r=config["r"], targets=config["target_modules"], tensors=tensors)
    assert torch.allclose(logits(model, ids), reference, atol=1e-5)


def test_merge_unmerge_and_low_rank_fold(ids):
    model = tiny_model("tiny-llama")
    before = {name: p.clone() for name, p in model.named_parameters()}
    adapters, _ = add_vera(model)
    unmerged = logits(model, ids)
    layers = [model.get_submodule(path) for path in adapters]
    for layer in layers:
        layer.merge(["default"])
    assert torch.allclose(logits(model, ids), unmerged, atol=1e-5)
    for layer in layers:
        layer.unmerge()
    after = {name.replace(".base_layer", ""): p for name, p in model.named_parameters() if "vera_" not in name}
    assert all(torch.allclose(after[name], before[name], atol=1e-6) for name in before)
    x = torch.randn(3, 5, 128)
    adapter, layer = adapters["model.layers.1.mlp.down_proj"], layers[-1]
    lora_A, lora_B, scale = adapter.low_rank(layer.base_layer)
    assert scale == 1.0 and torch.equal(lora_A, adapter.vera_lambda_d[:, None] * adapter.projections.vera_A)
    assert torch.equal(lora_B, adapter.vera_lambda_b[:, None] * adapter.projections.vera_B[:64])
    delta = adapter.delta(x, torch.zeros(3, 5, 64), layer.base_layer)
    assert torch.allclose(scale * (x @ lora_A.T @ lora_B.T), delta, atol=1e-5)
    assert torch.allclose(x @ adapter.delta_weight(layer.base_layer).T, delta, atol=1e-5)


def test_different_prng_keys_in_one_model_are_refused():
    model = tiny_model("tiny-llama")
    add_vera(model, VeraOptions(projection_prng_key=0), name="first")
    with pytest.raises(AdapterError, match=r"'second' has projection_prng_key=1 .*'first' .*projection_prng_key=0"):
        add_vera(model, VeraOptions(projection_prng_key=1), name="second")
    add_vera(model, VeraOptions(projection_prng_key=0), name="third")
    peft_model = peft_vera(key=0)
    with pytest.raises(ValueError, match="PRNG initialisation key must be the same"):
        peft_model.add_adapter("second", VeraConfig(r=8, target_modules=TARGETS, projection_prng_key=1))


def test_saved_projections_too_small_or_missing(tmp_path):
    peft_vera(targets=["q_proj"]).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"too small for model\.layers\.0\.mlp\.down_proj \(64x128\)"):
        add_vera(tiny_model("tiny-llama"), targets=["q_proj", "down_proj"], tensors=tensors)
    without = {k: v for k, v in tensors.items() if k not in PROJECTION_KEYS}
    with pytest.raises(AdapterError, match="lacks"):
        add_vera(tiny_model("tiny-llama"), targets=["q_proj"], tensors=without)


def test_options_check_and_adapter_errors():
    assert VeraOptions().check() == []
    assert [k for k, _ in VeraOptions(d_initial=0.0, projection_prng_key=2**64).check()] == [
        "projection_prng_key", "d_initial"]
    model = tiny_model("tiny-llama")
    projections = build_projections(model, ["model.layers.0.self_attn.q_proj"], 8, VeraOptions())
    with pytest.raises(AdapterError, match="r=4"):
        VeraAdapter(model.model.layers[0].self_attn.q_proj, 4, 1.0, 0.0, "kaiming", VeraOptions(), projections)
    with pytest.raises(AdapterError, match="64x128 layer"):
        VeraAdapter(model.model.layers[0].mlp.down_proj, 8, 1.0, 0.0, "kaiming", VeraOptions(), projections)


def test_mixed_adapter_batch_matches_each_adapter_alone(ids):
    model = tiny_model("tiny-llama")
    first, _ = add_vera(model, name="a")
    add_vera(model, name="b", seed=2)
    assert first["model.layers.0.self_attn.q_proj"].projections is first["model.layers.1.mlp.down_proj"].projections
    layers = [model.get_submodule(path) for path in first]
    alone = {}
    for name in ("a", "b", None):
        for layer in layers:
            layer.active = [] if name is None else [name]
        alone[name] = logits(model, ids)
    for layer in layers:
        layer.row_adapters = ["b", None]
    mixed = logits(model, ids)
    assert torch.allclose(mixed[0], alone["b"][0], atol=1e-5) and torch.allclose(mixed[1], alone[None][1], atol=1e-5)
    assert not torch.allclose(alone["a"], alone["b"], atol=1e-3)


def test_quantized_base_runs_but_refuses_in_place_merge():
    model = tiny_model("tiny-llama")
    dense = model.model.layers[0].self_attn.q_proj
    model.model.layers[0].self_attn.q_proj = QuantLinear(quantize_intk(dense.weight.detach()), None, torch.float32)
    adapters, _ = add_vera(model, targets=["q_proj"])
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 64)
    delta_weight = adapters["model.layers.0.self_attn.q_proj"].delta_weight(layer.base_layer)
    assert torch.allclose(layer(x), layer.base_layer(x) + x @ delta_weight.T, atol=1e-5)
    with pytest.raises(AdapterError, match="can't merge in place into a int4"):
        layer.merge(["default"])
