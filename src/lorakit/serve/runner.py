"""The model runner of the continuous engine: a pre-allocated KV cache with one slot per running row, and one forward
per scheduler step (`SlotRunner.step`): one decode token for each of many rows and the prompt chunks of rows still
prefilling, every token a row of the same matmuls, each chunk attending over its own row.

It reuses the model's own modules (embeddings, norms, MLPs, rotary embedding and the q/k/v/o projections, which are
lorakit LoRA layers routed per row by `adapters_per_row`) and replaces only what makes Hugging Face's generic
forward slow for serving: the growing cache (here written in place), the attention mask built every step (here one
boolean row mask), and padding every row to the longest prompt (here prompts go in as fixed chunks beside the decode
rows). Grouped-query attention runs without repeating K/V: the query heads that share a KV head are folded into the
query length of one attention call. On a CPU the decode rows attend through lorakit's C++ kernel
(`lorakit.serve.native`), each over exactly its own cached length (SDPA read every row to the step's longest row, and
its kernel is built for long queries): a bf16 step of 96 decode rows went from 277 to 157 ms (SmolLM2-135M, 2
cores). A step of 64 decode rows and 14 prompt chunks (1,927 tokens) took 2.9–3.1 s fp32 and 1.6–1.8 s bf16 as one
forward against 3.2–3.4 s and 1.9–2.0 s as 15 forwards.

LoRA runs batched across adapters (as Punica's BGMV/SGMV kernels do on GPUs): the linears that read one input (q|k|v,
gate|up; o and down alone) keep the A and B of all their resident plain-LoRA adapters side by side (`_LoraTable`), so
a step computes every row's deltas for the whole group with two matmuls and a per-row mask, whatever the number of
adapters in the batch. The tables run in the base's dtype; on a bf16 base a row's logits are then bit for bit the
same alone and in any batch (see `_LoraTable`, `KV_BLOCK` and `kernels.ONE_ROW_SUMS_ALIKE`); on an fp32 base MKL's
LoRA matmuls and SDPA round a row differently at different batch sizes (by ~1e-7: greedy tokens agree in the tests
and benchmark, logits not bit for bit). Layers where a row uses a DoRA adapter,
or whose base was split by PiSSA/OLoRA, fall back to the layer's own per-adapter routing (`adapters_per_row`).

On a CPU the frozen base linears run from oneDNN-packed copies of their weights (`lorakit.serve.kernels`): q|k|v
and gate|up each as one packed weight, o, down and the lm_head alone. They are packed when the runner first runs
and again when a base weight changes (an adapter merged into it, a PiSSA/OLoRA residual, a reload). A layer whose
base cannot be shared this step (a DoRA row, which reads W; a PiSSA/OLoRA layer) runs its own forward instead.
`pack=False`, a GPU, or a dtype oneDNN does not pack keeps every base linear on plain `F.linear`.

A decode step at batch 1 is the weight-streaming matmuls plus per-operator overhead (SmolLM2-135M, 2 cores: ~26 ms
of packed fp32 matmuls in a ~36 ms step; with fp32 steps of one or two rows on lorakit's kernel, `kernels.FEW_ROWS`,
~17.5 ms in a ~28 ms step), so the layer loop keeps operators few: q|k|v leave the packed weight as one tensor and
each LoRA delta is added into its columns in place, rotary runs on q and k at once, and each layer's modules are
looked up once per adapter change (`_Layer`), not at every step. `torch.compile` of the loop was measured and not
taken (fp32, batch 1: 47 ms/step after 88 s of compiling, recompiled per adapter; Inductor cannot take the packed
weights as inputs).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import LorakitError
from lorakit.lora.injection import adapters_per_row, lora_layers
from lorakit.lora.layers import LoraLinear
from lorakit.lora.variants import LoraVariant
from lorakit.serve.kernels import PackedLinear, pack
from lorakit.serve.native import decode_attention_op

SUPPORTED = ("llama", "mistral", "qwen2")
# Attention always reads a multiple of this many cached positions (the rest masked): SDPA's CPU kernels round a
# row's result differently when the number of keys has a ragged tail, so without it a row decoded beside a longer
# row (whose length sets the step's width) would differ in the last bit from the same row decoded alone.
KV_BLOCK = 16


def _blocks(n: int) -> int:
    """n rounded up to a whole number of KV_BLOCKs."""
    return -(-n // KV_BLOCK) * KV_BLOCK


def check_supported(model: nn.Module) -> None:
    """The continuous engine drives Llama-style decoders; anything else is served by the static batcher."""
    kind = getattr(model.config, "model_type", None)
    inner = getattr(model, "model", None)
    attn = getattr(getattr(inner, "layers", [None])[0], "self_attn", None)
    mlp = getattr(getattr(inner, "layers", [None])[0], "mlp", None)
    gated = all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn"))
    if kind not in SUPPORTED or attn is None or not gated or hasattr(attn, "q_norm") or getattr(model.config, "sliding_window",
                                                                                     None) and kind == "mistral":
        raise LorakitError(f"The continuous scheduler supports {list(SUPPORTED)} decoders (no sliding window, no "
                           f"q/k norms); this model is {kind!r}. Serve it with ServeConfig.scheduler='static'.")


class _LoraTable:
    """The plain LoRA adapters of linears that read the same input (one linear, or q|k|v, gate|up side by side in
    the output), as two matrices: A (Σr, in) with every adapter's A of every linear stacked, and B (Σout, Σr) with
    each adapter's B·scaling in its linear's rows and its own columns (zeros elsewhere). A step adds every row's
    deltas to all the linears with two matmuls: h = x·Aᵀ times `mask[row's adapter]` (ones on that adapter's
    columns), then h·Bᵀ. A row whose adapter is DoRA (`special`) takes the layer's own routing instead.

    The table runs in the base layer's dtype, as vLLM runs LoRA: on a bf16 base, A and B·scaling are bf16 and the
    deltas come from the same oneDNN kernels as the base, whose rows do not depend on the batch — so a row's output
    is bit for bit the same alone and in any batch (fp32 LoRA matmuls from MKL round a row differently at different
    batch sizes, which bf16 then amplifies into different greedy tokens). An adapter alone (`parts`) uses copies of
    its own columns of the same matrices, so the alone path and the batched path multiply the same numbers."""

    def __init__(self, layers: list[nn.Module], order: dict[str, int]):
        self.special: set[str] = set()
        columns: dict[str, list[int]] = {}  # adapter -> its columns of A's rows / B's columns
        A, B, at, out_at = [], [], 0, 0  # B: (out offset, B·scaling) per block
        for layer in layers:
            if _tabled(layer):
                names = [n for n in layer.adapters if type(layer.variant(n)) is LoraVariant]
                self.special |= set(layer.adapters) - set(names)
                for n in names:
                    r = layer.r[n]
                    A.append(layer.lora_A[n].weight.detach())
                    B.append((out_at, layer.lora_B[n].weight.detach() * layer.scaling[n]))
                    columns.setdefault(n, []).extend(range(at, at + r))
                    at += r
            out_at += layer.out_features
        weight = layers[0].base_layer.weight if isinstance(layers[0], LoraLinear) else layers[0].weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        self.A = self.B = None
        self.mask = torch.zeros(len(order) + 1, at, dtype=dtype, device=weight.device)
        self.parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # adapter -> its own rows of A, columns of B
        self.layout = tuple((n, tuple(c)) for n, c in columns.items())  # equal layouts: equal masks
        if not A:
            return
        self.A = torch.cat(A).to(dtype)  # (Σr, in)
        self.B = torch.zeros(out_at, at, dtype=dtype, device=weight.device)  # (Σout, Σr)
        col = 0
        for (row, b), a in zip(B, A):
            self.B[row:row + b.shape[0], col:col + a.shape[0]] = b
            col += a.shape[0]
        for n, cols in columns.items():
            self.mask[order[n], cols] = 1
            self.parts[n] = (self.A[cols].contiguous(), self.B[:, cols].contiguous())


def _tabled(layer: nn.Module) -> bool:
    """A LoRA linear whose plain adapters the tables hold (not a PiSSA/OLoRA residual, not Conv1D-style weights)."""
    return isinstance(layer, LoraLinear) and bool(layer.adapters) and not layer.init_factors \
        and not layer.fan_in_fan_out


class _Layer(NamedTuple):
    """A decoder layer's parts, looked up once: at every step an nn.Module attribute lookup costs about a
    microsecond, and a decode step made ~640 of them."""

    input_norm: tuple[torch.Tensor, float]  # (weight, eps)
    qkv: tuple[nn.Module, ...]
    o: tuple[nn.Module]
    post_norm: tuple[torch.Tensor, float]
    gate_up: tuple[nn.Module, ...]
    down: tuple[nn.Module]
    act: nn.Module


def _layer_parts(layer: nn.Module) -> _Layer:
    norm = lambda n: (n.weight, n.variance_epsilon)  # noqa: E731
    attn, mlp = _attention(layer), _mlp(layer)
    return _Layer(norm(layer.input_layernorm), attn[:3], attn[3:], norm(layer.post_attention_layernorm), mlp[:2],
                  mlp[2:], layer.mlp.act_fn)


class Decode(NamedTuple):
    """A decode row of a step: `token` goes in at position `length` of `slot`'s cached row."""

    slot: int
    token: int
    length: int
    adapter: str | None


