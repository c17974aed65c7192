"""Exact memory savers for training: the same numbers as the model's own code, fewer tensors kept for backward.

A gated MLP (Llama, Mistral, Qwen2, SmolLM2, ...) computes down(silu(gate(x)) * up(x)). Left to autograd, it keeps
three (tokens × intermediate) tensors per layer for backward: gate(x), silu(gate(x)) and up(x). The silu output is
cheap to recompute from gate(x), so `fuse_gated_mlp` makes the product one autograd function that keeps only gate(x)
and up(x) and recomputes the silu in backward, with the same kernels autograd would call, so values and gradients
are bit-identical. Where LoRA adapts the down projection, its A also kept the product (an fp32 copy on a bf16
base); the fused function then also computes that projection and recomputes the product for A's gradient. For SmolLM2-135M at batch 8 × 128 in fp32 that is 189 MB less at the peak of a training step.

On a bf16 base, RMSNorm and LoRA (whose weights are fp32) cast their bf16 input to fp32 and autograd keeps that copy
for backward: one per norm and one per adapted projection, even where q, k and v share one input.
`keep_low_precision_inputs` gives them autograd functions that keep the bf16 input and cast it again in backward,
running the same ops in the same order: each module's values and gradients are bit-identical. Where several
projections share an input, autograd may add their gradients into it in another order: bf16 rounding, no more.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.lora.layers import LoraLinear, project_keeping_input
from lorakit.lora.variants import LoraVariant


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up, saving gate and up only."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SiluMul.apply(gate, up)
    return F.silu(gate) * up


class _SiluMulLowRank(torch.autograd.Function):
    """h = silu(gate) * up and h A^T (in A's dtype): the product and the LoRA A projection of the down projection
    that reads it, keeping gate and up only. Left to autograd, LoRA A keeps h (or its fp32 copy on a bf16 base), a
    third (tokens × intermediate) tensor; here h is recomputed in backward for A's gradient."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, a: torch.Tensor):
        ctx.save_for_backward(gate, up, a)
        h = F.silu(gate) * up
        return h, F.linear(h.to(a.dtype), a)  # (..., inter), (..., r)

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor, grad_ha: torch.Tensor):
        gate, up, a = ctx.saved_tensors
        act = F.silu(gate)
        grad_a = None
        if ctx.needs_input_grad[2]:
            h = (act * up).to(a.dtype)
            grad_a = grad_ha.reshape(-1, grad_ha.shape[-1]).t().mm(h.reshape(-1, h.shape[-1]))  # (r, inter)
        grad = grad_h + grad_ha.matmul(a).to(grad_h.dtype)  # through the base and through LoRA A
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * act if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up, grad_a


def _plain_adapter(layer: nn.Module) -> str | None:
    """The adapter a LoraLinear runs in this forward when it is plain LoRA without dropout, else None."""
    if not isinstance(layer, LoraLinear) or layer.disabled or layer.row_groups is not None:
        return None
    name = layer.active_adapter
    if name is None or name in layer.merged_adapters or type(layer.variants[name]) is not LoraVariant:
        return None
    return name if isinstance(layer.lora_dropout[name], nn.Identity) else None


def _gated_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up, down = self.gate_proj(x), self.up_proj(x), self.down_proj
    name = _plain_adapter(down)
    if name is None or not torch.is_grad_enabled() or not (gate.requires_grad or up.requires_grad):
        return down(silu_mul(gate, up))
    h, after_a = _SiluMulLowRank.apply(gate, up, down.lora_A[name].weight)  # LoraLinear's forward, h not kept
    y = down.base_layer(h)
    return y + (down.lora_B[name](after_a) * down.scaling[name]).to(y.dtype)


def _is_gated_silu_mlp(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return (all(isinstance(getattr(module, name, None), nn.Module) for name in ("gate_proj", "up_proj", "down_proj"))
            and (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"))


def fuse_gated_mlp(model: nn.Module) -> int:
    """Give every gated-SiLU MLP in `model` the memory-saving forward; returns how many were changed (idempotent).
    Undo with `unfuse_gated_mlp`."""
    count = 0
    for module in model.modules():
        if _is_gated_silu_mlp(module):
            if "forward" not in module.__dict__:
                module.forward = types.MethodType(_gated_mlp_forward, module)
            count += 1
    return count


def unfuse_gated_mlp(model: nn.Module) -> int:
    count = 0
    for module in model.modules():
        if getattr(module.__dict__.get("forward"), "__func__", None) is _gated_mlp_forward:
            del module.forward
            count += 1
    return count


def low_rank_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """scale · B(A(x)) in A's dtype: what `LoraLinear.lora_delta(name, x.to(A.dtype))` computes, with the same values
    and gradients, but a low-precision x is kept for backward as it is, not as an fp32 copy."""
    return F.linear(project_keeping_input(x, a), b) * scale  # autograd keeps only the (..., r) projection


class _RmsNorm(torch.autograd.Function):
    """Llama's RMSNorm, weight · (x / rms(x) in fp32, cast back to x's dtype), keeping x in its own dtype and the
    (tokens × 1) reciprocal rms for backward instead of the fp32 copy of x; backward recomputes that copy and runs
    the ops autograd runs on the module's own graph, in its order (bit-identical gradients)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        normed = (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd, normed if weight.requires_grad else torch.empty(0))
        return weight * normed

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd, normed = ctx.saved_tensors
        grad_w = (grad * normed).sum_to_size(weight.shape) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            xf = x.to(torch.float32)
            g = (grad * weight).to(torch.float32)  # through weight * normed, then the cast
            grad_rstd = (g * xf).sum(-1, keepdim=True)  # through xf * rstd
            grad_var = -0.5 * grad_rstd * rstd.pow(3)  # rsqrt's backward (+ eps passes it on)
            grad_sq = grad_var.expand(xf.shape) / xf.shape[-1]  # mean's backward
            grad_x = (g * rstd + grad_sq * (2.0 * xf)).to(x.dtype)  # the mul's and the square's paths
        return grad_x, grad_w, None


RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
"""transformers' RMSNorm classes whose forward is Llama's (other families scale or cast differently)."""


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.dtype == torch.float32 or not torch.is_grad_enabled():  # no fp32 copy to spare
        return type(self).forward(self, hidden_states)
    return _RmsNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _lean_lora_delta(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    a = self.lora_A[name].weight
    if (x.dtype != a.dtype and type(self.variants[name]) is LoraVariant
            and isinstance(self.lora_dropout[name], nn.Identity)):
        return low_rank_delta(x, a, self.lora_B[name].weight, self.scaling[name])
    return type(self).delta(self, name, x, y)


def keep_low_precision_inputs(model: nn.Module) -> int:
    """On a low-precision (bf16) base, let Llama-style RMSNorms and plain LoRA adapters (no dropout, no DoRA) keep
    their bf16 input for backward instead of the fp32 copy their forward makes, with bit-identical values and
    gradients per module (see the module docstring for inputs shared by several projections): half the bytes, and
    one tensor for projections that share an input (q, k, v) instead of a copy each.
    Elsewhere (fp32 inputs, other variants, dropout) the modules run their own forward. Returns how many modules were
    changed (idempotent)."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in RMS_NORMS and hasattr(module, "variance_epsilon"):
            method = _rms_norm_forward
            name = "forward"
        elif isinstance(module, LoraLinear):
            method = _lean_lora_delta
            name = "delta"
        else:
            continue
        if name not in module.__dict__:
            setattr(module, name, types.MethodType(method, module))
        count += 1
    return count
