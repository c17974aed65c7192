"""Per-device memory estimate for LoRA training of a Llama-shaped model: one process, DDP or FSDP2 over N devices.

    lorakit plan llama-2-70b --devices 8 --dtype bf16 --batch 8 --seq 2048 --gradient-checkpointing

The terms: base weights (by dtype or quantization), LoRA parameters, their gradients, AdamW's two moments, and the
activations kept for the backward pass. FSDP2 shards the weights, adapter, gradients and moments over the N devices
and holds at most two transformer blocks unsharded at a time; DDP keeps a full replica on every device plus one
gradient bucket copy. Activations are per device (the global batch is split over the devices) and counted per token
and block from the tensors a Llama block saves for backward (see `_block_activation_elements`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import LorakitError

GIB = 1024 ** 3
BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0 + 4 / 64,  # + one fp32 scale per 64 weights
                   "nf4": 0.5 + 4 / 64}                                           # bitsandbytes block 64, fp32 absmax
MODES = ("none", "ddp", "fsdp")
PRESETS = {  # the published Hugging Face configs (meta-llama/Llama-2-*-hf), so no hub access is needed
    "llama-2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                   "tie_word_embeddings": False},
    "llama-2-70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000,
                    "tie_word_embeddings": False},
}
RUNTIME_BYTES = 0.24 * GIB
"""Python + torch + transformers + lorakit in a CPU process before any model: 242 MB RSS measured here. (On a GPU the
CUDA context takes a few hundred MB of device memory instead.)"""


@dataclass
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, cfg: dict) -> "Shape":
        try:
            return cls(cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"],
                       cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                       cfg["vocab_size"], bool(cfg.get("tie_word_embeddings", False)))
        except KeyError as e:
            raise LorakitError(f"The model config lacks {e}; plan needs a Llama-style config.json (hidden_size, "
                               "intermediate_size, num_hidden_layers, num_attention_heads, vocab_size).") from None

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer in one block."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def block_params(self) -> int:
        return sum(a * b for a, b in self.linears().values()) + 2 * self.hidden

    def params(self) -> int:
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied else 2) + self.layers * self.block_params() + self.hidden


def load_shape(model: str) -> Shape:
    """A preset name, a config.json, a model folder, or an embedded lorakit model name."""
    if model in PRESETS:
        return Shape.from_config(PRESETS[model])
    path = Path(model)
    if not path.exists():
        from lorakit.models.loading import EMBEDDED, resolve_model_path

        if model not in EMBEDDED:
            raise LorakitError(f"Unknown model {model!r}: give a preset ({sorted(PRESETS)}), an embedded model "
                               f"({sorted(EMBEDDED)}), a config.json or a model folder.")
        path = Path(resolve_model_path(model))
    if path.is_dir():
        path = path / "config.json"
    try:
        return Shape.from_config(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError) as e:
        raise LorakitError(f"Cannot read a model config from {path} ({e}).") from None


def _block_activation_elements(s: Shape, seq: int, eager_attention: bool) -> int:
    """Elements saved for backward per token in one block (fp32 training, frozen base, LoRA on some linears):
    two RMSNorm inputs and outputs (4h), q/k/v before and after rotary (2h + 3kv), attention output (h), the
    residual input (h), and the SwiGLU MLP's gate, up, act(gate) and product (4i); eager attention also keeps the
    (heads x seq) probabilities per token."""
    h, kv, i = s.hidden, s.kv_dim, s.intermediate
    out = 8 * h + 3 * kv + 4 * i
    return out + (s.heads * seq if eager_attention else 0)


def estimate(shape: Shape, mode: str = "fsdp", devices: int = 1, dtype: str = "bf16", r: int = 8,
             targets: tuple[str, ...] = ("q_proj", "v_proj"), batch: int = 8, seq: int = 2048,
             gradient_checkpointing: bool = False, act_bytes: float | None = None,
             eager_attention: bool = False, ce_chunk: int = 1024) -> dict[str, float]:
    """Bytes per device for each term; `batch` is the global micro-batch (split over the devices)."""
    if mode not in MODES:
        raise LorakitError(f"mode must be one of {MODES}, got {mode!r}.")
    if dtype not in BYTES_PER_PARAM:
        raise LorakitError(f"dtype must be one of {sorted(BYTES_PER_PARAM)}, got {dtype!r}.")
    if devices < 1 or (mode == "none" and devices != 1):
        raise LorakitError(f"devices must be >= 1 (and 1 for mode none), got {devices}.")
    unknown = [t for t in targets if t not in shape.linears()]
    if unknown:
        raise LorakitError(f"Unknown target module(s) {unknown}; allowed: {sorted(shape.linears())}.")
    shard = devices if mode == "fsdp" else 1
    lora = shape.layers * sum(r * (a + b) for name, (a, b) in shape.linears().items() if name in targets)
    weight_bytes = BYTES_PER_PARAM[dtype]
    out = {"base weights": shape.params() * weight_bytes / shard}
    if mode == "fsdp" and devices > 1:  # the block being computed and the prefetched next one, unsharded
        out["base weights"] += 2 * shape.block_params() * weight_bytes * (1 - 1 / devices)
    out["LoRA params"] = lora * 4 / shard
    out["LoRA grads"] = lora * 4 / shard * (2 if mode == "ddp" else 1)  # DDP: + the all-reduce bucket copy
    out["AdamW states"] = 2 * lora * 4 / shard
    local = math.ceil(batch / devices)
    act_bytes = act_bytes if act_bytes is not None else (2.0 if dtype != "fp32" else 4.0)
    tokens = local * seq
    per_block = _block_activation_elements(shape, seq, eager_attention) * tokens * act_bytes
    if gradient_checkpointing:  # each block's input, plus one block recomputed during backward
        blocks = shape.layers * shape.hidden * tokens * act_bytes + per_block
    else:
        blocks = shape.layers * per_block
    head = min(tokens, ce_chunk) * shape.vocab * 4 * 2 + 2 * tokens * shape.hidden * 4  # a logits chunk + grad
    out["activations"] = blocks + head
    out["runtime"] = RUNTIME_BYTES
    out["total"] = sum(out.values())
    return out


def plan_table(model: str, devices: int = 8, dtype: str = "bf16", r: int = 8, targets: tuple[str, ...] = ("q_proj", "v_proj"),
               batch: int = 8, seq: int = 2048, gradient_checkpointing: bool = False) -> str:
    """A markdown table: one column per mode (one device; DDP and FSDP2 over `devices`), GiB per device."""
    shape = load_shape(model)
    columns = [("1 device", "none", 1), (f"DDP x{devices}", "ddp", devices), (f"FSDP2 x{devices}", "fsdp", devices)]
    results = [estimate(shape, mode, n, dtype, r, targets, batch, seq, gradient_checkpointing) for _, mode, n in columns]
    lora = shape.layers * sum(r * (a + b) for name, (a, b) in shape.linears().items() if name in targets)
    lines = [f"{model}: {shape.params() / 1e9:.2f} B params, base in {dtype}, LoRA r={r} on {','.join(targets)} "
             f"({lora / 1e6:.1f} M params), global batch {batch} x {seq} tokens, gradient checkpointing "
             f"{'on' if gradient_checkpointing else 'off'}; GiB per device",
             "", "| term | " + " | ".join(c[0] for c in columns) + " |", "|---|" + "---:|" * len(columns)]
    for term in results[0]:
        lines.append(f"| {term} | " + " | ".join(f"{res[term] / GIB:,.2f}" for res in results) + " |")
    return "\n".join(lines)
