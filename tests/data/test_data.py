"""Data loading and tokenisation: every file format, every data format, prompt masking, truncation, batching, errors."""

from __future__ import annotations

import json

import pytest

from lorakit.data.records import (IGNORE_INDEX, DataConfig, Record, collate, epoch_batches, loss_tokens, read_records,
                          show_example, split_records, tokenize)
from lorakit.errors import LorakitError
from tiny_text import tiny_tokenizer

ROWS = [{"prompt": "the cat", "completion": "a dog"}, {"prompt": "hello world", "completion": "yes please"}]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------------- file formats
@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "hf_dir"])
def test_every_file_format_reads_the_same_records(tmp_path, kind):
    import pandas as pd

    path = tmp_path / f"data.{kind}"
    if kind == "jsonl":
        write_jsonl(path, ROWS)
    elif kind == "json":
        path.write_text(json.dumps(ROWS))
    elif kind == "csv":
        pd.DataFrame(ROWS).to_csv(path, index=False)
    elif kind == "parquet":
        pd.DataFrame(ROWS).to_parquet(path)
    else:
        import datasets

        path = tmp_path / "saved"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(path))
    records = read_records(path)
    assert [r.fields for r in records] == ROWS
    assert str(path) in records[1].source


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"prompt": "x", "completion": \n')
    with pytest.raises(LorakitError, match=r"bad\.jsonl:3: malformed JSON"):
        read_records(path)


def test_malformed_csv_row_names_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("prompt,completion\nthe cat,a dog\nonly one field\n")
    with pytest.raises(LorakitError, match=r"bad\.csv:3: malformed CSV row"):
        read_records(path)


@pytest.mark.parametrize("content", ["", "\n\n", "[]"])
def test_empty_dataset_is_an_error(tmp_path, content):
    path = tmp_path / ("e.json" if content == "[]" else "e.jsonl")
    path.write_text(content)
    with pytest.raises(LorakitError, match="empty"):
        read_records(path)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(LorakitError, match="does not exist"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(LorakitError, match="suffix"):
        read_records(tmp_path / "x.txt")


def test_missing_field_names_field_and_fields_present(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "the cat", "answer": "a dog"}])
    with pytest.raises(LorakitError, match=r"d\.jsonl:1: missing field 'completion'.*\['answer', 'prompt'\]"):
        tokenize(read_records(path), tok, DataConfig(format="instruction"))


# ---------------------------------------------------------------------------------------------------- formats
def test_instruction_masks_prompt_and_appends_eos(tok):
    data = tokenize([Record(ROWS[0], "x:1")], tok, DataConfig())
    ex = data.examples[0]
    assert data.format == "instruction"
    prompt = tok.apply_chat_template([{"role": "user", "content": "the cat"}], tokenize=False,
                                     add_generation_prompt=True)
    p = tok(prompt, add_special_tokens=False).input_ids
    c = tok("a dog", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert ex.input_ids == p + c
    assert ex.labels == [IGNORE_INDEX] * len(p) + c
    assert ex.prompt_len == len(p) and ex.target_text == "a dog"
    shown = show_example(ex, tok)
    assert "⟦<|user|> the cat </s> <|assistant|>⟧a dog </s>" in shown and "3 with loss" in shown


def test_instruction_without_template_and_train_on_prompt(tok):
    ex = tokenize([Record(ROWS[0], "x:1")], tok, DataConfig(chat_template=False, train_on_prompt=True)).examples[0]
    assert ex.input_ids == tok("the cat").input_ids + tok("a dog", add_special_tokens=False).input_ids + [2]
    assert ex.labels == ex.input_ids


def test_chat_labels_only_assistant_turns(tok):
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "yes"},
                {"role": "user", "content": "what"}, {"role": "assistant", "content": "no thanks"}]
    ex = tokenize([Record({"messages": messages}, "c:1")], tok, DataConfig()).examples[0]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert ex.input_ids == tok(rendered, add_special_tokens=False).input_ids
    trained = tok.decode([t for t in ex.labels if t != IGNORE_INDEX])
    assert trained.split() == ["yes", "</s>", "no", "thanks", "</s>"]


def test_text_format_trains_on_every_token(tok):
    ex = tokenize([Record({"text": "the sun is hot"}, "t:1")], tok, DataConfig()).examples[0]
    assert ex.labels == ex.input_ids and ex.input_ids[-1] == tok.eos_token_id and ex.input_ids[0] == 1


