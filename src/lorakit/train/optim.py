"""The optimizer and its schedule: AdamW in parameter groups (weight decay on matrices only; LoRA+ learning rates),
the warmup-then-decay factor, and the clipped global gradient norm."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.train import distributed as dist
from lorakit.train.config import OptimConfig

B_FACTORS = ("lora_B.weight", "lora_embedding_B")
"""The keys under which lorakit's LoRA layers name the B (up-projection) factor in `adapter_state`."""


def lora_b_parameters(model: nn.Module) -> set[int]:
    """ids of the B factors of every adapter (linear and embedding layers), found through the layers' adapter_state."""
    from lorakit.lora.injection import lora_layers

    return {id(p) for _, layer in lora_layers(model) for adapter in layer.adapters
            for key, p in layer.adapter_state(adapter).items() if key in B_FACTORS}


def build_optimizer(model: nn.Module, params: list[tuple[str, nn.Parameter]], config: OptimConfig
                    ) -> torch.optim.AdamW:
    """AdamW over `params`: weight decay on matrices only (not on biases, norms or DoRA magnitudes).

    With `config.loraplus_lr_ratio` (LoRA+, Hayou et al. 2024), the B factors learn at lr × ratio in their own groups;
    A factors and every other trainable parameter keep lr. As in PEFT's `create_loraplus_optimizer`, embedding
    adapters count too, with one difference: PEFT gives both embedding factors a fixed lr (`loraplus_lr_embedding`,
    1e-6); here the embedding B follows the ratio and its A the lr, like every other layer. Group order is fixed
    (plain groups first), so a checkpoint's optimizer state resumes into the same groups.
    """
    ratio = config.loraplus_lr_ratio
    fast = lora_b_parameters(model) if ratio is not None else set()
    if ratio is not None and not any(id(p) in fast for _, p in params):
        raise LorakitError(f"optim.loraplus_lr_ratio={ratio} scales the learning rate of LoRA B matrices, but none of "
                           "the trainable parameters is one (a model without lorakit adapters?). Add an adapter "
                           "(add_lora) or set optim.loraplus_lr_ratio to null.")
    groups = []
    for is_fast, lr in ((False, config.lr), (True, config.lr * (ratio or 1.0))):
        for decay in (True, False):
            chosen = [p for _, p in params if (id(p) in fast) == is_fast and (p.ndim >= 2) == decay]
            if chosen:
                groups.append({"params": chosen, "lr": lr, "weight_decay": config.weight_decay if decay else 0.0})
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, foreach=False)


def lr_factor(config: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier at each step: linear warmup, then linear or cosine decay to 0, or constant."""
    warmup = config.warmup_steps or int(config.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if config.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return factor


def grad_norm(params: list[tuple[str, nn.Parameter]], max_norm: float | None) -> float:
    """The global gradient norm (over all ranks), clipping to max_norm when set. Non-finite iff some gradient is."""
    # max_norm=inf measures without clipping (the scale factor clamps to exactly 1)
    norm = torch.nn.utils.clip_grad_norm_([p for _, p in params], math.inf if max_norm is None else max_norm)
    return float(dist.full_tensor(norm))
