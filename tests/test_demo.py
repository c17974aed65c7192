"""The demo's generated dataset: deterministic, strict format, held-out names and cities unseen in training."""

from __future__ import annotations

import re

from lorakit.demo import make_dataset, sentence


def test_dataset_is_deterministic_and_held_out_is_disjoint():
    train, test = make_dataset(300, 30)
    assert (train, test) == make_dataset(300, 30)
    assert len(train) == 300 and len(test) == 30
    fields = lambda rows, key: {re.search(rf"{key}=(\w+)", r["prompt"]).group(1) for r in rows}  # noqa: E731
    for key in ("name", "city"):
        assert fields(train, key).isdisjoint(fields(test, key)), key


def test_completion_follows_the_record_whatever_the_field_order():
    train, _ = make_dataset(50, 5)
    orders = set()
    for row in train:
        record = dict(kv.split("=") for kv in row["prompt"].split("Record: ")[1].split("; "))
        orders.add(tuple(record))
        assert row["completion"] == sentence(record)
    assert len(orders) > 5
    assert sentence({"name": "Ava", "age": 3, "job": "engineer", "city": "Oslo"}) == "Ava (3) is an engineer in Oslo."
    assert sentence({"name": "Ava", "age": 3, "job": "nurse", "city": "Oslo"}) == "Ava (3) is a nurse in Oslo."
