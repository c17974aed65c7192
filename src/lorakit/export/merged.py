"""Merging an adapter into its base and writing a plain Hugging Face model folder (no lorakit needed to load it).

The merge is checked, not trusted: logits of the merged model (in the chosen dtype) are compared with the base plus
the unmerged adapter in fp32 on a few inputs. A merge whose drift exceeds `max_drift` (typically a lower-precision
target such as bf16, where small ΔW are rounded away) is refused unless `force=True`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lorakit.lora.adapter_io import load_adapter
from lorakit.errors import LorakitError
from lorakit.fsutil import atomic_directory, write_json
from lorakit.lora.injection import disable_adapters, lora_layers, unload
from lorakit.lora.layers import LORA_LAYERS, is_quantized_weight
from lorakit.models.loading import load_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROBE_TEXTS = ("The quick brown fox jumps over the lazy dog.",
               "name[The Vaults], eatType[pub], priceRange[more than £30]",
               "Question: what is two plus two? Answer:")
REPORT_FILE = "lorakit_merge.json"


@dataclass
class MergeReport:
    path: str
    dtype: str
    max_logit_diff: float
    """Max |merged logits − (base + unmerged adapter) logits| on the probe inputs; the reference runs in fp32."""
    adapter_effect: float
    """Max |base + adapter − base| logits on the same inputs: the size of what the merge must preserve."""
    delta_lost: float
    """‖round(W + ΔW) − round(W) − ΔW‖ / ‖ΔW‖ over the merged weights: the share of ΔW lost to rounding."""
    forced: bool
    quantize: str | None = None
    """The quantized base (nf4 / int8 / int8-wo) the adapter was trained on and the reference ran on; its dequantized
    weights are what the adapter was merged into."""

    def __str__(self) -> str:
        base = f"{self.quantize} base+adapter" if self.quantize else "base+adapter"
        return (f"merged model written to {self.path} ({self.dtype}); max logit difference vs {base}: "
                f"{self.max_logit_diff:.3g} (adapter effect {self.adapter_effect:.3g}; "
                f"{100 * self.delta_lost:.2f}% of ΔW lost to {self.dtype} rounding)")


def _probe_logits(model: nn.Module, tokenizer, texts) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**tokenizer(t, return_tensors="pt")).logits.float()[0] for t in texts]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def check_mergeable(model: nn.Module) -> None:
    """Refuse merges that cannot be exact: quantized base weights, or a weight tied to another module."""
    if getattr(model, "hf_quantizer", None) is not None:
        raise LorakitError("The base model is quantized, so ΔW cannot be added to its weights exactly. Load an "
                           "unquantized copy of the base (lorakit's load_model dequantizes GGUF files) and merge "
                           "into that; the merge report then shows the drift.")
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{name}.{pname}")
    for name, layer in lora_layers(model):
        if not isinstance(layer, LORA_LAYERS):
            continue
        weight = layer.base_layer.weight
        if is_quantized_weight(weight):
            raise LorakitError(f"{name} stores its base weight quantized ({type(weight).__name__}, {weight.dtype}); "
                               "merging would corrupt it. Merge into an unquantized copy of the base (`lorakit merge "
                               "--quantize nf4|int8|int8-wo` "
                               "merges a QLoRA adapter into the dequantized base; in Python: "
                               "lorakit.models.quantization.merge_quantized).")
        if len(owners[id(weight)]) > 1:
            raise LorakitError(f"The adapter changes {name}, whose weight is tied to {owners[id(weight)]}; merging "
                               "would change both. Train the adapter without that module, or untie the weights "
                               "before merging.")


def _delta_lost(model: nn.Module, dtype: torch.dtype) -> float:
    lost = total = 0.0
    for _, layer in lora_layers(model):
        if not isinstance(layer, LORA_LAYERS) or layer.active_adapter is None:
            continue
        w = layer.base_layer.weight.detach().float()
        delta = layer.merged_delta(layer.active_adapter)
        kept = (w + delta).to(dtype).float() - w.to(dtype).float()
        lost += float((kept - delta).pow(2).sum())
        total += float(delta.pow(2).sum())
    return (lost / total) ** 0.5 if total else 0.0


def merge_to_directory(model: str, adapter: str | os.PathLike, out: str | os.PathLike, dtype: str = "float32",
                       max_drift: float = 1e-3, force: bool = False, probe_texts=PROBE_TEXTS,
                       quantize: str | None = None) -> MergeReport:
    """Load `model` (fp32) with the adapter folder `adapter`, merge, and write a plain model folder `out` in `dtype`.

    Refuses (LorakitError, nothing written) when the merged logits drift more than `max_drift` from base+adapter,
    unless `force`. `quantize` (nf4 / int8 / int8-wo): the adapter was trained on that quantized base (QLoRA); the
    base is quantized the same way, the reference logits come from it, and the adapter is merged into its dequantized
    weights.
    """
    if dtype not in DTYPES:
        raise LorakitError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    base, tokenizer = load_model(model, dtype=torch.float32, quantize=quantize)
    load_adapter(base, adapter)
    reference = _probe_logits(base, tokenizer, probe_texts)
    if quantize is not None:
        from lorakit.models.quantization import dequantize_model

        dequantize_model(base)
    check_mergeable(base)
    with disable_adapters(base):
        effect = _max_diff(_probe_logits(base, tokenizer, probe_texts), reference)
    lost = _delta_lost(base, DTYPES[dtype])
    merged = unload(base).to(DTYPES[dtype])
    drift = _max_diff(_probe_logits(merged, tokenizer, probe_texts), reference)
    report = MergeReport(str(out), dtype, drift, effect, lost, forced=force and drift > max_drift, quantize=quantize)
    if drift > max_drift and not force:
        raise LorakitError(f"Merging into {dtype} is lossy: the merged model's logits differ from base+adapter by up "
                           f"to {drift:.3g} (allowed {max_drift:g}; the adapter itself moves logits by {effect:.3g}, "
                           f"and {100 * lost:.2f}% of ΔW is lost to {dtype} rounding). Nothing was written. Merge in "
                           "float32, raise max_drift, or pass force to write it anyway.")
    with atomic_directory(out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / REPORT_FILE, {**asdict(report), "base_model": model, "adapter": str(adapter)})
    return report
