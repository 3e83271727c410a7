"""Errors the engine raises to its callers; the HTTP layer maps each to a status code."""

from __future__ import annotations


class UnknownAdapterError(LookupError):
    """A request or call named an adapter that is not registered."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class RequestTooLargeError(ValueError):
    """A prompt (plus max_tokens) longer than the model's context or than the memory pool can hold."""


class EngineClosedError(RuntimeError):
    """The engine is shutting down and takes no new requests."""
