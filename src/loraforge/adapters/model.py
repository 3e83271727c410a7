"""Model-wide adapter operations: activate, merge, unmerge, unload, disable, mixed batches, trainability."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from loraforge.adapters.layer import AdaptedLinear
from loraforge.adapters.spec import AdapterError


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    """Every adapted linear by module path."""
    return {path: m for path, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters on the model, in the order they were added."""
    names: dict[str, None] = {}
    for layer in adapted_layers(model).values():
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def _check_names(model: nn.Module, names: Sequence[str]) -> None:
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise AdapterError(f"no adapter named {unknown} on this model; it has {known}")


def set_active_adapters(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make exactly ``names`` active (their deltas add up)."""
    names = [names] if isinstance(names, str) else list(names)
    _check_names(model, names)
    for layer in adapted_layers(model).values():
        layer.active = [n for n in names if n in layer.adapters]


def merge_adapters(model: nn.Module, names: Sequence[str] | None = None) -> None:
    """Fold the active adapters (or ``names``) into the base weights. Idempotent."""
    if names is not None:
        _check_names(model, names)
    for layer in adapted_layers(model).values():
        layer.merge([n for n in (layer.active if names is None else names) if n in layer.adapters])


def unmerge_adapters(model: nn.Module) -> None:
    for layer in adapted_layers(model).values():
        layer.unmerge()


def merge_and_unload(model: nn.Module, names: Sequence[str] | None = None) -> nn.Module:
    """Merge, then put the plain base linears back in place of the wrappers. Returns ``model``."""
    merge_adapters(model, names)
    for path, layer in adapted_layers(model).items():
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path), child, layer.base_layer)
    return model


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; layers left with no adapter get their plain base linear back."""
    _check_names(model, [name])
    for path, layer in adapted_layers(model).items():
        if name not in layer.adapters:
            continue
        if name in layer.merged:
            raise AdapterError(f"adapter {name!r} is merged into {path}; unmerge before deleting it")
        del layer.adapters[name]
        layer.active = [n for n in layer.active if n != name]
        if not layer.adapters:
            parent_path, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_path), child, layer.base_layer)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model alone: merged adapters are unmerged for the duration and merged back after."""
    layers = adapted_layers(model).values()
    remerge = {layer: list(layer.merged) for layer in layers}
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    try:
        yield
    finally:
        for layer in layers:
            layer.disabled = False
            layer.merge(remerge[layer])


@contextmanager
def mixed_adapter_batch(model: nn.Module, row_adapters: Sequence[str | None]) -> Iterator[None]:
    """Within the block, batch row i runs with adapter ``row_adapters[i]`` (``None``: the base model)."""
    _check_names(model, [n for n in row_adapters if n is not None])
    layers = adapted_layers(model).values()
    for layer in layers:
        layer.row_adapters = list(row_adapters)
    try:
        yield
    finally:
        for layer in layers:
            layer.row_adapters = None


def mark_only_adapters_trainable(model: nn.Module, names: Sequence[str] | None = None) -> int:
    """Freeze everything but the parameters of adapters ``names`` (default: all). Returns the count trainable."""
    for param in model.parameters():
        param.requires_grad_(False)
    count = 0
    for layer in adapted_layers(model).values():
        for name, adapter in layer.adapters.items():
            if names is None or name in names:
                for param in adapter.parameters():
                    param.requires_grad_(True)
                    count += param.numel()
    return count
