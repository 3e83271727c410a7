"""The quantized base saved once in the model cache: hit bit-identical, keyed by source and settings,
damage detected and rebuilt, writes atomic."""

import json
import os
import re

import pytest
import torch
from torch import nn

from loraforge.config.schema import ModelConfig, QuantizationConfig
from loraforge.models import quantized_base, streaming_load
from loraforge.models.kind import is_vision_language
from loraforge.models.prepare import load_base
from loraforge.models.quantized_base import MANIFEST_NAME, cache_entry
from loraforge.models.tiny import tiny_model, tiny_tokenizer
from loraforge.models.tiny_vlm import tiny_vlm, tiny_vlm_processor

CPU = torch.device("cpu")
IDS = torch.tensor([[1, 5, 9, 200, 17, 3, 44]])


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("LORAFORGE_CACHE", str(root))
    monkeypatch.delenv("LORAFORGE_QUANTIZED_CACHE", raising=False)
    return root


@pytest.fixture
def folder(tmp_path):
    model = tiny_model("tiny-qwen2", tie_word_embeddings=True)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.bias.normal_(generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path / "m", max_shard_size="40KB")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def nf4(source, **options):
    return ModelConfig(source=str(source), quantization=QuantizationConfig(type="nf4", compute_dtype="fp32", **options))


def forbid_building(monkeypatch):
    """Make any load that is not a cache hit fail."""
    def fail(*args, **kwargs):
        raise AssertionError("the base was built again instead of read from the cache")

    monkeypatch.setattr(quantized_base, "stream_quantized", fail)
    monkeypatch.setattr(quantized_base, "load_model", fail)


def assert_same(ours, reference):
    a, b = ours.state_dict(), reference.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in b)
    assert [type(m) for m in ours.modules()] == [type(m) for m in reference.modules()]
    assert ours.config.to_dict() == reference.config.to_dict()
    with torch.no_grad():
        assert torch.equal(ours(IDS).logits, reference(IDS).logits)


def test_the_second_load_reads_the_cache_bit_identically(cache, folder, monkeypatch):
    config = nf4(folder)
    first, tokenizer = load_base(config, CPU)
    entry = cache_entry(config, CPU)
    assert entry.parent == cache / "quantized" and (entry / MANIFEST_NAME).is_file()
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".")], "no staging folder left behind"
    forbid_building(monkeypatch)
    second, cached_tokenizer = load_base(config, CPU)
    assert_same(second, first)
    assert second.lm_head.weight is second.model.embed_tokens.weight
    assert second.config._name_or_path == str(folder)
    assert second.generation_config.to_dict() == first.generation_config.to_dict()
    assert cached_tokenizer("hello <|im_end|>")["input_ids"] == tokenizer("hello <|im_end|>")["input_ids"]
    assert cached_tokenizer.chat_template == tokenizer.chat_template


def test_a_vision_language_model_is_cached_with_its_processor(cache, tmp_path, monkeypatch):
    tiny_vlm().save_pretrained(tmp_path / "vlm")
    tiny_vlm_processor().save_pretrained(tmp_path / "vlm")
    config = nf4(tmp_path / "vlm")
    first, _ = load_base(config, CPU)
    forbid_building(monkeypatch)
    second, processor = load_base(config, CPU)
    assert is_vision_language(second) and processor.image_token_id == tiny_vlm_processor().image_token_id
    assert isinstance(second.model.visual.blocks[0].mlp.up_proj, nn.Linear)
    assert_same(second, first)


def test_the_key_follows_settings_and_source(cache, folder):
    config = nf4(folder)
    entry = cache_entry(config, CPU)
    assert cache_entry(nf4(folder, block_size=128), CPU) != entry
    assert cache_entry(nf4(folder, double_quant=False), CPU) != entry
    assert cache_entry(ModelConfig(source=str(folder), dtype="bfloat16", quantization=config.quantization), CPU) != entry
    assert cache_entry(nf4(folder), CPU) == entry
    (folder / "config.json").write_text((folder / "config.json").read_text() + " ")
    assert cache_entry(nf4(folder), CPU) != entry, "an edited config.json is another source"
    shard = next(folder.glob("model-*.safetensors"))
    before = cache_entry(nf4(folder), CPU)
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1))
    assert cache_entry(nf4(folder), CPU) != before, "a rewritten shard is another source"
    assert cache_entry(nf4("tiny-llama"), CPU) is None, "in-process models have nothing to key on"


def test_the_cache_can_be_turned_off(cache, folder, monkeypatch):
    monkeypatch.setenv("LORAFORGE_QUANTIZED_CACHE", "off")
    load_base(nf4(folder), CPU)
    assert not cache.exists() or not (cache / "quantized").exists()


def damage_truncate(weights):
    with open(weights, "r+b") as file:
        file.truncate(weights.stat().st_size - 100)


def damage_flip_a_byte(weights):
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))


