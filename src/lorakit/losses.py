"""Causal-LM loss without materialising the (tokens × vocab) logits tensor.

For SmolLM2 at batch 8 × 128 the logits alone are 1024 × 49152 fp32 = 201 MB, plus as much again for their gradient,
and most of it is wasted when the prompt is masked. `causal_lm_loss` runs the decoder, keeps only the positions that
have a label, and computes output-head + cross-entropy chunk by chunk in one fused autograd function: the forward pass
also computes the gradient w.r.t. the hidden states (and the head weight, if it trains), so nothing of size vocab is
kept for backward and nothing is recomputed. The result equals `F.cross_entropy(lm_head(h), labels)` (mean over labelled
tokens) to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import LorakitError

IGNORE_INDEX = -100


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(h W^T, y); returns the sum. Gradients are computed in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        need_w = weight.requires_grad
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden)  # (N, H)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]  # (n, H)
            y = targets[start:start + chunk]  # (n,)
            logits = (h @ weight.T).float()  # (n, V)
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place: dL/dlogits = p - onehot
            probs[torch.arange(y.shape[0], device=y.device), y] -= 1.0
            g = probs.to(weight.dtype)
            grad_h[start:start + chunk] = g @ weight  # (n, H)
            if need_w:
                grad_w += (g.T @ h).float()  # (V, H)
        ctx.save_for_backward(grad_h, grad_w if need_w else torch.empty(0))
        ctx.need_w, ctx.w_dtype = need_w, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype)
        gw = (grad_w * grad_out).to(ctx.w_dtype) if ctx.need_w else None
        return gh, gw, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               chunk: int = 1024) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets` (rows already filtered), vocab-sized tensors never
    held for more than one chunk."""
    if hidden.shape[0] == 0:
        raise LorakitError("No labelled tokens in this batch (every label is -100); nothing to train on.")
    total = _FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk)
    return total / hidden.shape[0]


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: torch.Tensor | None = None, chunk: int = 1024, **model_kwargs) -> torch.Tensor:
    """Next-token loss of a Hugging Face causal LM, mean over labelled positions (labels == -100 are ignored).

    Equals `model(input_ids, attention_mask=..., labels=labels).loss` for models without logit soft-capping or
    scaling; falls back to that exact call when the output head is not a plain linear layer (e.g. LoRA on lm_head).
    """
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
