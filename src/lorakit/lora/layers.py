"""The LoRA layers: each wraps a frozen base layer (kept as the child `base_layer`) and adds named low-rank updates.

Parameter names follow PEFT (`lora_A.<adapter>.weight`, `lora_embedding_A.<adapter>`, `modules_to_save.<adapter>.*`)
so adapter files map one-to-one onto PEFT's.

Routing state lives on each layer and is set by the model-level functions in `lorakit.lora.injection`:
`active_adapter` (name or None), `disabled`, `merged_adapters`, and `row_groups` for mixed batches.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import LorakitError


def _is_conv1d(module: nn.Module) -> bool:
    """Hugging Face GPT-2's Conv1D: a linear layer whose weight is stored (in, out)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def is_quantized_weight(weight: torch.Tensor) -> bool:
    """Stored quantized: integer storage (bitsandbytes), or a torchao tensor subclass, which reports a float dtype."""
    return not weight.is_floating_point() or type(weight).__module__.split(".")[0] == "torchao"


def _storage(weight: torch.Tensor) -> str:
    return str(weight.dtype) if type(weight) in (torch.Tensor, nn.Parameter) else type(weight).__name__


class _AdapterRouting:
    """Shared state and routing rules of every lorakit layer."""

    def _init_routing(self) -> None:
        self.active_adapter: str | None = None
        self.disabled = False
        self.merged_adapters: list[str] = []
        self.row_groups: dict[str, torch.Tensor] | None = None  # adapter -> row indices, for a mixed batch
        self.row_count = 0

    def _check_rows(self, batch: int) -> None:
        if batch != self.row_count:
            raise LorakitError(f"Mixed-batch forward got a batch of {batch} rows but {self.row_count} adapter names; "
                               "pass one name (or None) per row (for beam search, repeat each name per beam).")


