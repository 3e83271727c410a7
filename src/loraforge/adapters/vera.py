"""VeRA (Kopiczko et al. 2024): LoRA with frozen, shared random A and B and two trainable vectors per layer.

    y = W x + λ_b ⊙ B[:out, :] (λ_d ⊙ A[:, :in] dropout(x))

A ``(r, max_in)`` and B ``(max_out, r)`` are drawn once per adapter name for the whole model, sized by
the largest targeted layer, and each layer uses their top-left corner. Per layer only λ_b ``(out,)``
(init 0) and λ_d ``(r,)`` (init ``d_initial``) train. Numerically as PEFT 0.21 (``peft.tuners.vera``):
with the same ``projection_prng_key``, A and B are bit-identical to PEFT's. VeRA has no alpha: the
``scaling`` argument that every method's constructor takes is ignored (the output scale is 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.adapters.layer import AdaptedLinear
from loraforge.adapters.lora import LoraAdapter
from loraforge.adapters.spec import AdapterError
from loraforge.config.schema import setting

PROJECTION_KEYS = ("base_model.vera_A", "base_model.vera_B")
"""PEFT's model-level keys for the shared A and B, written only when ``save_projection`` is true."""


@dataclass
class VeraOptions:
    """VeRA's own settings, besides ``adapter.r`` (one rank for the whole model; PEFT's default is 256)."""

    projection_prng_key: int = setting(0, "Seed of the shared random A and B; all VeRA adapters of a model share it.")
    d_initial: float = setting(0.1, "Initial value of every λ_d entry; the paper recommends <= 0.1.")
    save_projection: bool = setting(True, "Save A and B in the adapter file; false = rebuild them from the key.")

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if not -(2**63) <= self.projection_prng_key < 2**64:
            problems.append(("projection_prng_key", f"{self.projection_prng_key} does not fit a 64-bit torch seed"))
        if self.d_initial == 0:
            problems.append(("d_initial", "0 with λ_b starting at 0 gives neither vector a gradient; use e.g. 0.1"))
        return problems


class VeraProjections(nn.Module):
    """The shared frozen ``vera_A`` ``(r, max_in)`` and ``vera_B`` ``(max_out, r)`` of one adapter name.

    Non-persistent buffers: they follow ``model.to(...)`` but stay out of every layer's ``state_dict``;
    :func:`projection_tensors` gives them under PEFT's keys.
    """

    def __init__(self, vera_A: torch.Tensor, vera_B: torch.Tensor, options: VeraOptions):
        super().__init__()
        self.register_buffer("vera_A", vera_A, persistent=False)
        self.register_buffer("vera_B", vera_B, persistent=False)
        self.prng_key = options.projection_prng_key
        self.save_projection = options.save_projection


def build_projections(
    model: nn.Module, paths: list[str], r: int, options: VeraOptions, name: str = "default"
) -> VeraProjections:
    """Draw A and B exactly as PEFT does: one CPU generator seeded with the key, A first, then B, each
    kaiming-uniform (gain √2, fan_in = its second dim), float32; max_in/max_out over ``paths``.

    Raises:
        AdapterError: another VeRA adapter of ``model`` uses a different key or ``save_projection``.
    """
    _check_shared_settings(model, name, options)
    max_in, max_out = (max(dims) for dims in zip(*(_in_out(model, path) for path in paths)))
    generator = torch.Generator(device="cpu").manual_seed(options.projection_prng_key)
    vera_A = _kaiming_uniform((r, max_in), generator)
    vera_B = _kaiming_uniform((max_out, r), generator)
    return VeraProjections(vera_A, vera_B, options)


