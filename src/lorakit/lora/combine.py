"""Weighted combination of adapters into a new one.

- "linear": B_new = Σ wᵢ Bᵢ, A_new = Σ wᵢ sᵢ Aᵢ — interpolation in parameter space (equal ranks required; exact
  for one adapter, or for identical adapters with weights summing to 1).
- "cat":    A_new = [w₁s₁A₁; w₂s₂A₂; …], B_new = [B₁ B₂ …] — exactly Σ wᵢ ΔWᵢ, at rank Σ rᵢ.
- "svd":    Σ wᵢ ΔWᵢ truncated to rank `r` by SVD — the best rank-r approximation (exact when r ≥ Σ rᵢ).
The new adapter has scale 1 (alpha = r); all scales are folded into its A (and, for svd, its B).
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
from torch import nn

from lorakit.lora.config import LoraConfig
from lorakit.errors import LorakitError
from lorakit.lora.injection import add_lora, lora_layers, require_adapter
from lorakit.lora.layers import LORA_LAYERS, LoraEmbedding

METHODS = ("linear", "cat", "svd")


def _ab(layer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A: (r, in), B: (out, r)) for either kind of LoRA layer."""
    if isinstance(layer, LoraEmbedding):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def combine_adapters(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], new_adapter: str,
                     method: str = "linear", r: int | None = None) -> str:
    """Create `new_adapter` from a weighted combination of existing adapters (see module doc); returns its name."""
    adapters, weights = list(adapters), [float(w) for w in weights]
    if method not in METHODS:
        raise LorakitError(f"combine_adapters: method {method!r} is not one of {METHODS}.")
    if not adapters or len(adapters) != len(weights):
        raise LorakitError(f"combine_adapters needs one weight per adapter; got {len(adapters)} adapters and "
                           f"{len(weights)} weights.")
    for a in adapters:
        require_adapter(model, a)
    if any(model.lora_configs[a].modules_to_save for a in adapters):
        raise LorakitError("combine_adapters combines LoRA updates only; adapters with modules_to_save "
                           f"({[a for a in adapters if model.lora_configs[a].modules_to_save]}) cannot be combined.")

    variants = [a for a in adapters if model.lora_configs[a].use_dora or model.lora_configs[a].changes_base]
    if variants:
        raise LorakitError(f"combine_adapters combines plain LoRA updates; {variants} use DoRA or a PiSSA/OLoRA init, "
                           "whose update depends on the base weight. Save PiSSA/OLoRA ones with convert_to_lora=True "
                           "and load those instead; DoRA adapters cannot be combined.")

    plan = {}  # module name -> (layer, [(adapter, weight) present there])
    for name, layer in lora_layers(model):
        if isinstance(layer, LORA_LAYERS):
            present = [(a, w) for a, w in zip(adapters, weights) if a in layer.adapters]
            if present:
                plan[name] = (layer, present)
    ranks = {}
    for name, (layer, present) in plan.items():
        if method == "linear":
            rs = {layer.r[a] for a, _ in present}
            if len(rs) > 1 or len(present) != len(adapters):
                raise LorakitError(f"'linear' needs every adapter on every module with one rank; {name} has "
                                   f"{ {a: layer.r[a] for a, _ in present} }. Use method='cat' or 'svd'.")
            ranks[name] = rs.pop()
        elif method == "cat":
            ranks[name] = sum(layer.r[a] for a, _ in present)
        else:
            if r is None:
                raise LorakitError("method='svd' needs the new rank: pass r=...")
            ranks[name] = min(r, layer.in_features, layer.out_features)
    new_r = r or max(ranks.values())
    rank_pattern = {re.escape(n): k for n, k in ranks.items() if k != new_r}
    config = LoraConfig(r=new_r, alpha=float(new_r), target_modules=list(plan), rank_pattern=rank_pattern,
                        alpha_pattern={k: float(v) for k, v in rank_pattern.items()})  # scale 1 everywhere
    add_lora(model, config, new_adapter)

    with torch.no_grad():
        for name, (layer, present) in plan.items():
            A_new, B_new = _ab(layer, new_adapter)
            scaled_A = [w * layer.scaling[a] * _ab(layer, a)[0].float() for a, w in present]  # (r_i, in)
            Bs = [_ab(layer, a)[1].float() for a, _ in present]  # (out, r_i)
            if method == "linear":
                A_new.copy_(sum(scaled_A))
                B_new.copy_(sum(w * B for (_, w), B in zip(present, Bs)))
            elif method == "cat":
                A_new.copy_(torch.cat(scaled_A))
                B_new.copy_(torch.cat(Bs, dim=1))
            else:
                delta = sum(B @ A for A, B in zip(scaled_A, Bs))  # (out, in)
                U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
                k = ranks[name]
                B_new.copy_(U[:, :k] * S[:k])
                A_new.copy_(Vh[:k])
    return new_adapter
