"""Quantized linear layers as LoRA finds them under its wrappers: bitsandbytes `Linear4bit` (NF4) / `Linear8bitLt`
(int8) and torchao `Int8Tensor` (int8 weight-only) weights. Which format a layer holds, and the fp32 weight it
computes with.

Reading the format needs only torch; dequantizing a bitsandbytes layer imports bitsandbytes lazily
(`pip install 'lorakit[quant]'`). Making quantized layers (`quantize_model`, `loftq_init`, ...) is the job of
the models layer (models/quantization.py).
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.lora.layers import is_quantized_weight


def import_bitsandbytes():
    """The bitsandbytes module, imported on first use, with an install hint when it is missing."""
    try:
        import bitsandbytes
    except ImportError:
        raise LorakitError("Quantized bases need bitsandbytes, which is not installed. Install it with: "
                           "pip install 'lorakit[quant]' (or pip install bitsandbytes).") from None
    return bitsandbytes


def is_torchao_weight(weight: torch.Tensor) -> bool:
    """A torchao quantized tensor subclass (it reports a float dtype), as opposed to bitsandbytes' integer storage."""
    return weight.is_floating_point() and is_quantized_weight(weight)


def is_quantized(module: nn.Module) -> bool:
    """A linear layer whose weight is stored quantized (bitsandbytes Linear4bit / Linear8bitLt, torchao Int8Tensor)."""
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) and weight is not None and is_quantized_weight(weight)


def quantization_method(module: nn.Module) -> str | None:
    """"nf4", "int8" (bitsandbytes) or "int8-wo" (torchao) for a quantized linear layer, else None."""
    if not is_quantized(module):
        return None
    if is_torchao_weight(module.weight):
        return "int8-wo"
    return "nf4" if type(module).__name__ == "Linear4bit" else "int8"


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The fp32 (out, in) weight a quantized linear layer computes with."""
    w = module.weight
    if quantization_method(module) == "int8-wo":
        return w.dequantize().float()
    bnb = import_bitsandbytes()
    if quantization_method(module) == "nf4":
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    if quantization_method(module) == "int8":
        scb = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB  # (out,) row absmax
        return w.data.float() * (scb.float()[:, None] / 127.0)
    raise LorakitError(f"{type(module).__name__} is not a quantized linear layer.")
