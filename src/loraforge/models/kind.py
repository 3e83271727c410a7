"""Model kinds: what a loaded model takes as input, resolved once when it is loaded and carried on it.

- ``causal_lm``: token ids in, next-token logits out; comes with a tokenizer.
- ``vision_language``: token ids plus images (``pixel_values``, ``image_grid_thw``) in; comes with a
  :class:`~loraforge.models.vision.VisionProcessor` (tokenizer + image processor).

Data, training, export and serving ask :func:`model_kind`; none of them looks at class names.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

ModelKind = Literal["causal_lm", "vision_language"]
CAUSAL_LM: ModelKind = "causal_lm"
VISION_LANGUAGE: ModelKind = "vision_language"

KIND_ATTR = "loraforge_kind"
"""Attribute that ``models`` sets on every model it loads."""


def set_kind(model: nn.Module, kind: ModelKind) -> nn.Module:
    setattr(model, KIND_ATTR, kind)
    return model


def model_kind(model: nn.Module) -> ModelKind:
    """The kind that ``models`` recorded when it loaded ``model``. A model built elsewhere (a transformers
    causal LM made by hand in a test or a script) carries none and is a causal LM."""
    return getattr(model, KIND_ATTR, CAUSAL_LM)


def is_vision_language(model: nn.Module) -> bool:
    return model_kind(model) == VISION_LANGUAGE
