"""``loraforge cache``: what the quantized cache holds, removal by name, least-recently-used eviction to a size."""

import os

import pytest
import torch

from loraforge.cli.main import main
from loraforge.config.schema import ModelConfig, QuantizationConfig
from loraforge.models.prepare import load_base
from loraforge.models.quantized_base import cache_entry, cached_bases
from loraforge.models.tiny import tiny_model, tiny_tokenizer

CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LORAFORGE_QUANTIZED_CACHE", raising=False)


@pytest.fixture
def configs(tmp_path, cache):
    """Three cached bases: NF4 and INT4 of one folder, NF4 of another, used (hit) in that order."""
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        folder = tmp_path / f"m{seed}"
        tiny_model("tiny-llama").save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        folders.append(folder)
    configs = [
        ModelConfig(source=str(folders[0]), quantization=QuantizationConfig(type="nf4", compute_dtype="fp32")),
        ModelConfig(source=str(folders[0]), quantization=QuantizationConfig(type="int", bits=4, compute_dtype="fp32")),
        ModelConfig(source=str(folders[1]), quantization=QuantizationConfig(type="nf4", compute_dtype="fp32")),
    ]
    for config in configs:
        load_base(config, CPU)
    for age, config in zip((300, 200, 100), configs):  # then make the first the least recently used
        manifest = cache_entry(config, CPU) / "loraforge-cache.json"
        os.utime(manifest, (manifest.stat().st_atime, manifest.stat().st_mtime - age))
    return configs


def names(configs):
    return [cache_entry(config, CPU).name for config in configs]


def test_the_listing_names_source_quantization_and_size(configs, capsys):
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert "3 quantized base(s)" in out
    for config, name in zip(configs, names(configs)):
        assert name in out and config.source in out
    assert "quantization: nf4 block 64, double quant, compute float32" in out
    assert "quantization: int4 group 64, compute float32" in out
    assert [e.path.name for e in cached_bases()] == names(configs)[::-1]  # most recently used first
    sizes = {e.path.name: e.nbytes for e in cached_bases()}
    entry = cache_entry(configs[0], CPU)
    assert sizes[entry.name] == sum(f.stat().st_size for f in entry.rglob("*") if f.is_file()) > 0


def test_a_hit_marks_the_entry_used(configs):
    load_base(configs[0], CPU)
    assert cached_bases()[0].path.name == names(configs)[0]


def test_remove_by_name_then_the_next_load_rebuilds_it(configs, capsys):
    first = names(configs)[0]
    assert main(["cache", "--remove", first]) == 0
    assert f"removed {first}" in capsys.readouterr().out
    assert [e.path.name for e in cached_bases()] == names(configs)[:0:-1]
    assert not [p for p in cache_entry(configs[0], CPU).parent.iterdir() if p.name.startswith(".")]
    load_base(configs[0], CPU)
    assert cache_entry(configs[0], CPU).is_dir()


def test_max_size_evicts_least_recently_used_first(configs, capsys):
    sizes = {e.path.name: e.nbytes for e in cached_bases()}
    keep = sizes[names(configs)[1]] + sizes[names(configs)[2]]
    assert main(["cache", "--max-gib", str(keep / (1 << 30))]) == 0
    assert [e.path.name for e in cached_bases()] == [names(configs)[2], names(configs)[1]]
    assert main(["cache", "--max-gib", "0"]) == 0
    assert cached_bases() == []


def test_bad_arguments_are_named(configs, capsys):
    assert main(["cache", "--remove", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--remove nope: no such cache entry" in err and names(configs)[0] in err
    assert main(["cache", "--max-gib", "-1"]) == 2
    assert "--max-gib -1.0" in capsys.readouterr().err
    assert len(cached_bases()) == 3


def test_an_empty_cache_lists_nothing(cache, capsys):
    assert main(["cache"]) == 0
    assert "0 quantized base(s), 0.00 GiB" in capsys.readouterr().out
