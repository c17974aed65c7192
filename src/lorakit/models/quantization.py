"""Quantized frozen bases (QLoRA): bitsandbytes NF4 / int8 and torchao int8 weight-only linear layers under LoRA,
dequantizing merges, LoftQ init.

`quantize_model` swaps the frozen `nn.Linear` layers of a model (never the output head, never LoRA's own A/B or
modules to save) for bitsandbytes `Linear4bit` (method "nf4": NF4, double-quantised statistics, as in the QLoRA paper)
or `Linear8bitLt` (method "int8": LLM.int8), or for an `Int8WeightOnlyLinear` whose weight is a torchao `Int8Tensor`
(method "int8-wo": int8 weight-only, one symmetric scale per output row; activations stay float). A `LoraLinear`
wrapping such a layer runs the base through the layer's own forward and keeps A/B in fp32, so gradients reach the
adapter only.

Adding ΔW to 4-/8-bit weights would round most of it away, so `lorakit.merge` refuses a quantized base.
`merge_quantized` dequantizes first, merges in fp32, casts to the dtype asked for and reports the logit drift against
the quantized base + adapter it replaces; merging back into the quantized format is allowed only with `force=True`.

`loftq_init` (LoftQ, Li et al. 2023) chooses the base's quantization and the adapter together: alternately quantize
W − BA and set BA to the rank-r SVD of the residual W − Q, so that Q + BA starts closer to W than Q alone.
bitsandbytes and torchao are imported lazily: only these functions need them (`pip install 'lorakit[quant]'`).
`is_quantized`, `quantization_method` and `dequantize_weight` (reading a quantized layer's format and weight) live in
`lorakit.lora.quantized` and are re-exported here.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.lora.injection import (active_adapter, candidate_modules, disable_adapters, head_names, lora_layers, merge,
                                    merged_adapters, set_submodule, unload)
from lorakit.lora.layers import LoraLinear
# is_quantized, quantization_method and dequantize_weight are defined in lorakit.lora.quantized (adapter files read the
# format, and lora sits below models) and stay importable from here.
from lorakit.lora.quantized import (dequantize_weight, import_bitsandbytes, is_quantized, is_torchao_weight,
                                    quantization_method)

METHODS = ("nf4", "int8", "int8-wo")
LOFTQ_BITS = {4: "nf4", 8: "int8"}
# bitsandbytes NF4 quantizes blocks of 64 weights; its fast CPU kernel (AVX512-BF16 CPUs) regroups each weight row into
# whole blocks and the rows into groups of 32, and crashes on layers that do not divide evenly. The rule is applied on
# every device, so a model quantizes the same way (and the same layers stay full precision) on every machine.
NF4_BLOCK, NF4_ROW_GROUP = 64, 32


def _torchao():
    try:
        import torchao.quantization
    except ImportError:
        raise LorakitError("quantize='int8-wo' needs torchao, which is not installed. Install it with: "
                           "pip install 'lorakit[quant]' (or pip install torchao).") from None
    return torchao.quantization


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise LorakitError(f"quantize must be one of {METHODS}, got {method!r}.")


# ---------------------------------------------------------------------------------------------------- layers
def unsupported_shape(linear: nn.Linear, method: str) -> str | None:
    """Why `method` cannot quantize this layer on every CPU and GPU its library supports (None: it can)."""
    if method == "nf4" and (linear.in_features % NF4_BLOCK or linear.out_features % NF4_ROW_GROUP):
        return (f"{linear.in_features}→{linear.out_features}: nf4 needs an input width that is a multiple of "
                f"{NF4_BLOCK} and an output width that is a multiple of {NF4_ROW_GROUP}")
    return None


def quantize_linear(linear: nn.Linear, method: str, compute_dtype: torch.dtype = torch.float32,
                    weight: torch.Tensor | None = None) -> nn.Module:
    """A quantized copy of `linear` (weight `weight` if given, e.g. LoftQ's W − BA), frozen."""
    _check_method(method)
    reason = unsupported_shape(linear, method)
    if reason:
        raise LorakitError(f"Cannot quantize this layer ({reason}). Keep it in full precision, or use "
                           "quantize='int8' / 'int8-wo', which have no width rule.")
    if method == "int8-wo":
        return _torchao_linear(linear, compute_dtype, weight)
    bnb = import_bitsandbytes()
    w = (linear.weight if weight is None else weight).detach().float().cpu().clone()  # (out, in)
    has_bias = linear.bias is not None
    if method == "nf4":
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype,
                              compress_statistics=True, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4")
        # On AVX512-BF16 CPUs bitsandbytes would repack the weight on the first no-grad eval forward, rounding the
        # block scales to bf16 and fetching its kernel from a model hub: outputs would differ by CPU (and the layer
        # could no longer be dequantized exactly). lorakit keeps one computation on every CPU.
        q.support_avx512bf16_for_cpu = False
    else:
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                                threshold=0.0)
        q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    if has_bias:
        q.bias = nn.Parameter(linear.bias.detach().to(compute_dtype).cpu().clone(), requires_grad=False)
    q.train(linear.training)  # bitsandbytes' int8 layer computes differently in eval mode (int8 activations)
    return q.to(linear.weight.device)  # bitsandbytes quantizes on the move to a device


