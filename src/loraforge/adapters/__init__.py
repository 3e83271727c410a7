"""Adapters (LoRA, DoRA, ...) on one shared layer interface, and PEFT-format files."""

from loraforge.adapters.inject import add_adapter, linear_modules, select_targets
from loraforge.adapters.layer import BASE, AdaptedLinear
from loraforge.adapters.model import (
    adapted_layers,
    adapter_names,
    delete_adapter,
    disable_adapters,
    mark_only_adapters_trainable,
    merge_adapters,
    merge_and_unload,
    mixed_adapter_batch,
    set_active_adapters,
    unmerge_adapters,
)
from loraforge.adapters.registry import METHODS
from loraforge.adapters.peft_format import (
    AdapterFormatError,
    adapter_state_dict,
    load_adapter,
    read_adapter_dir,
    save_adapter,
)
from loraforge.adapters.spec import AdapterError, AdapterSpec

__all__ = [
    "BASE",
    "METHODS",
    "AdaptedLinear",
    "AdapterError",
    "AdapterFormatError",
    "AdapterSpec",
    "adapted_layers",
    "adapter_names",
    "adapter_state_dict",
    "add_adapter",
    "delete_adapter",
    "disable_adapters",
    "linear_modules",
    "load_adapter",
    "mark_only_adapters_trainable",
    "merge_adapters",
    "merge_and_unload",
    "mixed_adapter_batch",
    "read_adapter_dir",
    "save_adapter",
    "select_targets",
    "set_active_adapters",
    "unmerge_adapters",
]
