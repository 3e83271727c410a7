"""Model sources: resolve a source string to ``(model, tokenizer)`` (a ``VisionProcessor`` for a
vision-language model; ``model_kind`` says which)."""

from loraforge.models.device import resolve_device
from loraforge.models.kind import model_kind
from loraforge.models.sources import ModelSourceError, load_model
from loraforge.models.tiny import tiny_model, tiny_tokenizer
from loraforge.models.tiny_vlm import tiny_vlm, tiny_vlm_processor

__all__ = ["ModelSourceError", "load_model", "model_kind", "resolve_device", "tiny_model", "tiny_tokenizer",
           "tiny_vlm", "tiny_vlm_processor"]