def load_projections(
    tensors: dict[str, torch.Tensor], model: nn.Module, paths: list[str], r: int, options: VeraOptions,
    name: str = "default",
) -> VeraProjections:
    """The projections of a loaded adapter: from ``tensors`` (PEFT's model-level keys) when
    ``save_projection``, else rebuilt from the key (PEFT then ignores saved ones too).

    Raises:
        AdapterError: they are missing although ``save_projection`` is true, their rank is not ``r``, or
            they are smaller than a layer of ``paths`` needs.
    """
    if not options.save_projection:
        return build_projections(model, paths, r, options, name)
    missing = [key for key in PROJECTION_KEYS if key not in tensors]
    if missing:
        raise AdapterError(f"adapter {name!r}: save_projection is true but the adapter file lacks {missing}; "
                           "set save_projection: false to rebuild them from projection_prng_key")
    _check_shared_settings(model, name, options)
    vera_A, vera_B = (tensors[key] for key in PROJECTION_KEYS)
    if vera_A.shape[0] != r or vera_B.shape[1] != r:
        raise AdapterError(f"adapter {name!r}: saved {PROJECTION_KEYS[0]} {tuple(vera_A.shape)} and "
                           f"{PROJECTION_KEYS[1]} {tuple(vera_B.shape)} have rank {vera_A.shape[0]}, but r is {r}")
    for path in paths:
        n_in, n_out = _in_out(model, path)
        if n_in > vera_A.shape[1] or n_out > vera_B.shape[0]:
            raise AdapterError(
                f"adapter {name!r}: saved {PROJECTION_KEYS[0]} {tuple(vera_A.shape)} / {PROJECTION_KEYS[1]} "
                f"{tuple(vera_B.shape)} are too small for {path} ({n_out}x{n_in}): it needs {PROJECTION_KEYS[0]} "
                f"(r, >= {n_in}) and {PROJECTION_KEYS[1]} (>= {n_out}, r); target the modules it was trained on")
    return VeraProjections(vera_A.detach().clone(), vera_B.detach().clone(), options)


def projection_tensors(projections: VeraProjections) -> dict[str, torch.Tensor]:
    """PEFT's model-level tensors of one adapter: A and B under :data:`PROJECTION_KEYS`, or none."""
    if not projections.save_projection:
        return {}
    return dict(zip(PROJECTION_KEYS, (projections.vera_A, projections.vera_B)))


class VeraAdapter(nn.Module):
    """VeRA on one dense or quantized base linear, sharing ``projections`` with the model's other layers.

    Raises:
        AdapterError: ``r`` is not the projections' rank, or the layer is larger than the projections.
    """

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float, init: str,
                 options: VeraOptions, projections: VeraProjections):
        super().__init__()
        rank, max_in = projections.vera_A.shape
        max_out = projections.vera_B.shape[0]
        if r != rank:
            raise AdapterError(f"VeRA shares one rank per model: this layer asks r={r}, the projections have r={rank}; "
                               "drop adapter.rank_pattern for vera")
        if base.in_features > max_in or base.out_features > max_out:
            raise AdapterError(f"a {base.out_features}x{base.in_features} layer needs projections of at least "
                               f"that size, got vera_B rows {max_out} and vera_A columns {max_in}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.projections = projections
        self.vera_lambda_b = nn.Parameter(torch.zeros(base.out_features))
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(options.d_initial)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if init == "none":
            nn.init.normal_(self.vera_lambda_b)

    def slices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's ``A[:, :in]`` ``(r, in)`` and ``B[:out, :]`` ``(out, r)``, in λ's dtype."""
        dtype = self.vera_lambda_d.dtype
        return (self.projections.vera_A[:, : self.in_features].to(dtype),
                self.projections.vera_B[: self.out_features, :].to(dtype))

    def delta(self, x: torch.Tensor, base_out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """``(..., in)`` -> ``(..., out)``: ``λ_b ⊙ B (λ_d ⊙ A dropout(x))``."""
        vera_A, vera_B = self.slices()
        x = self.dropout(x.to(self.vera_lambda_d.dtype))
        return (self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(x, vera_A), vera_B)).to(base_out.dtype)

    def low_rank(self, base: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The exact LoRA pair: A ``(r, in)`` = λ_d ⊙ A, B ``(out, r)`` = λ_b ⊙ B, scale 1.0."""
        vera_A, vera_B = self.slices()
        return self.vera_lambda_d[:, None] * vera_A, self.vera_lambda_b[:, None] * vera_B, 1.0

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """``(out, in)``."""
        lora_A, lora_B, _ = self.low_rank(base)
        return lora_B @ lora_A

    merge = LoraAdapter.merge  # delta_weight added to (or taken from) a dense base
    unmerge = LoraAdapter.unmerge

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"vera_lambda_b": self.vera_lambda_b, "vera_lambda_d": self.vera_lambda_d}

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, param in self.peft_tensors().items():
                if tensors[key].shape != param.shape:
                    raise AdapterError(
                        f"{key}: saved shape {tuple(tensors[key].shape)}, this layer needs {tuple(param.shape)}"
                    )
                param.copy_(tensors[key])


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform on ``generator`` (gain √2, fan_in = ``shape[1]``), as PEFT's ``_kaiming_init``."""
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