def damage_manifest(weights):
    (weights.parent / MANIFEST_NAME).write_text("{not json")


def damage_remove(weights):
    weights.unlink()


def damage_layout(weights):
    """A file whose bytes match its manifest but whose tensors don't fit the model (e.g. a foreign writer)."""
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3)}, weights)
    manifest = json.loads((weights.parent / MANIFEST_NAME).read_text())
    manifest["weights"] = {"size": weights.stat().st_size, "sha256": quantized_base._sha256(weights)}
    (weights.parent / MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, message", [
    (damage_truncate, r"model.safetensors is \d+ bytes, the manifest says \d+ \(truncated\?\)"),
    (damage_flip_a_byte, r"model.safetensors's sha256 differs from the manifest's"),
    (damage_manifest, r"Expecting property name"),
    (damage_remove, r"model.safetensors is missing"),
    (damage_layout, r"does not fit Qwen2ForCausalLM"),
])
def test_damage_is_detected_warned_and_rebuilt(cache, folder, damage, message):
    config = nf4(folder)
    first, _ = load_base(config, CPU)
    entry = cache_entry(config, CPU)
    damage(entry / "model.safetensors")
    with pytest.warns(UserWarning) as record:
        rebuilt, _ = load_base(config, CPU)
    text = " ".join(str(warning.message) for warning in record)
    assert re.search(rf"the cached quantized base {re.escape(str(entry))} is damaged \(.*{message}", text), text
    assert "; rebuilding it" in text
    assert_same(rebuilt, first)
    manifest = json.loads((entry / MANIFEST_NAME).read_text())
    assert manifest["weights"]["size"] == (entry / "model.safetensors").stat().st_size
    assert manifest["weights"]["sha256"] == quantized_base._sha256(entry / "model.safetensors")


def test_a_failed_write_warns_and_leaves_no_entry(cache, folder, monkeypatch):
    def disk_full(model, directory):
        (directory / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("loraforge.quant.serialization.save_quantized", disk_full)
    config = nf4(folder)
    with pytest.warns(UserWarning, match="could not cache the quantized base .* No space left on device"):
        model, _ = load_base(config, CPU)
    assert sum(1 for _ in model.modules()) > 0
    entry = cache_entry(config, CPU)
    assert not entry.exists() and not [p for p in entry.parent.iterdir()]


def test_a_hit_hashes_the_weights_once_until_they_are_written_again(cache, folder, monkeypatch):
    """A hit whose hash check passed records the file's state (size, inode, mtime, ctime); later hits skip the hash
    while that state holds, and a write changes it, so damage is still caught."""
    monkeypatch.setattr(quantized_base, "SETTLED_SECONDS", 0.0)  # the file is fresh here; users' files are older
    hashed = []
    sha256 = quantized_base._sha256
    monkeypatch.setattr(quantized_base, "_sha256", lambda path: hashed.append(path) or sha256(path))
    config = nf4(folder)
    first, _ = load_base(config, CPU)  # built, hashed for the manifest
    load_base(config, CPU)  # the first hit hashes and records the check
    entry = cache_entry(config, CPU)
    weights = entry / "model.safetensors"
    assert json.loads((entry / MANIFEST_NAME).read_text())["weights"]["checked"] == quantized_base._file_state(weights)
    hashed.clear()
    again, _ = load_base(config, CPU)
    assert hashed == []
    assert_same(again, first)
    damage_flip_a_byte(weights)
    with pytest.warns(UserWarning, match="sha256 differs from the manifest's"):
        load_base(config, CPU)
    assert hashed


def test_streaming_is_skipped_on_a_hit(cache, folder, monkeypatch):
    """A hit doesn't even open the source's shards: the fingerprint reads headers and small files only."""
    config = nf4(folder)
    load_base(config, CPU)
    monkeypatch.setattr(streaming_load, "_safe_open", None)
    forbid_building(monkeypatch)
    load_base(config, CPU)


def test_train_writes_the_cache_and_export_run_reads_it(cache, folder, tmp_path, monkeypatch):
    """The user's path: ``loraforge train`` quantizes the base once; ``loraforge export --run`` merges into the
    very same base, read from the cache."""
    from loraforge.cli.main import main

    rows = [{"instruction": f"say {w}", "output": w.upper()} for w in ["cat", "dog", "sun", "sky"]]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "c.yaml").write_text(
        f"model: {{source: {folder}, threads: 1, quantization: {{type: nf4, compute_dtype: fp32}}}}\n"
        "adapter: {r: 4}\ndata: {train_files: train.jsonl, cutoff_len: 32}\n"
        f"train: {{max_steps: 2, batch_size: 2, lr: 0.01}}\noutput: {{dir: {tmp_path / 'run'}}}\n")
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    assert len(list((cache / "quantized").iterdir())) == 1
    forbid_building(monkeypatch)
    assert main(["export", "--run", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
