"""optim.max_batch_tokens: a micro-batch above the budget runs as several forward/backward passes whose token-weighted
gradients add up to the whole micro-batch's, so losses and adapters match the unsplit run to fp32 rounding, and a
resumed run equals an uninterrupted one exactly."""

from __future__ import annotations

import pytest
import torch

from lorakit.data.records import IGNORE_INDEX, loss_tokens
from lorakit.errors import LorakitError
from lorakit.train import TrainConfig, train
from lorakit.train.loop import split_batch
from test_training import Crash, adapter, crash_at
from tiny_run import config, data_file, lora_model, one_thread, tok  # noqa: F401 (fixtures)


def padded_batch(lengths: list[int], width: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded rows of the given lengths; every token after the first is a target."""
    width = width or max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.arange(1, n + 1) + 10 * r
        mask[r, :n] = 1
        labels[r, 1:n] = ids[r, 1:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_a_micro_batch_within_the_budget_is_left_as_it_is():
    batch = padded_batch([5, 9, 3])
    assert split_batch(batch, 27)[0] is batch and len(split_batch(batch, 27)) == 1
    assert split_batch(batch, None)[0] is batch


def test_passes_hold_every_row_once_within_the_budget_cut_to_their_longest_row():
    batch = padded_batch([5, 9, 3, 8, 2, 9])
    passes = split_batch(batch, 18)
    # longest first: [9, 9] (18 tokens), [8, 5] (16), [3, 2] (6)
    assert [p["input_ids"].shape for p in passes] == [(2, 9), (2, 8), (2, 3)]
    rows = sorted(tuple(r[r != 0].tolist()) for p in passes for r in p["input_ids"])
    assert rows == sorted(tuple(r[r != 0].tolist()) for r in batch["input_ids"])
    assert sum(loss_tokens(p) for p in passes) == loss_tokens(batch)
    assert all(int(p["attention_mask"][:, -1].max()) == 1 for p in passes)  # only columns masked everywhere are cut


def test_a_row_longer_than_the_budget_runs_alone_and_every_process_gets_rows():
    assert [p["input_ids"].shape for p in split_batch(padded_batch([12, 4, 3]), 8)] == [(1, 12), (2, 4)]
    # two processes: each pass has at least two rows, and its per-process share (ceil(rows / 2) rows) fits
    passes = split_batch(padded_batch([12, 4, 3, 3, 2]), 8, world=2)
    assert [p["input_ids"].shape for p in passes] == [(2, 12), (3, 3)]


def test_packed_rows_are_split_but_keep_their_width():
    packed = {"input_ids": torch.ones(4, 6, dtype=torch.long), "labels": torch.ones(4, 6, dtype=torch.long),
              "position_ids": torch.arange(6).repeat(4, 1), "num_tokens": torch.tensor(22)}
    passes = split_batch(packed, 12)
    assert [p["input_ids"].shape for p in passes] == [(2, 6), (2, 6)]
    assert all("num_tokens" not in p and p["position_ids"].shape == (2, 6) for p in passes)


def test_the_budget_is_validated():
    with pytest.raises(LorakitError, match="max_batch_tokens must be a positive integer"):
        TrainConfig.from_dict({"optim": {"max_batch_tokens": 0}})
    assert TrainConfig.from_dict({"optim": {"max_batch_tokens": None}}).optim.max_batch_tokens is None


def test_split_passes_train_as_the_whole_micro_batch_to_fp32_rounding(tmp_path, tok, data_file):
    runs = {}
    for budget in (None, 20):  # the tiny micro-batches are 4 rows of 11-13 tokens: 20 makes passes of 1 row
        runs[budget] = train(config(tmp_path / f"b{budget}", data_file, base_dtype="fp32",
                                    optim__max_batch_tokens=budget, save_every=0), lora_model(dropout=0.0), tok)
    whole, split = runs[None], runs[20]
    a, b = adapter(whole.run_dir), adapter(split.run_dir)
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the passes really ran: other rounding
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    losses = [[r["loss"] for r in run.history if "loss" in r] for run in (whole, split)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert split.metrics["eval_loss"] == pytest.approx(whole.metrics["eval_loss"], rel=1e-5)
    tokens = [[r["tokens_per_s"] > 0 for r in run.history if "loss" in r] for run in (whole, split)]
    assert all(tokens[0]) and all(tokens[1])


def test_a_resumed_run_with_split_passes_equals_the_uninterrupted_one(tmp_path, tok, data_file):
    cfg = {"optim__max_batch_tokens": 20, "base_dtype": "fp32"}
    full = train(config(tmp_path / "full", data_file, **cfg), lora_model(), tok)
    with pytest.raises(Crash):
        train(config(tmp_path / "cut", data_file, **cfg), lora_model(), tok, on_step=crash_at(7))
    resumed = train(None, lora_model(), tok, resume=tmp_path / "cut")
    A, B = adapter(full.run_dir), adapter(resumed.run_dir)
    assert all(torch.equal(A[k], B[k]) for k in A)
    assert [r["loss"] for r in resumed.history if "loss" in r] == [r["loss"] for r in full.history if "loss" in r]
