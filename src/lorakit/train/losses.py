"""Causal-LM loss without materialising the (tokens × vocab) logits tensor.

For SmolLM2 at batch 8 × 128 the logits alone are 1024 × 49152 fp32 = 201 MB, plus as much again for their gradient,
and most of it is wasted when the prompt is masked. `causal_lm_loss` runs the decoder, keeps only the positions that
have a label, and computes output-head + cross-entropy chunk by chunk in one fused autograd function: the forward pass
also computes the gradient w.r.t. the hidden states (and the head weight, if it trains), so nothing of size vocab is
kept for backward and nothing is recomputed. The result equals `F.cross_entropy(lm_head(h), labels)` (mean over labelled
tokens) to float rounding.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import LorakitError

IGNORE_INDEX = -100


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(h W^T, y); returns the sum. Gradients are computed in forward, chunk by chunk, those that
    autograd will ask for only (none under no_grad: then the loss alone).

    Each chunk's logits live in one reused fp32 buffer and are turned into softmax - onehot in place (max, subtract,
    exp, sum, divide), so no vocab-sized tensor is allocated per chunk: fresh multi-MB allocations cost page faults
    that, on CPU, took longer than the arithmetic. A bf16 head has one more reused buffer, of its dtype, holding the
    chunk's logits as the matmul gives them and then its gradient for the backward matmuls.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # both False under no_grad (evaluation)
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None  # (N, H)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        buf = torch.empty((min(chunk, n_rows), vocab), dtype=torch.float32, device=hidden.device)
        low = None if weight.dtype == torch.float32 else torch.empty(buf.shape, dtype=weight.dtype,
                                                                      device=hidden.device)  # bf16 logits, then grads
        w_t = weight.T
        for start in range(0, n_rows, chunk):
            h = hidden[start:start + chunk]  # (n, H)
            y = targets[start:start + chunk]  # (n,)
            rows = torch.arange(y.shape[0], device=y.device)
            logits = buf[: h.shape[0]]
            if low is None:
                torch.mm(h, w_t, out=logits)
            else:
                logits.copy_(torch.mm(h, w_t, out=low[: h.shape[0]]))
            target_logit = logits[rows, y]  # (n,), a copy taken before the in-place steps
            row_max = logits.amax(dim=-1, keepdim=True)
            logits.sub_(row_max).exp_()
            row_sum = logits.sum(dim=-1, keepdim=True)
            lse = row_max.squeeze(1) + row_sum.squeeze(1).log()
            total += (lse - target_logit).sum()
            if not (need_h or need_w):  # the loss alone
                continue
            probs = logits.div_(row_sum)  # softmax; dL/dlogits = p - onehot
            probs[rows, y] -= 1.0
            g = probs if low is None else low[: h.shape[0]].copy_(probs)
            if need_h:
                torch.mm(g, weight, out=grad_h[start:start + chunk])  # (n, H)
            if need_w:
                grad_w.addmm_(g.T.float(), h.float())  # (V, H)
        nothing = torch.empty(0)
        ctx.save_for_backward(grad_h if need_h else nothing, grad_w if need_w else nothing)
        ctx.need_h, ctx.need_w, ctx.w_dtype = need_h, need_w, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if ctx.need_h else None
        gw = (grad_w * grad_out).to(ctx.w_dtype) if ctx.need_w else None
        return gh, gw, None, None


def _default_chunk(vocab: int) -> int:
    """Rows per chunk so that one chunk of fp32 logits is about 64 MB (smaller chunks make slower matmuls)."""
    return max(16, (1 << 24) // max(1, vocab))


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               chunk: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets` (rows already filtered), vocab-sized tensors never
    held for more than one chunk (default: ~64 MB of fp32 logits)."""
    if hidden.shape[0] == 0:
        raise LorakitError("No labelled tokens in this batch (every label is -100); nothing to train on.")
    total = _FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk or _default_chunk(weight.shape[0]))
    return total / hidden.shape[0]


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: torch.Tensor | None = None, chunk: int | None = None, **model_kwargs) -> torch.Tensor:
    """Next-token loss of a Hugging Face causal LM, mean over labelled positions (labels == -100 are ignored).

    Equals `model(input_ids, attention_mask=..., labels=labels).loss` for models without logit soft-capping or
    scaling; falls back to that exact call when the output head is not a plain linear layer (e.g. LoRA on lm_head),
    and for PEFT prompt-learning models (prefix, prompt, p-tuning), whose virtual tokens only PEFT's forward adds.
    """
    peft_config = getattr(model, "active_peft_config", None)
    if getattr(peft_config, "is_prompt_learning", False):
        with warnings.catch_warnings():  # PEFT's prefix path calls transformers APIs that are deprecated, not wrong
            warnings.filterwarnings("ignore", r".*(past_key_values|is_gradient_checkpointing).*", FutureWarning)
            return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **model_kwargs).loss
    if hasattr(model, "get_base_model"):  # a PEFT-wrapped model: work on the transformers model inside
        model = model.get_base_model()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    plain_head = (isinstance(head, nn.Linear) and head.bias is None
                  and getattr(config, "final_logit_softcapping", None) is None
                  and getattr(config, "logit_scale", None) in (None, 1, 1.0))
    if not plain_head:
        return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **model_kwargs).loss
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    hidden = out.last_hidden_state[:, :-1]  # (B, T-1, H): position t predicts token t+1
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return fused_linear_cross_entropy(hidden[keep], head.weight, targets[keep], chunk)


def batch_loss(model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """Mean loss of one batch: next-token cross-entropy over labelled tokens, or classification loss (seq-cls)."""
    if task == "seq-cls":  # token_type_ids: sentence pairs as a BERT tokenizer encodes them (batches built by a caller)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "labels") if k in batch}
        return model(**inputs).loss
    if "position_ids" in batch:  # packed (lorakit.data.packing): no mask, so the model derives it from the positions
        return causal_lm_loss(model, batch["input_ids"], batch["labels"], None, position_ids=batch["position_ids"],
                              use_cache=False)
    return causal_lm_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
