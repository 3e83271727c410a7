"""Model sources: resolve a source string to ``(model, tokenizer)``."""

from loraforge.models.device import resolve_device
from loraforge.models.sources import ModelSourceError, load_model
from loraforge.models.tiny import tiny_model, tiny_tokenizer

__all__ = ["ModelSourceError", "load_model", "resolve_device", "tiny_model", "tiny_tokenizer"]