class LoraLinear(nn.Module, _AdapterRouting):
    """y = base(x) + (alpha/r) · B(A(dropout(x))) for a frozen `nn.Linear` or GPT-2 `Conv1D`.

    DoRA adapters (`use_dora=True`) add a magnitude vector m (one entry per output feature) and compute
    y = m / ‖W + s·BA‖ ⊙ (W + s·BA) x + bias, with the row norm detached from the graph as in the paper (§4.3) and PEFT.
    PiSSA and OLoRA inits put the top of W into B, A and replace the frozen W by the residual W − s·BA.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if not (isinstance(base_layer, nn.Linear) or _is_conv1d(base_layer)):
            raise LorakitError(f"LoraLinear wraps nn.Linear or transformers Conv1D, got {type(base_layer).__name__}.")
        self.base_layer = base_layer
        self.fan_in_fan_out = _is_conv1d(base_layer)  # Conv1D stores its weight transposed: (in, out)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:  # from the layer, not its weight: a quantized (bitsandbytes) weight is stored packed
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters only: (out,)
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.init_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # PiSSA/OLoRA: (A0, B0) taken out of W
        self.merge_norms: dict[str, torch.Tensor] = {}  # DoRA: ‖W + ΔW‖ rows at merge time, for an exact unmerge
        self._init_routing()

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, init: str = "kaiming",
                    use_rslora: bool = False, dtype: torch.dtype | None = None, use_dora: bool = False) -> None:
        weight = self.base_layer.weight
        if (use_dora or init.startswith(("pissa", "olora"))) and is_quantized_weight(weight):
            raise LorakitError(f"use_dora and init={init!r} read the base weight, which is stored quantized here "
                               f"({_storage(weight)}); add this adapter on the unquantized base.")
        # LoRA weights stay in fp32 by default even on a low-precision base: tiny updates survive there.
        dtype = dtype or (weight.dtype if weight.dtype == torch.float64 else torch.float32)
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=weight.device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=weight.device, dtype=dtype)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r[name] = r
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        if init.startswith("pissa") or init == "olora":
            self._init_from_base(name, init)  # B A = the top of W; the base keeps the residual
        else:
            if init == "gaussian":
                nn.init.normal_(self.lora_A[name].weight, std=1 / r)
            else:
                nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name].weight)  # ΔW = 0: a fresh adapter reproduces the base exactly
        if use_dora:  # m = ‖W + s·BA‖ per output row, so the adapter starts exact
            with torch.no_grad():
                norm = self._dora_norm(name, self._weight_oi().to(dtype))
            self.lora_magnitude_vector[name] = nn.Parameter(norm.to(dtype))

    def _weight_oi(self) -> torch.Tensor:
        """The base weight as (out, in), detached."""
        weight = self.base_layer.weight.detach()
        return weight.T if self.fan_in_fan_out else weight

    def _init_from_base(self, name: str, init: str) -> None:
        """PiSSA (SVD: B A = s⁻¹·top-r of W, split by √S) or OLoRA (QR: B = Q_r, A = R_r), as PEFT computes them."""
        weight = self.base_layer.weight
        r, scale = self.r[name], self.scaling[name]
        w = self._weight_oi().float()  # (out, in)
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
        lora_A, lora_B = self.lora_A[name].weight, self.lora_B[name].weight
        with torch.no_grad():
            lora_A.copy_(A)
            lora_B.copy_(B)
            residual = w - scale * (lora_B.float() @ lora_A.float())
            weight.copy_(residual.T if self.fan_in_fan_out else residual)
        self.init_factors[name] = (lora_A.detach().clone(), lora_B.detach().clone())

    def remove_adapter(self, name: str) -> None:
        if name in self.init_factors:  # give the base back the part PiSSA/OLoRA took out of it
            with torch.no_grad():
                self.base_layer.weight += self.initial_delta(name).to(self.base_layer.weight.dtype)
            del self.init_factors[name]
        for store in (self.lora_A, self.lora_B, self.lora_dropout):
            del store[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        del self.r[name], self.scaling[name]

    @property
    def adapters(self) -> list[str]:
        return list(self.lora_A.keys())

    def adapter_state(self, name: str) -> dict[str, nn.Parameter]:
        """This adapter's tensors under PEFT's local key names."""
        state = {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}
        if name in self.lora_magnitude_vector:
            state["lora_magnitude_vector"] = self.lora_magnitude_vector[name]
        return state

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW in the base weight's layout ((out, in), or (in, out) for Conv1D), computed in fp32."""
        A, B = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        delta = (B @ A) * self.scaling[name]  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def lora_delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        A = self.lora_A[name]
        x = x.to(A.weight.dtype)
        return self.lora_B[name](A(self.lora_dropout[name](x))) * self.scaling[name]  # (..., out)

    def _dora_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """‖W + s·BA‖ over each output row (out,), from a (out, in) weight; no gradient flows through it."""
        lora_weight = (self.lora_B[name].weight @ self.lora_A[name].weight).detach()  # (out, in)
        return torch.linalg.norm(weight + self.scaling[name] * lora_weight, dim=1).detach()

    def dora_delta(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """What a DoRA adapter adds to the base output y = W x + b: (m/‖W+s·BA‖ − 1) W x + m/‖W+s·BA‖ · s·B A x.

        As in PEFT: without dropout (or in eval) W x is taken from y; with dropout it is recomputed on the dropped x.
        """
        A, B = self.lora_A[name], self.lora_B[name]
        x = x.to(A.weight.dtype)
        weight = self._weight_oi().to(x.dtype)  # (out, in)
        factor = self.lora_magnitude_vector[name] / self._dora_norm(name, weight)  # (out,)
        dropout = self.lora_dropout[name]
        if isinstance(dropout, nn.Identity) or not self.training:
            bias = self.base_layer.bias
            base = (y if bias is None else y - bias).to(x.dtype)  # (..., out)
        else:
            x = dropout(x)
            base = F.linear(x, weight)
        return (factor - 1) * base + factor * B(A(x)) * self.scaling[name]  # (..., out)

    def adapter_delta(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution to the base output y (plain LoRA ignores y)."""
        return self.dora_delta(name, x, y) if name in self.lora_magnitude_vector else self.lora_delta(name, x)

    def _dora_target(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, W + ΔW), both (out, in) fp32, from the unmerged base weight."""
        w, delta = self._weight_oi().float(), self.delta_weight(name)
        return w, w + (delta.T if self.fan_in_fan_out else delta)

    def merged_delta(self, name: str) -> torch.Tensor:
        """What merging `name` adds to the (unmerged) base weight, in its layout: ΔW, or for DoRA m/‖W+ΔW‖⊙(W+ΔW) − W."""
        if name not in self.lora_magnitude_vector:
            return self.delta_weight(name)
        w, target = self._dora_target(name)
        change = (self.lora_magnitude_vector[name].detach().float() / target.norm(dim=1))[:, None] * target - w
        return change.T if self.fan_in_fan_out else change

    def dora_merge(self, name: str) -> None:
        """W ← m/‖W+ΔW‖ ⊙ (W + ΔW) per output row; the norm is kept so unmerge divides it back out exactly."""
        change = self.merged_delta(name)
        self.merge_norms[name] = self._dora_target(name)[1].norm(dim=1)  # (out,)
        weight = self.base_layer.weight
        weight.data += change.to(weight.dtype)

    def dora_unmerged_weight(self, name: str) -> torch.Tensor:
        """The base weight (its own layout, fp32) before `dora_merge(name)`: W'/(m/‖W+ΔW‖) − ΔW."""
        w, delta = self._weight_oi().float(), self.delta_weight(name)
        factor = self.lora_magnitude_vector[name].detach().float() / self.merge_norms[name]
        plain = w / factor[:, None] - (delta.T if self.fan_in_fan_out else delta)
        return plain.T if self.fan_in_fan_out else plain

    def dora_unmerge(self, name: str) -> None:
        self.base_layer.weight.data.copy_(self.dora_unmerged_weight(name))
        del self.merge_norms[name]

    def _original_base(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y from the residual base plus what PiSSA/OLoRA took out of it (s·B0A0 x), for rows not on that adapter:
        disabled adapters and `None` rows see the original base, not the residual."""
        for name, (A0, B0) in self.init_factors.items():
            share = (x.to(A0.dtype) @ A0.T @ B0.T) * self.scaling[name]  # (..., out)
            if self.row_groups is not None and name in self.row_groups:
                keep = torch.ones(x.shape[0], 1, dtype=share.dtype, device=share.device)  # (batch, 1)
                keep[self.row_groups[name]] = 0
                share = share * keep.view(-1, *[1] * (share.dim() - 1))
            y = y + share.to(y.dtype)
        return y

    def initial_delta(self, name: str) -> torch.Tensor | None:
        """s·B0 A0 in the base weight's layout: what a PiSSA/OLoRA init took out of the base (None for other inits)."""
        if name not in self.init_factors:
            return None
        A0, B0 = self.init_factors[name]
        delta = (B0.float() @ A0.float()) * self.scaling[name]  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)  # (..., out)
        if self.disabled:
            return self._original_base(x, y)
        if self.row_groups is not None:
            self._check_rows(x.shape[0])
            for name, rows in self.row_groups.items():
                y = y.index_add(0, rows, self.adapter_delta(name, x[rows], y[rows]).to(y.dtype))
            return self._original_base(x, y)
        name = self.active_adapter
        if name is None or name in self.merged_adapters:
            return y
        if name in self.lora_magnitude_vector:
            return y + self.dora_delta(name, x, y).to(y.dtype)
        A, B = self.lora_A[name], self.lora_B[name]
        h = A(self.lora_dropout[name](x.to(A.weight.dtype)))  # (..., r)
        if y.dtype != B.weight.dtype:  # low-precision base: LoRA in fp32, result cast back
            return y + (B(h) * self.scaling[name]).to(y.dtype)
        # y + scale · h Bᵀ in one addmm: no separate (…, out) tensors for B(h), its scaling and the sum.
        out = torch.addmm(y.reshape(-1, self.out_features), h.reshape(-1, h.shape[-1]), B.weight.T,
                          alpha=self.scaling[name])  # (N, out)
        return out.view(y.shape)


class LoraEmbedding(nn.Module, _AdapterRouting):
    """e = base(ids) + (alpha/r) · embedding(ids, Aᵀ) Bᵀ for a frozen `nn.Embedding` (A zero, B normal)."""

    def __init__(self, base_layer: nn.Embedding):
        super().__init__()
        if not isinstance(base_layer, nn.Embedding):
            raise LorakitError(f"LoraEmbedding wraps nn.Embedding, got {type(base_layer).__name__}.")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        self.lora_embedding_A = nn.ParameterDict()  # (r, num_embeddings)
        self.lora_embedding_B = nn.ParameterDict()  # (embedding_dim, r)
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters only: (out,)
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.init_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # PiSSA/OLoRA: (A0, B0) taken out of W
        self.merge_norms: dict[str, torch.Tensor] = {}  # DoRA: ‖W + ΔW‖ rows at merge time, for an exact unmerge
        self._init_routing()

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, init: str = "kaiming",
                    use_rslora: bool = False, dtype: torch.dtype | None = None, use_dora: bool = False) -> None:
        weight = self.base_layer.weight
        dtype = dtype or (weight.dtype if weight.dtype == torch.float64 else torch.float32)
        # As in the paper's reference code: A zero, B normal (so ΔW starts at zero and gradients reach A).
        self.lora_embedding_A[name] = nn.Parameter(torch.zeros(r, self.in_features, device=weight.device, dtype=dtype))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(self.out_features, r, device=weight.device, dtype=dtype))
        self.r[name] = r
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r

    def remove_adapter(self, name: str) -> None:
        del self.lora_embedding_A[name], self.lora_embedding_B[name]
        del self.r[name], self.scaling[name]

    @property
    def adapters(self) -> list[str]:
        return list(self.lora_embedding_A.keys())

    def adapter_state(self, name: str) -> dict[str, nn.Parameter]:
        return {"lora_embedding_A": self.lora_embedding_A[name], "lora_embedding_B": self.lora_embedding_B[name]}

    def delta_weight(self, name: str) -> torch.Tensor:
        A, B = self.lora_embedding_A[name].float(), self.lora_embedding_B[name].float()
        return (B @ A).T * self.scaling[name]  # (num_embeddings, embedding_dim)

    def lora_delta(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        after_a = F.embedding(ids, self.lora_embedding_A[name].T, padding_idx=base.padding_idx,
                              max_norm=base.max_norm, norm_type=base.norm_type,
                              scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)  # (..., r)
        return (after_a @ self.lora_embedding_B[name].T) * self.scaling[name]  # (..., dim)

    def forward(self, ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(ids, *args, **kwargs)
        if self.disabled:
            return y
        if self.row_groups is not None:
            self._check_rows(ids.shape[0])
            for name, rows in self.row_groups.items():
                y = y.index_add(0, rows, self.lora_delta(name, ids[rows]).to(y.dtype))
            return y
        name = self.active_adapter
        if name is None or name in self.merged_adapters:
            return y
        return y + self.lora_delta(name, ids).to(y.dtype)


class ModulesToSave(nn.Module, _AdapterRouting):
    """A module trained in full for each adapter (e.g. a classification head); the original stays frozen."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self._init_routing()

    def add_adapter(self, name: str) -> None:
        copy_ = copy.deepcopy(self.original_module)
        for p in copy_.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = copy_

    def remove_adapter(self, name: str) -> None:
        del self.modules_to_save[name]

    @property
    def adapters(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def adapter_state(self, name: str) -> dict[str, nn.Parameter]:
        return dict(self.modules_to_save[name].named_parameters())

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.disabled:
            return self.original_module(x, *args, **kwargs)
        if self.row_groups is not None:
            self._check_rows(x.shape[0])
            y = self.original_module(x, *args, **kwargs)
            for name, rows in self.row_groups.items():
                y = y.index_copy(0, rows, self.modules_to_save[name](x[rows], *args, **kwargs))
            return y
        if self.active_adapter not in self.modules_to_save:
            return self.original_module(x, *args, **kwargs)
        return self.modules_to_save[self.active_adapter](x, *args, **kwargs)


LORA_LAYERS = (LoraLinear, LoraEmbedding)
ADAPTER_LAYERS = (LoraLinear, LoraEmbedding, ModulesToSave)


def merge_layer(layer: LoraLinear | LoraEmbedding, name: str) -> None:
    """Add this adapter's ΔW into the base weight (no-op if already merged)."""
    if name in layer.merged_adapters:
        return
    weight = layer.base_layer.weight
    if is_quantized_weight(weight):
        raise LorakitError(f"Cannot merge into a quantized base ({type(layer.base_layer).__name__}, "
                           f"{_storage(weight)} weights): ΔW would be rounded away. Use "
                           "lorakit.models.quantization.merge_quantized(model, ids) (dequantize, merge, save in 16/32-bit; "
                           "reports the drift), `lorakit merge --quantize` for an adapter folder, or keep the adapter "
                           "unmerged.")
    if name in getattr(layer, "lora_magnitude_vector", {}):
        layer.dora_merge(name)
    else:
        weight.data += layer.delta_weight(name).to(weight.dtype)
    layer.merged_adapters.append(name)


def unmerge_layer(layer: LoraLinear | LoraEmbedding, name: str) -> None:
    """Subtract this adapter's ΔW from the base weight (no-op if not merged)."""
    if name not in layer.merged_adapters:
        return
    if name in getattr(layer, "lora_magnitude_vector", {}):
        layer.dora_unmerge(name)
    else:
        weight = layer.base_layer.weight
        weight.data -= layer.delta_weight(name).to(weight.dtype)
    layer.merged_adapters.remove(name)
