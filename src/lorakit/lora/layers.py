"""The LoRA layers: each wraps a frozen base layer (kept as the child `base_layer`) and adds named low-rank updates.

Parameter names follow PEFT (`lora_A.<adapter>.weight`, `lora_embedding_A.<adapter>`, `modules_to_save.<adapter>.*`)
so adapter files map one-to-one onto PEFT's.

Routing state lives on each layer and is set by the model-level functions in `lorakit.lora.injection`:
`active_adapter` (name or None), `disabled`, `merged_adapters`, and `row_groups` for mixed batches.
What a DoRA adapter or a PiSSA/OLoRA init changes is in `lorakit.lora.variants`. Layers that read one input (a
block's q, k, v; an MLP's gate, up) share a `SharedInput`, which runs their A's as one matmul.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import LorakitError
from lorakit.lora.variants import (Dora, LoraVariant, changes_base, init_adapter, initial_delta, original_output,
                                   undo_init)


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face GPT-2's Conv1D: a linear layer whose weight is stored (in, out)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def is_quantized_weight(weight: torch.Tensor) -> bool:
    """Stored quantized: integer storage (bitsandbytes), or a torchao tensor subclass, which reports a float dtype."""
    return not weight.is_floating_point() or type(weight).__module__.split(".")[0] == "torchao"


def _storage(weight: torch.Tensor) -> str:
    return str(weight.dtype) if type(weight) in (torch.Tensor, nn.Parameter) else type(weight).__name__


def _lora_dtype(weight: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    # LoRA weights stay in fp32 by default even on a low-precision base: tiny updates survive there.
    return dtype or (weight.dtype if weight.dtype == torch.float64 else torch.float32)


class _AdapterRouting:
    """Shared state and routing rules of every lorakit layer."""

    def _init_routing(self) -> None:
        self.active_adapter: str | None = None
        self.disabled = False
        self.merged_adapters: list[str] = []
        self.row_groups: dict[str, torch.Tensor] | None = None  # adapter -> row indices, for a mixed batch
        self.row_count = 0
        self.shared_input: SharedInput | None = None  # the LoRA layers reading the same input as this one

    def _check_rows(self, batch: int) -> None:
        if batch != self.row_count:
            raise LorakitError(f"Mixed-batch forward got a batch of {batch} rows but {self.row_count} adapter names; "
                               "pass one name (or None) per row (for beam search, repeat each name per beam).")


class _LoraLayer(nn.Module, _AdapterRouting):
    """The forward, merge and unmerge of both LoRA layers. A subclass provides `delta` (an adapter's change of the
    base output), `base_output` (the base's own output) and `variant` (whose merge and unmerge an adapter uses)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)  # (..., out)
        if self.disabled:
            return self.base_output(x, y)
        if self.row_groups is not None:  # a mixed batch: one batched delta per adapter, on its rows only
            self._check_rows(x.shape[0])
            out = self.base_output(x, y)  # what rows on no adapter get
            for name, rows in self.row_groups.items():
                out = out.index_copy(0, rows, y[rows] + self.delta(name, x[rows], y[rows]).to(y.dtype))
            return out
        name = self.active_adapter
        if name is None or name in self.merged_adapters:  # nothing to add, or it is in the base weight already
            return y
        if self.shared_input is not None and self.shared_input.fuses(self, name):  # q, k, v: one A matmul for all
            return y + self.shared_input.delta(self, name, x).to(y.dtype)
        return y + self.delta(name, x, y).to(y.dtype)

    def merge(self, name: str) -> None:
        """Add adapter `name` into the base weight, so forward costs the base's. No-op if already merged."""
        if name in self.merged_adapters:
            return
        weight = self.base_layer.weight
        if is_quantized_weight(weight):
            raise LorakitError(f"Cannot merge into a quantized base ({type(self.base_layer).__name__}, "
                               f"{_storage(weight)} weights): ΔW would be rounded away. Use "
                               "lorakit.models.quantization.merge_quantized(model, ids) (dequantize, merge, save "
                               "in 16/32-bit; reports the drift), `lorakit merge --quantize` for an adapter folder, or "
                               "keep the adapter unmerged.")
        self.variant(name).merge(self, name)
        self.merged_adapters.append(name)

    def unmerge(self, name: str) -> None:
        """Take adapter `name` back out of the base weight. No-op if not merged."""
        if name not in self.merged_adapters:
            return
        self.variant(name).unmerge(self, name)
        self.merged_adapters.remove(name)

    def merged_delta(self, name: str) -> torch.Tensor:
        """What merging `name` adds to the unmerged base weight (fp32, in its layout)."""
        return self.variant(name).merged_delta(self, name)

    def unmerged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The base weight (fp32) before merging `name`, from the merged `weight`."""
        return self.variant(name).unmerged_weight(self, name, weight)


class LoraLinear(_LoraLayer):
    """y = base(x) + (alpha/r) · B(A(dropout(x))) for a frozen `nn.Linear` or GPT-2 `Conv1D`.

    Each adapter acts through its variant (`variants[name]`: plain LoRA, or DoRA with `use_dora=True`); a PiSSA or
    OLoRA init moves the top of W into B A and keeps what it took out in `init_factors` (see `lorakit.lora.variants`).
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if not (isinstance(base_layer, nn.Linear) or is_conv1d(base_layer)):
            raise LorakitError(f"LoraLinear wraps nn.Linear or transformers Conv1D, got {type(base_layer).__name__}.")
        self.base_layer = base_layer
        self.fan_in_fan_out = is_conv1d(base_layer)  # Conv1D stores its weight transposed: (in, out)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:  # from the layer, not its weight: a quantized (bitsandbytes) weight is stored packed
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA's m (out,) per DoRA adapter, under PEFT's name
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.variants: dict[str, LoraVariant] = {}
        self.init_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # PiSSA/OLoRA: (A0, B0) taken out of W
        self._init_routing()

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, init: str = "kaiming",
                    use_rslora: bool = False, dtype: torch.dtype | None = None, use_dora: bool = False) -> None:
        weight = self.base_layer.weight
        if (use_dora or changes_base(init)) and is_quantized_weight(weight):
            raise LorakitError(f"use_dora and init={init!r} read the base weight, which is stored quantized here "
                               f"({_storage(weight)}); add this adapter on the unquantized base.")
        if self.init_factors or (changes_base(init) and self.adapters):  # the mixed-batch forward relies on this
            raise LorakitError(f"Adapter {name!r} (init={init!r}) cannot share this layer with {self.adapters}: a "
                               "PiSSA/OLoRA adapter replaces the base by a residual that other adapters cannot share. "
                               "Use a fresh copy of the base layer for it.")
        dtype = _lora_dtype(weight, dtype)
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=weight.device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=weight.device, dtype=dtype)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r[name] = r
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        init_adapter(self, name, init)
        self.variants[name] = Dora() if use_dora else LoraVariant()
        self.variants[name].add(self, name)

    def remove_adapter(self, name: str) -> None:
        undo_init(self, name)
        self.variants.pop(name).remove(self, name)
        for store in (self.lora_A, self.lora_B, self.lora_dropout):
            del store[name]
        del self.r[name], self.scaling[name]

    @property
    def adapters(self) -> list[str]:
        return list(self.lora_A.keys())

    def adapter_state(self, name: str) -> dict[str, nn.Parameter]:
        """This adapter's tensors under PEFT's local key names."""
        return {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight,
                **self.variants[name].state(self, name)}

    def variant(self, name: str) -> LoraVariant:
        return self.variants[name]

    def layout(self, t: torch.Tensor) -> torch.Tensor:
        """Between (out, in) and the base weight's layout, both ways: Conv1D stores (in, out)."""
        return t.T if self.fan_in_fan_out else t

    def weight_oi(self) -> torch.Tensor:
        """The base weight as (out, in), detached."""
        return self.layout(self.base_layer.weight.detach())

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = s·BA in the base weight's layout ((out, in), or (in, out) for Conv1D), computed in fp32."""
        A, B = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        return self.layout((B @ A) * self.scaling[name])

    def initial_delta(self, name: str) -> torch.Tensor | None:
        """What a PiSSA/OLoRA init took out of the base, in its layout (None for other inits)."""
        return initial_delta(self, name)

    def lora_delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """s·B(A(x)) for an input already dropped out and in the LoRA dtype: the one way the low-rank path runs."""
        return self.lora_B[name](self.lora_A[name](x)) * self.scaling[name]  # (..., out)

    def delta(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """What adapter `name` adds to the base output y = base(x), in the LoRA weights' dtype."""
        return self.variants[name].delta(self, name, x.to(self.lora_A[name].weight.dtype), y)

    def base_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The original base's output: a PiSSA/OLoRA init's share of W added back to the residual's y."""
        return original_output(self, x, y)


class LoraEmbedding(_LoraLayer):
    """e = base(ids) + (alpha/r) · embedding(ids, Aᵀ) Bᵀ for a frozen `nn.Embedding`.

    Plain LoRA with A zero and B normal, as in the paper's reference code and PEFT: ΔW starts at zero and gradients
    reach A. There is no dropout (PEFT builds a dropout module for embeddings but never applies it), no other init
    and no DoRA; `add_adapter` refuses them, and `add_lora` applies a config's dropout and init to linear layers only.
    """

    def __init__(self, base_layer: nn.Embedding):
        super().__init__()
        if not isinstance(base_layer, nn.Embedding):
            raise LorakitError(f"LoraEmbedding wraps nn.Embedding, got {type(base_layer).__name__}.")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        self.lora_embedding_A = nn.ParameterDict()  # (r, num_embeddings)
        self.lora_embedding_B = nn.ParameterDict()  # (embedding_dim, r)
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self._init_routing()

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, init: str = "kaiming",
                    use_rslora: bool = False, dtype: torch.dtype | None = None, use_dora: bool = False) -> None:
        defaults = (("dropout", dropout, 0.0), ("init", init, "kaiming"), ("use_dora", use_dora, False))
        asked = [f"{option}={value!r}" for option, value, default in defaults if value != default]
        if asked:
            raise LorakitError(f"LoraEmbedding over {self.base_layer} cannot honour {', '.join(asked)}: an embedding "
                               "adapter is plain LoRA without dropout, with A zero and B normal (as in PEFT). Leave "
                               "dropout=0.0, init='kaiming', use_dora=False for it, or adapt only linear layers.")
        weight = self.base_layer.weight
        dtype = _lora_dtype(weight, dtype)
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

    def variant(self, name: str) -> LoraVariant:
        return _PLAIN  # merging needs only delta_weight

    def delta_weight(self, name: str) -> torch.Tensor:
        A, B = self.lora_embedding_A[name].float(), self.lora_embedding_B[name].float()
        return (B @ A).T * self.scaling[name]  # (num_embeddings, embedding_dim)

    def delta(self, name: str, ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """s · embedding(ids, Aᵀ) Bᵀ (y is not needed)."""
        base = self.base_layer
        after_a = F.embedding(ids, self.lora_embedding_A[name].T, padding_idx=base.padding_idx,
                              max_norm=base.max_norm, norm_type=base.norm_type,
                              scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)  # (..., r)
        return (after_a @ self.lora_embedding_B[name].T) * self.scaling[name]  # (..., dim)

    def base_output(self, ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y  # no init changes an embedding's base


_PLAIN = LoraVariant()  # plain LoRA keeps no state, so all embedding adapters share one


class _SharedProjection(torch.autograd.Function):
    """x Aᵀ in A's dtype, keeping x in its own dtype for backward (a bf16 base's activation is cast again there
    instead of kept as an fp32 copy). The gradients are autograd's for `F.linear(x.to(A.dtype), A)`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, a)
        return F.linear(x.to(a.dtype), a)  # (..., Σr)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, a = ctx.saved_tensors
        grad_x = grad.matmul(a).to(x.dtype) if ctx.needs_input_grad[0] else None  # (..., in)
        grad_a = (grad.reshape(-1, grad.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]).to(a.dtype))
                  if ctx.needs_input_grad[1] else None)  # (Σr, in)
        return grad_x, grad_a


def project_keeping_input(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """`F.linear(x.to(a.dtype), a)` with the same values and gradients, but where gradients flow a low-precision x is
    kept for backward as it is (cast again there), not as the copy in A's dtype."""
    if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad):
        return _SharedProjection.apply(x, a)
    return F.linear(x.to(a.dtype), a)


def _plain_and_on(layer: LoraLinear, name: str) -> bool:
    """Adapter `name` runs on `layer` in this forward as plain LoRA without dropout (what fusing computes)."""
    return (layer.active_adapter == name and name not in layer.merged_adapters and not layer.disabled
            and layer.row_groups is None and type(layer.variants.get(name)) is LoraVariant
            and isinstance(layer.lora_dropout[name], nn.Identity))


class SharedInput:
    """LoRA layers that read the same input (a block's q, k, v; an MLP's gate, up), set up by `add_lora`.

    Each layer alone casts the input to the LoRA dtype, runs its own A and keeps its own copy for backward. Here the
    first member called on an input runs one matmul with the members' A's stacked ((Σr, in), in member order) and
    keeps the input once; each member takes its r columns of the result and applies its own B and scale. The
    values and gradients are those of the separate layers up to float summation order, and parameter names, state
    dicts and adapter files do not change (the group holds no tensors of its own).

    Members are fused only where adapter `name` is plain LoRA without dropout on at least two of them; a DoRA
    adapter, dropout (each layer draws its own mask), a mixed batch and torch.compile (whose tracing would not see
    this cache) take each layer's own path. The result is cached for one input: the same tensor object, unchanged
    (its version), the same adapter and grad mode; it is dropped once every member has taken its part.
    """

    def __init__(self, members: list[LoraLinear]):
        self.members = members
        self._key: tuple | None = None  # (input, its version, adapter, grad enabled) of the cached result
        self._fused: list[LoraLinear] = []  # the members in the cached result, in order
        self._after_a: torch.Tensor | None = None  # (..., Σr)
        self._served: set[int] = set()  # id() of the members that took their part of the cached result

    def fuses(self, layer: LoraLinear, name: str) -> bool:
        """Whether `layer`'s adapter `name` runs in the group's matmul in this forward."""
        return (not torch.compiler.is_compiling() and _plain_and_on(layer, name)
                and sum(_plain_and_on(m, name) for m in self.members) >= 2)

    def delta(self, layer: LoraLinear, name: str, x: torch.Tensor) -> torch.Tensor:
        """s·B(A x) of `layer` (in the LoRA dtype), its A x from the group's matmul on `x`."""
        key = (x, x._version, name, torch.is_grad_enabled())
        cached = self._key is not None and self._key[0] is x and self._key[1:] == key[1:]
        if not cached or layer not in self._fused or id(layer) in self._served:
            self._fused = [m for m in self.members if _plain_and_on(m, name)]
            a = torch.cat([m.lora_A[name].weight for m in self._fused])  # (Σr, in)
            self._after_a = project_keeping_input(x, a)  # (..., Σr)
            self._key, self._served = key, set()
        self._served.add(id(layer))
        start = sum(m.r[name] for m in self._fused[:self._fused.index(layer)])
        after_a = self._after_a[..., start:start + layer.r[name]]  # (..., r)
        if len(self._served) == len(self._fused):  # every member has its part: keep nothing past this forward
            self._key, self._after_a = None, None
        return layer.lora_B[name](after_a * layer.scaling[name])  # (..., out); scaled on r columns, not on out


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
    """`layer.merge(name)`, kept for callers of the function form."""
    layer.merge(name)


def unmerge_layer(layer: LoraLinear | LoraEmbedding, name: str) -> None:
    """`layer.unmerge(name)`, kept for callers of the function form."""
    layer.unmerge(name)
