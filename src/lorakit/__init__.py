"""lorakit: LoRA fine-tuning for PyTorch / Hugging Face models.

The public API (see README.md):

    LoraConfig, add_lora, trainable_parameters, save_adapter, load_adapter, set_adapter, delete_adapter,
    disable_adapters, adapters_per_row, merge, unmerge, unload, combine_adapters, load_model
"""

__version__ = "0.1.0"

from lorakit.memory import enable_huge_pages

enable_huge_pages()  # before any tensor exists: PyTorch reads THP_MEM_ALLOC_ENABLE once (see lorakit.memory)

from lorakit.errors import LorakitError
from lorakit.config import LoraConfig
from lorakit.layers import LoraLinear, LoraEmbedding, ModulesToSave
from lorakit.injection import (
    add_lora,
    adapter_names,
    adapters_per_row,
    active_adapter,
    cast_base,
    delete_adapter,
    disable_adapters,
    merge,
    set_adapter,
    trainable_parameters,
    unload,
    unmerge,
)
from lorakit.combine import combine_adapters
from lorakit.adapter_io import load_adapter, save_adapter
from lorakit.models import load_model

__all__ = [
    "LoraConfig", "LorakitError", "LoraLinear", "LoraEmbedding", "ModulesToSave",
    "add_lora", "adapter_names", "adapters_per_row", "active_adapter", "cast_base", "delete_adapter", "disable_adapters",
    "merge", "set_adapter", "trainable_parameters", "unload", "unmerge", "combine_adapters",
    "load_adapter", "save_adapter", "load_model", "__version__",
]
