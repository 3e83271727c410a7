"""The Train form as data (its choices come from the schema and the registries; the config it makes
round-trips; problems land at the field that caused them), and the login check of ``loraforge webui``."""

from __future__ import annotations

import dataclasses

import pytest

from loraforge.adapters.registry import METHODS
from loraforge.cli.main import CommandError
from loraforge.cli.webui import auth_check
from loraforge.config import Config
from loraforge.webui.form import (
    FormValues,
    config_data,
    form_values,
    method_names,
    quantization_choices,
    validate,
)


def test_choices_come_from_the_registry_and_the_schema():
    assert method_names() == list(METHODS)
    assert quantization_choices() == ["none", "nf4", "fp4", "int", "gguf"]


def test_form_values_round_trip_through_a_config():
    values = dataclasses.replace(FormValues(), model_kind="tiny-qwen2", method="dora", quantization="nf4", r=8,
                                 lr=1e-3, max_steps=7, columns="instruction=question, output=answer",
                                 gradient_checkpointing=True, run_name="x")
    data = config_data(values, {"train": {"seed": 3}})
    config = Config.from_dict(data, check_files=False)
    assert (config.model.source, config.adapter.method, config.model.quantization.type) == ("tiny-qwen2", "dora",
                                                                                           "nf4")
    assert config.train.seed == 3 and config.train.max_steps == 7 and config.train.save_steps is None
    assert config.data.columns == {"instruction": "question", "output": "answer"}
    back = form_values(data)
    assert dataclasses.replace(back, run_name="x") == dataclasses.replace(values, run_name="x")


def test_problems_are_placed_at_their_field():
    data = config_data(dataclasses.replace(FormValues(), model_kind="tiny-llama", method="lorra"), {})
    data["train"]["lr"] = -1
    _, errors = validate(data, check_files=False)
    assert any("did you mean 'lora'" in e for e in errors["method"])
    assert any("train.lr" in e for e in errors["train"])
    assert "model" not in errors and "data" not in errors


def test_login_accepts_the_pair_or_the_api_key():
    check = auth_check("admin:s3cret", "key123")
    assert check("admin", "s3cret") and check("anyone", "key123")
    assert not check("admin", "wrong") and not check("other", "s3cret")
    assert auth_check(None, None) is None
    with pytest.raises(CommandError, match="USER:PASSWORD"):
        auth_check("nocolon", None)
