"""Padding-free packing: the examples of a micro-batch placed back to back in as few rows as possible.

Each example keeps its own positions (`position_ids` restart at 0) and the batch carries no attention mask, so
transformers' mask utilities (used by Llama, Mistral, Qwen2, Gemma, ... with sdpa, eager or flex attention) build a
block-diagonal causal mask from the restarts: no token attends across examples. The first token of every example is
labelled -100; in an unpadded batch it is never a target either (position t predicts token t+1), so a packed batch
has exactly the targets of the padded one, and the same loss and gradients up to float summation order.

Packing works per micro-batch (the examples `epoch_batches` chose), so the number of steps, the data order and exact
resume are those of an unpacked run; only padding goes. How much goes depends on the spread of lengths in a batch:
random batches of 8 (the default) of WebNLG rendered as chat (61-318 tokens) go from 36% padding to 20%, of E2E
(30-106 tokens) from 27% to 23%; length-grouped batches have little padding to lose.

That is against whole padded micro-batches (`optim.max_batch_tokens: null`). Under a token budget of 512
tokens per pass (the default is 448) the training loop splits a padded micro-batch into passes of rows sorted by length, each cut to
its longest row, which pads less than packing: 11% on the chat set and 17% on E2E, against packed rows' 20% and
23% (packed rows keep their width), so packed micro-batches run 11% / 9% more positions there. Choosing per
micro-batch (pack where it removes at least 20% of the padded positions) would pack 0 of 24 chat and 1 of 64 E2E
batches under the budget, so it is not done.

`data.packing: auto` is resolved once per run by `resolve_packing`: on for causal-LM training in one process when
`packing_problem` finds that the model keeps packed examples apart, off otherwise. The default is false (measured
end to end in benchmarks/results/finetune.md: chat 382 packed vs 393 padded real tokens/s under the budget).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import nn

from lorakit.data.config import DataConfig
from lorakit.data.records import IGNORE_INDEX, Example
from lorakit.errors import LorakitError


def pack_rows(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Indices into `lengths` grouped into rows of at most `width` tokens (first-fit decreasing, deterministic)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(width - lengths[i])
    return rows


def collate_packed(examples: Sequence[Example], pad_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """A packed causal-LM batch: input_ids, labels and position_ids of shape (rows, T), no attention_mask.

    Rows hold at most `width` tokens (default: the longest example, so a packed batch never needs more memory per
    row than the padded one). Tails are padding: positions restarting at 0 (a segment of their own), label -100.
    """
    if not examples or not isinstance(examples[0].labels, list):
        raise ValueError("collate_packed packs causal-LM examples (per-token labels); classification batches are "
                         "not packed.")
    lengths = [len(e.input_ids) for e in examples]
    width = max(width or 0, max(lengths))
    rows = pack_rows(lengths, width)
    span = max(sum(lengths[i] for i in row) for row in rows)
    ids = torch.full((len(rows), span), pad_id, dtype=torch.long)  # (R, T)
    labels = torch.full((len(rows), span), IGNORE_INDEX, dtype=torch.long)  # (R, T)
    positions = torch.zeros((len(rows), span), dtype=torch.long)  # (R, T)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            e, n = examples[i], lengths[i]
            ids[r, start:start + n] = torch.tensor(e.input_ids)
            labels[r, start + 1:start + n] = torch.tensor(e.labels[1:])  # the first token is never a target
            positions[r, start:start + n] = torch.arange(n)
            start += n
        positions[r, start:] = torch.arange(span - start)  # padding: a segment of its own
    return {"input_ids": ids, "labels": labels, "position_ids": positions,
            "num_tokens": torch.tensor(sum(lengths))}


def packing_problem(model: nn.Module) -> str | None:
    """Why packed rows would not train `model` as separate examples, or None when they do.

    Measured, not guessed from the architecture: two short examples packed in one row (positions restarting, no
    mask) must give the second the logits it has alone, whatever the first holds. A model whose attention ignores
    the restart (or whose forward takes no position_ids) fails here; two forwards of 9 tokens and one of 4.
    """
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embeddings, nn.Embedding):
        return "the model has no token embedding to probe"
    device, vocab = embeddings.weight.device, embeddings.num_embeddings
    first, second = torch.arange(3, 8) % vocab, torch.arange(11, 15) % vocab
    positions = torch.cat([torch.arange(5), torch.arange(4)])[None].to(device)  # (1, 9)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            def logits(*parts: torch.Tensor, **kwargs) -> torch.Tensor:
                ids = torch.cat(parts)[None].to(device)  # (1, T)
                return model(input_ids=ids, use_cache=False, **kwargs).logits[0].float()  # (T, V)

            packed = logits(first, second, position_ids=positions)[5:]
            changed = logits((first + 1) % vocab, second, position_ids=positions)[5:]
            alone = logits(second)
    except Exception as e:  # noqa: BLE001  any failure means packed rows cannot be trusted with this model
        return f"a packed forward of this model fails ({type(e).__name__}: {str(e)[:200]})"
    finally:
        model.train(was_training)
    # A crossing changes logits by a good part of their scale (SmolLM2: 12 to 25 of 32); kept apart, the first
    # example does not reach the second at all, and alone differs by summation order (3e-5 there, fp32 or bf16).
    scale = max(1.0, float(alone.abs().max()))
    if float((packed - changed).abs().max()) > 1e-3 * scale:
        return "its attention crosses packed examples (it ignores the restarting position_ids)"
    if float((packed - alone).abs().max()) > (1e-3 if embeddings.weight.dtype == torch.float32 else 3e-2) * scale:
        return "a packed example does not compute as it does alone (its positions are not the restarted ones)"
    return None


def resolve_packing(data: DataConfig, task: str, distributed: str, model: nn.Module) -> tuple[DataConfig, str | None]:
    """`data` with packing auto replaced by true or false, and why (None when packing was given as true or false).

    auto packs causal-LM training in one process on a model that `packing_problem` passes. An explicit true on a
    model that fails it is an error (its examples would see each other); task and distributed are refused for an
    explicit true by TrainConfig already.
    """
    if data.packing is False:
        return data, None
    if task != "causal-lm":
        why = f"task {task} (classification batches are one label per row, not packed)"
    elif distributed != "none":
        why = f"distributed={distributed} (packing is for one process)"
    else:
        problem = packing_problem(model)
        if problem is None:
            return dataclasses.replace(data, packing=True), None if data.packing is True else (
                "data.packing auto -> true: causal-LM training in one process, and the model keeps packed examples "
                "apart (checked)")
        if data.packing is True:
            raise LorakitError(f"data.packing=true, but {problem}; packed examples would not train as separate "
                               "examples with this model. Set data.packing=false (or auto, which then pads).")
        why = problem
    return dataclasses.replace(data, packing=False), f"data.packing auto -> false: {why}"
