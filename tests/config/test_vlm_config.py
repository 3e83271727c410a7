"""The vision-language keys of the config: adapter.vision, adapter.projector, data.on_overflow."""

import pytest

from loraforge.config import Config, ConfigError


def test_vision_keys_take_booleans_names_or_a_regex():
    config = Config.from_dict({"adapter": {"vision": ["qkv", "proj"], "projector": True},
                               "data": {"on_overflow": "error"}}, check_files=False)
    assert (config.adapter.vision, config.adapter.projector, config.data.on_overflow) == (["qkv", "proj"], True,
                                                                                          "error")
    defaults = Config.from_dict({}, check_files=False)
    assert (defaults.adapter.vision, defaults.adapter.projector, defaults.data.on_overflow) == (False, False, "drop")


def test_bad_vision_keys_are_all_reported_at_once():
    with pytest.raises(ConfigError) as err:
        Config.from_dict({"adapter": {"vision": "(", "projector": "yes"}, "data": {"on_overflow": "cut"}},
                         source="c.yaml", check_files=False)
    message = str(err.value)
    assert "adapter.vision: not a valid regex" in message
    assert "adapter.projector: expected true or false, got 'yes'" in message
    assert "data.on_overflow: expected one of drop, error, got 'cut'" in message
    with pytest.raises(ConfigError, match="adapter.vision: an empty list adapts nothing"):
        Config.from_dict({"adapter": {"vision": []}}, check_files=False)


def test_llamafactory_freeze_flags_become_the_vision_opt_ins(tmp_path, monkeypatch):
    """With LoRA, LLaMA-Factory adapts the vision tower / projector when ``freeze_vision_tower`` /
    ``freeze_multi_modal_projector`` is false: ``adapter.vision`` / ``adapter.projector`` here."""
    import json

    from loraforge.config.llamafactory import convert

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps({"d": {"file_name": "d.json"}}))
    (tmp_path / "data" / "d.json").write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    monkeypatch.chdir(tmp_path)
    base = "model_name_or_path: tiny-qwen2.5-vl\nstage: sft\nfinetuning_type: lora\ndataset: d\n"
    (tmp_path / "a.yaml").write_text(base + "freeze_vision_tower: false\nfreeze_multi_modal_projector: true\n")
    config = convert(tmp_path / "a.yaml").config
    assert (config.adapter.vision, config.adapter.projector) == (True, False)
    (tmp_path / "b.yaml").write_text(base + "freeze_multi_modal_projector: false\n")
    assert convert(tmp_path / "b.yaml").config.adapter.projector is True
    (tmp_path / "c.yaml").write_text(base + "freeze_vision_tower: maybe\n")
    with pytest.raises(ConfigError, match="freeze_vision_tower: expected true or false, got 'maybe'"):
        convert(tmp_path / "c.yaml")
