"""What `lorakit eval` scores a model on: the user's own file (read as training reads it) or a preset.

Every source goes through `data.records.read_records` and the same field options as training (`format`,
`prompt_field`, `completion_field`, `messages_field`, `text_field`, `text_pair_field`, `label_field`, `chat_template`),
so a file that trains also evaluates, and a bad record is reported by file and line in the same words.

A preset is only a data source + a format + its field names + default metrics: "e2e" is the staged E2E file read as
instructions (the prompt built from `meaning_representation`, every reference of an MR kept), the GLUE tasks are the
staged GLUE files read as classification (the presets are defined in `eval.config`). Formats:

- instruction: the prompt (in the chat template, as in training) is continued; the completion field is the reference
  (a string, or a list of strings when an input has several references).
- chat: the messages before the last assistant turn are the prompt; that turn's content is the reference.
- classification: a text (and optional pair) and a label (a string or a class id); a model chooses with its
  sequence-classification head (`evaluate.predict_classes`) or, a causal LM, among the label strings
  (`evaluate.predict_choices`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorakit.data.config import DataConfig
from lorakit.data.records import Record, label_mapping, prompt_ids
from lorakit.errors import LorakitError
from lorakit.eval.config import EVAL_FORMATS, Preset


@dataclass
class EvalExample:
    source: str
    """"file:line", as in training's errors."""
    prompt: str
    """What the model is asked (the prompt text, the last user turn, or the text to classify)."""
    prompt_ids: list[int] = field(default_factory=list)
    """Generation: the tokens the model continues (chat template applied as in training)."""
    references: list[str] = field(default_factory=list)
    texts: tuple[str, ...] = ()
    """Classification: the text, or the text pair."""
    label: Any = None
    """Classification: the class id (or the number, for a regression preset such as stsb)."""


@dataclass
class EvalSet:
    examples: list[EvalExample]
    format: str
    label_names: list[str] | None = None
    """Classification: class id -> label as written in the file."""
    regression: bool = False


def read_eval_set(records: list[Record], tokenizer, data: DataConfig, preset: Preset | None = None) -> EvalSet:
    """The examples of `records` (from `read_records`) in `data.format` with `data`'s field names. Classification
    needs no tokenizer (pass None); the other formats tokenize their prompts as training does."""
    if data.format not in EVAL_FORMATS[1:]:
        raise LorakitError(f"Cannot evaluate the {data.format!r} format; allowed: {list(EVAL_FORMATS[1:])}.")
    if data.format == "classification":
        return _classification(records, data, preset)
    read = _instruction if data.format == "instruction" else _chat
    return EvalSet([read(r, tokenizer, data, preset) for r in records], data.format)


def _field(record: Record, name: str, kinds: tuple[type, ...], what: str, option: str) -> Any:
    if name not in record.fields:
        raise LorakitError(f"{record.source}: missing field {name!r}; the record has fields {sorted(record.fields)}. "
                           f"Set --{option} (data.{option.replace('-', '_')} in training) to the field that holds the "
                           f"{what}.")
    value = record.fields[name]
    if not isinstance(value, kinds) or isinstance(value, bool):
        allowed = " or ".join("a list of strings" if k is list else k.__name__ for k in kinds)
        raise LorakitError(f"{record.source}: field {name!r} must be {allowed}, got {type(value).__name__} "
                           f"({value!r:.60}).")
    return value


def _instruction(record: Record, tokenizer, data: DataConfig, preset: Preset | None) -> EvalExample:
    prompt = _field(record, data.prompt_field, (str,), "prompt", "prompt-field")
    refs = _field(record, data.completion_field, (str, list), "reference completion", "completion-field")
    refs = [refs] if isinstance(refs, str) else refs
    if not refs or not all(isinstance(r, str) for r in refs):
        raise LorakitError(f"{record.source}: field {data.completion_field!r} must be a string or a non-empty list of "
                           f"strings (several references), got {refs!r:.80}.")
    if preset is not None and preset.prompt_template:  # the outputs show the input (the MR), not the template
        ids = list(tokenizer(preset.prompt_template.format(mr=prompt)).input_ids)
    else:
        ids = prompt_ids(tokenizer, prompt, data.chat_template)
    return EvalExample(record.source, prompt, ids, refs)


def _chat(record: Record, tokenizer, data: DataConfig, preset: Preset | None) -> EvalExample:
    from lorakit.inference.generate import encode_chat

    messages = _field(record, data.messages_field, (list,), "chat messages", "messages-field")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise LorakitError(f"{record.source}: message {i} must be {{'role': str, 'content': str}}, got {m!r:.80}.")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise LorakitError(f"{record.source}: no assistant message, so there is no reference answer; the roles are "
                           f"{[m['role'] for m in messages]}. End each conversation with the expected assistant turn.")
    if not getattr(tokenizer, "chat_template", None):
        raise LorakitError(f"{record.source}: chat messages need a tokenizer with a chat template; this one has none.")
    user = [m["content"] for m in messages[:last] if m["role"] == "user"]
    return EvalExample(record.source, user[-1] if user else "", encode_chat(tokenizer, messages[:last]),
                       [messages[last]["content"]])


def _classification(records: list[Record], data: DataConfig, preset: Preset | None) -> EvalSet:
    regression = preset is not None and preset.regression
    label_ids = None if regression else label_mapping(records, data)
    examples = []
    for r in records:
        text = _field(r, data.text_field, (str,), "text to classify", "text-field")
        pair = _field(r, data.text_pair_field, (str,), "second text", "text-pair-field") if data.text_pair_field else None
        if regression:
            label = float(_field(r, data.label_field, (int, float), "label", "label-field"))
        else:
            value = _field(r, data.label_field, (str, int), "label", "label-field")
            if value not in label_ids:
                raise LorakitError(f"{r.source}: label {value!r} is not one of {sorted(label_ids, key=str)}.")
            label = label_ids[value]
        texts = (text,) if pair is None else (text, pair)
        examples.append(EvalExample(r.source, "\n".join(texts), texts=texts, label=label))
    names = None if regression else [str(k) for k, _ in sorted(label_ids.items(), key=lambda kv: kv[1])]
    return EvalSet(examples, "classification", names, regression)

