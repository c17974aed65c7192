"""Training data: read local files, turn records into token ids with the prompt masked, and batch them.

Files: JSONL, JSON (a list of objects, or {"data": [...]}), CSV, Parquet, or a folder written by
`datasets.Dataset.save_to_disk`. Formats:

- "instruction": a prompt field and a completion field; loss on the completion only (unless `train_on_prompt`),
  EOS appended. With `chat_template` the prompt is wrapped as a user message in the tokenizer's chat template.
- "chat": a list of {"role", "content"} messages rendered with the chat template; loss on assistant turns only.
- "text": plain text for language modelling; loss on every token, EOS appended.
- "classification": a text field (and optionally a second text for sentence pairs) and a label.

Every record remembers where it came from ("file:line"), so a bad record is reported by file and line number. The
reading options are `DataConfig` (defined in `data.config`, torch-free; importable from here too).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from lorakit.data.config import DataConfig
from lorakit.errors import LorakitError

IGNORE_INDEX = -100
SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Record:
    fields: dict[str, Any]
    source: str
    """Where the record came from, e.g. "train.jsonl:12"."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int] | int
    """Per-token labels (-100 = no loss) for language models, one class id for classification."""
    source: str
    prompt_len: int = 0
    """Number of leading prompt tokens (what a generation would start from)."""
    target_text: str | None = None
    """The reference completion, for generation metrics such as exact match."""


@dataclass
class TokenizedData:
    examples: list[Example]
    format: str
    truncated: int = 0
    """Examples cut to max_length."""
    dropped: int = 0
    """Examples with no trainable token left after truncation (skipped)."""
    label_ids: dict[Any, int] | None = None
    """Classification: label value -> class id."""

    @property
    def label_names(self) -> list[str] | None:
        if self.label_ids is None:
            return None
        return [str(k) for k, _ in sorted(self.label_ids.items(), key=lambda kv: kv[1])]

    @property
    def num_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


# ---------------------------------------------------------------------------------------------------- reading
def read_records(path: str | Path, split: str = "train") -> list[Record]:
    """All records of a data file (or saved datasets folder), each with its "file:line" source."""
    path = Path(path)
    if not path.exists():
        raise LorakitError(f"Data file {path} does not exist.")
    if path.is_dir():
        records = _read_hf_dir(path, split)
    else:
        kind = SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise LorakitError(f"Cannot read {path}: the suffix {path.suffix!r} is not one of {sorted(SUFFIXES)} "
                               "(or a folder saved with datasets' save_to_disk).")
        try:
            records = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}[kind](path)
        except UnicodeDecodeError as e:
            raise LorakitError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8.") from None
    if not records:
        raise LorakitError(f"The dataset {path} is empty: no records found. Check the file and its format.")
    return records


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise LorakitError(f"{path}:{number}: malformed JSON line ({e.msg} at column {e.colno}).") from None
            except RecursionError:
                raise LorakitError(f"{path}:{number}: JSON nested too deeply to be a data record.") from None
            if not isinstance(value, dict):
                raise LorakitError(f"{path}:{number}: each line must be a JSON object, got {type(value).__name__}.")
            records.append(Record(value, f"{path}:{number}"))
    return records


def _read_json(path: Path) -> list[Record]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LorakitError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}).") from None
    except RecursionError:
        raise LorakitError(f"{path}: JSON nested too deeply to be a list of data records.") from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise LorakitError(f"{path}: expected a JSON list of objects (or {{\"data\": [...]}}), got {type(value).__name__}.")
    records = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise LorakitError(f"{path}: item {i} must be a JSON object, got {type(item).__name__}.")
        records.append(Record(item, f"{path}:item {i}"))
    return records


