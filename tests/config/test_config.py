import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from loraforge.adapters.registry import METHODS
from loraforge.config import Config, ConfigError, QuantizationConfig, load_config, save_config


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A config folder with one data file, and a different working directory."""
    write(tmp_path / "cfg" / "data" / "train.json", "[]")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return tmp_path


def config_file(project: Path, body: str = "") -> Path:
    """``cfg/config.yaml`` with a valid ``data`` section on lines 1-2, then ``body`` from line 3."""
    body = textwrap.dedent(body).lstrip("\n")
    return write(project / "cfg" / "config.yaml", "data:\n  train_files: data/train.json\n" + body)


def error_of(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    return str(info.value)


def test_defaults(project):
    config = load_config(config_file(project))
    assert config.model.source == "default" and config.model.dtype == "float32"
    assert config.model.quantization is None and config.model.threads is None
    assert (config.adapter.method, config.adapter.r, config.adapter.alpha) == ("lora", 16, 32.0)
    assert config.adapter.target_modules == "all-linear" and config.adapter.rank_pattern == {}
    assert (config.data.format, config.data.cutoff_len, config.data.template) == ("alpaca", 1024, "auto")
    assert (config.train.lr, config.train.epochs, config.train.max_steps) == (2e-4, 1.0, None)
    assert config.output.dir == str(project / "cwd" / "runs" / "default")
    assert list(METHODS) == ["lora", "dora", "qalora", "adalora", "vera"]


def test_every_field_has_help():
    import dataclasses

    for section in dataclasses.fields(Config):
        assert section.metadata["help"]
        for f in dataclasses.fields(section.default_factory) + dataclasses.fields(QuantizationConfig):
            assert f.metadata.get("help"), f"{section.name}.{f.name} has no help text"


def test_round_trip(project):
    path = config_file(project, """
        model: {source: tiny-llama, quantization: {type: int, bits: 3, group_size: 32}}
        adapter: {method: dora, target_modules: [q_proj, v_proj], layers_to_transform: [0, 1],
                  rank_pattern: {q_proj: 4}}
        train: {lr: 1e-4, max_steps: 5, resume_from_checkpoint: latest}
    """)
    config = load_config(path)
    saved = project / "run" / "config.yaml"
    save_config(config, saved)
    again = load_config(saved)
    assert again == config
    assert again.to_dict() == config.to_dict()
    assert Config.from_dict(config.to_dict()) == config
    assert sorted(os.listdir(saved.parent)) == ["config.yaml"]  # no temp file left behind


def test_save_is_atomic_on_failure(project, monkeypatch):
    config = load_config(config_file(project))
    target = project / "run" / "config.yaml"
    write(target, "old: content\n")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save_config(config, target)
    assert target.read_text() == "old: content\n"
    assert sorted(os.listdir(target.parent)) == ["config.yaml"]


def test_overrides(project):
    config = load_config(config_file(project), [
        "train.lr=1e-4",
        "data.train_files=[data/train.json, data]",
        "model.quantization.bits=4",
        "adapter.target_modules=[q_proj,k_proj]",
        "adapter.rank_pattern={q_proj: 8}",
        "train.max_grad_norm=null",
        "output.dir=out",
    ])
    assert config.train.lr == 1e-4
    assert config.data.train_files == [str(project / "cfg" / "data" / "train.json"), str(project / "cfg" / "data")]
    assert config.model.quantization == QuantizationConfig(bits=4, type="nf4", double_quant=True, block_size=64)
    assert config.adapter.target_modules == ["q_proj", "k_proj"]
    assert config.adapter.rank_pattern == {"q_proj": 8}
    assert config.train.max_grad_norm is None
    assert config.output.dir == str(project / "cwd" / "out")


def test_override_replaces_a_section_value(project):
    path = config_file(project, "model:\n  quantization: {type: int, bits: 2}\n")
    assert load_config(path).model.quantization.group_size == 64
    assert load_config(path, ["model.quantization=null"]).model.quantization is None


def test_quantization_defaults_depend_on_type():
    nf4, int4 = QuantizationConfig(), QuantizationConfig(type="int")
    assert (nf4.block_size, nf4.double_quant, nf4.group_size) == (64, True, None)
    assert (int4.block_size, int4.double_quant, int4.group_size) == (None, None, 64)


def test_numeric_strings_are_floats(project):
    config = load_config(config_file(project, "train:\n  lr: 1e-4\n  epochs: 2\nadapter:\n  alpha_pattern: {q: 5e1}\n"))
    assert config.train.lr == 1e-4 and isinstance(config.train.lr, float)
    assert config.train.epochs == 2.0 and isinstance(config.train.epochs, float)
    assert config.adapter.alpha_pattern == {"q": 50.0}


def test_val_size_int_or_fraction(project):
    assert type(load_config(config_file(project), ["data.val_size=10"]).data.val_size) is int
    assert load_config(config_file(project), ["data.val_size=0.1"]).data.val_size == 0.1
    assert "a fraction must be in [0, 1)" in error_of(config_file(project), ["data.val_size=1.0"])


def test_paths_resolve_against_config_folder(project):
    absolute = project / "cfg" / "data" / "train.json"
    config = load_config(write(project / "cfg" / "config.yaml", f"data:\n  train_files: data/train.json\n"
                                                              f"  eval_files: [{absolute}]\n"))
    assert config.data.train_files == [str(absolute)]
    assert config.data.eval_files == [str(absolute)]


def test_from_dict_resolves_against_base_dir(project):
    config = Config.from_dict({"data": {"train_files": "data/train.json"}}, base_dir=project / "cfg")
    assert config.data.train_files == [str(project / "cfg" / "data" / "train.json")]


def test_unknown_key_with_suggestion_and_line(project):
    message = error_of(config_file(project, "train:\n  lr: 1.0e-4\n  warmup_stpes: 3\n"))
    assert message == "%s:5: unknown key 'train.warmup_stpes'; did you mean 'train.warmup_steps'?" % (
        project / "cfg" / "config.yaml")


def test_unknown_section_and_key_in_wrong_section(project):
    message = error_of(config_file(project, "trian: {}\ntrain:\n  cutoff_len: 5\n"))
    assert "config.yaml:3: unknown section 'trian'; did you mean 'train'?" in message
    assert "config.yaml:5: unknown key 'train.cutoff_len'; did you mean 'data.cutoff_len'?" in message


def test_unknown_override_key(project):
    message = error_of(config_file(project), ["train.lrr=1"])
    assert message == "override 'train.lrr=1': unknown key 'train.lrr'; did you mean 'train.lr'?"


def test_bad_override_syntax(project):
    message = error_of(config_file(project), ["train.lr", "train.lr.x=1", "data.train_files=[a"])
    assert "override 'train.lr': expected section.key=value" in message
    assert "override 'data.train_files=[a': cannot read the value as YAML" in message
    # train.lr is not in the file, so the override makes it a mapping, which is the wrong type
    assert "override 'train.lr.x=1': train.lr: expected a number, got {'x': 1}" in message


def test_wrong_types(project):
    message = error_of(config_file(project, """
        train: {lr: fast, batch_size: true, max_steps: 2.5}
        adapter: {target_modules: [q_proj, 3], use_rslora: 1}
        data: {columns: [a]}
    """))
    assert "config.yaml:3: train.lr: expected a number, got 'fast'" in message
    assert "train.batch_size: expected an integer, got true" in message
    assert "train.max_steps: expected an integer or null, got 2.5" in message
    assert "adapter.target_modules[1]: expected a string, got 3" in message
    assert "adapter.use_rslora: expected true or false, got 1" in message
    assert "data.columns: expected a mapping of names to strings, got ['a']" in message


def test_bad_choice_lists_allowed_values(project):
    message = error_of(config_file(project, "adapter:\n  method: lorra\n"))
    assert message.endswith("config.yaml:4: adapter.method: 'lorra' is not an adapter method; choose one of lora, "
                            "dora, qalora, adalora, vera; did you mean 'lora'?")


def test_bounds(project):
    message = error_of(config_file(project, """
        adapter: {r: 0, dropout: 1.0, layers_to_transform: [0, -1], rank_pattern: {q: 0}}
        train: {warmup_ratio: 0.5, warmup_steps: 3}
    """))
    assert "adapter.r: must be > 0, got 0" in message
    assert "adapter.dropout: must be < 1, got 1.0" in message
    assert "adapter.layers_to_transform[1]: must be >= 0, got -1" in message
    assert "adapter.rank_pattern.q: must be > 0, got 0" in message
    assert "train.warmup_ratio: set warmup_steps or warmup_ratio, not both" in message


def test_many_errors_reported_at_once_in_line_order(project):
    message = error_of(config_file(project, "train:\n  lr: fast\nadapter:\n  r: -1\n  alph: 3\n"), ["output.dirr=x"])
    lines = message.splitlines()
    assert lines[0].startswith("4 problems in ")
    assert [line.split(": ")[0].rsplit(":", 1)[-1] for line in lines[1:4]] == ["4", "6", "7"]
    assert lines[4].startswith("override 'output.dirr=x': unknown key 'output.dirr'; did you mean 'output.dir'?")


def test_nf4_needs_4_bits(project):
    message = error_of(config_file(project, "model:\n  quantization:\n    type: nf4\n    bits: 3\n"))
    assert message.endswith("config.yaml:6: model.quantization.bits: type nf4 is 4-bit only, got bits 3; "
                            "use type: int for 2, 3 or 8 bits")
    message = error_of(config_file(project), ["model.quantization.type=int", "model.quantization.block_size=32",
                                              "model.quantization.group_size=48"])
    assert "model.quantization.block_size: applies to nf4/fp4 only; type int uses group_size" in message
    assert "model.quantization.group_size: expected one of 32, 64, 128 or null, got 48" in message


def test_missing_config_file(project):
    assert error_of("nope.yaml") == f"config file not found: {project / 'cwd' / 'nope.yaml'}"


def test_yaml_syntax_error(project):
    path = write(project / "bad.yaml", "train:\n  lr: 1\n  seed: [1, 2\nmodel: {}\n")
    message = error_of(path)
    assert message.startswith(f"{path}:") and "YAML syntax error" in message
    assert len(message.splitlines()) == 1


def test_duplicate_key(project):
    message = error_of(config_file(project, "train:\n  lr: 0.1\n  lr: 0.2\n"))
    assert "config.yaml:5: train.lr: duplicate key (first at " in message


def test_data_files_required_and_must_exist(project):
    message = error_of(write(project / "cfg" / "empty.yaml", "model: {source: tiny-llama}\n"))
    assert message.endswith("empty.yaml: data.train_files: required for training; list the training data files "
                            "or folders")
    message = error_of(write(project / "cfg" / "config.yaml", "data:\n  train_files: data/train.json\n"
                                                               "  test_files: [data/train.json, data/missing.json]\n"))
    assert "config.yaml:3: data.test_files: no such file or folder: %s" % (project / "cfg" / "data" / "missing.json") \
        in message
    assert load_config(write(project / "cfg" / "empty.yaml", ""), check_files=False).data.train_files == []


def test_top_level_must_be_a_mapping(project):
    assert "expected a mapping of sections (model, adapter, data, train, output), got [1, 2]" in error_of(
        write(project / "list.yaml", "[1, 2]\n"))


def test_config_does_not_import_torch():
    code = "import sys, loraforge.config; assert 'torch' not in sys.modules, 'config imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
