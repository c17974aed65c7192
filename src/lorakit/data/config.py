"""`DataConfig`: where the training data is and how to read it (the `data` section of a training config).

Kept apart from the readers in `records` so the CLI can build its options from it without loading torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from lorakit.validation import check, is_int, is_number

FORMATS = ("auto", "instruction", "chat", "text", "classification")


@dataclass
class DataConfig:
    """Where the training data is and how to read it."""

    train_file: str | None = None
    """The training data: a .jsonl/.json/.csv/.parquet file or a saved Hugging Face datasets folder."""
    eval_file: str | None = None
    """Validation data in the same format (optional)."""
    eval_fraction: float = 0.0
    """Without eval_file: hold out this fraction of the training records (after a seeded shuffle) for validation."""
    format: str = "auto"
    """instruction, chat, text, classification, or auto (guessed from the first record's fields)."""
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    text_field: str = "text"
    text_pair_field: str | None = None
    """Second sentence for sentence-pair classification (e.g. "sentence2")."""
    label_field: str = "label"
    split: str = "train"
    """Which split to read from a saved DatasetDict folder."""
    chat_template: bool = True
    """Wrap instruction prompts in the tokenizer's chat template (when it has one)."""
    train_on_prompt: bool = False
    """Also compute the loss on prompt tokens (default: completion tokens only)."""
    max_length: int = 512
    """Longer examples are truncated (and counted)."""
    group_by_length: bool = False
    """Batch examples of similar length together, in a seeded random order: less padding where packing is off, but
    the batches are no longer random samples of the data, which can cost quality (E2E: eval loss 1.8% higher)."""
    packing: bool | str = False
    """Pack each micro-batch's examples back to back in rows as wide as its longest example (positions restart and
    attention cannot cross examples, so the loss is the padded batch's). Off by default: under the default token
    budget (optim.max_batch_tokens) padded micro-batches run as length-sorted passes that pad less than packed rows
    (chat set 11% vs 20%, E2E 17% vs 23%); packing pays with max_batch_tokens: null (chat 36% -> 20% padding). auto:
    on for causal-LM training in one process when the model keeps packed examples apart (checked at start-up), else
    off; the choice is printed and saved in the run's config."""

    def __post_init__(self) -> None:
        check(self, "Invalid data config")

    def problems(self, prefix: str = "data.") -> list[str]:
        """Every invalid value, each naming its key (`prefix` + field, as in a training config)."""
        out = []
        if self.format not in FORMATS:
            out.append(f"{prefix}format must be one of {FORMATS}, got {self.format!r}")
        if not is_int(self.max_length) or self.max_length < 2:
            out.append(f"{prefix}max_length must be an integer >= 2, got {self.max_length!r}")
        if not is_number(self.eval_fraction) or not 0.0 <= self.eval_fraction < 1.0:
            out.append(f"{prefix}eval_fraction must be in [0, 1), got {self.eval_fraction!r}")
        for name in ("prompt_field", "completion_field", "messages_field", "text_field", "label_field", "split"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                out.append(f"{prefix}{name} must be a non-empty string, got {getattr(self, name)!r}")
        for name in ("train_file", "eval_file", "text_pair_field"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), (str, os.PathLike)):
                out.append(f"{prefix}{name} must be a string or null, got {getattr(self, name)!r}")
        for name in ("chat_template", "train_on_prompt", "group_by_length"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"{prefix}{name} must be true or false, got {getattr(self, name)!r}")
        if self.packing not in (True, False, "auto") or not isinstance(self.packing, (bool, str)):  # 1 == True
            out.append(f"{prefix}packing must be true, false or auto, got {self.packing!r}")
        return out
