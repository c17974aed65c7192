"""Adapter files: PEFT's layout (`adapter_config.json` + `adapter_model.safetensors`, same key names) plus
`lorakit.json` with what PEFT lacks: the lorakit version, the resolved config and a fingerprint of the base weights.

Weights are read with safetensors only; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.lora.config import LoraConfig
from lorakit.errors import LorakitError
from lorakit.fsutil import atomic_directory, require_finite, write_json
from lorakit.lora.injection import active_adapter, add_lora, delete_adapter, lora_layers, require_adapter, set_adapter
from lorakit.lora.layers import LORA_LAYERS, is_quantized_weight
from lorakit.lora.quantized import dequantize_weight, quantization_method

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
META_FILE = "lorakit.json"
PREFIX = "base_model.model."  # PEFT's prefix for keys of a PeftModel wrapping the user's model
FINGERPRINT_METHOD = "lorakit-stats-v1"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


# ---------------------------------------------------------------------------------------------------- state dicts
def adapter_state_dict(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's saved key names (adapter name removed)."""
    require_adapter(model, adapter)
    state = {}
    for name, layer in lora_layers(model):
        if adapter in layer.adapters:
            for key, p in layer.adapter_state(adapter).items():
                state[f"{PREFIX}{name}.{key}"] = p
    return state


def _task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
                         ("ForConditionalGeneration", "SEQ_2_SEQ_LM")):
        if cls.endswith(suffix):
            return task
    return None


def _base_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None) or None


# ---------------------------------------------------------------------------------------------------- fingerprint
def _unmerged_weight(layer, original_of: str | None = None) -> torch.Tensor:
    """The base weight without merged adapters; with `original_of`, also with that adapter's PiSSA/OLoRA part back."""
    weight = layer.base_layer.weight.detach()
    if is_quantized_weight(weight):  # a quantized base: fingerprint the weights it computes with
        weight = dequantize_weight(layer.base_layer)
    for name in layer.merged_adapters:
        weight = layer.unmerged_weight(name, weight)
    initial = layer.initial_delta(original_of) if original_of and hasattr(layer, "initial_delta") else None
    return (weight if initial is None else weight.float() + initial).detach()


def base_fingerprint(model: nn.Module, adapter: str, original: bool = False) -> dict[str, Any]:
    """Per adapted module: shape, mean, std and a fixed random probe of the base weight, plus an exact digest.

    The statistics survive a change of dtype (a bf16 copy of the same base matches); the digest tells an identical
    base from a merely equivalent one. `original=True` fingerprints the base a PiSSA/OLoRA init started from.
    """
    digest = hashlib.sha256()
    modules = {}
    quantization = None
    for name, layer in lora_layers(model):
        if not isinstance(layer, LORA_LAYERS) or adapter not in layer.adapters:
            continue
        w = _unmerged_weight(layer, adapter if original else None)
        if is_quantized_weight(layer.base_layer.weight):
            quantization = quantization_method(layer.base_layer)
        digest.update(name.encode() + str(w.dtype).encode())
        digest.update(w.contiguous().cpu().view(torch.uint8).numpy().tobytes() if w.dtype != torch.bfloat16
                      else w.contiguous().cpu().view(torch.int16).numpy().tobytes())
        flat = w.reshape(-1).double()
        idx = torch.linspace(0, flat.numel() - 1, min(256, flat.numel())).long().to(flat.device)
        gen = torch.Generator().manual_seed(1234)
        signs = (torch.randint(0, 2, (idx.numel(),), generator=gen) * 2 - 1).double().to(flat.device)
        probe = float((flat[idx] * signs).sum())
        modules[name] = [list(w.shape), float(flat.mean()), float(flat.std()) if flat.numel() > 1 else 0.0, probe]
    return {"method": FINGERPRINT_METHOD, "sha256": digest.hexdigest(), "modules": modules,
            "quantization": quantization}


