"""Find the target linears of a model and wrap them with a named adapter."""

from __future__ import annotations

import re

from torch import nn

from loraforge.adapters.layer import AdaptedLinear
from loraforge.adapters.registry import method
from loraforge.adapters.spec import AdapterError, AdapterSpec, check_spec
from loraforge.models.kind import is_vision_language
from loraforge.models.vision import vision_layout
from loraforge.quant.base import QuantLinear

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every adaptable linear by module path (dense or quantized, wrapped or not), output head excluded."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = {}
    for path, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            found[path] = module
        elif isinstance(module, (nn.Linear, QuantLinear)) and module is not head:
            if not path.endswith(".base_layer"):
                found[path] = module
    return found


def select_targets(model: nn.Module, spec: AdapterSpec) -> list[str]:
    """Module paths that ``spec.target_modules`` and ``spec.layers_to_transform`` pick, in model order.

    In a vision-language model these reach only the language model; ``spec.vision`` adds vision-tower
    linears and ``spec.projector`` the projector's (:func:`vision_targets`).

    Raises:
        AdapterError: targets that match nothing, or ``vision``/``projector`` on a model without a vision tower.
    """
    everything = linear_modules(model)
    if not is_vision_language(model):
        if spec.vision or spec.projector:
            raise AdapterError("adapter.vision and adapter.projector apply to vision-language models; this model "
                               "has no vision tower, so set them to false")
        return _language_targets(everything, spec)
    language = vision_layout(model).language + "."
    chosen = _language_targets({p: m for p, m in everything.items() if p.startswith(language)}, spec)
    extra = set(vision_targets(model, spec, everything))
    return [path for path in everything if path in extra or path in chosen]


def vision_targets(model: nn.Module, spec: AdapterSpec, candidates: dict[str, nn.Module]) -> list[str]:
    """The vision-tower linears ``spec.vision`` picks (true: all; names; or a regex on full paths) and the
    projector's when ``spec.projector``. The patch embedding is never one: it is a convolution, and nothing
    under its path is offered."""
    layout = vision_layout(model)
    tower = [p for p in candidates if _inside(p, layout.vision) and not _inside(p, layout.projector)
             and not _inside(p, layout.patch_embed)]
    if spec.vision is True:
        chosen = tower
    elif isinstance(spec.vision, str):
        chosen = [p for p in tower if re.fullmatch(spec.vision, p)]
    elif spec.vision:
        missing = [t for t in spec.vision if not any(_matches_name(p, t) for p in tower)]
        if missing:
            raise AdapterError(f"adapter.vision: {missing} match no linear of the vision tower; its linears are "
                               f"{_leaf_names(tower)}")
        chosen = [p for p in tower if any(_matches_name(p, t) for t in spec.vision)]
    else:
        chosen = []
    if isinstance(spec.vision, str) and not chosen:
        raise AdapterError(f"adapter.vision={spec.vision!r} matches no linear of the vision tower (full names such as "
                           f"{tower[0] if tower else layout.vision})")
    if spec.projector:
        chosen += [p for p in candidates if _inside(p, layout.projector)]
    return chosen


def _inside(path: str, root: str) -> bool:
    return path.startswith(root + ".")


def _language_targets(candidates: dict[str, nn.Module], spec: AdapterSpec) -> list[str]:
    targets = spec.target_modules
    if targets == "all-linear":
        chosen = list(candidates)
    elif isinstance(targets, str):
        chosen = [path for path in candidates if re.fullmatch(targets, path)]
    else:
        missing = [t for t in targets if not any(_matches_name(path, t) for path in candidates)]
        if missing:
            raise AdapterError(
                f"adapter.target_modules: {missing} match no linear module of this model; "
                f"its linear modules are {_leaf_names(candidates)}"
            )
        chosen = [path for path in candidates if any(_matches_name(path, t) for t in targets)]
    if spec.layers_to_transform is not None:
        wanted = set(spec.layers_to_transform)
        chosen = [path for path in chosen if _layer_index(path) in wanted]
    if not chosen:
        raise AdapterError(
            f"adapter.target_modules={targets!r} with layers_to_transform={spec.layers_to_transform} selects no "
            f"linear module; this model's linear modules are {_leaf_names(candidates)}"
        )
    return chosen


