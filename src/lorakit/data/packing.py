"""Padding-free packing: the examples of a micro-batch placed back to back in as few rows as possible.

Each example keeps its own positions (`position_ids` restart at 0) and the batch carries no attention mask, so
transformers' mask utilities (used by Llama, Mistral, Qwen2, Gemma, ... with sdpa, eager or flex attention) build a
block-diagonal causal mask from the restarts: no token attends across examples. The first token of every example is
labelled -100; in an unpadded batch it is never a target either (position t predicts token t+1), so a packed batch
has exactly the targets of the padded one, and the same loss and gradients up to float summation order.

Packing works per micro-batch (the examples `epoch_batches` chose), so the number of steps, the data order and exact
resume are those of an unpacked run; only the padding goes.
"""

from __future__ import annotations

from typing import Sequence

import torch

from lorakit.data.records import IGNORE_INDEX, Example


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
