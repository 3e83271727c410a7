"""A tiny random-initialised Qwen2.5-VL and its offline processor, built in-process for tests.

The shape follows transformers' own Qwen2.5-VL tests: text hidden 32, 4 layers, M-RoPE sections
[2, 1, 1]; vision depth 2, ``out_hidden_size`` equal to the text hidden size, patch 14,
``spatial_merge_size`` 1. The tokenizer is the tiny byte-level one plus Qwen-VL's vision special
tokens, and the image processor is the PIL one with small ``min_pixels``/``max_pixels`` so that an
image becomes 4 to 64 image tokens.
"""

from __future__ import annotations

import torch

from loraforge.models.kind import VISION_LANGUAGE, set_kind
from loraforge.models.tiny import tiny_tokenizer
from loraforge.models.vision import VISION_CHATML_TEMPLATE, VISION_SPECIAL_TOKENS, VisionProcessor

TINY_VLM = "tiny-qwen2.5-vl"
PATCH = 14
MIN_PIXELS, MAX_PIXELS = 4 * PATCH * PATCH, 64 * PATCH * PATCH


def tiny_vlm_processor() -> VisionProcessor:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(list(VISION_SPECIAL_TOKENS), special_tokens=True)
    tokenizer.chat_template = VISION_CHATML_TEMPLATE
    image_processor = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=PATCH,
                                               merge_size=1, temporal_patch_size=2)
    return VisionProcessor(tokenizer, image_processor, VISION_CHATML_TEMPLATE)


def tiny_vlm(seed: int = 0) -> torch.nn.Module:
    """A random ``Qwen2_5_VLForConditionalGeneration`` whose vocabulary is :func:`tiny_vlm_processor`'s."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = tiny_vlm_processor().tokenizer
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in VISION_SPECIAL_TOKENS}
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
                tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                bos_token_id=None)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32, patch_size=PATCH,
                  spatial_merge_size=1, temporal_patch_size=2, fullatt_block_indexes=[1], window_size=2 * PATCH)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                              bos_token_id=None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    return set_kind(model.eval(), VISION_LANGUAGE)
