"""Vision-language models: the kind is resolved once at load, a Qwen2.5-VL / Qwen2-VL folder loads with its
processor, and the tiny VLM has the shape the tests rely on."""

import pytest
import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
from vlm_helpers import png

from loraforge.models import load_model
from loraforge.models.kind import CAUSAL_LM, VISION_LANGUAGE, model_kind
from loraforge.models.tiny_vlm import TINY_VLM
from loraforge.models.vision import VisionProcessor


def test_every_source_carries_its_kind():
    assert model_kind(load_model("tiny-llama")[0]) == CAUSAL_LM
    model, processor = load_model(TINY_VLM)
    assert model_kind(model) == VISION_LANGUAGE and isinstance(processor, VisionProcessor)
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.rope_parameters["mrope_section"]) == (32, 4, [2, 1, 1])
    assert (vision.depth, vision.out_hidden_size, vision.patch_size, vision.spatial_merge_size) == (2, 32, 14, 1)
    assert text.vocab_size == len(processor.tokenizer)


def _inputs(processor, tmp_path):
    from loraforge.data.images import image_ref
    from loraforge.data.vision import VisionSample, collate_vision

    image = image_ref(str(png(tmp_path / "i.png", size=(42, 28))), tmp_path, "test")
    ids = processor.tokenizer("<|im_start|>user\n<|vision_start|>")["input_ids"]
    ids += [processor.image_token_id] * processor.image_token_count(*image.size)
    ids += processor.tokenizer("<|vision_end|>hi<|im_end|>")["input_ids"]
    batch = collate_vision([VisionSample(ids, ids, (image,))], processor)
    return {k: v for k, v in batch.items() if k != "labels"}


def test_a_saved_qwen2_5_vl_folder_loads_back_with_its_processor(tmp_path):
    model, processor = load_model(TINY_VLM)
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    loaded, loaded_processor = load_model(str(tmp_path / "m"))
    assert model_kind(loaded) == VISION_LANGUAGE
    assert loaded_processor.chat_template == processor.chat_template
    assert loaded_processor.image_token_count(300, 200) == processor.image_token_count(300, 200)
    inputs = _inputs(processor, tmp_path)
    assert torch.equal(_inputs(loaded_processor, tmp_path)["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)


def test_a_qwen2_vl_folder_loads_as_a_vision_language_model(tmp_path):
    _, processor = load_model(TINY_VLM)
    tok = processor.tokenizer
    config = Qwen2VLConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2,
                     "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e4}},
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 4, "patch_size": 14,
                       "spatial_merge_size": 1, "mlp_ratio": 2},
        image_token_id=processor.image_token_id, video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"))
    Qwen2VLForConditionalGeneration(config).save_pretrained(tmp_path / "q2")
    processor.save_pretrained(tmp_path / "q2")
    model, loaded = load_model(str(tmp_path / "q2"))
    assert model_kind(model) == VISION_LANGUAGE and type(model).__name__ == "Qwen2VLForConditionalGeneration"
    with torch.no_grad():
        assert torch.isfinite(model(**_inputs(loaded, tmp_path)).logits).all()


def test_an_unknown_source_lists_the_tiny_vlm():
    with pytest.raises(ValueError, match="tiny-qwen2.5-vl"):
        load_model("no-such-model")