class Chunk(NamedTuple):
    """A prompt chunk of a step: `ids` go in at positions start.. of `slot`'s row."""

    slot: int
    ids: list[int]
    start: int
    adapter: str | None
    want_logits: bool


class SlotRunner:
    """KV cache of `slots` rows × `capacity` positions per layer, grown (never shrunk) when a longer row arrives."""

    def __init__(self, model: nn.Module, slots: int, pack: bool = True, native_attention: bool = True):
        check_supported(model)
        self.model, self.slots, self.pack = model, slots, pack
        self.inner = model.model
        cfg = model.config
        attn = self.inner.layers[0].self_attn
        self.kv_heads = cfg.num_key_value_heads
        self.heads = cfg.num_attention_heads
        self.head_dim = attn.head_dim
        self.groups = self.heads // self.kv_heads
        self.scaling = attn.scaling
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.capacity = 0
        self.keys: list[torch.Tensor] = []  # per layer: (slots, kv_heads, capacity, head_dim)
        self.values: list[torch.Tensor] = []
        self.tables: dict[LoraLinear, _LoraTable] = {}  # per LoRA linear, for its own forward
        self.group_tables: dict[tuple[nn.Module, ...], _LoraTable] = {}  # per group read from one packed weight
        self.order: dict[str, int] = {}  # adapter -> its row in every table's mask (0 = base)
        self.tables_version = None
        self.step_rows: torch.Tensor | None = None  # (B,) adapter index per row of the running forward
        self.step_names: set[str] = set()
        self.step_single: str | None = None  # the adapter of every row, when the step has one and no base rows
        self.step_plain = False  # every LoRA layer adds its table's deltas to its base this step (no own routing)
        self.step_masks: dict = {}  # per table layout: the step's rows' masks
        # the layers' forward of a step with prompt chunks: its first step_decode rows are decode rows (one
        # adapter each, through the tables and masks), then each chunk's rows (first, count, adapter), which share
        # one adapter and take only its own A and B (a table's other adapters' columns are 15/16 of its work at
        # 16 adapters; a prefill step of 1,991 tokens spent 8% of its time there)
        self.step_decode = 0
        self.step_chunks: list[tuple[int, int, str | None]] = []
        self.residual_layers = False  # some layer's base is a PiSSA/OLoRA residual (never shared with base rows)
        self.own_routing: set[str] = set()  # adapters some layer runs through its own forward (DoRA, embeddings...)
        self.untabled = True  # a LoRA layer outside the tables holds adapters (or no tables yet): route every step
        self.packed: list[dict[str, PackedLinear | None]] = []  # per decoder layer: qkv, o, gate_up, down
        self.packed_head: PackedLinear | None = None
        self.packed_signature = None
        self.layers = [_layer_parts(layer) for layer in self.inner.layers]
        self.final_norm = (self.inner.norm.weight, self.inner.norm.variance_epsilon)
        # decode rows: lorakit's kernel over each row's own length (CPU, fp32/bf16), else SDPA over whole KV blocks
        self.attend = decode_attention_op() if native_attention and self.device.type == "cpu" \
            and self.dtype in (torch.float32, torch.bfloat16) and self.head_dim % 16 == 0 else None

    def _base_signature(self) -> tuple:
        """What the packed copies were made from: each base weight's storage and version, merged adapters and
        PiSSA/OLoRA residuals (a merge writes through .data, which no version counter sees)."""
        out = []
        for layer in self.inner.layers:
            for m in (*_attention(layer), *_mlp(layer)):
                base = m.base_layer if isinstance(m, LoraLinear) else m
                w = base.weight
                out.append((w.data_ptr(), w._version, tuple(getattr(m, "merged_adapters", ())),
                            bool(getattr(m, "init_factors", None))))
        head = self.model.lm_head  # an adapter may wrap it (LoRA, modules_to_save): then it is not packed
        w = getattr(head, "weight", None)
        out.append((type(head), None if w is None else (w.data_ptr(), w._version)))
        return tuple(out)

    def refresh_weights(self) -> None:
        """(Re)pack the base linears when packing is on and the base weights changed since they were packed."""
        if not self.pack:
            return
        signature = self._base_signature()
        if signature == self.packed_signature:
            return
        base = lambda m: m.base_layer if isinstance(m, LoraLinear) else m  # noqa: E731
        self.packed = [{"qkv": pack([base(m) for m in _attention(layer)[:3]]),
                        "o": pack([base(layer.self_attn.o_proj)]),
                        "gate_up": pack([base(m) for m in _mlp(layer)[:2]]),
                        "down": pack([base(layer.mlp.down_proj)])} for layer in self.inner.layers]
        self.packed_head = pack([self.model.lm_head])
        self.packed_signature = signature

    @property
    def packed_bytes(self) -> int:
        """Memory held by the packed copies of the base weights."""
        parts = [p for group in self.packed for p in group.values()] + [self.packed_head]
        return sum(p.nbytes for p in parts if p is not None)

    def refresh_adapters(self, version) -> None:
        """Rebuild the side-by-side LoRA tables when the resident adapters changed (`version` says so)."""
        if version == self.tables_version:
            return
        layers = [l for _, l in lora_layers(self.model) if isinstance(l, LoraLinear)]
        names = sorted({n for l in layers for n in l.adapters})
        self.order = {n: i + 1 for i, n in enumerate(names)}
        self.tables = {l: _LoraTable([l], self.order) for l in layers if _tabled(l)}
        self.own_routing = {n for t in self.tables.values() for n in t.special}
        self.untabled = any(l.adapters for _, l in lora_layers(self.model) if l not in self.tables)
        self.residual_layers = any(l.init_factors for l in layers)
        self.layers = [_layer_parts(layer) for layer in self.inner.layers]  # adding LoRA replaces linears
        self.group_tables = {  # a group of one linear (o, down) is that linear's own table, not a second copy
            group: self.tables[group[0]] if len(group) == 1 else _LoraTable(list(group), self.order)
            for parts in self.layers for group in (parts.qkv, parts.o, parts.gate_up, parts.down)
            if any(m in self.tables for m in group)}
        self.tables_version = version

    def _linear(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """module(x), with the LoRA deltas of all rows from the table when the layer has one for this step."""
        table = self.tables.get(module)
        if table is None or self.step_names & table.special:
            return module(x)  # a plain linear, or the layer's own per-adapter routing
        return self._delta(table, x, module.base_layer(x))

    def _delta(self, table: _LoraTable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y plus every row's LoRA delta from the layer's table (y is returned, updated in place)."""
        if table.A is None or not self.step_names:  # no adapters here, or every row on the bare base
            return y
        if self.step_single is not None:  # every row on one adapter: its own rows of A and columns of B
            part = table.parts.get(self.step_single)
            if part is None:  # the adapter does not touch this layer
                return y
            A, B = part
            return y.add_(F.linear(F.linear(x.to(A.dtype), A), B))  # y + (B·scaling)·A·x
        b = self.step_decode if self.step_chunks else x.shape[0]  # rows of mixed adapters: the table, masked
        if b:
            h = F.linear(x[:b].to(table.A.dtype), table.A) * self._step_mask(table)  # (b, T, Σr): own columns
            y[:b].add_(F.linear(h, table.B))
        for first, m, adapter in self.step_chunks:  # a prompt chunk's rows share one adapter: its own A and B
            part = table.parts.get(adapter) if adapter is not None else None
            if part is not None:
                A, B = part
                y[first:first + m].add_(F.linear(F.linear(x[first:first + m].to(A.dtype), A), B))
        return y

    def _step_mask(self, table: _LoraTable) -> torch.Tensor:
        """Each row's adapter's columns of the table as ones, (B, 1, Σr); tables of equal layout share it."""
        mask = self.step_masks.get(table.layout)
        if mask is None:
            rows = self.step_rows[:self.step_decode] if self.step_chunks else self.step_rows
            mask = self.step_masks[table.layout] = table.mask[rows][:, None, :]
        return mask

    def _shares_base(self, module: nn.Module) -> bool:
        """This step, module's output is its base weight's output plus (at most) the LoRA deltas of its table."""
        if not isinstance(module, LoraLinear):
            return True
        if module.init_factors:  # PiSSA/OLoRA: rows off the adapter need the original base back
            return False
        table = self.tables.get(module)
        return table is None or not self.step_names & table.special

    def _group(self, modules: tuple[nn.Module, ...], packed: PackedLinear | None, x: torch.Tensor) -> torch.Tensor:
        """The outputs of linears that read the same x, side by side in one tensor (.., Σ out): from one packed
        weight plus every row's LoRA deltas from the group's table (two matmuls for the whole group) when every one
        of them can share its base this step, else each through _linear."""
        if packed is None or not (self.step_plain or all(self._shares_base(m) for m in modules)):
            outs = [self._linear(m, x) for m in modules]
            return outs[0] if len(outs) == 1 else torch.cat(outs, -1)
        table = self.group_tables.get(modules)
        out = packed(x)
        return out if table is None else self._delta(table, x, out)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        h = _rms_norm(h, *self.final_norm)
        return self.packed_head(h) if self.packed_head is not None else self.model.lm_head(h)

    @property
    def bytes_per_token(self) -> int:
        return len(self.inner.layers) * 2 * self.kv_heads * self.head_dim * torch.empty(0, dtype=self.dtype).element_size()

    def ensure_capacity(self, length: int, limit: int | None = None) -> None:
        """Room for `length` positions in every slot (growing by doubling, up to `limit`); the cache keeps what it
        holds when it grows."""
        if length <= self.capacity:
            return
        new = _blocks(max(length, min(max(2 * self.capacity, 64), limit or 1 << 62)))  # whole KV blocks
        shape = (self.slots, self.kv_heads, new, self.head_dim)
        if not self.keys:
            self.keys = [None] * len(self.inner.layers)
            self.values = [None] * len(self.inner.layers)
        for cache in (self.keys, self.values):
            for i, old in enumerate(cache):  # one layer at a time: one old tensor at most beside the new cache
                cache[i] = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if old is not None:
                    cache[i][:, :, :self.capacity] = old
        self.capacity = new

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy a row's first `length` cached positions from slot src to slot dst."""
        for cache in (*self.keys, *self.values):
            cache[dst, :, :length] = cache[src, :, :length]

    @contextlib.contextmanager
    def _rows(self, adapters: list[str | None]):
        missing = sorted({a for a in adapters if a is not None} - set(self.order))
        if missing:
            raise LorakitError(f"Adapter(s) {missing} are not in the runner's LoRA tables; call refresh_adapters "
                               "after loading adapters.")
        self.step_rows = torch.tensor([self.order[a] if a is not None else 0 for a in adapters], device=self.device)
        self.step_names = {a for a in adapters if a is not None}
        self.step_single = adapters[0] if len(set(adapters)) == 1 and adapters[0] is not None else None
        self.step_plain = not self.residual_layers and not self.step_names & self.own_routing
        # the layers' own per-row routing is needed only where a row's adapter is not in the tables
        routed = adapters_per_row(self.model, adapters) if self.untabled or self.step_names & self.own_routing \
            else contextlib.nullcontext()
        try:
            with routed:
                yield
        finally:
            self.step_rows, self.step_names, self.step_single, self.step_plain = None, set(), None, False
            self.step_masks = {}

    @torch.no_grad()
    def prefill(self, slot: int, ids: list[int], start: int, adapter: str | None, want_logits: bool
                ) -> torch.Tensor | None:
        """Run prompt tokens `ids` at positions start.. of one row; returns the last position's logits (V,) if asked."""
        return self.step([], [Chunk(slot, ids, start, adapter, want_logits)])[1][0]

    @torch.no_grad()
    def decode(self, slots: list[int], tokens: list[int], lengths: list[int], adapters: list[str | None]
               ) -> torch.Tensor:
        """One new token per row (row i in slots[i] with lengths[i] cached positions); returns logits (B, V)."""
        return self.step([Decode(*row) for row in zip(slots, tokens, lengths, adapters)], [])[0]

    @torch.no_grad()
    def step(self, decode: list[Decode], chunks: list[Chunk]) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
        """One forward for a whole scheduler step: one new token for each decode row and the prompt tokens of each
        chunk, all as rows of the same matmuls (a step of 16 short prompts streams the weights once, not 16
        times); each chunk attends over its own row's cache. Returns the decode rows' logits (B, V) (None without
        decode rows) and each chunk's last-position logits (V,) where it asked for them."""
        if not decode and not chunks:
            return None, []
        tokens = [r.token for r in decode] + [t for c in chunks for t in c.ids]
        positions = [r.length for r in decode] + [c.start + i for c in chunks for i in range(len(c.ids))]
        adapters = [r.adapter for r in decode] + [c.adapter for c in chunks for _ in c.ids]
        x = torch.tensor(tokens, device=self.device)[:, None]  # (N, 1): every token a row of the matmuls
        positions = torch.tensor(positions, device=self.device)[:, None]  # (N, 1)
        if not chunks:  # decode only: the head's rows are the layers' rows
            with self._rows(adapters):
                return self._head(self._layers(x, positions, decode, chunks))[:, -1].float(), []
        spans, at = [], len(decode)
        for c in chunks:
            spans.append((at, len(c.ids), c.adapter))
            at += len(c.ids)
        self.step_decode, self.step_chunks = len(decode), spans
        try:
            with self._rows(adapters):
                h = self._layers(x, positions, decode, chunks)  # (N, 1, hidden)
        finally:
            self.step_decode, self.step_chunks = 0, []
        ends, at = [], len(decode)  # the rows whose logits are wanted: every decode row, chunks' last tokens
        for c in chunks:
            at += len(c.ids)
            if c.want_logits:
                ends.append(at - 1)
        if not decode and not ends:
            return None, [None] * len(chunks)
        rows = list(range(len(decode))) + ends
        with self._rows([adapters[i] for i in rows]):  # the head may hold adapters (LoRA on lm_head, modules_to_save)
            logits = self._head(h[rows])[:, -1].float()
        per_chunk, i = [], len(decode)
        for c in chunks:
            per_chunk.append(logits[i] if c.want_logits else None)
            i += c.want_logits
        return (logits[:len(decode)] if decode else None), per_chunk

    def _layers(self, x: torch.Tensor, positions: torch.Tensor, decode: list[Decode], chunks: list[Chunk]
                ) -> torch.Tensor:
        """Embeddings through every decoder layer. The first len(decode) rows of x are decode tokens: each writes
        its K/V at its row's length and all of them attend together over the first `width` cached positions of
        their slots (a whole number of KV blocks, the rest masked). The rows after them are the chunks' prompt
        tokens, in order: a chunk writes its K/V at start.. of its slot and attends causally over its own row."""
        h = self.inner.embed_tokens(x)  # (N, 1, hidden)
        cos, sin = self.inner.rotary_emb(h, positions)  # (N, 1, d)
        half = self.head_dim // 2
        cos, sin = cos[:, None], torch.cat([-sin[..., :half], sin[..., half:]], -1)[:, None]  # (N, 1, 1, d)

        def rope(t: torch.Tensor) -> torch.Tensor:  # t·cos + rotate_half(t)·sin, rotate_half's sign moved into sin
            return t * cos + t.roll(half, -1) * sin  # rolling by half swaps the two halves

        heads, kv, d, groups = self.heads, self.kv_heads, self.head_dim, self.groups
        n, b = x.shape[0], len(decode)
        if b:
            slots = [r.slot for r in decode]
            index = torch.tensor(slots, device=self.device)
            contiguous = slots == list(range(slots[0], slots[0] + b))
            rows = slice(slots[0], slots[0] + b) if contiguous else index  # a view when the slots are a block
            pos = positions[:b, 0]
            if self.attend is None:
                width = _blocks(max(r.length for r in decode) + 1)
                mask = _additive((torch.arange(width, device=self.device)[None, :] <= positions[:b])[:, None, None, :],
                                 h.dtype)  # (b, 1, 1, width)
            else:
                lengths = pos + 1
        spans, at = [], b  # per chunk: (first row, its causal mask over whole KV blocks of its row)
        for c in chunks:
            width_c = _blocks(c.start + len(c.ids))
            causal = torch.arange(width_c, device=self.device)[None, :] <= positions[at:at + len(c.ids)]
            spans.append((at, _additive(causal.repeat(groups, 1)[None, None], h.dtype)))  # (1, 1, groups·len, w_c)
            at += len(c.ids)
        packed = self.packed or [{} for _ in self.inner.layers]
        for layer, kc, vc, p in zip(self.layers, self.keys, self.values, packed):
            qkv = self._group(layer.qkv, p.get("qkv"), _rms_norm(h, *layer.input_norm))
            qk = rope(qkv[..., :(heads + kv) * d].view(n, 1, heads + kv, d).transpose(1, 2))  # q and k at once
            q, k = qk[:, :heads], qk[:, heads:]  # (N, H, 1, d), (N, KV, 1, d)
            v = qkv[..., (heads + kv) * d:].view(n, 1, kv, d)  # (N, 1, KV, d)
            outs = []
            if b == 1:  # one row: slice writes
                kc[slots[0], :, pos[0]:pos[0] + 1] = k[0]
                vc[slots[0], :, pos[0]:pos[0] + 1] = v[0].transpose(0, 1)
            elif b:  # decode: row i writes its one token at its own length
                kc[index, :, pos] = k[:b, :, 0]
                vc[index, :, pos] = v[:b, 0]
            if b and self.attend is not None:  # each row over its own length, query heads grouped by KV head
                out = self.attend(q[:b].reshape(b, kv, groups, d), kc, vc, index, lengths, self.scaling)
                outs.append(out.reshape(b, heads * d))
            elif b:  # the query heads of a KV head as one query length
                out = F.scaled_dot_product_attention(q[:b].reshape(b, kv, groups, d), kc[rows, :, :width],
                                                     vc[rows, :, :width], attn_mask=mask, scale=self.scaling)
                outs.append(out.reshape(b, heads * d))
            for c, (first, causal) in zip(chunks, spans):
                m, end = len(c.ids), c.start + len(c.ids)
                kc[c.slot, :, c.start:end] = k[first:first + m, :, 0].transpose(0, 1)  # (KV, m, d)
                vc[c.slot, :, c.start:end] = v[first:first + m, 0].transpose(0, 1)
                qc = q[first:first + m, :, 0].transpose(0, 1).reshape(1, kv, groups * m, d)
                width_c = causal.shape[-1]
                out = F.scaled_dot_product_attention(qc, kc[c.slot:c.slot + 1, :, :width_c],
                                                     vc[c.slot:c.slot + 1, :, :width_c], attn_mask=causal,
                                                     scale=self.scaling)
                outs.append(out.view(heads, m, d).transpose(0, 1).reshape(m, heads * d))
            out = (outs[0] if len(outs) == 1 else torch.cat(outs)).view(n, 1, heads * d)
            h = h + self._group(layer.o, p.get("o"), out)
            gate, up = self._group(layer.gate_up, p.get("gate_up"), _rms_norm(h, *layer.post_norm)).chunk(2, -1)
            h = h + self._group(layer.down, p.get("down"), _act(layer.act, gate) * up)
        return h


def _additive(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as the additive one SDPA makes of it (0 where kept, -inf elsewhere), made once per
    step instead of once per layer inside SDPA."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))


def _act(fn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP's activation; SiLU (Llama, Mistral, Qwen2: torch's or transformers' module) as the functional op,
    without a module call."""
    return F.silu(x) if type(fn).__name__ in ("SiLU", "SiLUActivation") else fn(x)


def _rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The model's RMSNorm (Llama's: normalized in fp32, cast back, times the weight) in one fused op instead of
    its ~8 small ones; the same numbers in fp32, and in other dtypes the same order of rounding as the module."""
    if h.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(h, (h.shape[-1],), weight, eps)
    return weight * F.rms_norm(h.float(), (h.shape[-1],), None, eps).to(h.dtype)


def _attention(layer: nn.Module) -> tuple[nn.Module, ...]:
    a = layer.self_attn
    return a.q_proj, a.k_proj, a.v_proj, a.o_proj


def _mlp(layer: nn.Module) -> tuple[nn.Module, ...]:
    m = layer.mlp
    return m.gate_proj, m.up_proj, m.down_proj
