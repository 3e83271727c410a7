"""Adapter folders on bad input: one clear error naming the file and the tensor; a base name that
differs is only a warning. And ``save_adapter`` keeps what else the folder holds."""

import json
import os
import stat
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraforge.adapters import AdapterFormatError, AdapterSpec, add_adapter, load_adapter, save_adapter
from loraforge.adapters.peft_format import load_adapter_weights, read_adapter_dir
from loraforge.models import tiny_model

KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def saved(tmp_path, spec=AdapterSpec(r=2), base="tiny-llama", **model_overrides):
    model = tiny_model("tiny-llama", **model_overrides)
    add_adapter(model, spec)
    folder = tmp_path / "adapter"
    save_adapter(model, folder, spec, base_model_name_or_path=base)
    return folder


def test_weights_into_an_existing_adapter_check_every_key_and_shape_before_copying(tmp_path):
    folder = saved(tmp_path)
    weights = folder / "adapter_model.safetensors"
    _, tensors = read_adapter_dir(folder)
    model = tiny_model("tiny-llama")
    add_adapter(model, AdapterSpec(r=4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterFormatError) as err:
        load_adapter_weights(model, "default", tensors, folder)
    assert str(err.value) == (f"{weights}: {KEY} has shape (2, 64), but this model's adapter needs (4, 64); it was "
                              "saved with another rank, method or base model")

    narrow = tiny_model("tiny-llama")
    add_adapter(narrow, AdapterSpec(r=2, target_modules=["q_proj"]))
    with pytest.raises(AdapterFormatError) as err:
        load_adapter_weights(narrow, "default", tensors, folder)
    assert str(err.value) == (f"{weights}: holds {len(tensors) - 4} tensors that adapter 'default' of this model "
                              "lacks, e.g. base_model.model.model.layers.0.mlp.down_proj.lora_A.weight; it was saved "
                              "with other target modules or for another model")

    wide = tiny_model("tiny-llama")
    add_adapter(wide, AdapterSpec(r=2))
    del tensors[KEY]
    with pytest.raises(AdapterFormatError) as err:
        load_adapter_weights(wide, "default", tensors, folder)
    assert str(err.value) == (f"{weights}: lacks ['{KEY}']; it was saved for another model or adapter configuration")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "a refused load changes nothing"


@pytest.mark.parametrize("keep", [0, 7, 100, -10])
def test_truncated_weights_file_is_named(tmp_path, keep):
    folder = saved(tmp_path)
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(AdapterFormatError, match=rf"^{weights}: not a readable safetensors file \(.+\); is it "
                                                 r"truncated or corrupt\?$"):
        load_adapter(tiny_model("tiny-llama"), folder)


@pytest.mark.parametrize("content, message", [
    ('{"peft_type": "LORA", "r": ', "adapter_config.json:1: invalid JSON (Expecting value)"),
    ('[1, 2]', "adapter_config.json: expected a JSON object of LoraConfig fields, got list"),
    ('{"peft_type": "LORA"}', "adapter_config.json: r must be a positive integer, got None"),
    ('{"peft_type": "LORA", "r": 2, "lora_alpha": "big"}',
     "adapter_config.json: a LORA config field has a wrong type or value: could not convert string to float: 'big'"),
])
def test_broken_config_is_named(tmp_path, content, message):
    folder = saved(tmp_path)
    (folder / "adapter_config.json").write_text(content)
    with pytest.raises(AdapterFormatError) as err:
        load_adapter(tiny_model("tiny-llama"), folder)
    assert str(err.value) == f"{folder}/{message}"


def test_another_base_name_is_a_warning_when_the_shapes_fit(tmp_path):
    folder = saved(tmp_path, base="models/tiny-llama-v1")
    with pytest.warns(UserWarning) as caught:
        load_adapter(tiny_model("tiny-llama"), folder, base_model_name_or_path="tiny-llama")
    assert [str(w.message) for w in caught] == [
        f"{folder / 'adapter_config.json'}: the adapter was trained on 'models/tiny-llama-v1' and is loaded into "
        "'tiny-llama'; its shapes fit, but if that is another model its outputs will be wrong"]
    assert caught[0].filename == __file__, "the warning points at the caller"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(tiny_model("tiny-llama"), folder, base_model_name_or_path="models/tiny-llama-v1")
        load_adapter(tiny_model("tiny-llama"), folder)


def test_same_local_model_spelled_differently_is_not_warned_about(tmp_path, monkeypatch):
    (tmp_path / "base").mkdir()
    monkeypatch.chdir(tmp_path)
    folder = saved(tmp_path, base=str(tmp_path / "base"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(tiny_model("tiny-llama"), folder, base_model_name_or_path="./base")


def test_save_replaces_both_files_and_keeps_the_rest_of_the_folder(tmp_path):
    folder = saved(tmp_path)
    (folder / "README.md").write_text("notes")
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "adapter_config.json").write_text("not ours")
    (tmp_path / "link").symlink_to(folder)
    model = tiny_model("tiny-llama")
    add_adapter(model, AdapterSpec(r=4))
    save_adapter(model, tmp_path / "link", AdapterSpec(r=4))
    assert (tmp_path / "link").is_symlink(), "a symlinked folder stays a symlink; its target gets the new files"
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
    assert load_file(folder / "adapter_model.safetensors")[KEY].shape == (4, 64)
    assert (folder / "README.md").read_text() == "notes"
    assert (folder / "tokenizer" / "adapter_config.json").read_text() == "not ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "link"], "no staging folder is left behind"


def test_keys_without_tensors_for_every_module_are_refused(tmp_path):
    folder = saved(tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    del tensors[KEY.replace("lora_A", "lora_B")]
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError) as err:
        load_adapter(tiny_model("tiny-llama"), folder)
    assert str(err.value) == (f"{folder / 'adapter_model.safetensors'}: lacks "
                              f"['{KEY.replace('lora_A', 'lora_B')}']; it was saved for another model or adapter "
                              "configuration")


def test_save_onto_a_file_is_refused_and_the_file_kept(tmp_path):
    from loraforge.adapters import AdapterError

    model = tiny_model("tiny-llama")
    add_adapter(model, AdapterSpec(r=2))
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(AdapterError) as err:
        save_adapter(model, tmp_path / "notes.txt", AdapterSpec(r=2))
    assert str(err.value) == f"can't save the adapter to {tmp_path / 'notes.txt'}: it is a file; give a folder path"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_saved_folder_gets_the_usual_permissions(tmp_path):
    folder = saved(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