class _Int8WeightOnlyFunction(torch.autograd.Function):
    """torchao's linear on the int8 weight, with a backward that keeps only the int8 weight for the input gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        ctx.layer = layer
        return torch.nn.functional.linear(x, layer.weight, layer.bias)  # (..., out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = ctx.layer.weight.dequantize(grad.dtype)  # (out, in), one layer's float copy at a time
        return grad @ weight, None  # (..., in)


class Int8WeightOnlyLinear(nn.Linear):
    """An `nn.Linear` whose weight is a torchao `Int8Tensor` (int8, one symmetric scale per output row).

    torchao's own linear computes x·int8(W)ᵀ in the activation dtype, times the row scales, with plain torch ops, so
    autograd would save a float copy of every weight for the input gradient: training would hold the fp32 weights
    again until backward. This forward gives the same outputs and rebuilds the float weight in backward instead.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Int8WeightOnlyFunction.apply(x, self)


def _torchao_linear(linear: nn.Linear, compute_dtype: torch.dtype, weight: torch.Tensor | None) -> nn.Linear:
    """An `Int8WeightOnlyLinear` copy of `linear`, frozen, computing in `compute_dtype`."""
    ao = _torchao()
    w = (linear.weight if weight is None else weight).detach()
    q = Int8WeightOnlyLinear(linear.in_features, linear.out_features, bias=linear.bias is not None, device=w.device,
                             dtype=compute_dtype)
    with torch.no_grad():
        q.weight.copy_(w)
        if linear.bias is not None:
            q.bias.copy_(linear.bias)
    q.requires_grad_(False)
    # set_inductor_config=False: do not change torch.compile's global settings as a side effect.
    ao.quantize_(q, ao.Int8WeightOnlyConfig(set_inductor_config=False))
    return q.train(linear.training)


