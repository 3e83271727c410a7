"""Familiar Hugging Face / LLaMA-Factory / Axolotl key names are suggested, never accepted."""

import pytest

from loraforge.config import ConfigError, load_config
from loraforge.config.validate import ALIASES


@pytest.fixture
def config(tmp_path):
    (tmp_path / "train.json").write_text("[]")
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train_files: train.json\n")
    return path


def message_of(config, override: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(config, [override])
    return str(info.value)


@pytest.mark.parametrize("key, suggestion", [
    ("learning_rate", "train.lr"),
    ("num_train_epochs", "train.epochs"),
    ("per_device_train_batch_size", "train.batch_size"),
    ("gradient_accumulation_steps", "train.grad_accum"),
    ("lora_rank", "adapter.r"),
    ("lora_target", "adapter.target_modules"),
    ("model_name_or_path", "model.source"),
])
def test_the_issue_aliases_in_their_section_and_at_the_top(config, key, suggestion):
    section = suggestion.split(".")[0]
    assert message_of(config, f"{section}.{key}=1") == (
        f"override '{section}.{key}=1': unknown key '{section}.{key}'; did you mean '{suggestion}'?")
    assert message_of(config, f"{key}=1") == (
        f"override '{key}=1': unknown section '{key}'; did you mean '{suggestion}'?")


@pytest.mark.parametrize("key", sorted(ALIASES))
def test_every_alias_suggests_its_key_and_is_not_accepted(config, key):
    assert message_of(config, f"train.{key}=1").endswith(f"did you mean '{ALIASES[key]}'?")


def test_cutoff_len_in_the_wrong_section(config):
    assert message_of(config, "train.cutoff_len=512") == (
        "override 'train.cutoff_len=512': unknown key 'train.cutoff_len'; did you mean 'data.cutoff_len'?")


@pytest.mark.parametrize("override, suggestion", [
    ("train.lerning_rate=1e-4", "train.lr"),
    ("lerning_rate=1e-4", "train.lr"),
    ("train.num_train_epoch=2", "train.epochs"),
    ("adapter.lora_rnk=4", "adapter.r"),
    ("train.warmup_stpes=2", "train.warmup_steps"),
])
def test_typos_of_aliases_are_matched_too(config, override, suggestion):
    assert message_of(config, override).endswith(f"did you mean '{suggestion}'?")


def test_an_alias_in_the_file_is_located_by_line(tmp_path, config):
    config.write_text("data:\n  train_files: train.json\ntrain:\n  learning_rate: 1e-4\n")
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert str(info.value) == f"{config}:4: unknown key 'train.learning_rate'; did you mean 'train.lr'?"
