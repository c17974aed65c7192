"""Putting LoRA layers into a model and steering them: add, switch, disable, route per row, merge, unload.

The model keeps two plain attributes: `lora_configs` ({adapter: LoraConfig}, resolved) and `lora_active`.
Every other piece of state lives on the layers (see `lorakit.lora.layers`).
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import torch
from torch import nn

from lorakit.lora.config import LoraConfig
from lorakit.errors import LorakitError
from lorakit.lora.layers import (ADAPTER_LAYERS, LORA_LAYERS, LoraEmbedding, LoraLinear, ModulesToSave, SharedInput,
                                 is_conv1d, is_quantized_weight)

# The paper's choice (W_q, W_v) for architectures we know, used when `target_modules` is None.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"], "phi3": ["qkv_proj"], "gpt2": ["c_attn"], "bert": ["query", "value"],
    "roberta": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"], "t5": ["q", "v"],
    "opt": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "falcon": ["query_key_value"],
}
HEAD_NAMES = ("lm_head", "score", "classifier", "qa_outputs")
# Sibling projections that read the same input: their LoRA A's run as one matmul (lorakit.lora.layers.SharedInput).
# A pair that reads different inputs (T5's cross-attention k, v) still computes exactly, just without the saving.
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"), ("q", "k", "v"))
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|transformer_blocks)\.(\d+)(?:\.|$)")


# ---------------------------------------------------------------------------------------------------- finding targets
def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Layers LoRA can wrap (or already wraps), skipping lorakit's own internals."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(s) for s in skip):
            continue
        if isinstance(module, ADAPTER_LAYERS):
            skip.append(name + ".")
            if isinstance(module, LORA_LAYERS):
                yield name, module
            continue
        if _is_linear(module) or isinstance(module, nn.Embedding):
            yield name, module


def head_names(model: nn.Module) -> set[str]:
    heads = {n for n, _ in model.named_modules() if n.split(".")[-1] in HEAD_NAMES}
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        heads |= {n for n, m in model.named_modules() if m is out}
    return heads


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[model_type])
    suffixes = {n.split(".")[-1] for n, m in candidate_modules(model)}
    for pair in (["q_proj", "v_proj"], ["query", "value"], ["c_attn"], ["q", "v"]):
        if set(pair) <= suffixes:
            return pair
    raise LorakitError(f"No default target modules for model type {model_type!r}; set target_modules, "
                       f"e.g. 'all-linear' or some of: {_describe_names(model)}.")


def _describe_names(model: nn.Module) -> str:
    names = [n for n, _ in candidate_modules(model)]
    counts = Counter(n.split(".")[-1] for n in names)
    shown = ", ".join(f"{s} (×{c})" if c > 1 else s for s, c in counts.most_common(25))
    examples = ", ".join(names[:6])
    return f"{shown}; full names look like: {examples}"


def _layer_index(name: str) -> int | None:
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def find_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs `config` selects, in model order. Errors name what exists when nothing matches."""
    targets = config.target_modules
    heads = head_names(model)
    found = []
    for name, module in candidate_modules(model):
        base = module.base_layer if isinstance(module, LORA_LAYERS) else module
        if targets == "all-linear":
            hit = _is_linear(base) and name not in heads
        elif isinstance(targets, str):
            hit = re.fullmatch(targets, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in targets)
        if hit and config.layers is not None:
            hit = _layer_index(name) in config.layers
        if hit:
            found.append((name, module))
    if not found:
        where = f" in layers {config.layers}" if config.layers is not None else ""
        raise LorakitError(f"target_modules={targets!r} matched no module{where}. "
                           f"Modules LoRA can adapt in this model: {_describe_names(model)}.")
    return found


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