def _well_formed(saved: Any) -> bool:
    modules = saved.get("modules", {}) if isinstance(saved, dict) else None
    return isinstance(modules, dict) and all(
        isinstance(v, list) and len(v) == 4 and isinstance(v[0], list)
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v[1:]) for v in modules.values())


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], strict: bool, path: Path) -> None:
    if not _well_formed(saved):
        warnings.warn(f"{path}: the base fingerprint in {META_FILE} is malformed; base not checked.")
        return
    if saved.get("method") != FINGERPRINT_METHOD:
        warnings.warn(f"{path}: unknown base fingerprint method {str(saved.get('method'))[:40]!r}; base not checked.")
        return
    if saved.get("sha256") == current["sha256"]:
        return
    if saved.get("quantization") != current.get("quantization"):
        # A QLoRA adapter on the full-precision base (or the reverse) is normal use; the weights differ by design.
        warnings.warn(f"{path}: the adapter was trained on a {saved.get('quantization') or 'full-precision'} base and "
                      f"is loaded into a {current.get('quantization') or 'full-precision'} one; base not checked.")
        return
    mismatched = []
    for name, (shape, mean, std, probe) in saved.get("modules", {}).items():
        now = current["modules"].get(name)
        if now is None:
            continue
        tol = 1e-2 * max(std, 1e-12)
        if (now[0] != shape or abs(now[1] - mean) > tol or abs(now[2] - std) > 1e-2 * max(std, 1e-12)
                or abs(now[3] - probe) > 16 * tol):
            mismatched.append(name)
    if mismatched:
        msg = (f"The adapter at {path} was trained on a different base model: the base weights of "
               f"{len(mismatched)} adapted module(s) differ (e.g. {', '.join(mismatched[:3])}). Load it into the model "
               "it was trained on, or pass strict=False to load it anyway.")
        if strict:
            raise LorakitError(msg)
        warnings.warn(msg)


# ---------------------------------------------------------------------------------------------------- save
def save_adapter(model: nn.Module, path: str | os.PathLike, adapter: str | None = None,
                 extra: dict[str, Any] | None = None, convert_to_lora: bool = False) -> Path:
    """Write the adapter to the directory `path` atomically; returns the path.

    `extra` (e.g. the training config) is stored in `lorakit.json` so the run can be rebuilt from the folder alone.
    A PiSSA/OLoRA adapter is saved as PEFT saves it: its init is recorded, and loading re-derives the residual base
    from the original one (the fingerprint checks it). `convert_to_lora=True` instead writes a plain LoRA of rank 2r
    for the ORIGINAL base (PEFT's `path_initial_model_for_weight_conversion`): ΔW = s·(BA − B0A0) = s·[B | −B0][A; A0].
    """
    from safetensors.torch import save_file

    from lorakit import __version__

    adapter = adapter or active_adapter(model)
    if adapter is None:
        raise LorakitError("save_adapter: the model has no adapter; call add_lora first or pass adapter=NAME.")
    require_adapter(model, adapter)
    config: LoraConfig = model.lora_configs[adapter]
    state = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model, adapter).items()}
    if convert_to_lora:
        config, state = _as_plain_lora(model, adapter, config, state)
    require_finite(state, f"adapter {adapter!r} to {path}")
    meta = {
        "lorakit_version": __version__,
        "adapter": adapter,
        "base_model": _base_name(model),
        "base_model_class": type(model).__name__,
        "config": config.to_dict(),
        "base_fingerprint": base_fingerprint(model, adapter, original=convert_to_lora),
        "extra": extra or {},
    }
    path = Path(path)
    with atomic_directory(path) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        fan_in_fan_out = any(getattr(l, "fan_in_fan_out", False) for _, l in lora_layers(model) if adapter in l.adapters)
        write_json(tmp / CONFIG_FILE, config.to_peft_dict(_base_name(model), _task_type(model), fan_in_fan_out))
        write_json(tmp / META_FILE, meta)
    return path


