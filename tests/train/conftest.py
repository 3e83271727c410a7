import json

import pytest
import yaml


def _toy_run(folder):
    """A config file for tiny-llama on a small alpaca dataset in ``folder``; returns ``make(**overrides) -> path``."""
    rows = [{"instruction": f"say {w}", "output": w.upper()} for w in
            ["cat", "dog", "sun", "sky", "red", "box", "pen", "cup", "hat", "map", "owl", "fig"]]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))

    def make(**sections):
        config = {
            "model": {"source": "tiny-llama", "threads": 1},
            "adapter": {"r": 4, "alpha": 8, "dropout": 0.1},
            "data": {"train_files": "train.jsonl", "val_size": 2, "cutoff_len": 64},
            "train": {"batch_size": 2, "grad_accum": 2, "lr": 3e-2, "max_steps": 8, "logging_steps": 1},
            "output": {"dir": str(folder / "run"), "tensorboard": True, "plot": True},
        }
        for section, values in sections.items():
            config[section].update(values)
        path = folder / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return make


@pytest.fixture
def toy_run(tmp_path):
    return _toy_run(tmp_path)


@pytest.fixture(scope="module")
def module_toy_run(tmp_path_factory):
    """``toy_run`` for a module's tests to share (one data folder, so one set of data paths)."""
    return _toy_run(tmp_path_factory.mktemp("toy"))
