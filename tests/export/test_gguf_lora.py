"""The GGUF LoRA file itself: llama.cpp's keys and shapes (read with gguf-py), the Q/K permutation on lora_b
only, one alpha that keeps every module's scale, refusals with reasons, atomic writes, and the CLI."""

import math

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from references import require

from loraforge.adapters import AdapterSpec, add_adapter, read_adapter_dir, save_adapter
from loraforge.adapters.gguf_lora import read_gguf_lora
from loraforge.adapters.peft_format import PREFIX
from loraforge.cli.main import main
from loraforge.export.gguf_lora import write_gguf_lora
from loraforge.export.gguf_writer import GGUFExportError
from loraforge.models import tiny_model


def llama_cpp_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim in numpy."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def saved(folder, family="tiny-llama", **fields):
    model = tiny_model(family)
    spec = AdapterSpec(**{"method": "lora", "r": 4, "alpha": 8, "init": "none", **fields})
    torch.manual_seed(0)
    add_adapter(model, spec)
    return save_adapter(model, folder, spec)


def export(folder, out, gguf_type="f32", family="tiny-llama"):
    config, tensors = read_adapter_dir(folder)
    return write_gguf_lora(tiny_model(family), config, tensors, folder, out, gguf_type)


def fields(path) -> dict:
    return {key: field.contents() for key, field in GGUFReader(path).fields.items() if not key.startswith("GGUF.")}


@pytest.mark.parametrize("family, arch", [("tiny-llama", "llama"), ("tiny-mistral", "llama"), ("tiny-qwen2", "qwen2")])
def test_keys_names_and_shapes_are_llama_cpps(family, arch, tmp_path):
    folder = saved(tmp_path / "a", family)
    export(folder, tmp_path / "a.gguf", family=family)
    assert fields(tmp_path / "a.gguf") == {"general.architecture": arch, "general.type": "adapter",
                                           "general.name": "a", "adapter.type": "lora", "adapter.lora.alpha": 8.0}
    _, tensors = read_adapter_dir(folder)
    config = tiny_model(family).config
    written = {t.name: t for t in GGUFReader(tmp_path / "a.gguf").tensors}
    assert len(written) == len(tensors)
    for layer, (stem, module, heads) in enumerate([("attn_q", "self_attn.q_proj", config.num_attention_heads),
                                                   ("attn_k", "self_attn.k_proj", config.num_key_value_heads),
                                                   ("ffn_down", "mlp.down_proj", None)]):
        for index in range(config.num_hidden_layers):
            a = tensors[f"{PREFIX}model.layers.{index}.{module}.lora_A.weight"].numpy()
            b = tensors[f"{PREFIX}model.layers.{index}.{module}.lora_B.weight"].numpy()
            lora_a, lora_b = written[f"blk.{index}.{stem}.weight.lora_a"], written[f"blk.{index}.{stem}.weight.lora_b"]
            # ggml lists dimensions innermost first: lora_a is ne (in, r), lora_b ne (r, out)
            assert tuple(lora_a.shape) == a.shape[::-1] and tuple(lora_b.shape) == b.shape[::-1]
            assert np.array_equal(np.asarray(lora_a.data), a)
            expected_b = llama_cpp_permute(b, heads) if heads and arch == "llama" else b
            assert np.array_equal(np.asarray(lora_b.data), expected_b), (stem, index)


def test_rslora_and_patterns_keep_each_modules_scale(tmp_path):
    """rsLoRA: alpha·√r in the file; a module whose scale differs has it folded into its lora_b. Read back,
    every module's ``scale · B A`` is the original's."""
    folder = saved(tmp_path / "a", r=16, alpha=8, use_rslora=True, rank_pattern={"o_proj": 4},
                   alpha_pattern={"v_proj": 3})
    report = export(folder, tmp_path / "a.gguf")
    assert fields(tmp_path / "a.gguf")["adapter.lora.alpha"] == pytest.approx(8 * math.sqrt(16))
    assert sorted({p.rsplit(".", 1)[1] for p in report.rescaled}) == ["o_proj", "v_proj"]
    model = tiny_model("tiny-llama")
    original = _updates(model, *read_adapter_dir(folder), folder)
    again = _updates(model, *read_gguf_lora(tmp_path / "a.gguf", model.config), tmp_path)
    assert original.keys() == again.keys()
    for path in original:
        torch.testing.assert_close(again[path], original[path], atol=1e-6, rtol=1e-5)


def _updates(model, config, tensors, source):
    from loraforge.adapters.fold import fold_adapter

    return {path: pair.scale * pair.b @ pair.a for path, pair in fold_adapter(model, config, tensors, str(source)).items()}


def test_q8_0_blocks_where_rows_are_whole_blocks_f16_elsewhere(tmp_path):
    report = export(saved(tmp_path / "a", r=4), tmp_path / "a.gguf", "q8_0")
    types = {t.name.rsplit(".", 1)[1]: t.type for t in report.tensors}
    assert types == {"lora_a": "Q8_0", "lora_b": "F16"}  # lora_b's rows hold r=4 values
    assert "worst relative RMS rounding error" in report.summary()


def test_dora_is_refused_with_the_reason(tmp_path):
    with pytest.raises(GGUFExportError, match="llama.cpp's LoRA has no magnitude vector"):
        export(saved(tmp_path / "a", method="dora"), tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_embedding_and_head_adapters_are_refused_with_the_reason(target, tmp_path):
    """A PEFT file (written by PEFT itself) that adapts the embedding or the head."""
    peft = require("peft")
    model = peft.get_peft_model(tiny_model("tiny-llama"),
                                peft.LoraConfig(r=4, target_modules=["q_proj", target], init_lora_weights=False))
    model.save_pretrained(tmp_path / "a")
    with pytest.raises(GGUFExportError, match=f"adapts .*{target}; loraforge adapts only the decoder's linear"):
        export(tmp_path / "a", tmp_path / "a.gguf")


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    import loraforge.export.gguf_writer as writer

    target = tmp_path / "a.gguf"
    target.write_bytes(b"old")
    folder = saved(tmp_path / "a")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(writer, "open_writer", broken)
    with pytest.raises(OSError, match="disk full"):
        export(folder, target)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "a.gguf"]


def test_cli_writes_a_gguf_lora_and_refuses_other_types(tmp_path, capsys):
    folder = saved(tmp_path / "a")
    out = tmp_path / "lora.gguf"
    args = ["export", "--model", "tiny-llama", "--adapter", str(folder), "--format", "gguf-lora", "--out", str(out)]
    assert main(args) == 0
    assert "GGUF LoRA, 14 modules, alpha 8 (28 F16 tensors)" in capsys.readouterr().out
    assert fields(out)["adapter.type"] == "lora"
    assert main(args + ["--gguf-type", "q4_1"]) == 2
    assert "GGUF LoRA type 'q4_1' is not supported" in capsys.readouterr().err
