"""Every YAML under examples/ validates, is documented in the README, and trains for real."""

import math
import re
from pathlib import Path

import pytest

from loraforge.config import load_config
from loraforge.train import run_training

ROOT = Path(__file__).parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_the_readme_documents_exactly_the_examples_that_exist():
    documented = set(re.findall(r"examples/([\w.-]+\.yaml)", (ROOT / "README.md").read_text()))
    assert documented == {path.name for path in EXAMPLES}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(path):
    config = load_config(path)
    for file in config.data.train_files + config.data.eval_files + config.data.test_files:
        assert Path(file).exists(), file


def _native_gguf(path: Path) -> bool:
    quantization = load_config(path).model.quantization
    return quantization is not None and quantization.type == "gguf"


@pytest.mark.parametrize("path", [
    pytest.param(p, marks=[pytest.mark.slow] if _native_gguf(p) else [], id=p.name) for p in EXAMPLES
])
def test_example_trains_two_steps(path, tmp_path):
    """The example's own method, quantization, data format and template, on a tiny model (the default
    model where the example keeps a GGUF's own blocks, which needs a GGUF source)."""
    overrides = ["train.max_steps=2", "data.test_files=[]", "data.val_size=0",
                 f"output.dir={tmp_path / 'run'}"]
    if not _native_gguf(path) and not load_config(path).model.source.startswith("tiny-"):  # tiny ones stay
        overrides.append("model.source=tiny-llama")
    if load_config(path).adapter.method == "adalora":  # its rank schedule must fit the two steps
        overrides += ["adapter.options.tinit=0", "adapter.options.tfinal=0"]
    result = run_training(load_config(path, overrides))
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert result.steps == 2 and math.isfinite(result.summary["train_loss"])
