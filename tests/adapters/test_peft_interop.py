"""PEFT interop both ways, with real PEFT as the reference, and the bad-input errors of adapter files."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from loraforge.adapters import (
    AdapterError,
    AdapterFormatError,
    AdapterSpec,
    add_adapter,
    load_adapter,
    mark_only_adapters_trainable,
    save_adapter,
)
from loraforge.models import tiny_model


@pytest.fixture
def ids():
    return torch.randint(0, 250, (2, 13), generator=torch.Generator().manual_seed(2))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def train_a_few_steps(model, ids, steps=4):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-3)
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_ours_loads_in_peft_with_same_logits(family, method, ids, tmp_path):
    model = tiny_model(family)
    spec = AdapterSpec(method=method, r=8, alpha=16, rank_pattern={"v_proj": 4}, alpha_pattern={"down_proj": 4})
    torch.manual_seed(0)
    add_adapter(model, spec)
    mark_only_adapters_trainable(model)
    train_a_few_steps(model, ids)
    ours = logits(model, ids)
    save_adapter(model, tmp_path, spec, base_model_name_or_path=family)
    peft_model = PeftModel.from_pretrained(tiny_model(family), tmp_path)
    assert torch.allclose(logits(peft_model, ids), ours, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_peft_adapter_loads_in_ours_with_same_logits(method, ids, tmp_path):
    torch.manual_seed(0)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "up_proj"], use_dora=method == "dora",
        use_rslora=True, init_lora_weights=False, layers_to_transform=[1],
    )
    peft_model = get_peft_model(tiny_model("tiny-mistral"), config)
    train_a_few_steps(peft_model, ids, steps=2)
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path)
    ours = tiny_model("tiny-mistral")
    spec = load_adapter(ours, tmp_path)
    assert spec.method == method and spec.use_rslora
    assert torch.allclose(logits(ours, ids), expected, atol=1e-5)


def test_missing_and_corrupt_files(tmp_path):
    model = tiny_model("tiny-llama")
    with pytest.raises(AdapterFormatError, match="no such adapter directory"):
        load_adapter(model, tmp_path / "nope")
    with pytest.raises(AdapterFormatError, match="adapter_config.json is missing"):
        load_adapter(model, tmp_path)
    spec = AdapterSpec(r=2)
    add_adapter(model, spec)
    save_adapter(model, tmp_path, spec)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(AdapterFormatError, match="truncated or corrupt"):
        load_adapter(tiny_model("tiny-llama"), tmp_path)
    weights.unlink()
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterFormatError, match="never unpickles"):
        load_adapter(tiny_model("tiny-llama"), tmp_path)


def test_adapter_for_another_base_names_first_mismatching_key(tmp_path):
    small = tiny_model("tiny-llama")
    spec = AdapterSpec(r=2)
    add_adapter(small, spec)
    save_adapter(small, tmp_path, spec)
    other = tiny_model("tiny-llama", hidden_size=32, intermediate_size=64)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(AdapterFormatError) as err:
        load_adapter(other, tmp_path)
    assert str(err.value) == (  # the first key in model order
        f"{tmp_path / 'adapter_model.safetensors'}: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight "
        "has shape (2, 64), but this model's adapter needs (2, 32); it was saved with another rank, method or base "
        "model")
    after = other.state_dict()
    assert after.keys() == before.keys(), "a failed load must leave the model untouched"
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_keys_without_peft_prefix_are_refused(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    save_file({"model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError, match="mandatory"):
        load_adapter(tiny_model("tiny-llama"), tmp_path)


def test_bad_settings_and_targets():
    with pytest.raises(AdapterError, match="adapter.r: must be > 0, got 0"):
        add_adapter(tiny_model("tiny-llama"), AdapterSpec(r=0))
    with pytest.raises(AdapterError, match="adapter.alpha: must be > 0, got -1"):
        add_adapter(tiny_model("tiny-llama"), AdapterSpec(alpha=-1))
    with pytest.raises(AdapterError, match="adapter.method: 'vira' is not an adapter method; choose one of lora, "
                                           "dora, qalora, adalora, vera; did you mean 'vera'"):
        add_adapter(tiny_model("tiny-llama"), AdapterSpec(method="vira"))
    with pytest.raises(AdapterError, match="adapter.init: 'pissa' is not an init of dora"):
        add_adapter(tiny_model("tiny-llama"), AdapterSpec(method="dora", init="pissa"))
    with pytest.raises(AdapterError, match=r"\['q_prj'\] match no linear module.*q_proj"):
        add_adapter(tiny_model("tiny-llama"), AdapterSpec(target_modules=["q_prj"]))
    with pytest.raises(AdapterError, match="selects no linear module"):
        add_adapter(tiny_model("tiny-llama"), AdapterSpec(layers_to_transform=[7]))