def _read_csv(path: Path) -> list[Record]:
    records = []
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        try:
            for row in reader:
                if None in row or any(v is None for v in row.values()):
                    raise LorakitError(f"{path}:{reader.line_num}: malformed CSV row: it has "
                                       f"{len(row) - (None in row) + len(row.get(None) or [])} fields, the header has "
                                       f"{len(reader.fieldnames or [])} ({reader.fieldnames}).")
                records.append(Record(dict(row), f"{path}:{reader.line_num}"))
        except csv.Error as e:
            raise LorakitError(f"{path}:{reader.line_num}: malformed CSV ({e}).") from None
    return records


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise LorakitError(f"{path}: not a readable Parquet file ({e}).") from None
    return [Record(row, f"{path}:row {i}") for i, row in enumerate(rows)]


def _read_hf_dir(path: Path, split: str) -> list[Record]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # not a saved dataset
        raise LorakitError(f"{path} is a folder but not one written by datasets' save_to_disk ({e}).") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise LorakitError(f"{path} has splits {sorted(ds)}; data.split={split!r} is not one of them.")
        ds = ds[split]
    return [Record(row, f"{path}[{split}]:row {i}") for i, row in enumerate(ds)]


# ---------------------------------------------------------------------------------------------------- tokenising
def detect_format(record: Record, config: DataConfig) -> str:
    keys = record.fields
    if config.messages_field in keys:
        return "chat"
    if config.prompt_field in keys and config.completion_field in keys:
        return "instruction"
    if config.text_field in keys and config.label_field in keys:
        return "classification"
    if config.text_field in keys:
        return "text"
    raise LorakitError(f"{record.source}: cannot tell the data format from the fields {sorted(keys)}. Expected "
                       f"{config.prompt_field!r}+{config.completion_field!r}, {config.messages_field!r}, "
                       f"{config.text_field!r} (+{config.label_field!r}); set data.format and the *_field names.")


def _field(record: Record, name: str, kind: type | tuple = str) -> Any:
    if name not in record.fields:
        raise LorakitError(f"{record.source}: missing field {name!r}; the record has fields {sorted(record.fields)}. "
                           "Set the matching data.*_field option.")
    value = record.fields[name]
    if not isinstance(value, kind):
        raise LorakitError(f"{record.source}: field {name!r} must be {getattr(kind, '__name__', kind)}, "
                           f"got {type(value).__name__} ({value!r:.60}).")
    return value


def _has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def prompt_ids(tokenizer, prompt: str, chat_template: bool = True) -> list[int]:
    """The token ids a model sees before its answer, as in training (use these to generate)."""
    if chat_template and _has_template(tokenizer):
        return _render(tokenizer, [{"role": "user", "content": prompt}], generation_prompt=True)
    return list(tokenizer(prompt).input_ids)


