"""Padding-free packing: the same targets, loss and LoRA gradients as the padded batch; no attention across examples."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from conftest import randomize_lora_B, tiny_llama
from lorakit.data.packing import collate_packed, pack_rows
from lorakit.data.records import IGNORE_INDEX, Example, collate, loss_tokens
from lorakit.train.losses import causal_lm_loss


def examples(lengths, prompt=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 97, (n,), generator=gen).tolist()
        out.append(Example(ids, [IGNORE_INDEX] * min(prompt, n) + ids[prompt:], "test", prompt))
    return out


def test_rows_are_filled_first_fit_decreasing_within_the_width():
    assert pack_rows([5, 3, 8, 2, 6], 8) == [[2], [4, 3], [0, 1]]
    lengths = [17, 3, 9, 30, 12, 1, 5, 22]
    rows = pack_rows(lengths, 30)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 30 for row in rows) and len(rows) == 4  # 99 tokens: 4 rows of 30


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_has_the_loss_and_lora_gradients_of_the_padded_batch(attn):
    batch = examples([21, 5, 9, 14, 3, 30, 11, 7])
    grads = {}
    for mode in ("padded", "packed"):
        model = lk.add_lora(tiny_llama(), lk.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
        model.set_attn_implementation(attn)
        randomize_lora_B(model, std=0.1)
        if mode == "padded":
            b = collate(batch, pad_id=0)
            loss = causal_lm_loss(model, b["input_ids"], b["labels"], b["attention_mask"])
        else:
            b = collate_packed(batch, pad_id=0)
            loss = causal_lm_loss(model, b["input_ids"], b["labels"], None, position_ids=b["position_ids"], use_cache=False)
        loss.backward()
        grads[mode] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                       loss_tokens(b), b["input_ids"].numel())
    (l1, g1, t1, cells1), (l2, g2, t2, cells2) = grads["padded"], grads["packed"]
    assert t1 == t2 and cells2 < cells1  # the same targets in fewer cells
    assert torch.allclose(l1, l2, rtol=1e-6, atol=1e-6), (l1, l2)
    assert g1.keys() == g2.keys() and len(g1) > 0
    for name in g1:
        assert torch.allclose(g1[name], g2[name], rtol=1e-4, atol=1e-6), (name, (g1[name] - g2[name]).abs().max())


def test_no_token_attends_across_examples():
    model = tiny_llama()
    batch = examples([6, 5, 4])
    b = collate_packed(batch, pad_id=0, width=15)
    assert b["input_ids"].shape == (1, 15) and int(b["num_tokens"]) == 15
    with torch.no_grad():
        before = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
        changed = b["input_ids"].clone()
        changed[0, :6] = (changed[0, :6] + 1) % 97  # the first example only (the longest is placed first)
        after = model(input_ids=changed, position_ids=b["position_ids"], use_cache=False).logits
        alone = model(input_ids=torch.tensor([batch[1].input_ids])).logits  # the 5-token example on its own
    assert not torch.allclose(before[0, :6], after[0, :6])
    assert torch.equal(before[0, 6:], after[0, 6:])  # the other examples do not see the first one
    assert torch.allclose(before[0, 6:11], alone[0], atol=1e-5)  # and compute as if alone, from position 0


def test_classification_batches_are_refused():
    with pytest.raises(ValueError, match="per-token labels"):
        collate_packed([Example([1, 2, 3], 1, "x")], pad_id=0)
