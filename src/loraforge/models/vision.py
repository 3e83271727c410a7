"""Vision-language models (Qwen2-VL, Qwen2.5-VL): loading from a Hugging Face folder, the processor,
and the module layout that adapter targeting and serving need.

transformers' own ``Qwen2_5_VLProcessor`` insists on a video processor, which needs torchvision; loraforge
handles images only, so :class:`VisionProcessor` pairs the tokenizer with the PIL-based image processor
(``Qwen2VLImageProcessorPil``) and the chat template, and expands image tokens with the same rule as
transformers: an image of grid ``(t, h, w)`` patches becomes ``t*h*w / merge_size**2`` image tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraforge.models.kind import VISION_LANGUAGE, set_kind

VISION_SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

VISION_CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""ChatML whose messages may hold content parts: ``{"type": "image"}`` renders as Qwen-VL's
``<|vision_start|><|image_pad|><|vision_end|>``, ``{"type": "text", "text": ...}`` as its text."""


@dataclass(frozen=True)
class VisionLayout:
    """Module paths inside a vision-language model (transformers 5 layout)."""

    language: str = "model.language_model"
    """The decoder: what ``all-linear`` targets."""
    vision: str = "model.visual"
    """The vision tower; its linears are adapter targets only on request (``adapter.vision``)."""
    projector: str = "model.visual.merger"
    """The projector from vision features to the decoder's width (``adapter.projector``)."""
    patch_embed: str = "model.visual.patch_embed"
    """Never an adapter target."""


VLM_MODEL_TYPES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
"""``config.json`` ``model_type`` -> the transformers class loraforge loads it with. The one list of
supported vision-language architectures."""

LAYOUTS = {model_type: VisionLayout() for model_type in VLM_MODEL_TYPES}


def vision_layout(model) -> VisionLayout:
    """The module layout of a loaded vision-language model."""
    return LAYOUTS[model.config.model_type]


@dataclass
class VisionProcessor:
    """Tokenizer + image processor + chat template of a vision-language model."""

    tokenizer: Any
    image_processor: Any
    chat_template: str
    image_token: str = "<|image_pad|>"

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def image_token_count(self, width: int, height: int) -> int:
        """How many image tokens an image of this size becomes (the image processor's resize rule)."""
        return self.image_processor.get_number_of_image_patches(height, width) // self.image_processor.merge_size ** 2

    def pixels(self, images: list) -> dict[str, torch.Tensor]:
        """``pixel_values`` ``(patches, C*T*P*P)`` and ``image_grid_thw`` ``(n_images, 3)`` of PIL images."""
        out = self.image_processor(images=images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def save_pretrained(self, folder: str | Path) -> None:
        """Tokenizer files, ``preprocessor_config.json`` and ``chat_template.json``, as HF processors save them."""
        folder = Path(folder)
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": self.chat_template}, indent=2))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> VisionProcessor:
        """Read a model folder's tokenizer, image processor and chat template (``chat_template.json``,
        ``chat_template.jinja`` or the tokenizer's own)."""
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        folder = Path(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(folder)
        template = None
        if (folder / "chat_template.json").is_file():
            template = json.loads((folder / "chat_template.json").read_text()).get("chat_template")
        elif (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        return cls(tokenizer, image_processor, template or tokenizer.chat_template or VISION_CHATML_TEMPLATE)


def load_vlm_dir(path: Path, model_type: str, dtype: torch.dtype):
    """``(model, VisionProcessor)`` of a Qwen2-VL / Qwen2.5-VL Hugging Face folder, the model in eval mode."""
    import transformers

    model_class = getattr(transformers, VLM_MODEL_TYPES[model_type])
    model = model_class.from_pretrained(path, dtype=dtype, use_safetensors=True, attn_implementation="sdpa")
    return set_kind(model.eval(), VISION_LANGUAGE), VisionProcessor.from_pretrained(path)


def read_model_type(path: Path) -> str | None:
    """``model_type`` of a Hugging Face folder's ``config.json`` (None when absent or unreadable)."""
    try:
        return json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
