"""The one list of adapter methods.

Each method is one file under ``adapters/`` (its layer math, options and PEFT details) plus one entry
here. The config schema, injection, PEFT files, export and the serving engine read these entries and
never name a method; adding a method touches its file, its entry and its tests.

A method's layer class is built as ``layer(base, r, scaling, dropout, init, options, shared)`` and meets
``layer.Adapter``; for serving it also answers ``low_rank(base) -> (A (r, in), B (out, r), scale)``, the
exact fold of its update into a plain LoRA pair (DoRA adds ``row_scale(base) -> (out,)``: its update is
``(row_scale - 1) ⊙ W x + row_scale ⊙ scale · B A x``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from loraforge.adapters import adalora, dora, lora, qalora, vera
from loraforge.adapters.spec import AdapterError


class TrainingHook(Protocol):
    """What a method adds to the training loop (AdaLoRA's rank allocator). Per optimizer step the trainer
    adds ``loss()`` once to the task loss, and calls ``after_optimizer_step(step)`` (0-based) after
    ``optimizer.step()`` and before ``zero_grad``; ``finish()`` runs once before the final save. Its
    ``state_dict`` goes into every checkpoint, so a resume is exact."""

    def loss(self) -> torch.Tensor: ...

    def after_optimizer_step(self, step: int) -> None: ...

    def finish(self) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class SharedTensors:
    """Model-level tensors one adapter's layers share (VeRA's projections).

    ``build(model, name, paths, spec, saved)`` returns the object passed to every layer as ``shared``:
    drawn afresh when ``saved`` is None, else taken from the adapter file's tensors. ``tensors(shared)``
    gives them under PEFT's model-level keys (outside ``base_model.model.``)."""

    build: Callable[[nn.Module, str, list[str], Any, dict | None], Any]
    tensors: Callable[[Any], dict[str, torch.Tensor]]
    keys: tuple[str, ...]
    of_layer: Callable[[nn.Module], Any]
    """The shared object one of the adapter's layers holds."""