def test_classification_single_and_pair_with_string_labels(tok):
    records = [Record({"s1": "the cat", "s2": "a dog", "y": "no"}, "c:1"),
               Record({"s1": "the dog", "s2": "a dog", "y": "yes"}, "c:2")]
    config = DataConfig(format="classification", text_field="s1", text_pair_field="s2", label_field="y")
    data = tokenize(records, tok, config)
    assert data.label_names == ["no", "yes"] and [e.labels for e in data.examples] == [0, 1]
    assert data.examples[0].input_ids == tok("the cat", "a dog").input_ids
    bad = [Record({"s1": "x", "s2": "y", "y": "maybe"}, "v:1")]
    with pytest.raises(LorakitError, match="v:1: label 'maybe'"):
        tokenize(bad, tok, config, fmt="classification", label_ids=data.label_ids)


def test_csv_numeric_labels_stay_numeric(tok):
    records = [Record({"text": "the cat", "label": "1"}, "c:2"), Record({"text": "a dog", "label": "0"}, "c:3")]
    data = tokenize(records, tok, DataConfig())
    assert data.format == "classification" and [e.labels for e in data.examples] == [1, 0]


def test_truncation_is_counted_and_fully_masked_examples_dropped(tok):
    long = {"prompt": "the cat " * 20, "completion": "a dog"}
    short = {"prompt": "hello", "completion": "yes " * 10}
    data = tokenize([Record(long, "l:1"), Record(short, "l:2")], tok, DataConfig(max_length=12))
    assert data.truncated == 2 and data.dropped == 1
    assert len(data.examples) == 1 and len(data.examples[0].input_ids) == 12
    with pytest.raises(LorakitError, match="lost all its target tokens|max_length"):
        tokenize([Record(long, "l:1")], tok, DataConfig(max_length=12))


# ---------------------------------------------------------------------------------------------------- batching
def test_collate_pads_dynamically(tok):
    data = tokenize([Record(r, "x") for r in ROWS], tok, DataConfig())
    batch = collate(data.examples, tok.pad_token_id)
    width = max(len(e.input_ids) for e in data.examples)
    assert batch["input_ids"].shape == (2, width)
    for i, e in enumerate(data.examples):
        n = len(e.input_ids)
        assert batch["attention_mask"][i].sum() == n
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all() and (batch["input_ids"][i, n:] == 0).all()
    assert loss_tokens(batch) == sum(sum(t != IGNORE_INDEX for t in e.labels[1:]) for e in data.examples)


def test_epoch_batches_deterministic_group_by_length_and_complete():
    lengths = [(i * 37) % 23 + 1 for i in range(100)]
    a = epoch_batches(lengths, 8, seed=3, epoch=1)
    assert a == epoch_batches(lengths, 8, seed=3, epoch=1)
    assert a != epoch_batches(lengths, 8, seed=3, epoch=2)
    assert sorted(i for b in a for i in b) == list(range(100))
    spread = lambda batches: sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)  # noqa: E731
    assert spread(a) < spread(epoch_batches(lengths, 8, seed=3, epoch=1, group_by_length=False)) / 3


def test_split_records_is_seeded_and_disjoint():
    records = [Record({"text": str(i)}, f"f:{i}") for i in range(20)]
    train, held = split_records(records, 0.25, seed=1)
    assert len(held) == 5 and len(train) == 15
    assert {r.source for r in train}.isdisjoint(r.source for r in held)
    assert [r.source for r in held] == [r.source for r in split_records(records, 0.25, seed=1)[1]]


def test_data_config_problems():
    config = DataConfig()
    config.format, config.max_length, config.eval_fraction = "tsv", 1, 1.5  # problems() of a config changed later
    problems = config.problems()
    assert len(problems) == 3 and any("data.format" in p for p in problems)
    assert [p.split(" ")[0] for p in config.problems(prefix="")] == ["format", "max_length", "eval_fraction"]


def test_data_config_construction_reports_every_problem_at_once():
    with pytest.raises(LorakitError) as e:
        DataConfig(format="tsv", max_length=1, eval_fraction=1.5, chat_template="yes")
    lines = str(e.value).splitlines()
    assert lines[0] == "Invalid data config:" and len(lines) == 5
    for key in ("data.format", "data.max_length", "data.eval_fraction", "data.chat_template must be true or false"):
        assert any(key in line for line in lines), key
