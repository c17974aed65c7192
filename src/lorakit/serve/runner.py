"""The model runner of the continuous engine: a pre-allocated KV cache with one slot per running row, and the two
forwards a step needs: a prefill chunk of one row, and one decode token for each of many rows.

It reuses the model's own modules (embeddings, norms, MLPs, rotary embedding and the q/k/v/o projections, which are
lorakit LoRA layers routed per row by `adapters_per_row`) and replaces only what makes Hugging Face's generic
forward slow for serving: the growing cache (here written in place), the attention mask built every step (here one
boolean row mask), and padding every row to the longest prompt (here each row is prefilled alone, in fixed chunks).
Grouped-query attention runs without repeating K/V: the query heads that share a KV head are folded into the query
length of one attention call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import LorakitError
from lorakit.lora.injection import adapters_per_row

SUPPORTED = ("llama", "mistral", "qwen2")


def check_supported(model: nn.Module) -> None:
    """The continuous engine drives Llama-style decoders; anything else is served by the static batcher."""
    kind = getattr(model.config, "model_type", None)
    inner = getattr(model, "model", None)
    attn = getattr(getattr(inner, "layers", [None])[0], "self_attn", None)
    if kind not in SUPPORTED or attn is None or hasattr(attn, "q_norm") or getattr(model.config, "sliding_window",
                                                                                     None) and kind == "mistral":
        raise LorakitError(f"The continuous scheduler supports {list(SUPPORTED)} decoders (no sliding window, no "
                           f"q/k norms); this model is {kind!r}. Serve it with ServeConfig.scheduler='static'.")


class SlotRunner:
    """KV cache of `slots` rows × `capacity` positions per layer, grown (never shrunk) when a longer row arrives."""

    def __init__(self, model: nn.Module, slots: int):
        check_supported(model)
        self.model, self.slots = model, slots
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

    @property
    def bytes_per_token(self) -> int:
        return len(self.inner.layers) * 2 * self.kv_heads * self.head_dim * torch.empty(0, dtype=self.dtype).element_size()

    def ensure_capacity(self, length: int) -> None:
        """Room for `length` positions in every slot; the cache keeps what it holds when it grows."""
        if length <= self.capacity:
            return
        new = max(length, min(2 * self.capacity, length * 2), 64)
        shape = (self.slots, self.kv_heads, new, self.head_dim)
        grow = lambda old: torch.cat([old, old.new_zeros(*shape[:2], new - self.capacity, shape[3])], 2)  # noqa: E731
        if self.keys:
            self.keys = [grow(k) for k in self.keys]
            self.values = [grow(v) for v in self.values]
        else:
            self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.inner.layers]
            self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.inner.layers]
        self.capacity = new

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy a row's first `length` cached positions from slot src to slot dst."""
        for cache in (*self.keys, *self.values):
            cache[dst, :, :length] = cache[src, :, :length]

    @torch.no_grad()
    def prefill(self, slot: int, ids: list[int], start: int, adapter: str | None, want_logits: bool
                ) -> torch.Tensor | None:
        """Run prompt tokens `ids` at positions start.. of one row; returns the last position's logits (V,) if asked."""
        n = len(ids)
        x = torch.tensor([ids], device=self.device)  # (1, n)
        positions = torch.arange(start, start + n, device=self.device)[None]  # (1, n)
        keys = torch.arange(start + n, device=self.device)
        mask = keys[None, :] <= positions[0, :, None]  # (n, start + n): causal over the row's cache
        mask = mask.repeat(self.groups, 1)[None, None]  # (1, 1, groups·n, start + n), query heads folded in
        with adapters_per_row(self.model, [adapter]):
            h = self._layers(x, positions, [slot], start, start + n, mask)  # (1, n, hidden)
            if not want_logits:
                return None
            return self.model.lm_head(self.inner.norm(h[:, -1:]))[0, -1].float()

    @torch.no_grad()
    def decode(self, slots: list[int], tokens: list[int], lengths: list[int], adapters: list[str | None]
               ) -> torch.Tensor:
        """One new token per row (row i in slots[i] with lengths[i] cached positions); returns logits (B, V)."""
        x = torch.tensor(tokens, device=self.device)[:, None]  # (B, 1)
        positions = torch.tensor(lengths, device=self.device)[:, None]  # (B, 1)
        width = max(lengths) + 1
        mask = torch.arange(width, device=self.device)[None, :] <= positions  # (B, width)
        with adapters_per_row(self.model, adapters):
            h = self._layers(x, positions, slots, None, width, mask[:, None, None, :])  # (B, 1, hidden)
            return self.model.lm_head(self.inner.norm(h))[:, -1].float()

    def _layers(self, x: torch.Tensor, positions: torch.Tensor, slots: list[int], start: int | None, width: int,
                mask: torch.Tensor) -> torch.Tensor:
        """Embeddings through every decoder layer, writing K/V at `positions` of `slots` and attending over the
        first `width` cached positions. start=None: one token per row (decode); else one row from `start`."""
        h = self.inner.embed_tokens(x)  # (B, T, hidden)
        cos, sin = self.inner.rotary_emb(h, positions)
        batch, length = x.shape
        index = torch.tensor(slots, device=self.device)
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        rows = slice(slots[0], slots[0] + len(slots)) if contiguous else index  # a view when the slots are a block
        pos = positions[:, 0]
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        for layer, kc, vc in zip(self.inner.layers, self.keys, self.values):
            attn = layer.self_attn
            y = layer.input_layernorm(h)
            q = attn.q_proj(y).view(batch, length, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, d)
            k = attn.k_proj(y).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, d)
            v = attn.v_proj(y).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            if start is None:  # decode: row i writes its one token at its own length
                kc[index, :, pos] = k[:, :, 0]
                vc[index, :, pos] = v[:, :, 0]
            else:
                kc[slots[0], :, start:start + length] = k[0]
                vc[slots[0], :, start:start + length] = v[0]
            keys, values = kc[rows, :, :width], vc[rows, :, :width]  # (B, KV, width, d)
            q = q.reshape(batch, self.kv_heads, self.groups * length, self.head_dim)  # query heads of a KV head
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling)
            out = out.view(batch, self.heads, length, self.head_dim).transpose(1, 2).reshape(batch, length, -1)
            h = h + attn.o_proj(out)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h