def _lora_scaling(spec, r: int, alpha: float) -> float:
    """LoRA's output scale: alpha/r, or alpha/sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if spec.use_rslora else alpha / r


@dataclass(frozen=True)
class Method:
    """One adapter method.

    - ``layer``: builds one layer's adapter (see the module docstring).
    - ``options``: the dataclass of its ``adapter.options`` keys, or None when it has none.
    - ``inits``: the ``adapter.init`` values it takes (``pissa_niter_N`` counts as ``pissa``).
    - ``check(spec)``: its own rules on the rest of the adapter section, as ``(key, message)`` pairs.
    - ``layer_rank(spec, path)``: the rank its layer at ``path`` is built with.
    - ``scaling(spec, r, alpha)``: what the layer gets as ``scaling``.
    - ``peft_type`` / ``peft_flag``: how PEFT's ``adapter_config.json`` names it (``peft_type``, plus a
      flag such as ``use_dora`` that selects a LoRA variant).
    - ``lora_config``: whether its ``adapter_config.json`` holds the LoRA fields (``lora_alpha`` ...).
    - ``peft_fields(spec, model, name, paths)``: its own fields of ``adapter_config.json``.
    - ``from_peft(config)``: ``AdapterSpec`` fields (its options among them) from PEFT's config.
    - ``rank_from_peft(config, tensors)``: a layer's rank, from the file's config and its PEFT tensors.
    - ``after_load(adapter, path, config)``: fits a freshly built layer to the file before its tensors are
      copied in (AdaLoRA prunes to ``rank_pattern``), or None.
    - ``base_quantization``: the ``model.quantization.type`` values it needs (empty: any base).
    - ``shared``: model-level tensors, or None.
    - ``training_hook(model, name, options, total_steps)``: its part of the training loop, or None.
    - ``spec_for_original_base(spec)``: the spec a saved file describes when an init changed the base
      (PiSSA: ``adapter_state_dict(..., for_original_base=True)`` doubles the rank).
    """

    name: str
    layer: Callable[..., nn.Module]
    options: type | None = None
    inits: tuple[str, ...] = ("kaiming", "gaussian", "none")
    check: Callable[[Any], list[tuple[str, str]]] = lambda spec: []
    layer_rank: Callable[[Any, str], int] = lambda spec, path: spec.rank_and_alpha(path)[0]
    scaling: Callable[[Any, int, float], float] = _lora_scaling
    peft_type: str = "LORA"
    peft_flag: str | None = None
    lora_config: bool = True
    peft_fields: Callable[..., dict] = lambda spec, model, name, paths: {}
    from_peft: Callable[[dict], dict] = lambda config: {}
    rank_from_peft: Callable[[dict, dict], int] = lambda config, tensors: tensors["lora_A.weight"].shape[0]
    after_load: Callable[[nn.Module, str, dict], None] | None = None
    base_quantization: tuple[str, ...] = ()
    shared: SharedTensors | None = None
    training_hook: Callable[..., TrainingHook] | None = None
    spec_for_original_base: Callable[[Any], Any] = lambda spec: spec

    def problems(self, spec) -> list[tuple[str, str]]:
        """Everything wrong with ``spec`` for this method, as ``(key, message)`` pairs."""
        problems = list(self.check(spec))
        fast_pissa = "pissa" in self.inits and re.fullmatch(r"pissa_niter_[1-9]\d*", spec.init)
        if spec.init not in self.inits and not fast_pissa:
            takes = ", ".join(self.inits) + (" or pissa_niter_N" if "pissa" in self.inits else "")
            problems.append(("init", f"{spec.init!r} is not an init of {self.name}; it takes {takes}"))
        return problems


def _plain(cls):
    """A layer class whose constructor takes no options or shared tensors."""
    return lambda base, r, scaling, dropout, init, options, shared: cls(base, r, scaling, dropout, init)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("lora", _plain(lora.LoraAdapter), inits=("kaiming", "gaussian", "none", "pissa"),
           spec_for_original_base=lora.spec_for_original_base),
    Method("dora", _plain(dora.DoraAdapter), peft_flag="use_dora"),
    Method("qalora", _plain(qalora.QALoraAdapter), peft_flag="use_qalora", peft_fields=qalora.peft_fields,
           after_load=qalora.after_load, base_quantization=("int", "gguf")),
    Method("adalora", lambda base, r, scaling, dropout, init, options, shared:
           adalora.AdaLoraAdapter(base, r, scaling, dropout, init, options), options=adalora.AdaLoraOptions, check=adalora.check_spec,
           layer_rank=lambda spec, path: spec.options.init_r, scaling=lambda spec, r, alpha: alpha,
           peft_type="ADALORA", peft_fields=adalora.peft_fields, from_peft=adalora.from_peft,
           rank_from_peft=adalora.rank_from_peft, after_load=adalora.after_load, training_hook=adalora.AdaLoraHook),
    Method("vera", vera.VeraAdapter, options=vera.VeraOptions, inits=("kaiming", "none"), check=vera.check_spec,
           scaling=lambda spec, r, alpha: 1.0, peft_type="VERA", lora_config=False, peft_fields=vera.peft_fields,
           from_peft=vera.from_peft, rank_from_peft=lambda config, tensors: tensors["vera_lambda_d"].shape[0],
           shared=SharedTensors(vera.shared_projections, vera.projection_tensors, vera.PROJECTION_KEYS,
                                lambda layer: layer.projections)),
)}
"""Adapter method name -> its entry."""


def method(name: str) -> Method:
    """The entry for ``name``, or an error listing the methods there are."""
    if name not in METHODS:
        raise AdapterError(f"adapter.method {name!r} is not supported; choose one of {sorted(METHODS)}")
    return METHODS[name]


def method_for_peft_config(config: dict, source: str) -> Method:
    """Which method a PEFT ``adapter_config.json`` describes (its ``peft_type`` and variant flag)."""
    peft_type = config.get("peft_type")
    candidates = [m for m in METHODS.values() if m.peft_type == peft_type]
    if not candidates:
        supported = sorted({m.peft_type for m in METHODS.values()})
        raise AdapterError(f"{source}: peft_type {peft_type!r} is not supported; loraforge loads {supported} "
                           f"adapters ({', '.join(sorted(METHODS))})")
    flagged = [m for m in candidates if m.peft_flag and config.get(m.peft_flag)]
    if len(flagged) > 1:
        raise AdapterError(f"{source}: {' and '.join(m.peft_flag for m in flagged)} are all set; an adapter is "
                           "one method")
    return flagged[0] if flagged else next(m for m in candidates if m.peft_flag is None)