def _eos(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise LorakitError("The tokenizer has no EOS token; set tokenizer.eos_token before training.")
    return tokenizer.eos_token_id


def _instruction(record: Record, tokenizer, config: DataConfig) -> Example:
    prompt = _field(record, config.prompt_field)
    completion = _field(record, config.completion_field)
    p = prompt_ids(tokenizer, prompt, config.chat_template)
    c = list(tokenizer(completion, add_special_tokens=False).input_ids) + [_eos(tokenizer)]
    labels = (p if config.train_on_prompt else [IGNORE_INDEX] * len(p)) + c
    return Example(p + c, labels, record.source, prompt_len=len(p), target_text=completion)


def _chat(record: Record, tokenizer, config: DataConfig) -> Example:
    messages = _field(record, config.messages_field, list)
    if not _has_template(tokenizer):
        raise LorakitError(f"{record.source}: chat messages need a tokenizer with a chat template; this one has none.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise LorakitError(f"{record.source}: message {i} must be {{'role': str, 'content': str}}, got {m!r:.80}.")
    if not any(m["role"] == "assistant" for m in messages):
        raise LorakitError(f"{record.source}: no assistant message, so there is nothing to learn.")
    ids: list[int] = []
    labels: list[int] = []
    prompt_len = 0
    for i, m in enumerate(messages):
        # Render the conversation up to this turn; the new tokens are this turn's. Assistant turns start after the
        # generation prompt, so that the header stays masked and only the answer (and its end token) trains.
        before = _render(tokenizer, messages[:i], generation_prompt=True) if m["role"] == "assistant" and i else ids
        upto = _render(tokenizer, messages[:i + 1], generation_prompt=False)
        if upto[:len(before)] != before or upto[:len(ids)] != ids:
            raise LorakitError(f"{record.source}: the chat template does not render turn {i} as an extension of the "
                               "earlier turns, so prompt masking is impossible; use the instruction format instead.")
        if m["role"] == "assistant":
            labels += [IGNORE_INDEX] * (len(before) - len(ids)) + upto[len(before):]
            prompt_len = prompt_len or len(before)
        else:
            labels += (upto[len(ids):] if config.train_on_prompt else [IGNORE_INDEX] * (len(upto) - len(ids)))
        ids = upto
    eos = _eos(tokenizer)
    if eos not in [t for t in labels if t != IGNORE_INDEX]:
        ids, labels = ids + [eos], labels + [eos]
    return Example(ids, labels, record.source, prompt_len=prompt_len)


def _text(record: Record, tokenizer, config: DataConfig) -> Example:
    ids = list(tokenizer(_field(record, config.text_field)).input_ids) + [_eos(tokenizer)]
    return Example(ids, list(ids), record.source)


def _classification(record: Record, tokenizer, config: DataConfig, label_ids: dict[Any, int]) -> Example:
    text = _field(record, config.text_field)
    pair = _field(record, config.text_pair_field) if config.text_pair_field else None
    label = _field(record, config.label_field, (str, int))
    if label not in label_ids:
        raise LorakitError(f"{record.source}: label {label!r} is not one of the training labels {sorted(label_ids, key=str)}.")
    ids = tokenizer(text, pair, truncation=False).input_ids
    return Example(list(ids), label_ids[label], record.source)


MAX_CLASSES = 100_000


def _num_classes(labels: set[int]) -> int:
    """Integer labels are class ids 0..max; refuse negative ones and absurd maxima (a typo would allocate a table
    of that many classes)."""
    low, high = min(labels), max(labels)
    if low < 0 or high >= MAX_CLASSES:
        raise LorakitError(f"Integer labels are class ids and must be in 0..{MAX_CLASSES - 1}; got labels from {low} "
                           f"to {high}. Use string labels, or renumber the classes from 0.")
    return high + 1


def label_mapping(records: Sequence[Record], config: DataConfig) -> dict[Any, int]:
    """Class ids: integer labels map to themselves, string labels to their sorted position."""
    labels = {_field(r, config.label_field, (str, int)) for r in records}
    if all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        return {v: v for v in range(_num_classes(labels))}
    if all(isinstance(v, str) for v in labels):
        # CSV labels arrive as strings: "0", "1" stay numeric.
        if all(v.lstrip("-").isdigit() for v in labels):
            return {str(v): v for v in range(_num_classes({int(v) for v in labels}))}
        return {v: i for i, v in enumerate(sorted(labels))}
    raise LorakitError(f"Labels mix strings and integers: {sorted(labels, key=str)[:10]}; use one kind.")


def tokenize(records: Sequence[Record], tokenizer, config: DataConfig, fmt: str | None = None,
             label_ids: dict[Any, int] | None = None) -> TokenizedData:
    """Token ids and labels for every record, truncated to `config.max_length` (the count is reported)."""
    if not records:
        raise LorakitError("The dataset is empty: no records to train on.")
    fmt = fmt or (config.format if config.format != "auto" else detect_format(records[0], config))
    if fmt == "classification" and label_ids is None:
        label_ids = label_mapping(records, config)
    examples, truncated, dropped = [], 0, 0
    for record in records:
        if fmt == "instruction":
            ex = _instruction(record, tokenizer, config)
        elif fmt == "chat":
            ex = _chat(record, tokenizer, config)
        elif fmt == "text":
            ex = _text(record, tokenizer, config)
        else:
            ex = _classification(record, tokenizer, config, label_ids)
        if len(ex.input_ids) > config.max_length:
            truncated += 1
            ex.input_ids = ex.input_ids[:config.max_length]
            if isinstance(ex.labels, list):
                ex.labels = ex.labels[:config.max_length]
                if all(t == IGNORE_INDEX for t in ex.labels[1:]):  # label 0 is never predicted (no previous token)
                    dropped += 1
                    continue
        examples.append(ex)
    if not examples:
        raise LorakitError(f"Every one of the {len(records)} examples lost all its target tokens to truncation at "
                           f"max_length={config.max_length}; raise data.max_length.")
    return TokenizedData(examples, fmt, truncated, dropped, label_ids if fmt == "classification" else None)


def show_example(example: Example, tokenizer) -> str:
    """The tokens of one example as the model sees them: masked (prompt) spans in ⟦…⟧, trained spans plain."""
    if not isinstance(example.labels, list):
        return f"{tokenizer.decode(example.input_ids)!r} -> label {example.labels}"
    parts, run, masked = [], [], None
    for tok, lab in zip(example.input_ids, example.labels):
        m = lab == IGNORE_INDEX
        if masked is not None and m != masked:
            parts.append((masked, run))
            run = []
        masked = m
        run.append(tok)
    parts.append((masked, run))
    text = "".join(f"⟦{tokenizer.decode(ids)}⟧" if m else tokenizer.decode(ids) for m, ids in parts)
    trained = sum(1 for lab in example.labels if lab != IGNORE_INDEX)
    return (f"{example.source}: {len(example.input_ids)} tokens, {trained} with loss (masked spans in ⟦…⟧):\n{text}")


# ---------------------------------------------------------------------------------------------------- batching
def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool = True, shuffle: bool = True) -> list[list[int]]:
    """The batches (lists of example indices) of one epoch, a pure function of (seed, epoch): a resumed run can
    skip straight to any batch. With `group_by_length`, a shuffled pool of 50 batches at a time is sorted by length
    and cut into batches, and the batch order is shuffled again."""
    n = len(lengths)
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=gen).tolist() if shuffle else list(range(n))
    if group_by_length:
        pool = batch_size * 50
        order = [i for s in range(0, n, pool) for i in sorted(order[s:s + pool], key=lambda i: -lengths[i])]
    batches = [order[s:s + batch_size] for s in range(0, n, batch_size)]
    if group_by_length and shuffle:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
    return batches


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest example of the batch (right padding); padded labels are -100."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    per_token = isinstance(examples[0].labels, list)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long) if per_token else \
        torch.tensor([e.labels for e in examples], dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        if per_token:
            labels[i, :n] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    """How many targets the batch's loss averages over (shifted labels for language models)."""
    labels = batch["labels"]
    return int((labels[:, 1:] != IGNORE_INDEX).sum()) if labels.dim() == 2 else labels.shape[0]


def iterate_batches(data: TokenizedData, batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Fixed-order batches (for evaluation), grouped by length to pad little."""
    lengths = [len(e.input_ids) for e in data.examples]
    for idx in epoch_batches(lengths, batch_size, 0, 0, group_by_length=True, shuffle=False):
        yield collate([data.examples[i] for i in idx], pad_id)


def split_records(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out `fraction` of the records (seeded) for validation."""
    if fraction <= 0:
        return records, []
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    k = max(1, math.floor(len(records) * fraction))
    held = sorted(order[:k])
    keep = sorted(order[k:])
    if not keep:
        raise LorakitError(f"data.eval_fraction={fraction} leaves no training records out of {len(records)}.")
    return [records[i] for i in keep], [records[i] for i in held]
