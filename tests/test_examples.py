"""Every YAML under examples/ loads and validates against the schema, its data files included."""

from pathlib import Path

import pytest

from loraforge.config import load_config

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.yaml"))


def test_there_are_examples():
    assert EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(path):
    config = load_config(path)
    for file in config.data.train_files + config.data.eval_files + config.data.test_files:
        assert Path(file).exists(), file
