"""Exact memory savers for training: the same numbers as the model's own code, fewer tensors kept for backward.

A gated MLP (Llama, Mistral, Qwen2, SmolLM2, ...) computes down(silu(gate(x)) * up(x)). Left to autograd, it keeps
three (tokens × intermediate) tensors per layer for backward: gate(x), silu(gate(x)) and up(x). The silu output is
cheap to recompute from gate(x), so `fuse_gated_mlp` makes the product one autograd function that keeps only gate(x)
and up(x) and recomputes the silu in backward, with the same kernels autograd would call, so values and gradients
are bit-identical. For SmolLM2-135M at batch 8 × 128 in fp32 that is 189 MB less at the peak of a training step.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


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


def _gated_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


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
