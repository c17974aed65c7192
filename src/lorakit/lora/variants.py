"""LoRA variants: what an adapter of a `LoraLinear` does beyond plain LoRA, behind one small interface.

Each adapter makes two independent choices, and the layer stays the same for all of them:

- How it acts: a `LoraVariant` object, one per adapter. `LoraVariant` itself is plain LoRA (the default); `Dora`
  overrides what DoRA changes. The layer hands its output change (`delta`), `merge` and `unmerge` to it.
- How A and B start: `init_adapter`. Kaiming or gaussian A with B zero, so ΔW = 0 and the base is untouched; or
  PiSSA / OLoRA, which put the top of W into B A and leave the residual W − s·BA as the frozen base. The part taken out
  is kept as (A0, B0) in `layer.init_factors`; `original_output` adds it back wherever that adapter is off, so "off"
  still means the original model, and `undo_init` gives it back to the base when the adapter is removed.

Adding a variant: subclass `LoraVariant` here, override the methods whose behaviour differs, and construct it in
`LoraLinear.add_adapter` from the option that asks for it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.lora.config import BASE_CHANGING_INITS

if TYPE_CHECKING:  # layers.py imports this module; the annotations only name its classes
    from lorakit.lora.layers import LoraEmbedding, LoraLinear


class LoraVariant:
    """Plain LoRA: the adapter adds s·B A x to the output; merging adds ΔW = s·BA to the base weight.

    A variant gets the layer and the adapter name on every call and reads the adapter's tensors from the layer (whose
    parameter names follow PEFT). It keeps only its own state, one instance per adapter. A variant whose merged change
    does not depend on W overrides `delta` and `merged_delta`; one that reads W (DoRA) also overrides `merge`,
    `unmerge` and `unmerged_weight`. Plain merging reads nothing but `layer.delta_weight(name)`, which `LoraEmbedding`
    has as well, so both layer kinds merge through this class.
    """

    def add(self, layer: LoraLinear, name: str) -> None:
        """Create the variant's own tensors, once A and B hold their initial values."""

    def remove(self, layer: LoraLinear, name: str) -> None:
        """Delete the variant's own tensors."""

    def state(self, layer: LoraLinear, name: str) -> dict[str, nn.Parameter]:
        """The variant's own tensors under PEFT's local key names (saved beside lora_A / lora_B)."""
        return {}

    def delta(self, layer: LoraLinear, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """What the adapter adds to the base output y = base(x); x is already in the LoRA weights' dtype."""
        return layer.lora_delta(name, layer.lora_dropout[name](x))  # (..., out)

    def merged_delta(self, layer: LoraLinear | LoraEmbedding, name: str) -> torch.Tensor:
        """What merging adds to the unmerged base weight: fp32, in the base weight's layout."""
        return layer.delta_weight(name)

    def merge(self, layer: LoraLinear | LoraEmbedding, name: str) -> None:
        weight = layer.base_layer.weight
        weight.data += self.merged_delta(layer, name).to(weight.dtype)

    def unmerge(self, layer: LoraLinear | LoraEmbedding, name: str) -> None:
        weight = layer.base_layer.weight
        weight.data -= self.merged_delta(layer, name).to(weight.dtype)

    def unmerged_weight(self, layer: LoraLinear | LoraEmbedding, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The base weight (fp32, its layout) before `merge(name)`, computed from the merged `weight`."""
        return weight.float() - self.merged_delta(layer, name)


class Dora(LoraVariant):
    """DoRA: a magnitude m per output row rescales W + s·BA, so W' = m / ‖W + s·BA‖ ⊙ (W + s·BA).

    The row norm is detached from the graph, as in the paper (§4.3) and PEFT. m lives on the layer as
    `lora_magnitude_vector[name]`, PEFT's parameter name.
    """

    def __init__(self) -> None:
        self.merge_norm: torch.Tensor | None = None  # ‖W + ΔW‖ rows when merged: unmerge divides it back out exactly

    def add(self, layer: LoraLinear, name: str) -> None:
        dtype = layer.lora_A[name].weight.dtype
        with torch.no_grad():  # m = ‖W + s·BA‖ per output row, so the adapter starts exact
            norm = self.norm(layer, name, layer.weight_oi().to(dtype))
        layer.lora_magnitude_vector[name] = nn.Parameter(norm.to(dtype))

    def remove(self, layer: LoraLinear, name: str) -> None:
        del layer.lora_magnitude_vector[name]

    def state(self, layer: LoraLinear, name: str) -> dict[str, nn.Parameter]:
        return {"lora_magnitude_vector": layer.lora_magnitude_vector[name]}

    @staticmethod
    def norm(layer: LoraLinear, name: str, weight: torch.Tensor) -> torch.Tensor:
        """‖W + s·BA‖ over each output row (out,), from an (out, in) weight; no gradient flows through it."""
        lora_weight = (layer.lora_B[name].weight @ layer.lora_A[name].weight).detach()  # (out, in)
        return torch.linalg.norm(weight + layer.scaling[name] * lora_weight, dim=1).detach()

    def delta(self, layer: LoraLinear, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(m/‖W+s·BA‖ − 1) W x + m/‖W+s·BA‖ · s·B A x.

        As in PEFT: without dropout (or in eval) W x is taken from y; with dropout it is recomputed on the dropped x.
        """
        weight = layer.weight_oi().to(x.dtype)  # (out, in)
        factor = layer.lora_magnitude_vector[name] / self.norm(layer, name, weight)  # (out,)
        dropout = layer.lora_dropout[name]
        if isinstance(dropout, nn.Identity) or not layer.training:
            bias = layer.base_layer.bias
            base = (y if bias is None else y - bias).to(x.dtype)  # (..., out)
        else:
            x = dropout(x)
            base = F.linear(x, weight)  # (..., out)
        return (factor - 1) * base + factor * layer.lora_delta(name, x)  # (..., out)

    def _target(self, layer: LoraLinear, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, W + ΔW), both (out, in) fp32, from the unmerged base weight."""
        w = layer.weight_oi().float()
        return w, w + layer.layout(layer.delta_weight(name))

    def merged_delta(self, layer: LoraLinear, name: str) -> torch.Tensor:
        """m/‖W+ΔW‖ ⊙ (W+ΔW) − W, in the base weight's layout."""
        w, target = self._target(layer, name)
        magnitude = layer.lora_magnitude_vector[name].detach().float()
        return layer.layout((magnitude / target.norm(dim=1))[:, None] * target - w)

    def merge(self, layer: LoraLinear, name: str) -> None:
        self.merge_norm = self._target(layer, name)[1].norm(dim=1)  # (out,), taken before W changes
        super().merge(layer, name)

    def unmerge(self, layer: LoraLinear, name: str) -> None:
        layer.base_layer.weight.data.copy_(self.unmerged_weight(layer, name, layer.base_layer.weight))
        self.merge_norm = None

    def unmerged_weight(self, layer: LoraLinear, name: str, weight: torch.Tensor) -> torch.Tensor:
        """W'/(m/‖W+ΔW‖) − ΔW, from the merged W' and the norm kept at merge time."""
        factor = layer.lora_magnitude_vector[name].detach().float() / self.merge_norm  # (out,)
        w = layer.layout(weight.detach()).float()  # (out, in)
        return layer.layout(w / factor[:, None] - layer.layout(layer.delta_weight(name)))


# ---------------------------------------------------------------------------------------------------- inits
def changes_base(init: str) -> bool:
    """PiSSA (also pissa_niter_K) and OLoRA move the top of W into the adapter; the base keeps the residual."""
    return init.startswith(BASE_CHANGING_INITS)


def init_adapter(layer: LoraLinear, name: str, init: str) -> None:
    """Set the new adapter's A and B (already allocated on the layer) as `init` says."""
    if changes_base(init):
        _split_base(layer, name, init)
        return
    A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
    if init == "gaussian":
        nn.init.normal_(A, std=1 / layer.r[name])
    else:  # kaiming; loftq starts here too and is set afterwards by lorakit.models.quantization.loftq_init
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    nn.init.zeros_(B)  # ΔW = 0: a fresh adapter reproduces the base exactly


def _split_base(layer: LoraLinear, name: str, init: str) -> None:
    """PiSSA (SVD: B A = s⁻¹·top-r of W, split by √S) or OLoRA (QR: B = Q_r, A = R_r), as PEFT computes them."""
    r, scale = layer.r[name], layer.scaling[name]
    w = layer.weight_oi().float()  # (out, in)
    if init == "olora":
        Q, R = torch.linalg.qr(w)
        A, B = R[:r].contiguous(), Q[:, :r].contiguous()  # (r, in), (out, r)
    else:
        if init == "pissa":
            U, S, Vh = torch.linalg.svd(w, full_matrices=False)
            U, S, Vh = U[:, :r], S[:r], Vh[:r]
        else:  # pissa_niter_K: randomized SVD with K subspace iterations, seeded so a reload finds the same residual
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                U, S, V = torch.svd_lowrank(w, r, niter=int(init.split("_niter_")[1]))
            Vh = V.T
        S = S / scale
        A, B = torch.diag(S.sqrt()) @ Vh, U @ torch.diag(S.sqrt())  # (r, in), (out, r)
    lora_A, lora_B = layer.lora_A[name].weight, layer.lora_B[name].weight
    with torch.no_grad():
        lora_A.copy_(A)
        lora_B.copy_(B)
        residual = w - scale * (lora_B.float() @ lora_A.float())
        layer.base_layer.weight.copy_(layer.layout(residual))
    layer.init_factors[name] = (lora_A.detach().clone(), lora_B.detach().clone())


def initial_delta(layer: LoraLinear, name: str) -> torch.Tensor | None:
    """s·B0 A0 in the base weight's layout: what a PiSSA/OLoRA init took out of the base (None for other inits)."""
    if name not in layer.init_factors:
        return None
    A0, B0 = layer.init_factors[name]
    return layer.layout((B0.float() @ A0.float()) * layer.scaling[name])  # (out, in) -> base layout


def undo_init(layer: LoraLinear, name: str) -> None:
    """Give the base back what a PiSSA/OLoRA init took out of it (nothing to do for other inits)."""
    if name in layer.init_factors:
        with torch.no_grad():
            layer.base_layer.weight += initial_delta(layer, name).to(layer.base_layer.weight.dtype)
        del layer.init_factors[name]


def original_output(layer: LoraLinear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y = base(x) plus what PiSSA/OLoRA inits took out of the base (s·B0 A0 x): the original base's output."""
    for name, (A0, B0) in layer.init_factors.items():
        y = y + ((x.to(A0.dtype) @ A0.T @ B0.T) * layer.scaling[name]).to(y.dtype)  # (..., out)
    return y
