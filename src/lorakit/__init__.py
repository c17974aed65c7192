"""lorakit: LoRA fine-tuning for PyTorch / Hugging Face models.

The public API (see README.md), imported on first use so that `import lorakit` stays light (no training, serving or
transformers code until a name that needs it is used):

    LoraConfig, add_lora, trainable_parameters, save_adapter, load_adapter, set_adapter, delete_adapter,
    disable_adapters, adapters_per_row, merge, unmerge, unload, combine_adapters, load_model, lora_layers

Subpackages, one per concern (see ARCHITECTURE.md): lora (layers, variants, injection, adapter files), models (loading,
quantization), data, train, eval, inference, serve, export, cli.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from lorakit.memory import enable_huge_pages

enable_huge_pages()  # before any tensor exists: PyTorch reads THP_MEM_ALLOC_ENABLE once (see lorakit.memory)

from lorakit.errors import LorakitError  # noqa: E402

# public name -> the module that defines it
_PUBLIC = {
    "LoraConfig": "lorakit.lora.config",
    **dict.fromkeys(["LoraLinear", "LoraEmbedding", "ModulesToSave"], "lorakit.lora.layers"),
    **dict.fromkeys(["add_lora", "adapter_names", "adapters_per_row", "active_adapter", "cast_base", "delete_adapter",
                     "disable_adapters", "merge", "set_adapter", "trainable_parameters", "unload", "unmerge",
                     "lora_layers", "merged_adapters"], "lorakit.lora.injection"),
    "combine_adapters": "lorakit.lora.combine",
    **dict.fromkeys(["load_adapter", "save_adapter"], "lorakit.lora.adapter_io"),
    "load_model": "lorakit.models.loading",
}

__all__ = ["LorakitError", "__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    try:  # a submodule used as an attribute: lorakit.fsutil, lorakit.train, ...
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from lorakit.lora.adapter_io import load_adapter, save_adapter  # noqa: F401
    from lorakit.lora.combine import combine_adapters  # noqa: F401
    from lorakit.lora.config import LoraConfig  # noqa: F401
    from lorakit.lora.injection import (  # noqa: F401
        active_adapter, adapter_names, adapters_per_row, add_lora, cast_base, delete_adapter, disable_adapters,
        lora_layers, merge, merged_adapters, set_adapter, trainable_parameters, unload, unmerge)
    from lorakit.lora.layers import LoraEmbedding, LoraLinear, ModulesToSave  # noqa: F401
    from lorakit.models.loading import load_model  # noqa: F401