def add_adapter(model: nn.Module, spec: AdapterSpec, name: str = "default", paths: list[str] | None = None,
                ranks: dict[str, tuple[int, float]] | None = None, saved_shared: dict | None = None,
                peft_config: dict | None = None) -> list[str]:
    """Wrap the target linears (``paths``, or those ``spec`` selects) with a new adapter ``name``.

    The adapter becomes active. ``ranks``, ``saved_shared`` and ``peft_config`` describe an adapter
    file (see :func:`build_adapters`). Returns the module paths it was added to.

    Raises:
        AdapterError: an invalid ``spec`` (every problem, each naming its ``adapter.<key>``), targets that
            match nothing, or a module that already has an adapter ``name``.
    """
    check_spec(spec)
    paths = select_targets(model, spec) if paths is None else paths
    taken = [path for path in paths if isinstance(model.get_submodule(path), AdaptedLinear)
             and name in model.get_submodule(path).adapters]
    if taken:
        raise AdapterError(f"module {taken[0]} already has an adapter named {name!r}; pick another name")
    for path, adapter in build_adapters(model, spec, name, paths, ranks, saved_shared, peft_config).items():
        layer = _wrap(model, path)
        layer.adapters[name] = adapter
        layer.active.append(name)
    return paths


def build_adapters(model: nn.Module, spec: AdapterSpec, name: str, paths: list[str],
                   ranks: dict[str, tuple[int, float]] | None = None, saved_shared: dict | None = None,
                   peft_config: dict | None = None) -> dict[str, nn.Module]:
    """Module path -> a new adapter of ``spec``'s method, built against that module's base linear but not
    put into the model (``add_adapter`` wraps them in; the serving engine only folds them).

    ``ranks`` overrides ``(r, alpha)`` per path and ``saved_shared`` holds the model-level tensors of a
    method that shares some (VeRA), both as an adapter file has them; ``peft_config``, the file's config,
    lets each layer fit itself to the file (the method's ``after_load``).
    """
    entry = method(spec.method)
    shared = entry.shared.build(model, name, paths, spec, saved_shared) if entry.shared else None
    adapters = {}
    for path in paths:
        base = base_of(model.get_submodule(path))
        r, alpha = (ranks or {}).get(path) or (entry.layer_rank(spec, path), spec.rank_and_alpha(path)[1])
        adapter = entry.layer(base, r, entry.scaling(spec, r, alpha), spec.dropout, spec.init, spec.options, shared)
        adapter.method_name = entry.name  # how files, export and serving find its registry entry
        if peft_config is not None and entry.after_load is not None:
            entry.after_load(adapter, path, peft_config)
        adapters[path] = adapter.to(_device_of(base))
    return adapters


def base_of(module: nn.Module) -> nn.Module:
    """The base linear of a possibly adapted module."""
    return module.base_layer if isinstance(module, AdaptedLinear) else module


def _wrap(model: nn.Module, path: str) -> AdaptedLinear:
    module = model.get_submodule(path)
    if isinstance(module, AdaptedLinear):
        return module
    parent_path, _, child = path.rpartition(".")
    wrapped = AdaptedLinear(module)
    setattr(model.get_submodule(parent_path), child, wrapped)
    return wrapped


def _device_of(module: nn.Module):
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers())
    return tensor.device


def _matches_name(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)


def _layer_index(path: str) -> int | None:
    match = _LAYER_INDEX.search(path)
    return int(match.group(1)) if match else None


def _leaf_names(paths) -> list[str]:
    return sorted({path.rsplit(".", 1)[-1] for path in paths})
