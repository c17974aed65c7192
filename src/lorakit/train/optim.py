"""The optimizer and its schedule: AdamW in parameter groups (weight decay on matrices only), the warmup-then-decay
factor, and the clipped global gradient norm."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from lorakit.train import distributed as dist
from lorakit.train.config import OptimConfig

def build_optimizer(model: nn.Module, params: list[tuple[str, nn.Parameter]], config: OptimConfig
                    ) -> torch.optim.AdamW:
    """AdamW over `params`: weight decay on matrices only (not on biases, norms or DoRA magnitudes)."""
    groups = []
    for decay in (True, False):
        chosen = [p for _, p in params if (p.ndim >= 2) == decay]
        if chosen:
            groups.append({"params": chosen, "lr": config.lr, "weight_decay": config.weight_decay if decay else 0.0})
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
