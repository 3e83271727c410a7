"""Adapter targets on a vision-language model, and PEFT interop both ways on the tiny Qwen2.5-VL (with
images in the forward pass, so vision-tower and projector adapters are exercised)."""

import json

import pytest
import torch
from references import require
from vlm_helpers import shapes_dataset

from loraforge.adapters import AdapterError, AdapterSpec, add_adapter, load_adapter, save_adapter
from loraforge.adapters.inject import select_targets
from loraforge.data.vision import build_vision_datasets, collate_vision
from loraforge.models import tiny_model
from loraforge.models.tiny_vlm import TINY_VLM, tiny_vlm, tiny_vlm_processor

LANGUAGE = "model.language_model."
TOWER = "model.visual.blocks."
PROJECTOR = "model.visual.merger."


def groups(paths):
    return {prefix for prefix in (LANGUAGE, TOWER, PROJECTOR) for p in paths if p.startswith(prefix)}


def test_all_linear_is_the_language_model_only():
    paths = select_targets(tiny_vlm(), AdapterSpec())
    assert groups(paths) == {LANGUAGE} and len(paths) == 4 * 7


@pytest.mark.parametrize(("vision", "projector", "expected_tower"), [
    (True, False, 2 * 5),
    (["qkv"], False, 2),
    (r".*visual\.blocks\.1\.attn\.qkv", True, 1),
    (False, True, 0),
])
def test_the_vision_tower_and_the_projector_are_opt_in(vision, projector, expected_tower):
    paths = select_targets(tiny_vlm(), AdapterSpec(target_modules=["q_proj"], vision=vision, projector=projector))
    assert sum(p.startswith(LANGUAGE) for p in paths) == 4
    assert sum(p.startswith(TOWER) for p in paths) == expected_tower
    assert sum(p.startswith(PROJECTOR) for p in paths) == (2 if projector else 0)
    assert not any("patch_embed" in p for p in paths)


def test_target_names_do_not_reach_the_vision_tower_even_where_names_repeat():
    paths = select_targets(tiny_vlm(), AdapterSpec(target_modules=["gate_proj"]))  # the vision MLP has one too
    assert len(paths) == 4 and groups(paths) == {LANGUAGE}


@pytest.mark.parametrize(("spec", "message"), [
    (AdapterSpec(vision=["patch_embed.proj"]), r"adapter.vision: \['patch_embed.proj'\] match no linear"),
    (AdapterSpec(vision=r".*patch_embed.*"), "matches no linear of the vision tower"),
])
def test_the_patch_embedding_is_never_a_target(spec, message):
    with pytest.raises(AdapterError, match=message):
        select_targets(tiny_vlm(), spec)


def test_vision_options_on_a_text_model_are_refused():
    with pytest.raises(AdapterError, match="adapter.vision and adapter.projector apply to vision-language models"):
        select_targets(tiny_model("tiny-llama"), AdapterSpec(projector=True))


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    processor = tiny_vlm_processor()
    data = build_vision_datasets(processor, train_files=[str(shapes_dataset(folder))], eval_files=None,
                                 format="openai", columns=None, val_size=0, cutoff_len=512, train_on_prompt=False,
                                 system_prompt=None, template="auto", on_overflow="drop", seed=0)
    return collate_vision(data.train[-4:], processor)


def logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def test_ours_loads_in_peft_with_the_same_outputs(batch, tmp_path):
    peft = require("peft")
    model = tiny_vlm()
    spec = AdapterSpec(r=4, alpha=8, init="none", vision=["qkv", "down_proj"], projector=True)
    torch.manual_seed(0)
    add_adapter(model, spec)
    ours = logits(model, batch)
    assert not torch.allclose(ours, logits(tiny_vlm(), batch), atol=1e-4)
    save_adapter(model, tmp_path, spec, base_model_name_or_path=TINY_VLM)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    peft_model = peft.PeftModel.from_pretrained(tiny_vlm(), tmp_path)
    wrapped = {name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    assert len(wrapped) == 28 + 4 + 2 and isinstance(config["target_modules"], str)
    torch.testing.assert_close(logits(peft_model, batch), ours, atol=1e-5, rtol=1e-4)


def test_peft_adapter_on_the_vision_tower_loads_in_ours_with_the_same_outputs(batch, tmp_path):
    peft = require("peft")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                             target_modules=r".*(language_model.*\.(q_proj|v_proj)|visual\.blocks\.\d+\.attn\.qkv"
                                            r"|visual\.merger\.mlp\.0)")
    peft_model = peft.get_peft_model(tiny_vlm(), config)
    peft_model.save_pretrained(tmp_path)
    reference = logits(peft_model, batch)
    model = tiny_vlm()
    load_adapter(model, tmp_path)
    adapted = [p for p, m in model.named_modules() if type(m).__name__ == "AdaptedLinear"]
    assert len(adapted) == 8 + 2 + 1
    torch.testing.assert_close(logits(model, batch), reference, atol=1e-5, rtol=1e-4)
