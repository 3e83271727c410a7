"""Greedy answers of the base model and several adapters, batched together.

The serving engine (``serve/engine.py``) runs every ``(prompt, adapter)`` request of every model in
one continuous batch, each adapter applied to its own rows, so that scoring five adapters costs
about what one does. Models the engine can't run (architectures outside the Llama family), and
adapters that exist only on the model in memory (the trainer's), are answered by transformers'
``generate``, one adapter after another (``train/evaluate.generate_replies``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from loraforge.adapters import adapted_layers, disable_adapters
from loraforge.adapters.peft_format import CONFIG_NAME
from loraforge.train.evaluate import generate_replies

log = logging.getLogger(__name__)

BACKENDS = ("engine", "transformers")


@dataclass(frozen=True)
class Candidate:
    """One model to score: the base (``adapter`` None) or an adapter on the model in memory, by name,
    with the PEFT folder it was loaded from when there is one (the engine registers it from there)."""

    label: str
    adapter: str | None = None
    folder: Path | None = None


def generate_answers(model: nn.Module, tokenizer, prompts: Sequence[list[int]], candidates: Sequence[Candidate],
                     max_new_tokens: int, backend: str, batch_size: int, pool_bytes: int,
                     device: torch.device) -> tuple[dict[str, list[str]], str]:
    """Greedy answers ``{label: [answer per prompt]}`` of every candidate, and the backend that ran them
    (``engine``, ``transformers``, or both joined by ``+``)."""
    answers: dict[str, list[str]] = {}
    used = []
    on_engine = [c for c in candidates if c.adapter is None or c.folder is not None]
    if backend == "engine" and on_engine:
        from loraforge.serve.runner import UnsupportedModelError

        try:
            answers.update(_engine_answers(model, tokenizer, prompts, on_engine, max_new_tokens, batch_size,
                                           pool_bytes, device))
            used.append("engine")
        except UnsupportedModelError as err:
            log.warning("the serving engine can't run this model (%s); generating with transformers instead", err)
    rest = [c for c in candidates if c.label not in answers]
    if rest:
        used.append("transformers")
        for candidate in rest:
            answers[candidate.label] = _transformers_answers(model, tokenizer, prompts, candidate, max_new_tokens,
                                                             batch_size, device)
    return answers, "+".join(used)


def _engine_answers(model: nn.Module, tokenizer, prompts: Sequence[list[int]], candidates: Sequence[Candidate],
                    max_new_tokens: int, batch_size: int, pool_bytes: int, device: torch.device
                    ) -> dict[str, list[str]]:
    from loraforge.serve.engine import Engine, EngineConfig, Request
    from loraforge.serve.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_new_tokens)
    folders = {c.label: c.folder for c in candidates if c.folder is not None}
    defaults = EngineConfig()
    with disable_adapters(model), _plain_linears(model):
        # each step decodes ``batch_size`` prompts of every model at once: N models cost N times the batch, not
        # N times the steps
        engine = Engine(model, tokenizer, device=device, pool_bytes=pool_bytes,
                        max_num_seqs=batch_size * len(candidates),
                        max_batch_tokens=defaults.max_batch_tokens * len(candidates),
                        max_rank=max([defaults.max_rank, *(_largest_rank(f) for f in folders.values())]))
        for label, folder in folders.items():
            engine.register_adapter(label, folder)
        requests = [Request(list(ids), params, adapter=c.label if c.folder is not None else None)
                    for c in candidates for ids in prompts]
        completions = engine.generate(requests)
    failed = next((c for c in completions if c.finish_reason == "error"), None)
    if failed is not None:
        raise RuntimeError(f"the serving engine failed while generating answers: {failed.error}")
    n = len(prompts)
    return {c.label: [done.text for done in completions[k * n : (k + 1) * n]] for k, c in enumerate(candidates)}


def _transformers_answers(model: nn.Module, tokenizer, prompts: Sequence[list[int]], candidate: Candidate,
                          max_new_tokens: int, batch_size: int, device: torch.device) -> list[str]:
    if candidate.adapter is None:
        with disable_adapters(model):
            return generate_replies(model, tokenizer, prompts, max_new_tokens, batch_size, device)
    with _only_active(model, candidate.adapter):
        return generate_replies(model, tokenizer, prompts, max_new_tokens, batch_size, device)


@contextmanager
def _only_active(model: nn.Module, name: str) -> Iterator[None]:
    """Within the block only adapter ``name`` is active; each layer's active list is restored after."""
    layers = adapted_layers(model)
    before = {path: list(layer.active) for path, layer in layers.items()}
    for layer in layers.values():
        layer.active = [name] if name in layer.adapters else []
    try:
        yield
    finally:
        for path, layer in layers.items():
            layer.active = before[path]


@contextmanager
def _plain_linears(model: nn.Module) -> Iterator[None]:
    """Within the block the model's adapted linears are replaced by their base linears (the engine
    adds each request's adapter itself); the wrappers are put back after."""
    wrapped = adapted_layers(model)
    for path, layer in wrapped.items():
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base_layer)
    try:
        yield
    finally:
        for path, layer in wrapped.items():
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)


def _largest_rank(folder: Path) -> int:
    """The largest rank an adapter's ``adapter_config.json`` names (``r``, AdaLoRA's ``init_r``, ``rank_pattern``)."""
    config = json.loads((folder / CONFIG_NAME).read_text())
    ranks = [config.get("r"), config.get("init_r"), *(config.get("rank_pattern") or {}).values()]
    return max((r for r in ranks if isinstance(r, int) and not isinstance(r, bool)), default=0)