def dequantize_linear(module: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Linear:
    w = dequantize_weight(module)
    linear = nn.Linear(w.shape[1], w.shape[0], bias=module.bias is not None, device=w.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(w)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    linear.requires_grad_(False)
    return linear.train(module.training)


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, plus bitsandbytes' quantization statistics; a torchao
    quantized tensor counts its inner tensors (int8 data, scales, zero points), not its nominal float size."""
    seen: set[int] = set()
    total = 0

    def add(t) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            if is_torchao_weight(t):
                for inner in t.__tensor_flatten__()[0]:
                    add(getattr(t, inner))
            else:
                total += t.numel() * t.element_size()

    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
        state = getattr(t, "quant_state", None)
        while state is not None:  # NF4: absmax (+ nested absmax and code with double quantization)
            add(state.absmax)
            add(state.code)
            state = getattr(state, "state2", None)
    for module in model.modules():  # int8: the per-row scales, on the weight until the first forward, then on state
        if quantization_method(module) == "int8":
            scb = module.weight.SCB if getattr(module.weight, "SCB", None) is not None else module.state.SCB
            add(scb)
    return total


# ---------------------------------------------------------------------------------------------------- models
def _base_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every frozen base linear: plain ones and LoRA-wrapped ones, never heads or adapter weights."""
    heads = head_names(model)
    out = []
    for name, module in candidate_modules(model):
        if name in heads:
            continue
        if isinstance(module, LoraLinear):
            out.append((name + ".base_layer", module.base_layer))
        elif isinstance(module, nn.Linear):
            out.append((name, module))
    return out


def quantize_model(model: nn.Module, method: str = "nf4", compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace the frozen base `nn.Linear` layers (not the output head) by quantized layers, in place.

    Works before or after `add_lora`; layers already quantized are left alone. GPT-2's Conv1D layers stay as they are.
    Layers the method cannot quantize (see `unsupported_shape`) stay in full precision, named in one warning; a model
    where no layer can be quantized is refused.
    """
    _check_method(method)
    merged = merged_adapters(model)
    if merged:
        raise LorakitError(f"Adapter(s) {merged} are merged into the base weights; unmerge(model) before quantizing "
                           "the base.")
    done, kept = 0, {}
    for name, layer in _base_linears(model):
        current = quantization_method(layer)
        if current is not None:
            if current != method:
                raise LorakitError(f"{name} is already quantized as {current}; cannot requantize it as {method}.")
            continue
        if type(layer) is not nn.Linear:
            continue
        reason = unsupported_shape(layer, method)
        if reason:
            kept[name.removesuffix(".base_layer")] = reason
            continue
        set_submodule(model, name, quantize_linear(layer, method, compute_dtype))
        done += 1
    if not done and quantization_of(model) is None:
        if kept:
            raise LorakitError(f"quantize={method!r} can quantize none of this model's linear layers: "
                               f"{_list(kept)}. Use quantize='int8' or 'int8-wo', or no quantization.")
        raise LorakitError("quantize_model found no nn.Linear layer to quantize (heads are kept; GPT-2 Conv1D layers "
                           "are not supported).")
    if kept:
        warnings.warn(f"quantize={method!r}: {len(kept)} layer(s) kept in full precision because {method} cannot "
                      f"quantize their shape: {_list(kept)}.", stacklevel=2)
    return model


def _list(reasons: dict[str, str], most: int = 6) -> str:
    shown = "; ".join(f"{name} ({reason})" for name, reason in list(reasons.items())[:most])
    return shown + (f"; and {len(reasons) - most} more" if len(reasons) > most else "")


def quantization_of(model: nn.Module) -> str | None:
    """"nf4", "int8" or "int8-wo" when the model's base has quantized linear layers, else None."""
    for _, layer in _base_linears(model):
        method = quantization_method(layer)
        if method is not None:
            return method
    return None


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every quantized base linear by a plain `nn.Linear` holding its dequantized weight, in place."""
    for name, layer in _base_linears(model):
        if is_quantized(layer):
            set_submodule(model, name, dequantize_linear(layer, dtype))
    return model


# ---------------------------------------------------------------------------------------------------- merging
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class QuantizedMergeReport:
    method: str
    """The quantization of the base the adapter was trained on."""
    dtype: str
    """The merged model's weights: float32 / bfloat16 / float16, or the quantization itself when requantized."""
    max_logit_diff: float
    """Max |merged logits − (quantized base + adapter) logits| on the probe inputs."""
    adapter_effect: float
    """Max |quantized base + adapter − quantized base| logits: the size of what the merge must preserve."""
    requantized: bool

    def __str__(self) -> str:
        return (f"merged the adapter into the dequantized {self.method} base ({self.dtype}); max logit difference vs "
                f"{self.method} base+adapter: {self.max_logit_diff:.3g} (adapter effect {self.adapter_effect:.3g})")


def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def merge_quantized(model: nn.Module, input_ids: torch.Tensor, dtype: str = "float32", requantize: bool = False,
                    force: bool = False) -> tuple[nn.Module, QuantizedMergeReport]:
    """Dequantize the base, merge the active adapter, unload and cast to `dtype`; returns (plain model, report).

    The report's drift compares the result with the quantized base + adapter on `input_ids` (B, T). `requantize`
    quantizes the merged weights back to the base's format, which rounds away much of ΔW: only with `force=True`,
    and the drift is printed.
    """
    method = quantization_of(model)
    if method is None:
        raise LorakitError("merge_quantized: the model's base is not quantized; use lorakit.merge / unload.")
    if dtype not in DTYPES:
        raise LorakitError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    if active_adapter(model) is None:
        raise LorakitError("merge_quantized: the model has no active adapter to merge.")
    if requantize and not force:
        raise LorakitError(f"Merging back into {method} rounds ΔW to the {method} grid, so most of a small adapter is "
                           "lost and the logits drift. Merge into float32/bfloat16 instead (requantize=False), or pass "
                           "force=True to requantize anyway (the drift is printed).")
    reference = _logits(model, input_ids)
    with disable_adapters(model):
        effect = float((_logits(model, input_ids) - reference).abs().max())
    dequantize_model(model, torch.float32)
    merge(model)
    plain = unload(model)
    if requantize:
        quantize_model(plain, method)
    else:
        plain.to(DTYPES[dtype])
    drift = float((_logits(plain, input_ids) - reference).abs().max())
    report = QuantizedMergeReport(method, method if requantize else dtype, drift, effect, requantize)
    if requantize:
        print(f"lorakit: forced merge back into {method}: max logit difference vs base+adapter {drift:.3g} "
              f"(adapter effect {effect:.3g})", flush=True)
    return plain, report


# ---------------------------------------------------------------------------------------------------- LoftQ
def loftq_init(model: nn.Module, adapter: str | None = None, bits: int = 4, iters: int = 1,
               compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """LoftQ: for each LoRA layer of `adapter`, quantize its base and set A, B so that Q + scale·BA ≈ W.

    Each iteration quantizes W − scale·BA, then takes the rank-r SVD of the residual W − dequant(Q) as scale·BA
    (√S split between the factors). The base layers become bitsandbytes layers; the stored config records
    init="loftq" and PEFT's `loftq_config`. Quantize the remaining linear layers with `quantize_model` afterwards.
    Layers the method cannot quantize (`unsupported_shape`) keep their base and their usual init; `quantize_model`
    names them in its warning.
    """
    if bits not in LOFTQ_BITS:
        raise LorakitError(f"loftq bits must be one of {sorted(LOFTQ_BITS)}, got {bits!r}.")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise LorakitError(f"loftq iters must be a positive integer, got {iters!r}.")
    adapter = adapter or active_adapter(model)
    if adapter is None or adapter not in getattr(model, "lora_configs", {}):
        raise LorakitError(f"loftq_init: no adapter {adapter!r} on this model; call add_lora first.")
    method = LOFTQ_BITS[bits]
    for name, layer in list(lora_layers(model)):
        if not isinstance(layer, LoraLinear) or adapter not in layer.adapters:
            continue
        base = layer.base_layer
        if type(base) is not nn.Linear:
            raise LorakitError(f"loftq_init needs the unquantized weight of {name} (a plain nn.Linear), got "
                               f"{type(base).__name__}: apply LoftQ to the fp32/bf16 model, before quantizing.")
        if adapter in layer.merged_adapters:
            raise LorakitError(f"{name}: adapter {adapter!r} is merged; unmerge before loftq_init.")
        if unsupported_shape(base, method):
            continue
        r, scale = layer.r[adapter], layer.scaling[adapter]
        with torch.no_grad():
            w = base.weight.detach().float()  # (out, in)
            target = w
            for _ in range(iters):
                quantized = quantize_linear(base, method, compute_dtype, weight=target)
                u, s, vh = torch.linalg.svd(w - dequantize_weight(quantized), full_matrices=False)
                root = s[:r].sqrt()
                left, right = u[:, :r] * root, root[:, None] * vh[:r]  # (out, r), (r, in)
                target = w - left @ right
            layer.lora_A[adapter].weight.copy_(right)
            layer.lora_B[adapter].weight.copy_(left / scale)
        layer.base_layer = quantized
    model.lora_configs = {**model.lora_configs, adapter: dataclasses.replace(
        model.lora_configs[adapter], init="loftq", loftq_config={"loftq_bits": bits, "loftq_iter": iters})}
    return model
