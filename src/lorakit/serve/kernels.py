"""Frozen base linears in oneDNN's pre-blocked weight layout, for the continuous runner's forwards on a CPU.

A decode step multiplies a few rows by every weight of the model, so it is bound by how fast the weights stream from
memory. `F.linear` on a CPU re-reads the (out, in) weight in its plain layout at every call; oneDNN can reorder a frozen
weight once into the blocked layout its kernel reads (`torch.ops.mkldnn._reorder_linear_weight`, as Inductor's
CPU weight prepacking does) and multiply from it (`torch.ops.mkldnn._linear_pointwise`). Measured on an
AVX512-BF16 EPYC, 2 threads, all of SmolLM2-135M's 30 layers at batch 1: 34.5 → 23.1 ms fp32, 26.2 → 16.3 ms bf16;
with q|k|v and gate|up each fused into one weight (fewer, larger calls), 20.1 ms fp32 and 11.0 ms bf16; the tied
lm_head 9.3 → 3.7 ms fp32. Results equal `F.linear` up to fp32 rounding (max |Δ| 1.7e-5 on the lm_head's outputs
for 8 random rows; identical in bf16).

Memory: a packed weight is a copy. The model keeps its own weights (LoRA layers, DoRA, merging and the static batcher
read them), so packing costs one more copy of every packed linear: for SmolLM2-135M 538 MB in fp32 (269 MB in
bf16), of which 113 MB (57 MB) is the lm_head it shares with the embeddings (`SlotRunner.packed_bytes`, the
`lorakit_packed_weight_bytes` gauge of /metrics). In the runner this took a batch-1 decode step with an adapter from
60.9 to 44.0 ms (fp32) and 40.4 to 29.8 ms (bf16).

Packing is used only where it works: a CPU tensor in float32 or bfloat16, a plain `nn.Linear` (not a quantized one),
with `torch.backends.mkldnn.is_available()`, and a trial multiplication that equals `F.linear`. Elsewhere (GPUs, other
dtypes, quantized bases) `pack` returns None and the caller keeps its plain `F.linear` path.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.serve.native import linear_rows_op


@functools.lru_cache(maxsize=None)
def packing_works(dtype: torch.dtype) -> bool:
    """oneDNN's packed linear is available on this CPU for `dtype` and agrees with F.linear on a small case."""
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(48, 64, generator=gen).to(dtype)
        x = torch.randn(3, 64, generator=gen).to(dtype)
        y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, 1), None, "none", [], "")
        return bool(torch.allclose(y.float(), F.linear(x, w).float(), rtol=1e-2, atol=1e-2))
    except (RuntimeError, AttributeError):  # an op missing from this build, or a dtype its CPU kernels lack
        return False


def packable(module: nn.Module) -> bool:
    """A plain, unquantized CPU nn.Linear in a dtype oneDNN packs on this machine."""
    weight = getattr(module, "weight", None)
    return (type(module) is nn.Linear and type(weight) is nn.Parameter and weight.device.type == "cpu"
            and packing_works(weight.dtype))


class PackedLinear:
    """x @ [W_1; W_2; ...]ᵀ (+ biases) from one packed copy of the weights stacked along the output dimension: the
    outputs of several linears with the same input in one call (q|k|v, gate|up)."""

    def __init__(self, modules: list[nn.Linear]):
        weights = [m.weight.detach() for m in modules]
        self.sizes = [w.shape[0] for w in weights]
        weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1)  # blocked for a few rows (a decode step)
        biases = [m.bias for m in modules]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach() if b is not None else weight.new_zeros(n) for b, n in zip(biases, self.sizes)])
        self.nbytes = weight.numel() * weight.element_size()
        # fp32, one or two rows: lorakit's kernel on the modules' own weights (no copy), see FEW_ROWS
        few = linear_rows_op() if weight.dtype == torch.float32 and weight.shape[1] % 16 == 0 else None
        self.few_rows = (few, weights) if few is not None and all(w.is_contiguous() for w in weights) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.few_rows is not None and x.numel() <= FEW_ROWS * x.shape[-1]:
            op, weights = self.few_rows
            out = op(x.reshape(-1, x.shape[-1]), weights).view(x.shape[:-1] + (-1,))
            return out if self.bias is None else out.add_(self.bias)
        if x.numel() == x.shape[-1] and x.shape[-1] > ONE_ROW_SUMS_ALIKE and x.dtype == torch.bfloat16:
            return one_row_as_two(self._multiply, x)  # one long bf16 row: as two (see ONE_ROW_SUMS_ALIKE)
        return self._multiply(x)

    def _multiply(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


# fp32 products of at most this many rows (a decode step of one or two rows) run through lorakit's kernel
# (`lorakit.serve.native`, csrc/linear_rows.cpp) on the modules' own weights: oneDNN's packed fp32 kernel streamed the
# weights at ~21 GB/s for one row on a 2-core EPYC. Not in bf16, whose rows must stay oneDNN's (batch-invariant) rows.
FEW_ROWS = 2

# oneDNN multiplies a single row by a packed weight with a kernel of its own that, for inputs longer than this, sums
# in another order than its kernel for two or more rows (measured on an AVX512-BF16 EPYC, bf16: every input length up
# to 1024 agreed, 1152 to 4096 differed in the last bit for 1 to 50% of rows; fp32 likewise). A row decoded alone
# would then differ from the same row decoded in a batch, so bf16 products of such a row run on the row twice. Not
# in fp32: there MKL's LoRA matmuls and SDPA already round a row differently at different batch sizes, and oneDNN's
# fp32 kernel for two rows is slower than its single-row one (1536 in, 576 out: 98 vs 67 µs).
ONE_ROW_SUMS_ALIKE = 1024


def one_row_as_two(fn, x: torch.Tensor) -> torch.Tensor:
    """fn(x) for a single-row x, computed on two copies of the row (see ONE_ROW_SUMS_ALIKE)."""
    two = x.reshape(1, x.shape[-1]).expand(2, -1).contiguous()
    return fn(two)[:1].view(x.shape[:-1] + (-1,))


def pack(modules: list[nn.Module]) -> PackedLinear | None:
    """One PackedLinear for `modules` (same input width and dtype), or None where packing does not apply."""
    if not modules or not all(packable(m) for m in modules):
        return None
    if len({(m.in_features, m.weight.dtype) for m in modules}) != 1:
        return None
    return PackedLinear(modules)
