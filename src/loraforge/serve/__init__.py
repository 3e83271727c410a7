"""Multi-adapter serving: an S-LoRA style engine (paged KV cache and adapters in one memory pool,
mixed-adapter continuous batching) and, on top, an OpenAI-compatible HTTP API."""

from loraforge.serve.engine import Completion, Delta, Engine, EngineConfig, EngineStats, Request, RequestHandle
from loraforge.serve.errors import EngineClosedError, RequestTooLargeError, UnknownAdapterError
from loraforge.serve.sampling import SamplingParams

__all__ = [
    "Completion",
    "Delta",
    "Engine",
    "EngineClosedError",
    "EngineConfig",
    "EngineStats",
    "Request",
    "RequestHandle",
    "RequestTooLargeError",
    "SamplingParams",
    "UnknownAdapterError",
]