def _as_plain_lora(model: nn.Module, adapter: str, config: LoraConfig,
                   state: dict[str, torch.Tensor]) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A PiSSA/OLoRA adapter as a rank-2r plain LoRA on the original base: A' = [A; A0], B' = [B, −B0], same scale."""
    if not config.changes_base:
        raise LorakitError(f"convert_to_lora applies to PiSSA/OLoRA adapters; {adapter!r} has init={config.init!r} "
                           "and already fits the original base. Save it without convert_to_lora.")
    if config.use_dora:
        raise LorakitError(f"{adapter!r} uses DoRA, whose magnitude depends on the base weight, so it has no exact "
                           "plain-LoRA form on the original base. Save it as is (PEFT and lorakit re-derive the base).")
    state = dict(state)
    for name, layer in lora_layers(model):
        if adapter in getattr(layer, "init_factors", {}):
            A0, B0 = layer.init_factors[adapter]
            key = f"{PREFIX}{name}."
            state[key + "lora_A.weight"] = torch.cat([state[key + "lora_A.weight"], A0.cpu()], dim=0)  # (2r, in)
            state[key + "lora_B.weight"] = torch.cat([state[key + "lora_B.weight"], -B0.cpu()], dim=1)  # (out, 2r)
    grow = 2 ** 0.5 if config.use_rslora else 2  # alpha/r (or alpha/√r) unchanged at rank 2r
    config = replace(config, r=2 * config.r, alpha=grow * config.alpha, init="kaiming",
                     rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
                     alpha_pattern={k: grow * v for k, v in config.alpha_pattern.items()})
    return config, state


# ---------------------------------------------------------------------------------------------------- load
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LorakitError(f"{path} is not valid JSON ({e}); the adapter folder is corrupt. Save it again.") from None
    if not isinstance(data, dict):
        raise LorakitError(f"{path} must hold a JSON object, got {type(data).__name__}.")
    return data


# Bytes per element of the safetensors dtypes an adapter may hold (LoRA matrices and saved heads are floating point).
FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
MAX_HEADER_BYTES = 16_000_000


def check_safetensors_header(path: Path) -> None:
    """Validate a safetensors header against the file's length BEFORE anything is read or allocated: every tensor's
    dtype, shape and byte range must be consistent and inside the file, so a header claiming a huge tensor fails
    here with a clear error instead of making the reader allocate it."""
    size = path.stat().st_size
    if size < 8:
        raise LorakitError(f"{path} is truncated ({size} bytes); a safetensors file starts with an 8-byte header "
                           "length. Save the adapter again.")
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        if header_len > size - 8 or header_len > MAX_HEADER_BYTES:
            raise LorakitError(f"{path} is corrupt or truncated: its header claims {header_len} bytes but the file "
                               f"has {size} (at most {MAX_HEADER_BYTES} allowed). Save the adapter again.")
        raw = fh.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise LorakitError(f"{path} has a corrupt safetensors header ({type(e).__name__}). Save the adapter again.") \
            from None
    if not isinstance(header, dict):
        raise LorakitError(f"{path}: the safetensors header must be a JSON object, got {type(header).__name__}.")
    data_len = size - 8 - header_len
    claimed_total = 0
    for name, info in header.items():
        if name == "__metadata__":
            if not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise LorakitError(f"{path}: __metadata__ must map strings to strings. The file is corrupt.")
            continue
        problem = _tensor_entry_problem(info, data_len)
        claimed_total += 0 if problem else info["data_offsets"][1] - info["data_offsets"][0]
        if not problem and claimed_total > data_len:
            problem = f"brings the tensors' total to {claimed_total} bytes, more than the file's {data_len} data bytes"
        if problem:
            raise LorakitError(f"{path}: tensor {name[:200]!r} {problem}. The file is corrupt or not a LoRA adapter; "
                               "save the adapter again.")


def _tensor_entry_problem(info: Any, data_len: int) -> str | None:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        return "must have exactly dtype, shape and data_offsets"
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in FLOAT_DTYPES:
        return f"has dtype {str(dtype)[:20]!r}; adapter tensors must be one of {sorted(FLOAT_DTYPES)}"
    if not (isinstance(shape, list) and len(shape) <= 8
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        return f"has an invalid shape {str(shape)[:80]}"
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_len):
        return f"has data offsets {str(offsets)[:80]} outside the file's {data_len} data bytes"
    claimed = math.prod(shape) * FLOAT_DTYPES[dtype]
    if claimed != offsets[1] - offsets[0]:
        return (f"claims shape {shape} ({claimed} bytes) but its data range holds {offsets[1] - offsets[0]} bytes "
                f"(the file has {data_len} data bytes in all)")
    return None


def read_adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning every failure into a clear error (never unpickles)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors_header(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LorakitError(f"{path} is not a valid safetensors file ({e}); it is corrupt or truncated. "
                           "Save the adapter again.") from None


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter: str = "default", strict: bool = True,
                 trainable: bool = False) -> nn.Module:
    """Load a lorakit or PEFT LoRA adapter folder into `model` under the name `adapter`; returns `model`.

    strict=True: a different base model, missing or unexpected keys are errors (with strict=False, warnings).
    A shape mismatch is always an error. The model is left unchanged when loading fails.
    """
    path = Path(path)
    if not path.is_dir():
        hint = " (an interrupted save left a complete previous copy at .{}.old)".format(path.name) \
            if (path.parent / f".{path.name}.old").is_dir() else ""
        raise LorakitError(f"Adapter folder {path} does not exist{hint}; expected a folder with {CONFIG_FILE} and "
                           f"{WEIGHTS_FILE}.")
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / f).is_file():
            found = sorted(p.name for p in path.iterdir())
            extra = (" lorakit never reads pickled weights (they can run code when loaded); convert them to "
                     "safetensors with a tool you trust." if any(Path(f).suffix in PICKLE_SUFFIXES for f in found)
                     else "")
            raise LorakitError(f"{path} has no {f} (found: {found}).{extra}")
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        warnings.warn(f"{path}: ignoring {pickled}: pickled files can run code when loaded, so lorakit never reads "
                      f"them; the weights come from {WEIGHTS_FILE} only.")
    config = LoraConfig.from_peft_dict(_read_json(path / CONFIG_FILE), source=str(path / CONFIG_FILE))
    meta = _read_json(path / META_FILE) if (path / META_FILE).is_file() else {}
    if meta.get("config"):
        config = LoraConfig.from_dict(meta["config"])  # lorakit's own resolved config is authoritative
    weights = read_adapter_weights(path / WEIGHTS_FILE)
    # PEFT-saved keys may keep the adapter name ("lora_A.default.weight") in some versions; normalise.
    weights = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
               for k, v in weights.items()}

    if adapter in getattr(model, "lora_configs", {}):
        raise LorakitError(f"An adapter named {adapter!r} is already loaded; pick another name or delete_adapter it.")
    if config.modules_to_save:  # keep only heads the file has weights for (PEFT lists head names generically)
        saved = ["." + k[len(PREFIX):] for k in weights if k.startswith(PREFIX)]
        kept = [m for m in config.modules_to_save if any(f".{m}." in k for k in saved)]
        config = LoraConfig.from_dict({**config.to_dict(), "modules_to_save": kept or None})
    _check_ranks(config, weights, path)
    previous_active = active_adapter(model)
    try:
        add_lora(model, config, adapter)
    except LorakitError as e:
        raise LorakitError(f"Cannot load the adapter at {path} into this model: {e}") from None
    try:
        _copy_weights(model, adapter, weights, strict, path)
        if meta.get("base_fingerprint"):
            check_fingerprint(meta["base_fingerprint"], base_fingerprint(model, adapter), strict, path)
    except BaseException:
        delete_adapter(model, adapter)
        if previous_active is not None:
            set_adapter(model, previous_active)
        raise
    for p in adapter_state_dict(model, adapter).values():
        p.requires_grad_(trainable)
    return model


def _check_ranks(config: LoraConfig, weights: dict[str, torch.Tensor], path: Path) -> None:
    """Checked before add_lora allocates anything: a config claiming a rank larger than any matrix in the weights
    file must not make the loader allocate huge matrices (exact per-module shapes are checked after add_lora)."""
    found = [int(t.shape[0]) for k, t in weights.items()
             if t.ndim == 2 and (k.endswith(".lora_A.weight") or k.endswith(".lora_embedding_A"))]
    largest = max([config.r, *config.rank_pattern.values()])
    if largest > max(found, default=0):
        raise LorakitError(f"{path}: the config asks for rank {largest}, but the largest LoRA matrix in the weights "
                           f"file has rank {max(found, default=0)} ({len(found)} found). The adapter folder is "
                           "inconsistent or not a LoRA adapter; save it again.")


def _copy_weights(model: nn.Module, adapter: str, weights: dict[str, torch.Tensor], strict: bool, path: Path) -> None:
    expected = adapter_state_dict(model, adapter)
    weights = _drop_unchanged_base_copies(model, weights, path)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    for key in sorted(set(expected) & set(weights)):
        if tuple(expected[key].shape) != tuple(weights[key].shape):
            module = key[len(PREFIX):]
            raise LorakitError(f"Shape mismatch for {module}: the file at {path} has {tuple(weights[key].shape)}, "
                               f"this model expects {tuple(expected[key].shape)}. The adapter was made for a "
                               "different model (or different rank settings).")
    if missing or unexpected:
        msg = (f"Adapter at {path} does not fit this model: {len(missing)} missing key(s) "
               f"{_short(missing)}, {len(unexpected)} unexpected key(s) {_short(unexpected)}.")
        if strict:
            raise LorakitError(msg + " Pass strict=False to load the matching part.")
        warnings.warn(msg)
    with torch.no_grad():
        for key in set(expected) & set(weights):
            t = weights[key]
            if not torch.isfinite(t).all():
                raise LorakitError(f"{path}: tensor {key} holds NaN or inf values; the adapter is unusable.")
            expected[key].copy_(t.to(expected[key].device))


def _drop_unchanged_base_copies(model: nn.Module, weights: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """PEFT saves whole embedding matrices (`...base_layer.weight`) when embeddings are targeted. Copies equal to this
    model's base are redundant; a different one (e.g. a resized vocabulary) would replace base weights, which lorakit
    adapters never do, so it is an error."""
    kept = {}
    for key, t in weights.items():
        if not key.endswith(".base_layer.weight"):
            kept[key] = t
            continue
        module = key[len(PREFIX):-len(".base_layer.weight")]
        try:
            current = model.get_submodule(module).base_layer.weight
        except AttributeError:
            kept[key] = t
            continue
        if current.shape != t.shape or not torch.allclose(current.float().cpu(), t.float(), atol=1e-6):
            raise LorakitError(f"{path} carries a replacement for the base weight of {module} (shape {tuple(t.shape)}, "
                               f"this model has {tuple(current.shape)}): PEFT's save_embedding_layers, e.g. after "
                               "resizing the vocabulary. Resize/load that embedding into the base model first.")
    return kept


def _short(keys: list[str], n: int = 5) -> str:
    shown = [k[len(PREFIX):] if k.startswith(PREFIX) else k for k in keys[:n]]
    return str(shown) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def peek_adapter_config(path: str | os.PathLike) -> LoraConfig:
    """The config of a saved adapter, without loading weights."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise LorakitError(f"{path} is not an adapter folder: it has no {CONFIG_FILE}.")
    meta_path = path / META_FILE
    if meta_path.is_file():
        meta = _read_json(meta_path)
        if meta.get("config"):
            return LoraConfig.from_dict(meta["config"])
    return LoraConfig.from_peft_dict(_read_json(path / CONFIG_FILE), source=str(path / CONFIG_FILE))