def _in_out(model: nn.Module, path: str) -> tuple[int, int]:
    module = model.get_submodule(path)
    return module.in_features, module.out_features


def _check_shared_settings(model: nn.Module, name: str, options: VeraOptions) -> None:
    """PEFT refuses a second VeRA adapter whose key or ``save_projection`` differs from the first's."""
    for layer in model.modules():
        if not isinstance(layer, AdaptedLinear):
            continue
        for other, adapter in layer.adapters.items():
            if not isinstance(adapter, VeraAdapter) or other == name:
                continue
            theirs = adapter.projections
            if theirs.prng_key != options.projection_prng_key:
                raise AdapterError(
                    f"VeRA adapter {name!r} has projection_prng_key={options.projection_prng_key} but adapter "
                    f"{other!r} in this model has projection_prng_key={theirs.prng_key}; all VeRA adapters of one "
                    f"model must share one key (PEFT refuses this too): set {name!r}'s to {theirs.prng_key}")
            if theirs.save_projection != options.save_projection:
                raise AdapterError(
                    f"VeRA adapter {name!r} has save_projection={options.save_projection} but adapter {other!r} has "
                    f"save_projection={theirs.save_projection}; PEFT needs one value for all VeRA adapters of a model")


def check_spec(spec) -> list[tuple[str, str]]:
    """VeRA's rules on the rest of the adapter section: one rank for the model, no alpha."""
    problems = [(key, "does not apply to vera: all its layers share one rank (adapter.r) and it has no alpha; "
                      "remove it") for key in ("rank_pattern", "alpha_pattern") if getattr(spec, key)]
    if spec.use_rslora:
        problems.append(("use_rslora", "does not apply to vera, which has no alpha scaling"))
    return problems


def peft_fields(spec, model: nn.Module, name: str, paths: list[str]) -> dict:
    """VeRA's fields of ``adapter_config.json`` (a ``VeraConfig``, not a LoRA one)."""
    options: VeraOptions = spec.options
    return {"projection_prng_key": options.projection_prng_key, "save_projection": options.save_projection,
            "d_initial": options.d_initial, "vera_dropout": spec.dropout, "init_weights": True, "bias": "none",
            "fan_in_fan_out": False, "modules_to_save": None}


def from_peft(config: dict) -> dict:
    """``AdapterSpec`` fields from a PEFT ``VeraConfig``."""
    defaults = VeraOptions()
    options = VeraOptions(**{f: config.get(f, getattr(defaults, f)) for f in defaults.__dataclass_fields__})
    return {"options": options, "dropout": float(config.get("vera_dropout") or 0.0)}


def shared_projections(model: nn.Module, name: str, paths: list[str], spec, saved: dict | None) -> VeraProjections:
    """The projections adapter ``name``'s layers share: drawn from the key, or those of an adapter file."""
    if saved is None:
        return build_projections(model, paths, spec.r, spec.options, name)
    return load_projections(saved, model, paths, spec.r, spec.options, name)
