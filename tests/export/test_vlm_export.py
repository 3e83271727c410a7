"""Exporting a vision-language run: a merged Qwen2.5-VL folder that transformers loads with the same
outputs, through the CLI; GGUF is refused with the reason."""

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration
from vlm_helpers import shapes_batch

from loraforge.adapters import AdapterSpec, add_adapter, save_adapter
from loraforge.cli.main import main
from loraforge.export import GGUFExportError, export_model
from loraforge.models import load_model
from loraforge.models.tiny_vlm import TINY_VLM, tiny_vlm, tiny_vlm_processor


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    batch = shapes_batch(tmp_path_factory.mktemp("d"))
    batch.pop("labels")
    return batch


def adapted(tmp_path):
    model = tiny_vlm()
    spec = AdapterSpec(r=4, alpha=8, init="none", vision=True, projector=True)
    torch.manual_seed(1)
    add_adapter(model, spec)
    save_adapter(model, tmp_path / "adapter", spec, base_model_name_or_path=TINY_VLM)
    return model


def test_cli_export_hf_writes_a_merged_folder_transformers_runs_the_same(batch, tmp_path, capsys):
    model = adapted(tmp_path)
    with torch.no_grad():
        expected = model(**batch).logits
        assert not torch.allclose(expected, tiny_vlm()(**batch).logits, atol=1e-4)
    assert main(["export", "--model", TINY_VLM, "--adapter", str(tmp_path / "adapter"), "--out",
                 str(tmp_path / "merged"), "--format", "hf"]) == 0
    merged = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-5, rtol=1e-4)
    reloaded, processor = load_model(str(tmp_path / "merged"))  # the folder carries its processor too
    assert processor.image_token_count(100, 60) == tiny_vlm_processor().image_token_count(100, 60)


def test_gguf_export_of_a_vision_language_model_is_refused_with_the_reason(tmp_path):
    with pytest.raises(GGUFExportError, match="GGUF export of a vision-language model is not supported: .*mmproj"):
        export_model(adapted(tmp_path), tiny_vlm_processor(), tmp_path / "m.gguf", format="gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_export_of_a_trained_qlora_run_loads_in_transformers(batch, tmp_path, capsys):
    """``loraforge train`` on image data with an NF4 language model, then ``loraforge export --run``: the
    merged folder runs in transformers as the run's (dequantized) model does."""
    import yaml
    from vlm_helpers import shapes_dataset

    from loraforge.adapters import disable_adapters, load_adapter
    from loraforge.config import load_config
    from loraforge.models.prepare import load_base

    shapes_dataset(tmp_path)
    config = {"model": {"source": TINY_VLM, "quantization": {"type": "nf4", "compute_dtype": "fp32"}},
              "adapter": {"r": 4, "projector": True},
              "data": {"format": "openai", "train_files": ["train.jsonl"], "cutoff_len": 256},
              "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2},
              "output": {"dir": str(tmp_path / "run"), "tensorboard": False, "plot": False}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "merged")]) == 0
    assert "wrote" in capsys.readouterr().out
    run_model, _ = load_base(load_config(tmp_path / "run" / "config.yaml", check_files=False).model,
                             torch.device("cpu"))  # the NF4 base, as trained
    load_adapter(run_model, tmp_path / "run" / "adapter")
    merged = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        expected = run_model(**batch).logits
        with disable_adapters(run_model):
            assert (run_model(**batch).logits - expected).abs().max() > 1e-3  # the trained adapter matters
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-4, rtol=1e-3)