# ---------------------------------------------------------------------------------------------------- model state
def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every lorakit layer (LoRA and modules-to-save wrappers) with its module name."""
    for name, module in model.named_modules():
        if isinstance(module, ADAPTER_LAYERS):
            yield name, module


def merged_adapters(model: nn.Module) -> list[str]:
    """The adapters merged into the base weights of any layer (sorted)."""
    return sorted({n for _, layer in lora_layers(model) for n in layer.merged_adapters})


def adapter_names(model: nn.Module) -> list[str]:
    return list(getattr(model, "lora_configs", {}).keys())


def active_adapter(model: nn.Module) -> str | None:
    return getattr(model, "lora_active", None)


def require_adapter(model: nn.Module, adapter: str) -> None:
    names = adapter_names(model)
    if adapter not in names:
        raise LorakitError(f"No adapter named {adapter!r} on this model; adapters present: {names or 'none'}.")


def add_lora(model: nn.Module, config: LoraConfig | None = None, adapter: str = "default",
             dtype: torch.dtype | None = None) -> nn.Module:
    """Wrap the layers `config` selects with LoRA, freeze everything but the new adapter, and return `model`.

    The adapter's weights are fp32 (fp64 on a fp64 base) unless `dtype` says otherwise, also on a bf16 or quantized base.
    `config.dropout` and `config.init` shape the linear layers' adapters; an embedding target gets plain LoRA without
    dropout and with its own init (A zero, B normal), as in PEFT, so adapters that list a dropout still load there.

    A model may hold several adapters; the first one added becomes active. The config stored on the model is
    resolved (default target modules filled in) and is what `save_adapter` writes.
    """
    config = config or LoraConfig()
    if not isinstance(adapter, str) or not adapter or "." in adapter:
        raise LorakitError(f"Adapter names must be non-empty strings without dots, got {adapter!r}.")
    configs = dict(getattr(model, "lora_configs", {}))
    if adapter in configs:
        raise LorakitError(f"An adapter named {adapter!r} already exists; use another name or delete_adapter first.")
    if merged_adapters(model):
        raise LorakitError("Cannot add an adapter while others are merged into the base weights; unmerge first.")
    if config.target_modules is None:
        config = replace(config, target_modules=default_targets(model))
    targets = find_targets(model, config)
    _check_variant_fits(config, configs, targets)

    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in targets:
        if isinstance(module, LORA_LAYERS):
            layer = module
        else:
            layer = LoraLinear(module) if _is_linear(module) else LoraEmbedding(module)
            set_submodule(model, name, layer)
        r, alpha = config.rank_for(name), config.alpha_for(name)
        if isinstance(layer, LoraEmbedding):  # DoRA and PiSSA/OLoRA on embeddings were refused above
            layer.add_adapter(adapter, r, alpha, use_rslora=config.use_rslora, dtype=dtype)
        else:
            layer.add_adapter(adapter, r, alpha, config.dropout, config.init, config.use_rslora, dtype=dtype,
                              use_dora=config.use_dora)
    for name in _modules_to_save_names(model, config):
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            set_submodule(model, name, module)
        module.add_adapter(adapter)

    _share_inputs(model)
    configs[adapter] = config
    model.lora_configs = configs
    set_adapter(model, active_adapter(model) or adapter)  # also routes the newly wrapped layers
    _mark_trainable(model, adapter)
    return model


def _share_inputs(model: nn.Module) -> None:
    """Give the LoRA layers of each SHARED_INPUTS set under one parent (two or more of them) one SharedInput."""
    for parent in model.modules():
        for names in SHARED_INPUTS:
            members = [getattr(parent, n) for n in names if isinstance(getattr(parent, n, None), LoraLinear)]
            if len(members) >= 2 and any(m.shared_input is None or m.shared_input.members != members for m in members):
                group = SharedInput(members)
                for member in members:
                    member.shared_input = group


def _check_variant_fits(config: LoraConfig, configs: dict[str, LoraConfig], targets) -> None:
    """DoRA and PiSSA/OLoRA are for linear layers; a PiSSA/OLoRA base (the residual) cannot be shared with others."""
    embeddings = [n for n, m in targets if isinstance(m, (nn.Embedding, LoraEmbedding))]
    if embeddings and (config.use_dora or config.changes_base):
        raise LorakitError(f"use_dora and init={config.init!r} apply to linear layers only, but target_modules "
                           f"selects embedding(s) {embeddings[:3]}; drop them from target_modules or use plain LoRA.")
    changed = [n for n, c in configs.items() if c.changes_base]
    if configs and (config.changes_base or changed):
        raise LorakitError(f"init={(config if config.changes_base else configs[changed[0]]).init!r} replaces the frozen "
                           f"base by a residual, which other adapters cannot share; this model already has adapter(s) "
                           f"{sorted(configs)}. Use a fresh copy of the base model for it.")


def _modules_to_save_names(model: nn.Module, config: LoraConfig) -> list[str]:
    names = []
    for wanted in config.modules_to_save or []:
        hits = [n for n, m in model.named_modules()
                if (n == wanted or n.endswith("." + wanted)) and not _inside_adapter_layer(model, n)]
        if not hits:
            raise LorakitError(f"modules_to_save entry {wanted!r} matched no module. "
                               f"Top-level modules: {[n for n, _ in model.named_children()]}; "
                               f"heads seen: {sorted(head_names(model)) or 'none'}.")
        names += hits
    return names


def _inside_adapter_layer(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    for i in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:i])), ADAPTER_LAYERS):
            return True
    return False


def _mark_trainable(model: nn.Module, adapter: str) -> None:
    for _, layer in lora_layers(model):
        if adapter in layer.adapters:
            for p in layer.adapter_state(adapter).values():
                p.requires_grad_(True)


def set_adapter(model: nn.Module, adapter: str) -> None:
    """Make `adapter` the one used by forward passes (its weights keep their requires_grad)."""
    require_adapter(model, adapter)
    merged = set(merged_adapters(model))
    if merged and merged != {adapter}:
        raise LorakitError(f"Adapter(s) {sorted(merged)} are merged into the base weights; unmerge before switching.")
    for _, layer in lora_layers(model):
        layer.active_adapter = adapter if adapter in layer.adapters else None
    model.lora_active = adapter


def delete_adapter(model: nn.Module, adapter: str) -> None:
    """Remove an adapter's weights and config from the model (it must not be merged)."""
    require_adapter(model, adapter)
    if adapter in merged_adapters(model):
        raise LorakitError(f"Adapter {adapter!r} is merged into the base weights; unmerge it before deleting.")
    for _, layer in list(lora_layers(model)):
        if adapter in layer.adapters:
            layer.remove_adapter(adapter)
    configs = dict(model.lora_configs)
    del configs[adapter]
    model.lora_configs = configs
    if active_adapter(model) == adapter:
        model.lora_active = None
        for _, layer in lora_layers(model):
            layer.active_adapter = None
        if configs:
            set_adapter(model, next(iter(configs)))


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Inside this block the model computes exactly its base outputs (adapters must not be merged)."""
    layers = [l for _, l in lora_layers(model)]
    merged = merged_adapters(model)
    if merged:
        raise LorakitError(f"Adapter(s) {merged} are merged into the base weights, so the base cannot be recovered "
                           "exactly; call unmerge(model) first.")
    previous = [l.disabled for l in layers]
    for l in layers:
        l.disabled = True
    try:
        yield model
    finally:
        for l, was in zip(layers, previous):
            l.disabled = was


@contextlib.contextmanager
def adapters_per_row(model: nn.Module, names: Sequence[str | None]):
    """Route each batch row through its own adapter (None = base) for forward passes and `generate` in this block.

    Rows are grouped by adapter and each group is one batched matmul per layer: the cost grows with the number of
    distinct adapters in the batch, not with the batch size.
    """
    names = list(names)
    known = set(adapter_names(model))
    unknown = sorted({n for n in names if n is not None and n not in known})
    if unknown:
        raise LorakitError(f"Unknown adapter(s) {unknown} in the per-row names; adapters present: {sorted(known)}.")
    layers = [l for _, l in lora_layers(model)]
    if merged_adapters(model):
        raise LorakitError("A mixed batch needs unmerged adapters; call unmerge(model) first.")
    device = next(model.parameters()).device
    groups_all = {n: torch.tensor([i for i, m in enumerate(names) if m == n], device=device)
                  for n in sorted({n for n in names if n is not None})}
    for l in layers:
        l.row_groups = {n: rows for n, rows in groups_all.items() if n in l.adapters}
        l.row_count = len(names)
    try:
        yield model
    finally:
        for l in layers:
            l.row_groups = None
            l.row_count = 0


# ---------------------------------------------------------------------------------------------------- merging
def merge(model: nn.Module, adapter: str | None = None) -> None:
    """Add the adapter's ΔW into the base weights (default: the active one). Idempotent; forward then costs the base's."""
    adapter = adapter or active_adapter(model)
    if adapter is None:
        raise LorakitError("merge: the model has no active adapter; pass adapter=NAME.")
    require_adapter(model, adapter)
    merged = set(merged_adapters(model))
    if merged - {adapter}:
        raise LorakitError(f"Adapter(s) {sorted(merged - {adapter})} are already merged; unmerge before merging "
                           f"{adapter!r} (one merged adapter at a time keeps unmerge exact).")
    if adapter != active_adapter(model):
        set_adapter(model, adapter)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if isinstance(layer, LORA_LAYERS) and adapter in layer.adapters:
                layer.merge(adapter)


def unmerge(model: nn.Module) -> None:
    """Subtract every merged ΔW from the base weights. Idempotent."""
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if isinstance(layer, LORA_LAYERS):
                for name in list(layer.merged_adapters):
                    layer.unmerge(name)


def unload(model: nn.Module, merge_adapter: bool = True) -> nn.Module:
    """Return the plain model: the active adapter merged (unless `merge_adapter=False`), no lorakit modules left.

    Modules-to-save are replaced by the active adapter's trained copy.
    """
    adapter = active_adapter(model)
    if merge_adapter and adapter is not None:
        merge(model, adapter)
    elif not merge_adapter:
        unmerge(model)
    for name, layer in list(lora_layers(model)):
        if isinstance(layer, LORA_LAYERS):
            if not merge_adapter:  # removing adapters gives PiSSA/OLoRA's share back to the base
                for adapter_name in layer.adapters:
                    layer.remove_adapter(adapter_name)
            set_submodule(model, name, layer.base_layer)
        else:
            keep = layer.modules_to_save[adapter] if (merge_adapter and adapter in layer.adapters) else layer.original_module
            set_submodule(model, name, keep)
    for attr in ("lora_configs", "lora_active"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


# ---------------------------------------------------------------------------------------------------- precision
def cast_base(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the frozen parameters (not buffers such as RoPE frequencies) to `dtype` once; trainable ones (LoRA A/B,
    modules to save) keep their dtype. On CPUs with AMX a bf16 base makes training ~2x faster; the update stays fp32."""
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                # quantized weights (torchao's report a float dtype) keep their own compute dtype
                if not p.requires_grad and not is_quantized_weight(p) and p.dtype != dtype:
                    p.data = p.data.to(dtype)  # same Parameter object: tied weights stay tied
    return model


# ---------------------------------------------------------------------------------------------------- reporting
@dataclass
class ParameterReport:
    trainable: int
    total: int
    trainable_bytes: int
    per_module: list[tuple[str, int, str]]  # (module name, trainable params, note such as "r=8 (576+576)")

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable%: {self.percent:.4f} || adapter size: {self.trainable_bytes / 1e6:.2f} MB")


def trainable_parameters(model: nn.Module) -> ParameterReport:
    """Count what trains: total, % of all parameters, bytes on disk (same dtype), and per adapted module."""
    seen: set[int] = set()
    total = trainable = nbytes = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            nbytes += p.numel() * p.element_size()
    per_module = []
    for name, layer in lora_layers(model):
        for adapter in layer.adapters:
            params = layer.adapter_state(adapter)
            if not any(p.requires_grad for p in params.values()):
                continue
            count = sum(p.numel() for p in params.values())
            note = (f"r={layer.r[adapter]} ({layer.in_features}+{layer.out_features})"
                    if isinstance(layer, LORA_LAYERS) else "full copy")
            per_module.append((name, count, note))
    return ParameterReport(trainable, total, nbytes, per_module)
