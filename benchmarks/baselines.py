"""Adapter layers (Houlsby et al., 2019) as a latency baseline for the LoRA paper's Table 1. Benchmark-only code.

A bottleneck MLP `h + up(act(down(h)))` is inserted after each block's attention output projection and after its MLP
output projection, i.e. on the residual branch before the residual add, as in Houlsby's placement. Unlike LoRA,
these extra layers run in sequence with the base computation and cannot be merged away.
"""

from __future__ import annotations

import torch
from torch import nn


class AdapterAfter(nn.Module):
    """Runs `inner`, then adds a bottleneck adapter on its output (starts as the identity: up = 0)."""

    def __init__(self, inner: nn.Linear, bottleneck: int):
        super().__init__()
        self.inner = inner
        d = inner.out_features
        w = inner.weight
        self.down = nn.Linear(d, bottleneck, device=w.device, dtype=w.dtype)
        self.up = nn.Linear(bottleneck, d, device=w.device, dtype=w.dtype)
        self.act = nn.GELU()
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inner(x)  # (..., d)
        return h + self.up(self.act(self.down(h)))


def add_adapter_layers(model: nn.Module, bottleneck: int = 8,
                       after: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")) -> int:
    """Wrap each block's attention and MLP output projections; returns the number of adapter parameters added."""
    added = 0
    for name, module in list(model.named_modules()):
        for suffix in after:
            parent_name, _, child = suffix.rpartition(".")
            if not name.endswith("." + parent_name) and name != parent_name:
                continue
            inner = getattr(module, child, None)
            if isinstance(inner, nn.Linear):
                wrapped = AdapterAfter(inner, bottleneck)
                setattr(module, child, wrapped)
                added += sum(p.numel() for n, p in wrapped.named_parameters() if not n.startswith("inner."))
    if not added:
        raise ValueError(f"No module matched {after}; this baseline knows Llama-style blocks.")
    return added
