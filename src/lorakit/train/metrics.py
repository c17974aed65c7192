"""Validation during training: loss (and perplexity for language models), plus the task metric — accuracy for
classification, exact match of greedy completions for instruction data."""

from __future__ import annotations

import math

import torch
from torch import nn

from lorakit.data.records import TokenizedData, iterate_batches, loss_tokens
from lorakit.errors import LorakitError
from lorakit.train.config import TrainConfig
from lorakit.train.losses import batch_loss


def autocast(config: TrainConfig):
    """bf16 autocast on CPU when config.precision is bf16; a no-op context otherwise."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.precision == "bf16")


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer, data: TokenizedData, task: str, config: TrainConfig) -> dict[str, float]:
    """Validation loss (and perplexity for language models) plus the configured task metric."""
    was_training = model.training
    model.train(False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count, correct = 0.0, 0, 0
    with autocast(config):
        for batch in iterate_batches(data, config.eval_batch_size, pad):
            n = loss_tokens(batch)
            if task == "seq-cls":
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
                correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
                total += float(out.loss) * n
            else:
                total += float(batch_loss(model, batch, task)) * n
            count += n
    metrics = {"eval_loss": total / max(count, 1)}
    if task == "causal-lm":
        metrics["eval_ppl"] = math.exp(min(metrics["eval_loss"], 50.0))
    if config.metric == "accuracy":
        if task != "seq-cls":
            raise LorakitError("metric: accuracy needs classification data (task seq-cls); use exact_match instead.")
        metrics["accuracy"] = correct / len(data.examples)
    elif config.metric == "exact_match":
        metrics["exact_match"] = exact_match(model, tokenizer, data, config.max_new_tokens, config.eval_batch_size)
    model.train(was_training)
    return metrics


def exact_match(model: nn.Module, tokenizer, data: TokenizedData, max_new_tokens: int, batch_size: int = 16) -> float:
    """Share of examples whose greedy completion equals the reference completion (whitespace-stripped)."""
    from lorakit.inference.generate import Row, Sampling, generate_rows
    from lorakit.lora.injection import active_adapter

    examples = [e for e in data.examples if e.target_text is not None]
    if not examples:
        raise LorakitError("metric: exact_match needs instruction data (prompt + completion) for validation.")
    sampling = Sampling(max_new_tokens=max_new_tokens)
    adapter = active_adapter(model)  # the adapter being trained (None: a model without lorakit adapters)
    hits = 0
    for s in range(0, len(examples), batch_size):
        part = examples[s:s + batch_size]
        outs = generate_rows(model, tokenizer, [Row(e.input_ids[:e.prompt_len], adapter, sampling) for e in part])
        hits += sum(o.text.strip() == e.target_text.strip() for o, e in zip(outs, part))
    return hits / len(examples)
